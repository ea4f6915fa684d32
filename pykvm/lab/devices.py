"""Facts about the lab machine (L1) that tests and examples rely on.

The QEMU command line pins every emulated PCI device to a fixed slot (``addr=``), so
these addresses are stable across runs and kernels. The NVMe disk is written by
:mod:`pykvm.lab.image` with a self-describing pattern: sector ``n`` (512 bytes) is
``NVME_DISK_MAGIC + n.to_bytes(8, "little")`` followed by a byte ramp starting at
``n % 256``, so any read can be checked with :func:`nvme_sector`.

Behind a conventional PCI bridge sit a second edu and a second, small NVMe. Conventional
PCI has no ACS and a bridge forwards its devices' DMA under its own requester ID, so the
IOMMU cannot isolate them from each other: Linux puts the bridge and both devices in one
IOMMU group. With L1's ``nvme`` driver on the second NVMe, that group is not viable for
VFIO until both devices leave the host's drivers: the lab's real non-viable group.
"""
from __future__ import annotations

# PCI functions of L1, as pinned on the QEMU command line (domain 0000, bus 00).
EDU_BDF = "0000:00:04.0"
NVME_BDF = "0000:00:05.0"
TESTDEV_BDF = "0000:00:06.0"
# The bridge on bus 0 and the two functions behind it; the firmware numbers the bridge's
# secondary bus 01 (it is the only bridge).
GROUP_BRIDGE_BDF = "0000:00:07.0"
GROUP_EDU_BDF = "0000:01:01.0"
GROUP_NVME_BDF = "0000:01:02.0"

# vendor:device IDs as sysfs shows them (``/sys/bus/pci/devices/BDF/{vendor,device}``).
EDU_ID = (0x1234, 0x11E8)
NVME_ID = (0x1B36, 0x0010)
TESTDEV_ID = (0x1B36, 0x0005)

# The serial number QEMU's NVMe controller reports in IDENTIFY CONTROLLER.
NVME_SERIAL = "pykvm-lab-nvme"
GROUP_NVME_SERIAL = "pykvm-lab-nvme-group"

# The NVMe disk: size and the pattern of each 512-byte sector.
NVME_SECTOR_SIZE = 512
NVME_DISK_SIZE = 64 * 1024 * 1024
NVME_DISK_MAGIC = b"PYKVM-LAB-NVME\n"
# The second NVMe's disk: same layout, its own magic (same length), 1 MiB.
GROUP_NVME_DISK_SIZE = 1024 * 1024
GROUP_NVME_DISK_MAGIC = b"PYKVM-LAB-NVMG\n"

# Where L1 sees the per-run writable share (also in env PYKVM_LAB_OUT inside L1).
LAB_OUT_GUEST = "/tmp/lab-out"

_RAMP = bytes(range(256)) * 3
_RAMP_LEN = NVME_SECTOR_SIZE - len(NVME_DISK_MAGIC) - 8


def nvme_sector(lba: int, magic: bytes = NVME_DISK_MAGIC) -> bytes:
    """The 512 bytes the lab's NVMe disk holds at logical block ``lba`` (the second
    disk's with ``magic=GROUP_NVME_DISK_MAGIC``)."""
    start = lba % 256
    return magic + lba.to_bytes(8, "little") + _RAMP[start : start + _RAMP_LEN]
