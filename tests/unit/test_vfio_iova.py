"""The IOVA allocator: blocks stay inside the container's ranges, never overlap, and coalesce."""
import errno

import pytest
from hypothesis import given, settings
from hypothesis import stateful
from hypothesis import strategies as st

from pykvm.vfio.iova import IovaAllocator, in_ranges, merge_ranges

PAGE = 4096
# x86 VT-d ranges as a 6.1 kernel reports them: everything but the MSI window
VTD = [(0, 0xFEDFFFFF), (0xFEF00000, (1 << 39) - 1)]


def test_in_ranges():
    assert in_ranges(VTD, 0x100000, PAGE)
    assert not in_ranges(VTD, 0xFEE00000, PAGE)  # the MSI window
    assert not in_ranges(VTD, 0xFEDFF000, 0x2000)  # straddles into it
    assert in_ranges(VTD, 0xFEDFF000, 0x1000)
    assert not in_ranges(VTD, 1 << 39, PAGE)
    assert not in_ranges(VTD, 0x1000, 0)


def test_skips_the_msi_window_and_honours_limit():
    a = IovaAllocator(VTD, PAGE, base=0xFED00000, limit=0xFF000000)
    first = a.alloc(0x100000)
    assert first == 0xFED00000
    second = a.alloc(0x1000)
    assert second == 0xFEF00000  # jumped over 0xfee00000-0xfeefffff
    with pytest.raises(OSError) as exc:
        a.alloc(0x200000)
    assert exc.value.errno == errno.ENOSPC and "no free IOVA block" in str(exc.value)


def test_alignment_and_rounding():
    a = IovaAllocator(VTD, PAGE, base=0x1000)
    assert a.alloc(1) == 0x1000  # a byte takes a page
    two_mib = a.alloc(0x200000, align=0x200000)
    assert two_mib % 0x200000 == 0
    assert a.alloc(PAGE) == 0x2000  # the gap before the aligned block is still used


def test_double_free_is_refused():
    a = IovaAllocator(VTD, PAGE)
    iova = a.alloc(PAGE)
    a.free(iova)
    with pytest.raises(ValueError, match="not allocated"):
        a.free(iova)


def test_merge_ranges():
    assert merge_ranges([(0x3000, 0x3FFF), (0, 0xFFF), (0x1000, 0x1FFF), (0x1800, 0x27FF)]) == (
        (0, 0x27FF), (0x3000, 0x3FFF))


def test_bad_page_size():
    with pytest.raises(ValueError):
        IovaAllocator(VTD, 3000)


ranges_st = st.lists(st.tuples(st.integers(0, 1 << 32), st.integers(1, 1 << 24)), min_size=1, max_size=4).map(
    lambda pairs: [(s, s + n - 1) for s, n in pairs])


class AllocatorMachine(stateful.RuleBasedStateMachine):
    """Random alloc/free sequences: every live block lies in the ranges, none overlap, and after
    freeing everything the free space is whole again."""

    @stateful.initialize(ranges=ranges_st, base=st.integers(0, 1 << 20), limit=st.none() | st.integers(1 << 20, 1 << 33))
    def setup(self, ranges, base, limit):
        self.ranges = merge_ranges(ranges)
        self.alloc = IovaAllocator(ranges, PAGE, base, limit)
        self.initial = self.alloc.free_blocks()
        self.total = self.alloc.free_bytes
        self.live = {}

    @stateful.rule(size=st.integers(1, 1 << 20), align_shift=st.integers(12, 22))
    def allocate(self, size, align_shift):
        try:
            iova = self.alloc.alloc(size, 1 << align_shift)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            return
        rounded = -(-size // PAGE) * PAGE
        assert iova % (1 << align_shift) == 0
        assert in_ranges(self.ranges, iova, rounded)
        for other, osize in self.live.items():
            assert iova + rounded <= other or other + osize <= iova
        self.live[iova] = rounded

    @stateful.precondition(lambda self: self.live)
    @stateful.rule(data=st.data())
    def release(self, data):
        iova = data.draw(st.sampled_from(sorted(self.live)))
        self.alloc.free(iova)
        del self.live[iova]

    @stateful.invariant()
    def accounting(self):
        if hasattr(self, "alloc"):
            assert self.alloc.free_bytes + sum(self.live.values()) == self.total

    def teardown(self):
        if hasattr(self, "alloc"):
            for iova in list(self.live):
                self.alloc.free(iova)
            assert self.alloc.free_blocks() == self.initial


AllocatorMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestAllocator = AllocatorMachine.TestCase


@given(ranges_st)
def test_free_space_is_page_aligned_and_inside(ranges):
    a = IovaAllocator(ranges, PAGE)
    for lo, hi in a.free_blocks():
        assert lo % PAGE == 0 and hi % PAGE == 0 and lo < hi
        assert in_ranges(merge_ranges(ranges), lo, hi - lo)
