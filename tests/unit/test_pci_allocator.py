"""BAR allocator: natural alignment, no overlaps, the right window per kind."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.vmm.pci.allocator import BarAllocationError, BarAllocator
from pykvm.vmm.pci.config import BarKind, BarSpec

GiB = 1 << 30


def alloc() -> BarAllocator:
    return BarAllocator.for_layout(0xC000_0000, 0xFEC0_0000 - 0xC000_0000, 4 * GiB, phys_bits=40)


specs = st.builds(
    lambda kind, exp, pf: BarSpec(1 << min(exp, {BarKind.IO: 8, BarKind.MEM32: 28, BarKind.MEM64: 36}[kind]),
                                  kind, pf and kind is not BarKind.IO),
    st.sampled_from(list(BarKind)), st.integers(4, 36), st.booleans())


@given(st.lists(specs, max_size=40))
def test_allocations_are_aligned_disjoint_and_in_their_window(bars):
    a = alloc()
    placed = []
    for spec in bars:
        try:
            addr = a.allocate(spec)
        except BarAllocationError:
            continue
        assert addr % spec.size == 0
        assert a.accepts(spec.kind, addr, spec.size)
        if spec.kind is not BarKind.MEM64:
            assert addr + spec.size <= (0x10000 if spec.kind is BarKind.IO else 0xFEC0_0000)
        placed.append((spec.kind is BarKind.IO, addr, addr + spec.size))
    for i, (io1, s1, e1) in enumerate(placed):
        for io2, s2, e2 in placed[i + 1:]:
            assert io1 != io2 or e1 <= s2 or e2 <= s1


def test_windows_and_preferences():
    a = alloc()
    assert a.allocate(BarSpec(0x4000, BarKind.MEM64)) == 4 * GiB
    assert a.allocate(BarSpec(0x100000, BarKind.MEM32)) == 0xC000_0000
    assert a.allocate(BarSpec(0x1000, BarKind.MEM32)) == 0xC010_0000
    assert a.allocate(BarSpec(0x100, BarKind.IO)) == 0xC000
    assert not a.accepts(BarKind.MEM32, 4 * GiB, 0x1000)
    assert not a.accepts(BarKind.MEM64, 0x1000_0000, 0x1000)  # RAM
    assert a.accepts(BarKind.MEM64, 0xC800_0000, 0x1000)


def test_mem64_falls_back_below_4g_and_exhaustion_is_an_error():
    a = BarAllocator((0xC000_0000, 0xD000_0000), (4 * GiB, 4 * GiB + 0x1000))
    assert a.allocate(BarSpec(0x1000, BarKind.MEM64)) == 4 * GiB
    assert a.allocate(BarSpec(0x1000, BarKind.MEM64)) == 0xC000_0000
    with pytest.raises(BarAllocationError, match="no room"):
        a.allocate(BarSpec(1 << 29, BarKind.MEM32))


def test_free_returns_space():
    a = BarAllocator((0, 0x2000), (0x2000, 0x2000))
    spec = BarSpec(0x2000, BarKind.MEM32)
    addr = a.allocate(spec)
    with pytest.raises(BarAllocationError):
        a.allocate(spec)
    a.free(spec, addr)
    assert a.allocate(spec) == addr


def test_phys_bits_checked():
    with pytest.raises(ValueError):
        BarAllocator.for_layout(0xC000_0000, 0x1000, 4 * GiB, phys_bits=32)
