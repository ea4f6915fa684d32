"""Device regions: what VFIO_DEVICE_GET_REGION_INFO reports, and access to them.

A region (a PCI BAR, the ROM, config space, ...) lives at ``info.offset`` in
the device fd's file space: ``pread``/``pwrite`` there reach the device
through vfio-pci (which performs real 1/2/4/8-byte accesses for aligned
sizes), and regions flagged MMAP can be mapped for direct access. A sparse
mmap capability restricts mapping to the listed areas; the MSI-X mappable
capability says the MSI-X table's page may be mapped too.
"""
from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from pykvm._native import ffi, lib
from pykvm.vfio.caps import read_array, read_struct, walk_chain
from pykvm.vfio.errors import vfio_error

if TYPE_CHECKING:
    from pykvm.vfio.device import Device

__all__ = ["SparseArea", "RegionType", "RegionCaps", "RegionInfo", "Region", "Mmio", "parse_region_caps"]


@dataclass(frozen=True)
class SparseArea:
    """A part of a region that may be mmap'd (offsets relative to the region)."""

    offset: int
    size: int


@dataclass(frozen=True)
class RegionType:
    """Device-specific region type (VFIO_REGION_INFO_CAP_TYPE): ``type`` and ``subtype``."""

    type: int
    subtype: int


@dataclass(frozen=True)
class RegionCaps:
    """A region's capabilities: ``sparse_areas`` is None when the whole region may be mapped."""

    sparse_areas: Optional[Tuple[SparseArea, ...]] = None
    type: Optional[RegionType] = None
    msix_mappable: bool = False
    other: Tuple[int, ...] = ()  # ids this version of pykvm does not interpret


def parse_region_caps(buf: bytes, first: int) -> RegionCaps:
    """Parse the capability chain of a region-info buffer starting at offset ``first``."""
    sparse, rtype, msix, other = None, None, False, []
    for cap_id, _version, off in walk_chain(buf, first, ffi.sizeof("struct vfio_region_info")):
        if cap_id == lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
            head = read_struct(buf, off, "struct vfio_region_info_cap_sparse_mmap")
            cap = read_array(buf, off, "struct vfio_region_info_cap_sparse_mmap", "areas", head.nr_areas,
                             "struct vfio_region_sparse_mmap_area")
            sparse = tuple(SparseArea(cap.areas[i].offset, cap.areas[i].size) for i in range(head.nr_areas))
        elif cap_id == lib.VFIO_REGION_INFO_CAP_TYPE:
            cap = read_struct(buf, off, "struct vfio_region_info_cap_type")
            rtype = RegionType(cap.type, cap.subtype)
        elif cap_id == lib.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
            msix = True
        else:
            other.append(cap_id)
    return RegionCaps(sparse, rtype, msix, tuple(other))


@dataclass(frozen=True)
class RegionInfo:
    """One region as the kernel describes it."""

    index: int
    flags: int
    size: int
    offset: int  # where the region starts in the device fd
    caps: RegionCaps

    @property
    def readable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_MMAP)

    def mmap_areas(self) -> Tuple[SparseArea, ...]:
        """The parts of the region that may be mapped (none when it is not mmappable)."""
        if not self.mmappable or self.size == 0:
            return ()
        if self.caps.sparse_areas is not None:
            return self.caps.sparse_areas
        return (SparseArea(0, self.size),)


