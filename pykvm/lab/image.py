"""Preparing the lab: tools, Debian's kernel, L1's initramfs and the NVMe disks, cached.

Everything lives under :func:`cache_root` (``$PYKVM_LAB_CACHE``, else
``$XDG_CACHE_HOME/pykvm/lab``, else ``~/.cache/pykvm/lab``), the kernel tree keyed by its
version (``<version>/kernel``). Each artifact is built next to its final name and renamed
into place, so an interrupted prepare leaves nothing that looks valid; a re-run only checks
what exists (well under a second).

The kernel is Debian's ``linux-image-<version>`` (the one ``linux-image-amd64`` depends
on, or ``$PYKVM_LAB_KERNEL``), fetched with ``apt-get download`` by its exact name and
unpacked with ``dpkg -x``; ``depmod -b`` then writes ``modules.dep`` for the unpacked tree.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

from pykvm.lab.devices import (
    GROUP_NVME_DISK_MAGIC, GROUP_NVME_DISK_SIZE, NVME_DISK_MAGIC, NVME_DISK_SIZE, NVME_SECTOR_SIZE, nvme_sector,
)
from pykvm.lab.guest import L1_MODULES, l1_init_script
from pykvm.lab.initramfs import build_initramfs

Progress = Callable[[str], None]

# Debian package providing each tool the lab needs.
TOOLS: Dict[str, str] = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "depmod": "kmod",
}
_KERNEL_RE = re.compile(r"^\s*Depends:\s*linux-image-(\d+\.\d+\.\d+-\d+-amd64)\s*$", re.M)
_STAMP = ".complete"
_STALE_AFTER = 24 * 3600  # seconds before an initramfs of an older init is removed


class LabUnavailable(RuntimeError):
    """The lab cannot be prepared here (missing tool, kernel unreachable, ...)."""


def stderr_progress(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    if os.environ.get("PYKVM_LAB_CACHE"):
        return Path(os.environ["PYKVM_LAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pykvm" / "lab"


@dataclass(frozen=True)
class LabImage:
    """Paths of a prepared lab."""

    kernel_version: str
    kernel_path: Path       # vmlinuz
    modules_dir: Path       # lib/modules/<version> with modules.dep
    initrd_path: Path       # L1's initramfs
    disk_path: Path         # the NVMe disk (see pykvm.lab.devices)
    qemu: Path
    busybox: Path
    group_disk_path: Optional[Path] = None  # the second NVMe's disk; None: no bridge group in L1


def _run(argv: List[str], **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)
    except FileNotFoundError as exc:
        raise LabUnavailable(f"{argv[0]} not found: install it (see .ci/lab-deps)") from exc
    except subprocess.CalledProcessError as exc:
        raise LabUnavailable(
            f"`{' '.join(argv)}` failed (exit {exc.returncode}):\n{(exc.stderr or exc.stdout).strip()}"
        ) from exc


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP (dynamic loader) program header."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit only
            return False
        order = "little" if header[5] == 1 else "big"
        phoff = int.from_bytes(header[32:40], order)
        phentsize = int.from_bytes(header[54:56], order)
        phnum = int.from_bytes(header[56:58], order)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(
        int.from_bytes(table[i * phentsize : i * phentsize + 4], order) != 3  # PT_INTERP
        for i in range(phnum)
    )


def _find_busybox() -> Optional[Path]:
    for candidate in (os.environ.get("PYKVM_LAB_BUSYBOX"), "/bin/busybox", shutil.which("busybox")):
        if candidate and Path(candidate).is_file() and is_static_elf(Path(candidate)):
            return Path(candidate)
    return None


def _find_tool(name: str) -> Optional[Path]:
    if name == "busybox":
        return _find_busybox()
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    return Path(found) if found else None


def ensure_tools(install: bool, progress: Progress) -> Dict[str, Path]:
    """Locate the tools; with ``install`` (and root) apt-get install the missing ones."""
    missing = [name for name in TOOLS if _find_tool(name) is None]
    if missing and install and os.geteuid() == 0:
        packages = sorted({TOOLS[name] for name in missing})
        progress(f"installing {' '.join(packages)} (apt-get)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        _run(["apt-get", "update"], env=env)
        _run(["apt-get", "install", "-y", "--no-install-recommends", *packages], env=env)
        missing = [name for name in TOOLS if _find_tool(name) is None]
    if missing:
        packages = " ".join(sorted({TOOLS[name] for name in missing}))
        raise LabUnavailable(
            f"missing {', '.join(missing)}: run `python3 -m pykvm lab prepare` as root "
            f"or `apt-get install {packages}`"
        )
    return {name: _find_tool(name) for name in TOOLS}  # type: ignore[misc]


def parse_kernel_depends(apt_cache_output: str) -> Optional[str]:
    """The kernel version that ``apt-cache depends linux-image-amd64`` names."""
    match = _KERNEL_RE.search(apt_cache_output)
    return match.group(1) if match else None


def _cached_kernels() -> List[str]:
    root = cache_root()
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob("*/kernel/" + _STAMP))


def resolve_kernel_version(progress: Progress) -> str:
    """``$PYKVM_LAB_KERNEL``, else Debian's current ``linux-image-amd64`` kernel, else the
    newest cached one (offline)."""
    if os.environ.get("PYKVM_LAB_KERNEL"):
        return os.environ["PYKVM_LAB_KERNEL"]
    for attempt in range(2):
        try:
            out = subprocess.run(
                ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True
            ).stdout
        except FileNotFoundError:
            break
        version = parse_kernel_depends(out)
        if version:
            return version
        cached = _cached_kernels()
        if cached:
            return cached[-1]
        if attempt == 0 and os.geteuid() == 0:
            progress("apt-get update (no package lists yet)")
            subprocess.run(["apt-get", "update"], capture_output=True)
    raise LabUnavailable(
        "cannot resolve the kernel: `apt-cache depends linux-image-amd64` names no "
        "linux-image-<version> (run `apt-get update`) and none is cached; "
        "or set PYKVM_LAB_KERNEL=6.1.0-N-amd64"
    )


def ensure_kernel(version: str, progress: Progress) -> Path:
    """Download, unpack and depmod ``linux-image-<version>``; return the tree's root."""
    base = cache_root() / version
    tree = base / "kernel"
    if (tree / _STAMP).exists():
        return tree
    base.mkdir(parents=True, exist_ok=True)
    download = base / "download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir()
    package = f"linux-image-{version}"
    progress(f"downloading {package} (apt-get download, ~70 MB)")
    try:
        _run(["apt-get", "download", package], cwd=download)
    except LabUnavailable:
        shutil.rmtree(download)
        with contextlib.suppress(OSError):
            base.rmdir()  # only if nothing else of this version is cached
        raise
    debs = [p for p in download.iterdir() if p.name.startswith(package + "_") and p.suffix == ".deb"]
    if len(debs) != 1:
        raise LabUnavailable(f"apt-get download {package} left {[p.name for p in download.iterdir()]}")
    staging = base / "kernel.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    progress(f"unpacking {debs[0].name} (dpkg -x)")
    _run(["dpkg", "-x", str(debs[0]), str(staging)])
    progress(f"depmod -b {staging} {version}")
    _run([str(_find_tool("depmod") or "depmod"), "-b", str(staging), version])
    (staging / _STAMP).write_text(debs[0].name + "\n")
    shutil.rmtree(tree, ignore_errors=True)
    staging.rename(tree)
    shutil.rmtree(download)
    return tree


