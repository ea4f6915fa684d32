"""The /dev/vfio API: containers (IOMMU contexts), groups, devices, DMA and interrupts.

    with Container() as c, Group.for_device("0000:00:04.0") as g:
        g.set_container(c)
        c.set_iommu()
        dev = g.get_device("0000:00:04.0")
        bar0 = dev.region(lib.VFIO_PCI_BAR0_REGION_INDEX).mmap()

Closing the container closes its groups, which close their devices.
"""
from pykvm._native import lib
from pykvm.vfio.caps import CapabilityChainError
from pykvm.vfio.container import Container, DmaMapping, IommuInfo, Migration
from pykvm.vfio.device import Device, DeviceInfo, HotResetDependent, IoEventFd
from pykvm.vfio.dirty import DirtyBitmap
from pykvm.vfio.errors import VfioError, VfioUnavailableError
from pykvm.vfio.eventfd import EventFd
from pykvm.vfio.group import Group, GroupStatus
from pykvm.vfio.iova import DmaAllocator, DmaBuffer, IovaAllocator
from pykvm.vfio.irqs import IrqInfo
from pykvm.vfio.pci import ConfigSpace, MsixCap
from pykvm.vfio.regions import Mmio, Region, RegionCaps, RegionInfo, RegionType, SparseArea

__all__ = [
    "lib", "CapabilityChainError", "Container", "DmaMapping", "DmaBatch", "IommuInfo", "Migration", "Device",
    "DeviceInfo", "HotResetDependent", "IoEventFd", "DirtyBitmap", "VfioError", "VfioUnavailableError", "EventFd",
    "Group", "GroupStatus", "DmaAllocator", "DmaBuffer", "IovaAllocator", "IrqInfo", "ConfigSpace", "MsixCap", "Mmio",
    "Region", "RegionCaps", "RegionInfo", "RegionType", "SparseArea",
]


def __getattr__(name: str):
    """``DmaBatch`` on first use: its module imports numpy, which `import pykvm.vfio` (and
    every `pykvm run --vfio`) should not pay for."""
    if name == "DmaBatch":
        from pykvm.vfio.dma_batch import DmaBatch

        return DmaBatch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
