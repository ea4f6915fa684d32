"""IOVA space: which I/O virtual addresses a container may map, and handing them out.

The kernel reports the usable IOVA ranges of a container (the IOMMU's address
width minus reserved windows such as the x86 MSI window 0xfee00000-0xfeefffff)
as inclusive ``(start, end)`` pairs. :class:`IovaAllocator` hands out
page-aligned blocks inside them (first fit, freed blocks coalesce);
:class:`DmaAllocator` pairs each block with an anonymous-memory buffer mapped
for the device with ``map_dma``.
"""
from __future__ import annotations

import bisect
import errno
import mmap
from typing import TYPE_CHECKING, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from pykvm.vfio.errors import vfio_error

if TYPE_CHECKING:
    from pykvm.vfio.container import Container, DmaMapping

__all__ = ["IovaAllocator", "DmaAllocator", "DmaBuffer", "in_ranges", "merge_ranges", "format_ranges"]

Range = Tuple[int, int]  # inclusive, as the kernel reports them


def merge_ranges(ranges: Sequence[Range]) -> Tuple[Range, ...]:
    """Sorted inclusive ranges with overlapping or touching ones joined."""
    out: List[List[int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return tuple((s, e) for s, e in out)


def in_ranges(ranges: Sequence[Range], iova: int, size: int) -> bool:
    """Does ``[iova, iova+size)`` lie inside one of the inclusive ``ranges`` (merged, see merge_ranges)?"""
    last = iova + size - 1
    return size > 0 and any(start <= iova and last <= end for start, end in ranges)


def format_ranges(ranges: Sequence[Range]) -> str:
    return ", ".join(f"[{s:#x}, {e:#x}]" for s, e in ranges) or "none"


def outside_ranges(iova: int, size: int, ranges: Sequence[Range]) -> str:
    """Why map_dma/map_dma_batch refuse ``[iova, iova+size)`` before asking the kernel."""
    return f"IOVA [{iova:#x}, {iova + size:#x}) is outside the container's usable IOVA ranges {format_ranges(ranges)}"


def _round_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


class IovaAllocator:
    """First-fit allocator of ``page_size``-aligned IOVA blocks inside ``ranges``.

    ``base``/``limit`` narrow the space further, e.g. ``limit=1 << 28`` for a device
    whose DMA mask is 28 bits. Not thread-safe.
    """

    def __init__(self, ranges: Sequence[Range], page_size: int = mmap.PAGESIZE, base: int = 0,
                 limit: Optional[int] = None):
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError(f"page size {page_size} is not a power of two")
        self.page_size = page_size
        self._free: List[List[int]] = []  # sorted, disjoint [start, end) blocks
        for start, end in merge_ranges(ranges):
            lo = _round_up(max(start, base), page_size)
            hi = (end + 1 if limit is None else min(end + 1, limit)) // page_size * page_size
            if lo < hi:
                self._free.append([lo, hi])
        self._used: Dict[int, int] = {}

    @property
    def free_bytes(self) -> int:
        return sum(hi - lo for lo, hi in self._free)

    def free_blocks(self) -> List[Tuple[int, int]]:
        """The free ``[start, end)`` blocks, in order."""
        return [(lo, hi) for lo, hi in self._free]

    def alloc(self, size: int, align: Optional[int] = None) -> int:
        """An IOVA for ``size`` bytes (rounded up to pages), aligned to ``align`` (default: a page)."""
        if size <= 0:
            raise ValueError(f"cannot allocate {size} bytes of IOVA space")
        align = max(align or self.page_size, self.page_size)
        size = _round_up(size, self.page_size)
        for i, (lo, hi) in enumerate(self._free):
            start = _round_up(lo, align)
            if start + size <= hi:
                pieces = [[lo, start]] if lo < start else []
                if start + size < hi:
                    pieces.append([start + size, hi])
                self._free[i : i + 1] = pieces
                self._used[start] = size
                return start
        raise vfio_error(errno.ENOSPC, f"no free IOVA block of {size:#x} bytes (aligned {align:#x}); "
                                       f"free: {self.free_bytes:#x} bytes in {len(self._free)} blocks", "iova alloc")

    def free(self, iova: int) -> None:
        """Return the block that :meth:`alloc` gave at ``iova``."""
        size = self._used.pop(iova, None)
        if size is None:
            raise ValueError(f"IOVA {iova:#x} was not allocated here")
        i = bisect.bisect_left(self._free, [iova, iova])
        block = [iova, iova + size]
        if i < len(self._free) and self._free[i][0] == block[1]:
            block[1] = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == block[0]:
            block[0] = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, block)


class DmaBuffer(NamedTuple):
    """Host memory the device can reach at ``iova``; unpacks as ``buffer, iova = ...``."""

    buffer: mmap.mmap
    iova: int

    @property
    def size(self) -> int:
        return len(self.buffer)


class DmaAllocator:
    """Anonymous-memory buffers mapped into a container at IOVAs from an :class:`IovaAllocator`.

    ``alloc(size)`` returns a :class:`DmaBuffer`; ``free`` (or ``close``, for all of them)
    unmaps it from the IOMMU before the memory goes away.
    """

    def __init__(self, container: "Container", base: int = 0x100000, limit: Optional[int] = None):
        info = container.iommu_info()
        self.container = container
        self.iovas = IovaAllocator(container.iova_ranges, max(info.min_page_size, mmap.PAGESIZE), base, limit)
        self._live: Dict[int, Tuple[DmaBuffer, "DmaMapping"]] = {}

    def alloc(self, size: int, readable: bool = True, writable: bool = True) -> DmaBuffer:
        size = _round_up(size, self.iovas.page_size)
        iova = self.iovas.alloc(size)
        buffer = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            mapping = self.container.map_dma(buffer, iova, readable=readable, writable=writable)
        except BaseException:
            buffer.close()
            self.iovas.free(iova)
            raise
        dma = DmaBuffer(buffer, iova)
        self._live[iova] = (dma, mapping)
        return dma

    def free(self, dma: DmaBuffer) -> None:
        _, mapping = self._live.pop(dma.iova)
        mapping.unmap()
        dma.buffer.close()
        self.iovas.free(dma.iova)

    def __iter__(self) -> Iterator[DmaBuffer]:
        return iter([dma for dma, _ in self._live.values()])

    def close(self) -> None:
        """Unmap and free every buffer still allocated."""
        for dma, _ in list(self._live.values()):
            self.free(dma)

    def __enter__(self) -> "DmaAllocator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