class Mmio:
    """A mapped part of a region. Offsets are region offsets (as in the device's datasheet).

    ``read32``/``write32`` (and the 8/16/64-bit variants) are single accesses of that
    width, as device registers need; ``view`` is the raw memoryview for bulk data.
    ``unmapped`` is called once :meth:`close` has unmapped it.
    """

    def __init__(self, mm: mmap.mmap, base: int, unmapped: Optional[Callable[[], None]] = None):
        self._mm = mm
        self._unmapped = unmapped
        self.base = base
        self.size = len(mm)
        self._open_views()

    def _open_views(self) -> None:
        self.view = memoryview(self._mm)
        self._views = {w: self.view.cast(c) for w, c in ((1, "B"), (2, "H"), (4, "I"), (8, "Q"))}

    def _index(self, offset: int, width: int) -> int:
        rel = offset - self.base
        if rel < 0 or rel + width > self.size or rel % width:
            raise ValueError(f"{width}-byte access at {offset:#x} outside [{self.base:#x}, "
                             f"{self.base + self.size:#x}) or misaligned")
        return rel // width

    def read(self, offset: int, width: int) -> int:
        return self._views[width][self._index(offset, width)]

    def write(self, offset: int, width: int, value: int) -> None:
        self._views[width][self._index(offset, width)] = value

    def read8(self, offset: int) -> int:
        return self.read(offset, 1)

    def read16(self, offset: int) -> int:
        return self.read(offset, 2)

    def read32(self, offset: int) -> int:
        return self.read(offset, 4)

    def read64(self, offset: int) -> int:
        return self.read(offset, 8)

    def write8(self, offset: int, value: int) -> None:
        self.write(offset, 1, value)

    def write16(self, offset: int, value: int) -> None:
        self.write(offset, 2, value)

    def write32(self, offset: int, value: int) -> None:
        self.write(offset, 4, value)

    def write64(self, offset: int, value: int) -> None:
        self.write(offset, 8, value)

    @property
    def closed(self) -> bool:
        return self._mm.closed

    def close(self) -> None:
        """Unmap. Idempotent. While the caller still holds a view of the memory (a slice or
        cast of ``view``), it cannot be unmapped: BufferError, and this Mmio stays usable."""
        if not self._mm.closed:
            try:
                for v in self._views.values():
                    v.release()
                self.view.release()  # refused while the caller exports view itself (ffi.from_buffer(view))
                self._mm.close()  # refused while the caller holds a slice or cast of it
            except BufferError:
                self._open_views()
                raise
            if self._unmapped is not None:
                self._unmapped()

    def __enter__(self) -> "Mmio":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Mmio [{self.base:#x}, {self.base + self.size:#x}){' closed' if self.closed else ''}>"


class Region:
    """A region of an open :class:`~pykvm.vfio.device.Device`."""

    def __init__(self, device: "Device", info: RegionInfo):
        self.device = device
        self.info = info

    @property
    def index(self) -> int:
        return self.info.index

    @property
    def size(self) -> int:
        return self.info.size

    def _check(self, offset: int, size: int, what: str, allowed: bool) -> None:
        if not allowed:
            raise vfio_error(errno.EACCES, f"region {self.index} is not {what} (flags {self.info.flags:#x})", "pread/pwrite")
        if offset < 0 or size < 0 or offset + size > self.info.size:
            raise ValueError(f"[{offset:#x}, {offset + size:#x}) is outside region {self.index} "
                             f"(size {self.info.size:#x})")

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` through the device fd (pread)."""
        self._check(offset, size, "readable", self.info.readable)
        try:
            data = os.pread(self.device.fileno(), size, self.info.offset + offset)
        except OSError as exc:
            raise vfio_error(exc.errno, f"read of region {self.index} at {offset:#x}: {exc.strerror}", "pread") from None
        if len(data) != size:
            raise vfio_error(errno.EIO, f"short read of region {self.index} at {offset:#x}: {len(data)}/{size}", "pread")
        return data

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` through the device fd (pwrite)."""
        self._check(offset, len(data), "writable", self.info.writable)
        try:
            done = os.pwrite(self.device.fileno(), data, self.info.offset + offset)
        except OSError as exc:
            raise vfio_error(exc.errno, f"write to region {self.index} at {offset:#x}: {exc.strerror}", "pwrite") from None
        if done != len(data):
            raise vfio_error(errno.EIO, f"short write to region {self.index} at {offset:#x}: {done}/{len(data)}", "pwrite")

    def read32(self, offset: int) -> int:
        return int.from_bytes(self.read(offset, 4), "little")

    def write32(self, offset: int, value: int) -> None:
        self.write(offset, value.to_bytes(4, "little"))

    def mmap(self, offset: int = 0, size: Optional[int] = None) -> Mmio:
        """Map ``[offset, offset+size)`` of the region (default: all of it).

        The range must lie inside one mmap area (the whole region, or one sparse area).
        """
        size = self.info.size - offset if size is None else size
        areas = self.info.mmap_areas()
        if offset < 0 or size <= 0 or not any(a.offset <= offset and offset + size <= a.offset + a.size for a in areas):
            listing = ", ".join(f"[{a.offset:#x}, {a.offset + a.size:#x})" for a in areas) or "none"
            raise vfio_error(errno.EINVAL, f"region {self.index}: [{offset:#x}, {offset + size:#x}) is not inside an "
                                f"mmap area (areas: {listing}); use read()/write() instead", "mmap")
        if offset % mmap.PAGESIZE:
            raise ValueError(f"mmap offset {offset:#x} is not page aligned")
        try:
            mm = mmap.mmap(self.device.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=self.info.offset + offset)
        except OSError as exc:
            raise vfio_error(exc.errno, f"mmap of region {self.index} [{offset:#x}, {offset + size:#x}) refused: "
                                        f"{exc.strerror}", "mmap") from None
        mmio = Mmio(mm, offset, self.device.group._track_mapping(mm))
        self.device._mmaps.add(mmio)
        return mmio

    def mmap_areas(self) -> List[Mmio]:
        """Map every mmap area of the region (one per sparse area, or the whole region)."""
        return [self.mmap(a.offset, a.size) for a in self.info.mmap_areas()]

    def __repr__(self) -> str:
        i = self.info
        return f"<Region {i.index} size={i.size:#x} flags={i.flags:#x} caps={i.caps}>"
