"""What an L2 guest needs: a kernel, a busybox initramfs, devices on vfio-pci, a bounded run.

Tests, the demo, examples and benches boot a Linux guest under ``pykvm run`` with host
PCI devices passed through. Inside the lab (L1) the guest kernel is the one L1 runs,
found in the lab's cache by L1's release (the cache is read-only there, so nothing is
prepared); on a real host it is the host's own ``/boot/vmlinuz-$(uname -r)`` with
``/lib/modules/$(uname -r)``.

- :func:`guest_kernel`: ``(bzImage, lib/modules/<release>)`` of that kernel;
- :func:`build_guest_initramfs`: a busybox initramfs with given modules and an ``/init``;
- :func:`vfio_bound`: a context manager that moves PCI functions to vfio-pci
  (:func:`pykvm.host.bind.bind`), waits for their groups' /dev/vfio nodes
  (:func:`await_group_node`) and gives them back (:func:`~pykvm.host.bind.restore`);
- :func:`run_guest`: ``python3 -m pykvm run ...`` in a subprocess with a deadline,
  streaming the guest console line by line; returns status, console and pykvm's log
  (:func:`run_streaming` does the same for any VMM, e.g. QEMU in the benches).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Mapping, Optional, Sequence, Tuple

from pykvm.lab.image import LabUnavailable, cache_root, is_static_elf
from pykvm.lab.initramfs import FileContent, build_initramfs

ROOT = Path(__file__).resolve().parents[2]
GUEST_MEMORY = "256M"

# The head of every guest /init: busybox applets, /proc, /sys, /dev, then the modules.
INIT_PROLOGUE = """#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
/bin/pykvm-load-modules
"""


def guest_kernel(release: Optional[str] = None) -> Tuple[Path, Path]:
    """``(kernel, modules_dir)`` for an L2 guest running the kernel this machine runs.

    In the lab, the lab's cached Debian kernel (``<cache>/<release>/kernel``); elsewhere
    ``/boot/vmlinuz-<release>`` and ``/lib/modules/<release>``.
    """
    release = release or os.uname().release
    tree = cache_root() / release / "kernel"
    candidates = [(tree / "boot" / f"vmlinuz-{release}", tree / prefix / "modules" / release)
                  for prefix in ("lib", "usr/lib")]
    candidates.append((Path(f"/boot/vmlinuz-{release}"), Path(f"/lib/modules/{release}")))
    for kernel, modules in candidates:
        if kernel.is_file() and (modules / "modules.dep").is_file():
            return kernel, modules
    raise LabUnavailable(
        f"no kernel {release} with modules: looked in {tree} (the lab's cache; set PYKVM_LAB_CACHE) "
        f"and /boot, /lib/modules (install linux-image-{release} on a real host)")


def find_busybox() -> Path:
    """A static busybox (the initramfs has no libraries for a dynamic one)."""
    for candidate in (os.environ.get("PYKVM_LAB_BUSYBOX"), "/bin/busybox", shutil.which("busybox")):
        if candidate and Path(candidate).is_file() and is_static_elf(Path(candidate)):
            return Path(candidate)
    raise LabUnavailable("no static busybox: apt-get install busybox-static")


def build_guest_initramfs(path: Path, init_body: str, modules: Sequence[str] = (),
                          extra_files: Optional[Mapping[str, FileContent]] = None,
                          modules_dir: Optional[Path] = None) -> Path:
    """Write an initramfs whose ``/init`` is :data:`INIT_PROLOGUE` (mounts, ``modules``
    loaded in dependency order) followed by ``init_body``; returns ``path``."""
    if modules_dir is None:
        modules_dir = guest_kernel()[1]
    build_initramfs(Path(path), INIT_PROLOGUE + init_body, list(modules), extra_files,
                    modules_dir=modules_dir, busybox=find_busybox())
    return Path(path)


def driver_of(bdf: str) -> Optional[str]:
    """The driver ``bdf`` is bound to now (None if none)."""
    link = Path("/sys/bus/pci/devices") / bdf / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def await_group_node(bdf: str, timeout: float = 10.0) -> Path:
    """``/dev/vfio/<group>`` of ``bdf``, once it exists: vfio-pci creates it when it binds,
    and it may show up a moment later (udev); opening the group before that fails."""
    from pykvm.vfio.group import group_of_device

    node = Path("/dev/vfio") / str(group_of_device(bdf))
    deadline = time.monotonic() + timeout
    while not node.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{node} did not appear within {timeout:g} s of binding {bdf} to vfio-pci")
        time.sleep(0.05)
    return node


@contextlib.contextmanager
def vfio_bound(bdfs: Sequence[str], state_dir: Optional[str] = None) -> Iterator[List[str]]:
    """Move each of ``bdfs`` to vfio-pci for the ``with`` body (each group's /dev/vfio node
    present), then back to the driver it had (the state dir remembers which; a private
    temporary one by default). A device already on vfio-pci stays there."""
    from pykvm.host.bind import bind, restore
    from pykvm.host.sysfs import Root

    root = Root()
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pykvm-bind-"))
        moved: List[str] = []
        try:
            for bdf in bdfs:
                result = bind(root, bdf, state_dir=state_dir)
                if any(c.before != c.after for c in result.changes):
                    moved.append(bdf)
                await_group_node(bdf)
            yield list(bdfs)
        finally:
            for bdf in reversed(moved):
                restore(root, bdf, state_dir=state_dir)


@dataclass
class GuestRun:
    """How a ``pykvm run`` ended: its exit status, the guest console and pykvm's stderr."""

    returncode: int
    console: str
    log: str
    seconds: float

    def detail(self, tail: int = 4000) -> str:
        """For assertion messages: status, console tail and pykvm's messages."""
        return (f"pykvm run exit {self.returncode} after {self.seconds:.1f} s\n"
                f"--- guest console (tail) ---\n{self.console[-tail:]}\n--- pykvm stderr ---\n{self.log[-tail:]}")


