"""Decoding VFIO_IOMMU_DIRTY_PAGES bitmaps: u64 words, bit i is page iova + i * pgsize."""
import array

from hypothesis import given
from hypothesis import strategies as st

from pykvm.vfio.dirty import DirtyBitmap, bitmap_bytes, dirty_pages

PAGE = 4096


def encode(indices, nbytes: int) -> bytes:
    """The bitmap the kernel would write: native-endian u64 words."""
    words = array.array("Q", bytes(nbytes))
    for i in indices:
        words[i // 64] |= 1 << (i % 64)
    return words.tobytes()


@st.composite
def bitmaps(draw):
    npages = draw(st.integers(1, 300))
    dirty = draw(st.sets(st.integers(0, npages - 1)))
    iova = draw(st.integers(0, (1 << 40) // PAGE)) * PAGE
    pgsize = draw(st.sampled_from([PAGE, 2 << 20, 1 << 30]))
    return npages, dirty, iova, pgsize


def test_bitmap_bytes_is_whole_u64_words():
    assert [bitmap_bytes(n) for n in (0, 1, 63, 64, 65, 128, 129)] == [0, 8, 8, 8, 16, 16, 24]


@given(st.integers(0, 1 << 34))
def test_bitmap_bytes_holds_one_bit_per_page_in_the_fewest_words(npages):
    size = bitmap_bytes(npages)
    assert size % 8 == 0 and size * 8 >= npages > size * 8 - 64


@given(bitmaps())
def test_decoding_returns_the_dirty_pages_in_order(case):
    npages, dirty, iova, pgsize = case
    bitmap = encode(dirty, bitmap_bytes(npages))
    expected = [iova + i * pgsize for i in sorted(dirty)]
    assert dirty_pages(bitmap, iova, pgsize, npages) == expected
    assert DirtyBitmap(iova, pgsize, npages, bitmap).pages == expected


@given(bitmaps(), st.sets(st.integers(0, 63)))
def test_bits_past_the_last_page_are_ignored(case, extra):
    npages, dirty, iova, pgsize = case
    nbytes = bitmap_bytes(npages)
    padding = {i for i in (npages + e for e in extra) if i < nbytes * 8}
    assert dirty_pages(encode(dirty | padding, nbytes), iova, pgsize, npages) == [
        iova + i * pgsize for i in sorted(dirty)]


def test_little_endian_layout_as_on_x86():
    # Page 0 and page 9 of word 0, page 64 (bit 0 of word 1): bytes 0x01 0x02 ... 0x01.
    bitmap = bytes([0x01, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0])
    assert dirty_pages(bitmap, 0x100000, PAGE, 128) == [0x100000, 0x100000 + 9 * PAGE, 0x100000 + 64 * PAGE]
    assert dirty_pages(bytes(16), 0, PAGE, 128) == []
