"""GuestMemory: bounds, regions, views (no KVM needed)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.memory import PAGE_SIZE, GuestMemory, GuestMemoryError, MemoryRegion


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory()
    m.add_region(0, 16 * PAGE_SIZE, name="low")
    m.add_region(0x100000, 4 * PAGE_SIZE, backing="memfd", name="high")
    yield m
    m.close()


@given(gpa=st.integers(-2, 0x200000), size=st.integers(0, 0x20000))
def test_access_is_inside_a_region_or_a_clear_error(mem, gpa, size):
    inside = any(r.gpa <= gpa and gpa + size <= r.end for r in mem) and gpa >= 0
    if inside:
        assert len(mem.read(gpa, size)) == size
    else:
        with pytest.raises(GuestMemoryError, match="not inside guest RAM|bad guest access"):
            mem.read(gpa, size)


@given(gpa=st.integers(0, 16 * PAGE_SIZE - 8), value=st.integers(0, 2**64 - 1))
def test_integers_round_trip_and_numpy_shares_bytes(mem, gpa, value):
    mem.write_u64(gpa, value)
    assert mem.read_u64(gpa) == value
    arr = mem.numpy(gpa, 8, np.uint8)
    assert int.from_bytes(arr.tobytes(), "little") == value
    arr[0] ^= 0xFF
    assert mem.read_u8(gpa) == (value & 0xFF) ^ 0xFF


def test_overlap_and_alignment_are_rejected(mem):
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add_region(0x1000, PAGE_SIZE)
    with pytest.raises(GuestMemoryError, match="multiples"):
        GuestMemory().add_region(0x10, PAGE_SIZE)
    with pytest.raises(GuestMemoryError, match="unknown backing"):
        GuestMemory().add_region(0, PAGE_SIZE, backing="tape")


def test_host_address_is_stable_and_memfd_has_an_fd(mem):
    high = mem.region_for(0x100000)
    assert high.fd >= 0
    assert mem.host_address(0x100010) == high.host_address + 0x10


def test_a_region_is_a_context_manager_that_unmaps_on_exit():
    with MemoryRegion(0, 0x2000, name="ctx") as r:
        r.buffer[0:2] = b"ok"
        assert bytes(r.buffer[0:2]) == b"ok"
    with pytest.raises(GuestMemoryError, match="closed"):
        r.buffer
