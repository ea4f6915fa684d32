"""Page bitmaps as KVM (KVM_GET/CLEAR_DIRTY_LOG) and VFIO (VFIO_IOMMU_DIRTY_PAGES) write
them: native-endian u64 words, bit ``i % 64`` of word ``i // 64`` for page ``i``."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where it is used (start-up time)
    import numpy as np

__all__ = ["bitmap_bytes", "set_bits"]


def bitmap_bytes(npages: int) -> int:
    """Size of the bitmap for ``npages`` pages: whole u64 words, as the kernel writes them."""
    return (npages + 63) // 64 * 8


def set_bits(bitmap, npages: int) -> "np.ndarray":
    """Ascending indices of the set bits among the first ``npages`` of ``bitmap`` (any buffer
    of whole u64 words); bits from ``npages`` on are ignored."""
    import numpy as np

    little = np.frombuffer(bitmap, dtype=np.uint64).astype("<u8", copy=False).view(np.uint8)
    return np.flatnonzero(np.unpackbits(little, bitorder="little")[:npages])
