"""DmaBatch argument handling: normalisation and the checks made before any ioctl,
against a per-entry reference written the obvious way."""
import errno
from typing import List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm._native import ffi
from pykvm.vfio import DmaBatch, VfioError
from pykvm.vfio.dma_batch import batch_arrays, check_batch

PAGE = 4096
VTD = ((0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1))  # what a 6.1 kernel reports on VT-d


def test_sizes_broadcast_and_offsets_default_to_back_to_back():
    offsets, iovas, sizes = batch_arrays([0x200000, 0x100000, 0x300000], PAGE, None)
    assert offsets.tolist() == [0, PAGE, 2 * PAGE] and sizes.tolist() == [PAGE] * 3
    assert iovas.tolist() == [0x200000, 0x100000, 0x300000]
    assert all(a.dtype == np.uint64 and not a.flags.writeable for a in (offsets, iovas, sizes))
    offsets, _, sizes = batch_arrays(np.array([0x1000, 0x3000]), [0x2000, 0x1000], None)
    assert offsets.tolist() == [0, 0x2000] and sizes.tolist() == [0x2000, 0x1000]
    offsets, _, _ = batch_arrays([1 << 20, 2 << 20], PAGE, [0, 0])  # the same page twice
    assert offsets.tolist() == [0, 0]


def test_python_ints_above_int64_stay_exact():
    _, iovas, _ = batch_arrays([0, (1 << 64) - PAGE], PAGE, None)
    assert iovas.tolist() == [0, (1 << 64) - PAGE]


def test_arrays_are_private_copies():
    user = np.array([0x100000, 0x200000], dtype=np.uint64)
    _, iovas, _ = batch_arrays(user, PAGE, None)
    user[0] = 0
    assert iovas[0] == 0x100000


@pytest.mark.parametrize("iovas, sizes, offsets, error, text", [
    ([0x1000, -0x1000], PAGE, None, ValueError, "iovas must not be negative"),
    ([0x1000], [1.5], None, TypeError, "sizes must be integers"),
    ([[0x1000]], PAGE, None, ValueError, "one-dimensional"),
    ([0x1000, 0x2000], [PAGE], None, ValueError, "differ in length"),
    ([0x1000, 0x2000], PAGE, [0], ValueError, "differ in length"),
    ([1 << 64], PAGE, None, ValueError, "iovas must fit in 64 bits"),
    ([1 << 63, -1], PAGE, None, ValueError, "iovas must not be negative"),
    (np.array([4096.0]), PAGE, None, TypeError, "iovas must be integers"),
])
def test_bad_shapes_and_types(iovas, sizes, offsets, error, text):
    with pytest.raises(error, match=text):
        batch_arrays(iovas, sizes, offsets)


def reference(buffer_len: int, entries: List[Tuple[int, int, int]], ranges) -> Optional[str]:
    """What check_batch should refuse first, entry by entry: 'buffer k', 'empty k', 'range k'
    or 'overlap a b' (the first overlapping pair in IOVA order), else None."""
    for k, (off, iova, size) in enumerate(entries):
        if off + size > buffer_len:
            return f"buffer {k}"
    for k, (_, _, size) in enumerate(entries):
        if size == 0:
            return f"empty {k}"
    for k, (_, iova, size) in enumerate(entries):
        if not any(lo <= iova and iova + size - 1 <= hi for lo, hi in ranges):
            return f"range {k}"
    order = sorted(range(len(entries)), key=lambda i: entries[i][1])
    for a, b in zip(order, order[1:]):
        if entries[b][1] < entries[a][1] + entries[a][2]:
            return "overlap {} {}".format(*sorted((a, b)))
    return None


def verdict(exc: VfioError) -> str:
    text = str(exc)
    assert exc.errno == errno.EINVAL and exc.ioctl == "VFIO_IOMMU_MAP_DMA"
    if "overlap" in text:
        a, b = text.split("batch entries ")[1].split(" overlap")[0].split(" and ")
        return f"overlap {a} {b}"
    k = text.split("batch entry ")[1].split(":")[0].split(" ")[0]
    kind = "buffer" if "exceeds the buffer" in text else "empty" if "size 0" in text else "range"
    if kind == "range":
        assert "usable IOVA ranges" in text
    return f"{kind} {k}"