def guest_cmdline() -> str:
    """pykvm's default command line plus ``quiet``: every console byte costs exits (LSR
    poll, THR write), dear in nested KVM, so the kernel stays quiet and /init talks."""
    from pykvm.vmm.machine import DEFAULT_CMDLINE  # pykvm.lab does not import the VMM at load

    return DEFAULT_CMDLINE + " quiet"


def pykvm_argv(kernel: Path, initrd: Path, *, vfio: Sequence[str] = (), memory: str = GUEST_MEMORY,
               cpus: int = 1, cmdline: Optional[str] = None, timeout: float = 240.0,
               marker: Optional[str] = None, stats: bool = True, direct: bool = False) -> List[str]:
    """The ``python3 -m pykvm run`` command line for an L2 guest with ``vfio`` passed through
    (``direct``: boot the bzImage's kernel directly, ``--direct``)."""
    cmdline = cmdline or guest_cmdline()
    argv = [sys.executable, "-m", "pykvm", "run", "--kernel", str(kernel), "--initrd", str(initrd),
            "--cpus", str(cpus), "--memory", memory, "--cmdline", cmdline, "--console", "stdio",
            "--timeout", str(timeout)]
    if marker:
        argv += ["--marker", marker]
    if stats:
        argv.append("--stats")
    if direct:
        argv.append("--direct")
    for bdf in vfio:
        argv += ["--vfio", bdf]
    return argv


def run_guest(kernel: Path, initrd: Path, *, vfio: Sequence[str] = (), timeout: float = 240.0,
              prefix: Sequence[str] = (), stream: Optional[Callable[[str], None]] = None,
              **options) -> GuestRun:
    """Boot ``kernel`` + ``initrd`` under ``pykvm run`` and wait (``timeout`` for the guest,
    pykvm's own ``--timeout``, plus a margin after which the process is killed).

    ``prefix`` goes before the command (e.g. ``setpriv ...``); ``stream`` gets each console
    line as the guest prints it; ``options`` are :func:`pykvm_argv`'s.
    """
    argv = [*prefix, *pykvm_argv(kernel, initrd, vfio=vfio, timeout=timeout, **options)]
    return run_streaming(argv, timeout + 60, stream)


def run_streaming(argv: Sequence[str], deadline: float, stream: Optional[Callable[[str], None]] = None) -> GuestRun:
    """Run ``argv`` (a VMM whose stdout is the guest console) with no input, killing it after
    ``deadline`` seconds; ``stream`` gets each stdout line as it comes."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT)
    console: List[str] = []
    log: List[str] = []

    def pump(pipe, sink: List[str], echo: Optional[Callable[[str], None]]) -> None:
        for raw in iter(pipe.readline, b""):
            line = raw.decode(errors="replace").replace("\r", "")
            sink.append(line)
            if echo:
                echo(line.rstrip("\n"))

    readers = [threading.Thread(target=pump, args=(proc.stdout, console, stream), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, log, None), daemon=True)]
    for t in readers:
        t.start()
    try:
        returncode = proc.wait(deadline)
    except subprocess.TimeoutExpired:
        proc.kill()
        returncode = proc.wait()
        log.append(f"\n[l2] {os.path.basename(argv[0])} killed: no exit {deadline:.0f} s after start\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for t in readers:
        t.join(5)
    return GuestRun(returncode, "".join(console), "".join(log), time.monotonic() - started)
