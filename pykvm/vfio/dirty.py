"""Dirty-page bitmaps of VFIO_IOMMU_DIRTY_PAGES (type1's dirty tracking, for migration).

GET_BITMAP fills u64 words, one bit per page from the requested IOVA: bit ``i % 64`` of
word ``i // 64`` set means page ``iova + i * pgsize`` may have been written by a device.
Decoding is pure, tested without a device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from pykvm._bitmap import bitmap_bytes, set_bits

__all__ = ["DirtyBitmap", "bitmap_bytes", "dirty_pages"]


def dirty_pages(bitmap: bytes, iova: int, pgsize: int, npages: int) -> List[int]:
    """Ascending IOVAs of the pages whose bit is set in ``bitmap`` (native-endian u64 words);
    bits from ``npages`` on are ignored."""
    return [iova + int(i) * pgsize for i in set_bits(bitmap, npages)]


@dataclass(frozen=True)
class DirtyBitmap:
    """One GET_BITMAP answer for the ``npages`` pages of ``pgsize`` bytes from ``iova``."""

    iova: int
    pgsize: int
    npages: int
    bitmap: bytes  # as the kernel wrote it

    @property
    def pages(self) -> List[int]:
        """The IOVAs of the dirty pages."""
        return dirty_pages(self.bitmap, self.iova, self.pgsize, self.npages)
