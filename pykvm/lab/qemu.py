"""Booting L1: QEMU's command line and a supervised QEMU process.

L1 is a q35 machine under TCG (QEMU's software CPU, so no host KVM is needed) with an
emulated Intel IOMMU (``intremap=on`` needs ``kernel-irqchip=split``; ``caching-mode=on``
makes QEMU see every IOMMU mapping, which VFIO in L1 requires) and the PCI devices of
:mod:`pykvm.lab.devices` at pinned slots. ``-nodefaults`` keeps the default NIC and VGA
out, so the device list is exactly what we add. A conventional PCI bridge carries a
second edu and NVMe that Linux puts in one IOMMU group with it (no ACS below a PCI bridge).
"""
from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Callable, Deque, List, Optional

from pykvm.lab.devices import (
    EDU_BDF, GROUP_BRIDGE_BDF, GROUP_EDU_BDF, GROUP_NVME_BDF, GROUP_NVME_SERIAL, NVME_BDF, NVME_SERIAL, TESTDEV_BDF,
)
from pykvm.lab.guest import HOST_TAG, OUT_TAG
from pykvm.lab.image import LabImage

# no_timer_check: under TCG on a busy host the IO-APIC timer probe can miss its window and
# panic ("timer doesn't work through Interrupt-remapped IO-APIC"); QEMU's timer is fine.
KERNEL_CMDLINE = "console=ttyS0 panic=-1 quiet loglevel=3 intel_iommu=on iommu=pt no_timer_check"
# L1's CPU: everything TCG emulates except ERMS and FSRM. TCG runs `rep movsb`/`rep stosb`
# one byte per iteration, and with those flags L1's kernel (clear_page_erms, copy_user) and
# glibc's memcpy/memset choose them: measured in L1, faulting in 64 MiB took 261 ms with
# them and 137 ms without, `dd` of 512 MiB from /dev/zero 0.63 s against 0.16 s, and an L2
# Linux boot 6.4 s against 4.7 s (under QEMU and pykvm alike). Real CPUs with ERMS copy
# fast; this keeps L1's speed closer in proportion to a real machine's.
L1_CPU = "max,erms=off,fsrm=off"


def _slot(bdf: str) -> str:
    """``0000:00:05.0`` -> ``05.0`` (QEMU's ``addr=`` on the device's bus)."""
    return bdf.split(":", 2)[2]


def _bridge_group(disk: Path) -> List[str]:
    """The ``pci-bridge`` (its own chassis, no SHPC hotplug controller) at GROUP_BRIDGE_BDF
    with an edu and an NVMe on ``disk`` (``snapshot=on``: never modified) behind it."""
    return [
        "-device", f"pci-bridge,id=lab-bridge,chassis_nr=1,shpc=off,addr={_slot(GROUP_BRIDGE_BDF)}",
        "-device", f"edu,bus=lab-bridge,addr={_slot(GROUP_EDU_BDF)}",
        "-drive", f"file={disk},if=none,id=nvg,format=raw,snapshot=on",
        "-device", f"nvme,drive=nvg,serial={GROUP_NVME_SERIAL},bus=lab-bridge,addr={_slot(GROUP_NVME_BDF)}",
    ]


def qemu_argv(
    image: LabImage,
    out_dir: Path,
    *,
    memory_mb: int,
    cpus: int,
    interactive: bool = False,
    host_root: str = "/",
    qmp: Optional[Path] = None,
) -> List[str]:
    """The QEMU command line for L1; ``interactive`` multiplexes the monitor on stdio;
    ``qmp`` is a Unix socket path where QEMU listens for QMP (see :mod:`pykvm.lab.monitor`)."""
    console = (
        ["-chardev", "stdio,id=con,mux=on,signal=off", "-serial", "chardev:con",
         "-mon", "chardev=con,mode=readline"]
        if interactive
        else ["-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con"]
    )
    return [
        str(image.qemu),
        "-accel", "tcg", "-cpu", L1_CPU, "-M", "q35,kernel-irqchip=split",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-m", str(memory_mb), "-smp", str(cpus),
        "-device", "intel-iommu,intremap=on,caching-mode=on",
        "-device", f"edu,addr={_slot(EDU_BDF)}",
        "-drive", f"file={image.disk_path},if=none,id=nvm,format=raw,snapshot=on",
        "-device", f"nvme,drive=nvm,serial={NVME_SERIAL},addr={_slot(NVME_BDF)}",
        "-device", f"pci-testdev,addr={_slot(TESTDEV_BDF)}",
        *(_bridge_group(image.group_disk_path) if image.group_disk_path else []),
        "-virtfs", f"local,path={host_root},mount_tag={HOST_TAG},security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={out_dir},mount_tag={OUT_TAG},security_model=none,multidevs=remap",
        "-kernel", str(image.kernel_path), "-initrd", str(image.initrd_path),
        "-append", KERNEL_CMDLINE,
        *console,
        *(["-qmp", f"unix:{qmp},server=on,wait=off"] if qmp else []),
    ]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when its parent dies (PR_SET_PDEATHSIG), so a
    killed Python (SIGTERM, SIGKILL) never leaves a QEMU behind."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class QemuProcess:
    """QEMU with its console read line by line on a thread; killed by :meth:`kill`.

    ``on_line`` is called on the reader thread for each console line. QEMU runs in its
    own session, so a Ctrl-C reaches Python, whose handler then kills QEMU.
    """

    def __init__(self, argv: List[str], on_line: Callable[[str], None]) -> None:
        self.stderr_tail: Deque[str] = collections.deque(maxlen=50)
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        self._readers = [
            threading.Thread(target=self._pump, args=(self._proc.stdout, on_line), daemon=True),
            threading.Thread(target=self._pump, args=(self._proc.stderr, self.stderr_tail.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _pump(stream, sink: Callable[[str], None]) -> None:
        for raw in iter(stream.readline, b""):
            sink(raw.decode("utf-8", "replace").rstrip("\r\n"))

    def poll(self) -> Optional[int]:
        return self._proc.poll()

    def cpu_seconds(self) -> float:
        """CPU time QEMU has used (user + system, all threads): flat while L1 is idle."""
        try:
            with open(f"/proc/{self._proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def finish_reading(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the readers to drain what QEMU printed before exiting."""
        for reader in self._readers:
            reader.join(timeout)

    def kill(self) -> None:
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._proc.wait(10)
        self.finish_reading()
