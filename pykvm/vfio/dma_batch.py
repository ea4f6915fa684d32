"""Many DMA mappings of one buffer, made and undone in C: :class:`DmaBatch`.

``Container.map_dma_batch`` maps N pieces of one buffer at N IOVAs with a single call
into the extension, which issues the N VFIO_IOMMU_MAP_DMA ioctls itself (and, on
``unmap()``, the N VFIO_IOMMU_UNMAP_DMA). The kernel still does one pin and one
IOMMU page-table update per entry: a batch saves only the Python work around each
ioctl, which is what dominates small mappings (see bench/vfio_map_dma.py).

numpy is imported here, and this module only when a batch is made, so that
``import pykvm.vfio`` (and ``pykvm run --vfio``) does not pay for numpy.

Buffer bounds, IOVA ranges and overlaps inside the batch are checked here, vectorised,
before any ioctl; what only the kernel can refuse (an overlap with an existing mapping,
misalignment, the mapping limit) is undone in C: a failed batch leaves nothing mapped.
"""
from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from pykvm._native import ffi
from pykvm.vfio.errors import vfio_error
from pykvm.vfio.iova import Range, outside_ranges

if TYPE_CHECKING:
    from pykvm.vfio.container import Container

__all__ = ["DmaBatch", "batch_arrays", "check_batch", "u64_pointer"]

ArrayLike = Union[int, Sequence[int], np.ndarray]
_OP = "VFIO_IOMMU_MAP_DMA"


def _u64(name: str, values: Any) -> np.ndarray:
    """A private, read-only, 1-D uint64 copy of ``values`` (refusing negatives and non-integers)."""
    a = np.asarray(values)
    if a.size and a.dtype.kind not in "ui":
        # Python ints above 2**63 next to small ones make numpy guess float64 (or object): redo exactly
        exact = np.asarray(values, dtype=object)
        if isinstance(values, np.ndarray) or not all(isinstance(v, int) for v in exact.flat):
            raise TypeError(f"{name} must be integers (got {a.dtype})")
        a = exact
    if a.size and a.dtype.kind in "iO" and a.min() < 0:
        raise ValueError(f"{name} must not be negative")
    if a.dtype == object and max(a.flat) >> 64:
        raise ValueError(f"{name} must fit in 64 bits")
    out = np.array(a, dtype=np.uint64, order="C", ndmin=1)
    if out.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (got shape {a.shape})")
    out.flags.writeable = False
    return out


