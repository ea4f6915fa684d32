"""MSR filter ranges (pykvm.kvm.msr_filter) as KVM reads them: pure computation, no kernel."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.kvm.msr_filter import MAX_MSRS_PER_RANGE, MsrAccess, MsrFilterRange, msr_filter_struct


@st.composite
def ranges(draw):
    base = draw(st.integers(0, 0xFFFFFFFF - MAX_MSRS_PER_RANGE))
    nmsrs = draw(st.integers(1, MAX_MSRS_PER_RANGE))
    allowed = draw(st.sets(st.integers(base, base + nmsrs - 1), max_size=64))
    access = draw(st.sampled_from([MsrAccess.READ, MsrAccess.WRITE, MsrAccess.READ | MsrAccess.WRITE]))
    return MsrFilterRange(base, nmsrs, access, frozenset(allowed))


@given(ranges())
def test_bit_i_of_the_bitmap_allows_msr_base_plus_i(r: MsrFilterRange):
    r.check()
    bitmap = r.bitmap()
    assert len(bitmap) % 8 == 0 and len(bitmap) * 8 - 64 < r.nmsrs <= len(bitmap) * 8  # whole u64 words
    bits = int.from_bytes(bitmap, "little")
    assert {r.base + i for i in range(len(bitmap) * 8) if bits >> i & 1} == r.allowed


@given(ranges(), st.integers(0, 0xFFFFFFFF))
def test_an_allowed_msr_outside_the_range_is_refused(r: MsrFilterRange, msr: int):
    if r.base <= msr < r.base + r.nmsrs:
        return
    with pytest.raises(ValueError, match="cannot allow"):
        r._replace(allowed=r.allowed | {msr}).check()


@given(st.lists(ranges(), max_size=16), st.booleans())
def test_the_struct_holds_each_range_and_its_bitmap(rs, default_allow):
    if not rs and not default_allow:
        with pytest.raises(ValueError, match="at least one range"):
            msr_filter_struct(rs, default_allow)
        return
    c, bitmaps = msr_filter_struct(rs, default_allow)
    for i, r in enumerate(rs):
        got = c.ranges[i]
        assert (got.base, got.nmsrs, got.flags) == (r.base, r.nmsrs, int(r.access))
        assert bytes(got.bitmap[0:len(r.bitmap())]) == r.bitmap()
    assert all(c.ranges[i].nmsrs == 0 for i in range(len(rs), 16))  # unused ranges stay empty
