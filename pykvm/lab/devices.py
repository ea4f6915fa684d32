"""Facts about the lab machine (L1) that tests and examples rely on.

The QEMU command line pins every emulated PCI device to a fixed slot (``addr=``), so
these addresses are stable across runs and kernels. The NVMe disk is written by
:mod:`pykvm.lab.image` with a self-describing pattern: sector ``n`` (512 bytes) is
``NVME_DISK_MAGIC + n.to_bytes(8, "little")`` followed by a byte ramp starting at
``n % 256``, so any read can be checked with :func:`nvme_sector`.
"""
from __future__ import annotations

# PCI functions of L1, as pinned on the QEMU command line (domain 0000, bus 00).
EDU_BDF = "0000:00:04.0"
NVME_BDF = "0000:00:05.0"
TESTDEV_BDF = "0000:00:06.0"

# vendor:device IDs as sysfs shows them (``/sys/bus/pci/devices/BDF/{vendor,device}``).
EDU_ID = (0x1234, 0x11E8)
NVME_ID = (0x1B36, 0x0010)
TESTDEV_ID = (0x1B36, 0x0005)

# The serial number QEMU's NVMe controller reports in IDENTIFY CONTROLLER.
NVME_SERIAL = "pykvm-lab-nvme"

# The NVMe disk: size and the pattern of each 512-byte sector.
NVME_SECTOR_SIZE = 512
NVME_DISK_SIZE = 64 * 1024 * 1024
NVME_DISK_MAGIC = b"PYKVM-LAB-NVME\n"

# Where L1 sees the per-run writable share (also in env PYKVM_LAB_OUT inside L1).
LAB_OUT_GUEST = "/tmp/lab-out"

_RAMP = bytes(range(256)) * 3
_RAMP_LEN = NVME_SECTOR_SIZE - len(NVME_DISK_MAGIC) - 8


def nvme_sector(lba: int) -> bytes:
    """The 512 bytes the lab's NVMe disk holds at logical block ``lba``."""
    start = lba % 256
    return NVME_DISK_MAGIC + lba.to_bytes(8, "little") + _RAMP[start : start + _RAMP_LEN]
