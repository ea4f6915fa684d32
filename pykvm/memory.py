"""Guest memory: host mappings that back guest-physical address ranges.

A ``GuestMemory`` holds one or more ``MemoryRegion`` objects placed at
guest-physical addresses. Backings: ``anon`` (private anonymous memory with
MADV_HUGEPAGE, as QEMU uses: transparent huge pages make the guest's nested
page tables use 2 MiB pages), ``shared`` (MAP_SHARED anonymous), ``memfd``
(shareable with another process by fd) and ``hugetlb`` (memfd on reserved
huge pages). KVM sees them through memslots
(``Vm.map_memory``); VFIO maps the same host pages for device DMA.
``MemoryRegion.huge_page_bytes()`` says how much of a region huge pages back now
(``/proc/self/smaps``): KVM's nested page tables and the IOMMU map a 2 MiB page
as one entry only when the host page under it is huge. All
accessors take guest-physical addresses and are bounds-checked: an access
that leaves the region raises ``GuestMemoryError`` naming the range.
"""
from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Iterator, List, Optional

from pykvm._native import ffi
from pykvm._record import record_repr

if TYPE_CHECKING:  # numpy is imported where it is used: it costs ~1 s at start-up in the lab
    import numpy as np

PAGE_SIZE = mmap.PAGESIZE
HUGE_PAGE_SIZE = 2 << 20

__all__ = ["GuestMemory", "MemoryRegion", "GuestMemoryError", "PAGE_SIZE"]


class GuestMemoryError(ValueError):
    """A guest-physical access outside every region, or a bad region layout."""


def _host_address(mm: mmap.mmap) -> int:
    c = ffi.from_buffer(mm)
    addr = int(ffi.cast("uintptr_t", c))
    ffi.release(c)
    return addr