pages = st.integers(0, 64).map(lambda p: p * PAGE)
iova_near_edges = st.sampled_from([0, 0x100000, 0xFEDFF000, 0xFEE00000, 0xFEF00000, (1 << 39) - PAGE,
                                   1 << 39, (1 << 64) - PAGE]).flatmap(
    lambda base: st.integers(-4, 4).map(lambda d: max(0, min((1 << 64) - PAGE, base + d * PAGE))))
entry = st.tuples(pages, st.one_of(iova_near_edges, st.integers(0, (1 << 64) - 1)), pages)


@given(st.integers(0, 64 * PAGE), st.lists(entry, max_size=12),
       st.sampled_from([VTD, ((0, (1 << 64) - 1),), ()]))
def test_check_batch_matches_the_per_entry_reference(buffer_len, entries, ranges):
    offsets, iovas, sizes = batch_arrays([e[1] for e in entries], [e[2] for e in entries],
                                         [e[0] for e in entries])
    expected = reference(buffer_len, entries, ranges)
    if expected is None:
        check_batch(buffer_len, offsets, iovas, sizes, ranges)
    else:
        with pytest.raises(VfioError) as exc:
            check_batch(buffer_len, offsets, iovas, sizes, ranges)
        assert verdict(exc.value) == expected


@given(st.lists(st.integers(0, 255), min_size=1, max_size=64, unique=True), st.randoms())
def test_disjoint_pages_in_any_order_pass(page_numbers, rnd):
    rnd.shuffle(page_numbers)
    offsets, iovas, sizes = batch_arrays([0x100000 + p * PAGE for p in page_numbers], PAGE, None)
    check_batch(len(page_numbers) * PAGE, offsets, iovas, sizes, VTD)


def test_messages_name_the_entry_and_the_fix():
    with pytest.raises(VfioError, match=r"batch entry 1: \[0x1000, 0x3000\) exceeds the buffer \(0x2000 bytes\)"):
        check_batch(0x2000, *batch_arrays([0x100000, 0x200000], [PAGE, 0x2000], [0, PAGE]), VTD)
    with pytest.raises(VfioError, match=r"batch entry 2: IOVA \[0xfee00000, 0xfee01000\) is outside"):
        check_batch(3 * PAGE, *batch_arrays([0x100000, 0x200000, 0xFEE00000], PAGE, None), VTD)
    with pytest.raises(VfioError, match=r"batch entries 0 and 2 overlap: IOVA \[0x100000, 0x102000\) and "
                                        r"\[0x101000, 0x102000\)"):
        check_batch(4 * PAGE, *batch_arrays([0x100000, 0x300000, 0x101000], [0x2000, PAGE, PAGE], None), VTD)


@given(st.lists(st.integers(0, 63), min_size=1, max_size=32, unique=True),
       st.lists(st.tuples(st.integers(0, 70), st.integers(1, 70)), max_size=6), st.integers(0, 70))
def test_bookkeeping_after_unmap_dma_of_covering_ranges(pages, unmapped, probe):
    """What unmap_dma tells a batch: entries wholly inside an unmapped range are gone, the
    rest stay, and overlap explanations name only those still mapped."""
    buffer = bytearray(len(pages) * PAGE)
    iova_of = [0x100000 + p * PAGE for p in pages]
    batch = DmaBatch(None, buffer, ffi.from_buffer(buffer), *batch_arrays(iova_of, PAGE, None), True, True)
    live = [True] * len(pages)
    for first, count in unmapped:
        lo, hi = 0x100000 + first * PAGE, 0x100000 + (first + count) * PAGE
        batch._drop_inside(lo, hi - lo)
        live = [ok and not (lo <= iova and iova + PAGE <= hi) for ok, iova in zip(live, iova_of)]
    assert batch.live.tolist() == live and batch.mapped == any(live)
    assert (batch.buffer is buffer) == any(live) and (batch.vaddrs is None) == (not any(live))
    at = 0x100000 + probe * PAGE
    expected = sorted((iova, iova + PAGE) for ok, iova in zip(live, iova_of)
                      if ok and iova < at + 2 * PAGE and at < iova + PAGE)
    assert sorted(batch.overlapping(at, 2 * PAGE)) == expected