def batch_arrays(iovas: ArrayLike, sizes: ArrayLike, offsets: Optional[ArrayLike]
                 ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(offsets, iovas, sizes)`` as equal-length uint64 arrays.

    ``sizes`` may be one number for every entry; without ``offsets`` the entries lie
    back to back from the buffer's start (the buffer carved into consecutive chunks).
    """
    iova = _u64("iovas", iovas)
    size = _u64("sizes", sizes)
    if size.shape == (1,) and np.ndim(sizes) == 0:
        size = np.full(len(iova), size[0], dtype=np.uint64)
        size.flags.writeable = False
    if offsets is None:
        offset = np.cumsum(size, dtype=np.uint64) - size
        offset.flags.writeable = False
    else:
        offset = _u64("offsets", offsets)
    if not len(iova) == len(size) == len(offset):
        raise ValueError(f"iovas, sizes and offsets differ in length ({len(iova)}, {len(size)}, {len(offset)})")
    return offset, iova, size


def _first(bad: np.ndarray) -> Optional[int]:
    hits = np.flatnonzero(bad)
    return int(hits[0]) if hits.size else None


def check_batch(buffer_len: int, offsets: np.ndarray, iovas: np.ndarray, sizes: np.ndarray,
                ranges: Sequence[Range]) -> None:
    """Raise a VfioError (EINVAL) naming the first entry that leaves the buffer or the usable
    IOVA ``ranges`` (merged, inclusive), is empty, or overlaps another entry of the batch.
    Alignment is left to the C helper, which refuses it before the ioctl."""
    n = len(iovas)
    if not n:
        return
    k = _first((offsets > buffer_len) | (sizes > buffer_len - np.minimum(offsets, buffer_len)))
    if k is not None:
        raise vfio_error(errno.EINVAL, f"batch entry {k}: [{int(offsets[k]):#x}, {int(offsets[k] + sizes[k]):#x}) "
                                       f"exceeds the buffer ({buffer_len:#x} bytes)", _OP)
    k = _first(sizes == 0)
    if k is not None:
        raise vfio_error(errno.EINVAL, f"batch entry {k} has size 0: every entry maps at least one page", _OP)
    last = iovas + (sizes - 1)
    starts = np.array([s for s, _ in ranges], dtype=np.uint64)
    ends = np.array([e for _, e in ranges], dtype=np.uint64)
    idx = np.searchsorted(starts, iovas, side="right") - 1
    inside = (idx >= 0) & (last >= iovas) & (last <= ends[np.maximum(idx, 0)]) if len(ranges) else np.zeros(n, bool)
    k = _first(~inside)
    if k is not None:
        raise vfio_error(errno.EINVAL, f"batch entry {k}: {outside_ranges(int(iovas[k]), int(sizes[k]), ranges)}", _OP)
    order = np.argsort(iovas, kind="stable")
    k = _first(iovas[order[1:]] <= last[order[:-1]])
    if k is not None:
        a, b = sorted((int(order[k]), int(order[k + 1])))
        raise vfio_error(errno.EINVAL, f"batch entries {a} and {b} overlap: IOVA [{int(iovas[a]):#x}, "
                                       f"{int(iovas[a]) + int(sizes[a]):#x}) and [{int(iovas[b]):#x}, "
                                       f"{int(iovas[b]) + int(sizes[b]):#x})", _OP)


def u64_pointer(array: np.ndarray) -> Any:
    """A ``uint64_t *`` into ``array`` (which must stay referenced while C uses it)."""
    return ffi.from_buffer("uint64_t[]", array)


class DmaBatch:
    """Entries ``i`` of one buffer (``buffer[offsets[i]:offsets[i] + sizes[i]]``) mapped at
    ``iovas[i]``, made by ``Container.map_dma_batch``.

    Keeps the buffer pinned (it cannot be closed under the device) until every entry is
    unmapped: by ``unmap()`` (all remaining entries, in C), leaving the ``with`` block, an
    ``unmap_dma`` of ranges that cover entries, or the container losing its IOMMU.
    ``offsets``, ``iovas`` and ``sizes`` are read-only uint64 arrays.
    """

    __slots__ = ("container", "buffer", "_pin", "offsets", "iovas", "sizes", "_live", "readable", "writable")

    def __init__(self, container: "Container", buffer: Any, pin: Any, offsets: np.ndarray, iovas: np.ndarray,
                 sizes: np.ndarray, readable: bool, writable: bool):
        self.container, self.buffer, self._pin = container, buffer, pin
        self.offsets, self.iovas, self.sizes = offsets, iovas, sizes
        self.readable, self.writable = readable, writable
        self._live: Optional[np.ndarray] = None  # None: every entry is mapped; else which ones are

    def __len__(self) -> int:
        return len(self.iovas)

    @property
    def mapped(self) -> bool:
        """True while any entry is still mapped."""
        return self._pin is not None

    @property
    def live(self) -> np.ndarray:
        """Which entries are still mapped (a bool array)."""
        if self._pin is None:
            return np.zeros(len(self), bool)
        return np.ones(len(self), bool) if self._live is None else self._live.copy()

    @property
    def vaddrs(self) -> Optional[np.ndarray]:
        """The host virtual address of each entry (None once unmapped)."""
        return None if self._pin is None else self.offsets + int(ffi.cast("uintptr_t", self._pin))

    def live_arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(iovas, sizes)`` of the entries still mapped (contiguous arrays)."""
        if self._pin is None:
            return self.iovas[:0], self.sizes[:0]
        if self._live is None:
            return self.iovas, self.sizes
        return self.iovas[self._live], self.sizes[self._live]

    def overlapping(self, iova: int, size: int) -> List[Tuple[int, int]]:
        """The ``[start, end)`` of live entries that overlap ``[iova, iova+size)``."""
        iovas, sizes = self.live_arrays()
        hit = np.flatnonzero((iovas < iova + size) & (iova < iovas + sizes))
        return [(int(iovas[i]), int(iovas[i] + sizes[i])) for i in hit]

    def unmap(self) -> None:
        """Unmap every entry still mapped, in C (idempotent)."""
        if self._pin is not None:
            self.container._unmap_batch(self)

    def _drop_inside(self, iova: int, size: int) -> None:
        """The kernel unmapped ``[iova, iova+size)``: forget the entries that lay inside it."""
        if self._pin is None:
            return
        inside = (self.iovas >= iova) & (self.iovas + self.sizes <= iova + size)
        if inside.any():
            self._live = ~inside if self._live is None else self._live & ~inside
            if not self._live.any():
                self._forget()

    def _forget(self) -> None:
        self._pin = self.buffer = None
        self._live = None

    def __enter__(self) -> "DmaBatch":
        return self

    def __exit__(self, *exc) -> None:
        self.unmap()

    def __repr__(self) -> str:
        if self._pin is None:
            return f"<DmaBatch of {len(self)} unmapped>"
        live = len(self) if self._live is None else int(self._live.sum())
        return f"<DmaBatch of {len(self)}, {live} mapped>"