class MemoryRegion:
    """``size`` bytes of host memory shown to the guest at ``gpa``.

    Compared by identity (``is``), like any object: each region owns its mapping."""

    __slots__ = ("gpa", "size", "backing", "name", "readonly", "_mm", "_view", "_fd", "host_address")
    gpa: int
    size: int
    backing: str
    name: str
    readonly: bool
    _mm: Optional[mmap.mmap]
    _view: Optional[memoryview]
    _fd: int
    host_address: int

    _repr_fields = ("gpa", "size", "backing", "name", "readonly")

    def __init__(self, gpa: int, size: int, backing: str = "anon", name: str = "", readonly: bool = False) -> None:
        self.gpa = gpa
        self.size = size
        self.backing = backing
        self.name = name
        self.readonly = readonly
        self._mm = None
        self._view = None
        self._fd = -1

        align = HUGE_PAGE_SIZE if self.backing == "hugetlb" else PAGE_SIZE
        if self.size <= 0 or self.size % align or self.gpa % align or self.gpa < 0:
            raise GuestMemoryError(
                f"region {self.name or ''} at {self.gpa:#x}+{self.size:#x}: gpa and size must be "
                f"positive multiples of {align:#x}"
            )
        offset = 0
        if self.backing in ("anon", "shared"):
            # Over-allocate so the region can start on a 2 MiB boundary: KVM maps a guest
            # huge page only where GPA and host address agree modulo 2 MiB (QEMU aligns too;
            # kernels before 6.7 do not align large anonymous mappings themselves).
            private = self.backing == "anon"
            flags = (mmap.MAP_PRIVATE if private else mmap.MAP_SHARED) | mmap.MAP_ANONYMOUS
            self._mm = mmap.mmap(-1, self.size + HUGE_PAGE_SIZE, flags=flags)
            offset = -_host_address(self._mm) % HUGE_PAGE_SIZE
            if private:
                try:
                    self._mm.madvise(mmap.MADV_HUGEPAGE, offset, self.size)
                except (AttributeError, OSError):
                    pass  # no THP on this kernel: 4 KiB pages still work
        elif self.backing in ("memfd", "hugetlb"):
            flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB if self.backing == "hugetlb" else 0)
            self._fd = os.memfd_create(f"pykvm-{self.name or 'ram'}", flags)
            try:
                os.ftruncate(self._fd, self.size)
                self._mm = mmap.mmap(self._fd, self.size, flags=mmap.MAP_SHARED)
            except OSError as exc:
                os.close(self._fd)
                self._fd = -1
                hint = " (are hugepages reserved? see /proc/sys/vm/nr_hugepages)" if self.backing == "hugetlb" else ""
                raise GuestMemoryError(f"cannot allocate {self.size:#x} bytes of {self.backing} memory: {exc}{hint}") from exc
        else:
            raise GuestMemoryError(f"unknown backing {self.backing!r} (anon, shared, memfd, hugetlb)")
        self._view = memoryview(self._mm)[offset:offset + self.size]
        self.host_address = _host_address(self._mm) + offset

    __repr__ = record_repr

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def huge_page_bytes(self, smaps: str = "/proc/self/smaps") -> int:
        """Bytes of the region that huge pages back now: all of a ``hugetlb`` region; for the
        others, the transparent huge pages the kernel reports in ``smaps`` (AnonHugePages,
        ShmemPmdMapped) for the mappings inside the region (MADV_HUGEPAGE made the region
        its own mapping). Pages not touched yet are not backed by anything."""
        if self._mm is None:
            raise GuestMemoryError("region is closed")
        if self.backing == "hugetlb":
            return self.size
        start, end = self.host_address, self.host_address + self.size
        total, inside = 0, False
        with open(smaps) as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo < end and start < hi
                elif inside and head in ("AnonHugePages:", "ShmemPmdMapped:"):
                    total += int(line.split()[1]) * 1024
        return min(total, self.size)

    @property
    def fd(self) -> int:
        """The memfd behind the region, or -1 for anonymous memory."""
        return self._fd

    @property
    def buffer(self) -> memoryview:
        """The region's bytes (writable, exactly ``size`` long)."""
        if self._view is None:
            raise GuestMemoryError("region is closed")
        return self._view

    def contains(self, gpa: int, size: int = 1) -> bool:
        return self.gpa <= gpa and gpa + size <= self.end

    def close(self) -> None:
        if self._view is not None:
            try:
                self._view.release()
            except BufferError:
                pass  # something still holds the bytes: the mapping goes when it does
            self._view = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # numpy views still alive: the mapping goes when they do
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "MemoryRegion":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GuestMemory:
    """Guest RAM as a set of non-overlapping regions addressed by GPA."""

    def __init__(self, regions: Optional[List[MemoryRegion]] = None):
        self._regions: List[MemoryRegion] = []
        for r in regions or []:
            self._insert(r)

    @classmethod
    def flat(cls, size: int, gpa: int = 0, backing: str = "anon") -> "GuestMemory":
        """One region of ``size`` bytes at ``gpa`` (the common tiny-guest case)."""
        return cls([MemoryRegion(gpa, size, backing, name="ram")])

    def add_region(self, gpa: int, size: int, backing: str = "anon", name: str = "", readonly: bool = False) -> MemoryRegion:
        return self._insert(MemoryRegion(gpa, size, backing, name=name, readonly=readonly))

    def _insert(self, region: MemoryRegion) -> MemoryRegion:
        for r in self._regions:
            if region.gpa < r.end and r.gpa < region.end:
                region.close()
                raise GuestMemoryError(
                    f"region {region.gpa:#x}+{region.size:#x} overlaps {r.name or 'region'} at {r.gpa:#x}+{r.size:#x}"
                )
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.gpa)
        return region

    @property
    def regions(self) -> List[MemoryRegion]:
        return list(self._regions)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self._regions)

    @property
    def size(self) -> int:
        return sum(r.size for r in self._regions)

    def region_for(self, gpa: int, size: int = 1) -> MemoryRegion:
        if size < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest access {gpa:#x}+{size:#x}")
        for r in self._regions:
            if r.contains(gpa, size):
                return r
        raise GuestMemoryError(f"guest range {gpa:#x}+{size:#x} is not inside guest RAM ({self._describe()})")

    def _describe(self) -> str:
        return ", ".join(f"{r.gpa:#x}-{r.end - 1:#x}" for r in self._regions) or "no regions"

    def view(self, gpa: int, size: int) -> memoryview:
        """A writable view of guest bytes ``[gpa, gpa+size)`` (must lie in one region)."""
        r = self.region_for(gpa, size)
        off = gpa - r.gpa
        return r.buffer[off:off + size]

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.view(gpa, size))

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.view(gpa, size)[:] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def read_u8(self, gpa: int) -> int:
        return self.read_int(gpa, 1)

    def read_u16(self, gpa: int) -> int:
        return self.read_int(gpa, 2)

    def read_u32(self, gpa: int) -> int:
        return self.read_int(gpa, 4)

    def read_u64(self, gpa: int) -> int:
        return self.read_int(gpa, 8)

    def write_u8(self, gpa: int, v: int) -> None:
        self.write_int(gpa, 1, v)

    def write_u16(self, gpa: int, v: int) -> None:
        self.write_int(gpa, 2, v)

    def write_u32(self, gpa: int, v: int) -> None:
        self.write_int(gpa, 4, v)

    def write_u64(self, gpa: int, v: int) -> None:
        self.write_int(gpa, 8, v)

    def numpy(self, gpa: int, size: int, dtype: "np.typing.DTypeLike" = "uint8") -> "np.ndarray":
        """A numpy array sharing the guest's bytes (no copy)."""
        import numpy as np

        dt = np.dtype(dtype)
        if size % dt.itemsize:
            raise GuestMemoryError(f"size {size:#x} is not a multiple of {dt} ({dt.itemsize} bytes)")
        return np.frombuffer(self.view(gpa, size), dtype=dt)

    def host_address(self, gpa: int) -> int:
        r = self.region_for(gpa)
        return r.host_address + (gpa - r.gpa)

    def close(self) -> None:
        for r in self._regions:
            r.close()
        self._regions = []

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
