"""PCI configuration space of a VFIO device (region VFIO_PCI_CONFIG_REGION_INDEX).

vfio-pci virtualizes config space: BARs and some capability fields read back
what the kernel emulates, while the command register's memory-decode and
bus-master bits reach the device. After binding to vfio-pci bus mastering is
off, so a device's DMA is silently dropped until :meth:`ConfigSpace.enable`
sets it.

The capability-list walk and the MSI-X capability parser work on a bytes
snapshot and are bounds- and loop-safe, whatever the device returns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

from pykvm._native import lib

if TYPE_CHECKING:
    from pykvm.vfio.regions import Region

__all__ = ["ConfigSpace", "MsixCap", "walk_capabilities", "parse_msix"]

MAX_CAPS = 48  # (256 - 64) / 4: the most a standard list can hold


def _u16(data: bytes, off: int) -> int:
    return int.from_bytes(data[off : off + 2], "little")


def _u32(data: bytes, off: int) -> int:
    return int.from_bytes(data[off : off + 4], "little")


def walk_capabilities(config: bytes) -> List[Tuple[int, int]]:
    """``(cap_id, offset)`` for each capability in the standard list (stops at a loop or a bad pointer)."""
    if len(config) < lib.PCI_STD_HEADER_SIZEOF or not _u16(config, lib.PCI_STATUS) & lib.PCI_STATUS_CAP_LIST:
        return []
    caps: List[Tuple[int, int]] = []
    seen = set()
    ptr = config[lib.PCI_CAPABILITY_LIST] & ~3
    while ptr >= lib.PCI_STD_HEADER_SIZEOF and ptr + 2 <= len(config) and ptr not in seen and len(caps) < MAX_CAPS:
        seen.add(ptr)
        caps.append((config[ptr + lib.PCI_CAP_LIST_ID], ptr))
        ptr = config[ptr + lib.PCI_CAP_LIST_NEXT] & ~3
    return caps


@dataclass(frozen=True)
class MsixCap:
    """Where a device keeps its MSI-X table and pending-bit array (BAR index and offset)."""

    offset: int  # of the capability in config space
    table_size: int  # number of vectors
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int
    enabled: bool
    masked: bool


def parse_msix(config: bytes, offset: int) -> MsixCap:
    """Decode the MSI-X capability at ``offset``."""
    if offset + lib.PCI_MSIX_PBA + 4 > len(config):
        raise ValueError(f"MSI-X capability at {offset:#x} runs past config space ({len(config)} bytes)")
    flags = _u16(config, offset + lib.PCI_MSIX_FLAGS)
    table = _u32(config, offset + lib.PCI_MSIX_TABLE)
    pba = _u32(config, offset + lib.PCI_MSIX_PBA)
    return MsixCap(
        offset=offset,
        table_size=(flags & lib.PCI_MSIX_FLAGS_QSIZE) + 1,
        table_bar=table & lib.PCI_MSIX_TABLE_BIR,
        table_offset=table & lib.PCI_MSIX_TABLE_OFFSET,
        pba_bar=pba & lib.PCI_MSIX_PBA_BIR,
        pba_offset=pba & lib.PCI_MSIX_PBA_OFFSET,
        enabled=bool(flags & lib.PCI_MSIX_FLAGS_ENABLE),
        masked=bool(flags & lib.PCI_MSIX_FLAGS_MASKALL),
    )


class ConfigSpace:
    """Typed access to a device's config region."""

    def __init__(self, region: "Region"):
        self.region = region

    def read(self, offset: int, size: int) -> int:
        """A ``size``-byte (1, 2 or 4) little-endian register."""
        return int.from_bytes(self.region.read(offset, size), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.region.write(offset, value.to_bytes(size, "little"))

    def snapshot(self, size: int = 256) -> bytes:
        """The first ``size`` bytes of config space (256: the standard part)."""
        return self.region.read(0, min(size, self.region.size))

    @property
    def vendor_id(self) -> int:
        return self.read(lib.PCI_VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.read(lib.PCI_DEVICE_ID, 2)

    @property
    def command(self) -> int:
        return self.read(lib.PCI_COMMAND, 2)

    @command.setter
    def command(self, value: int) -> None:
        self.write(lib.PCI_COMMAND, 2, value)

    def enable(self, memory: bool = True, io: bool = False, bus_master: bool = True) -> int:
        """Set the decode/bus-master bits asked for (others untouched); returns the new command."""
        bits = ((lib.PCI_COMMAND_MEMORY if memory else 0) | (lib.PCI_COMMAND_IO if io else 0)
                | (lib.PCI_COMMAND_MASTER if bus_master else 0))
        self.command = self.command | bits
        return self.command

    def capabilities(self) -> List[Tuple[int, int]]:
        """``(cap_id, offset)`` of each standard capability (ids: ``lib.PCI_CAP_ID_*``)."""
        return walk_capabilities(self.snapshot())

    def find_capability(self, cap_id: int) -> Optional[int]:
        return next((off for cid, off in self.capabilities() if cid == cap_id), None)

    def msix(self) -> Optional[MsixCap]:
        """The MSI-X capability, or None when the device has none."""
        config = self.snapshot()
        off = next((o for cid, o in walk_capabilities(config) if cid == lib.PCI_CAP_ID_MSIX), None)
        return None if off is None else parse_msix(config, off)