def modules_dir_of(tree: Path, version: str) -> Path:
    """Debian ships modules under /lib/modules (or /usr/lib/modules after the usr merge)."""
    for prefix in ("lib", "usr/lib"):
        candidate = tree / prefix / "modules" / version
        if (candidate / "modules.dep").exists():
            return candidate
    raise LabUnavailable(f"no modules.dep for {version} in {tree}: remove {tree.parent} and re-run prepare")


def ensure_initrd(version: str, modules_dir: Path, busybox: Path, progress: Progress) -> Path:
    """L1's initramfs, named by a hash of what goes in, so a changed init rebuilds it."""
    init = l1_init_script()
    key = hashlib.sha256(
        "\0".join([init, *L1_MODULES, str(busybox.stat().st_size), version]).encode()
    ).hexdigest()[:12]
    path = cache_root() / version / f"l1-initrd-{key}.img"
    if path.exists():
        return path
    progress(f"building L1 initramfs ({', '.join(L1_MODULES)})")
    for stale in path.parent.glob("l1-initrd-*.img"):
        # Another process may have prepared a lab with an older init and boot it later.
        if time.time() - stale.stat().st_mtime > _STALE_AFTER:
            stale.unlink()
    build_initramfs(path, init, L1_MODULES, modules_dir=modules_dir, busybox=busybox)
    return path


def ensure_disk(progress: Progress, name: str = "nvme-disk.img", size: int = NVME_DISK_SIZE,
                magic: bytes = NVME_DISK_MAGIC) -> Path:
    """An NVMe disk image with the pattern of :func:`pykvm.lab.devices.nvme_sector`.

    QEMU opens it with ``snapshot=on``, so a run that writes to the disk never changes it.
    """
    path = cache_root() / name
    if path.exists() and path.stat().st_size == size:
        with open(path, "rb") as f:
            if f.read(NVME_SECTOR_SIZE) == nvme_sector(0, magic):
                return path
    progress(f"writing the NVMe disk image {name} ({size >> 20} MiB)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    chunk = 2048  # sectors per write
    sectors = size // NVME_SECTOR_SIZE
    with open(tmp, "wb") as f:
        for first in range(0, sectors, chunk):
            f.write(b"".join(nvme_sector(lba, magic) for lba in range(first, min(first + chunk, sectors))))
    tmp.replace(path)
    return path


@contextlib.contextmanager
def _cache_lock(progress: Progress) -> Iterator[None]:
    """Serialise preparation between processes (several test runs may start at once)."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "w")
    except OSError:  # a read-only cache (the host's, seen from inside L1): nobody can change it
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process preparing {root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prepare(*, install: bool = False, progress: Progress = stderr_progress) -> LabImage:
    """Make the lab bootable: tools, kernel, initramfs, disks. Raises LabUnavailable."""
    tools = ensure_tools(install, progress)
    with _cache_lock(progress):
        return _prepare_locked(tools, progress)


def _prepare_locked(tools: Dict[str, Path], progress: Progress) -> LabImage:
    version = resolve_kernel_version(progress)
    tree = ensure_kernel(version, progress)
    modules_dir = modules_dir_of(tree, version)
    kernel = tree / "boot" / f"vmlinuz-{version}"
    if not kernel.exists():
        raise LabUnavailable(f"{kernel} is missing: remove {tree.parent} and re-run prepare")
    initrd = ensure_initrd(version, modules_dir, tools["busybox"], progress)
    disk = ensure_disk(progress)
    group_disk = ensure_disk(progress, "nvme-group-disk.img", GROUP_NVME_DISK_SIZE, GROUP_NVME_DISK_MAGIC)
    return LabImage(version, kernel, modules_dir, initrd, disk, tools["qemu-system-x86_64"], tools["busybox"],
                    group_disk)
