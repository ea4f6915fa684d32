"""The config-space model: write masks, RW1C bits, BAR sizing, ROM, capability lists."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.vmm.pci.config import (
    BASE_ADDRESS_0, CAPABILITY_LIST, COMMAND, COMMAND_IO, COMMAND_MEMORY, INTERRUPT_LINE, ROM_ADDRESS,
    STATUS, STATUS_CAP_LIST, BarKind, BarSpec, BarWindow, ConfigSpace,
)

BARS = {
    0: BarSpec(0x100000, BarKind.MEM32),
    1: BarSpec(0x100, BarKind.IO),
    2: BarSpec(0x4000, BarKind.MEM64, prefetchable=True),
    4: BarSpec(1 << 33, BarKind.MEM64),
}


def make() -> ConfigSpace:
    c = ConfigSpace.for_function(0x1234, 0x11E8, 0x00FF00, revision=0x10, subsystem_vendor=0x1AF4,
                                 subsystem=0x1100, interrupt_pin=1)
    for i, spec in BARS.items():
        c.set_bar(i, spec)
    c.set_rom(0x10000)
    c.add_capability(0x09, bytes(6), wmask=b"\x00\xff")
    return c


writes = st.lists(st.tuples(st.integers(-8, 0x108), st.sampled_from([0, 1, 2, 3, 4, 8]),
                            st.integers(0, (1 << 64) - 1)), max_size=60)


def test_header_reads_back():
    c = make()
    assert c.read(0, 4) == 0x11E81234
    assert c.read(0x08, 4) == 0x00FF0010
    assert c.read(0x2C, 4) == 0x11001AF4
    assert c.read(0x3D, 1) == 1


def test_out_of_range_and_bad_sizes_read_all_ones():
    c = make()
    assert c.read(0xFE, 4) == 0xFFFFFFFF
    assert c.read(0x10, 3) == 0xFFFFFF
    assert c.read(-1, 1) == 0xFF


@pytest.mark.parametrize("index", sorted(BARS))
def test_bar_sizing(index):
    c = make()
    spec = BARS[index]
    off = BASE_ADDRESS_0 + 4 * index
    c.write(off, 4, 0xFFFFFFFF)
    low = c.read(off, 4)
    if spec.kind is BarKind.MEM64:
        c.write(off + 4, 4, 0xFFFFFFFF)
        size_mask = low & ~0xF | c.read(off + 4, 4) << 32
        assert (~size_mask & ((1 << 64) - 1)) + 1 == spec.size
        assert low & 0xF == 0x4 | (0x8 if spec.prefetchable else 0)
    elif spec.kind is BarKind.IO:
        assert ((~(low & ~0x3)) & 0xFFFFFFFF) + 1 == spec.size
        assert low & 0x3 == 0x1
    else:
        assert ((~(low & ~0xF)) & 0xFFFFFFFF) + 1 == spec.size
        assert low & 0xF == 0


def test_unused_bar_reads_zero_after_all_ones():
    c = make()
    c.write(BASE_ADDRESS_0 + 4 * 3, 4, 0xFFFFFFFF)  # upper half of BAR2 is BAR3: part of BAR2
    c.write(BASE_ADDRESS_0 + 4 * 1, 4, 0xFFFFFFFF)
    fresh = ConfigSpace.for_function(1, 2, 3)
    fresh.write(BASE_ADDRESS_0, 4, 0xFFFFFFFF)
    assert fresh.read(BASE_ADDRESS_0, 4) == 0


def test_bar_declaration_errors():
    c = ConfigSpace()
    with pytest.raises(ValueError):
        c.set_bar(5, BarSpec(0x1000, BarKind.MEM64))
    c.set_bar(0, BarSpec(0x1000, BarKind.MEM64))
    with pytest.raises(ValueError):
        c.set_bar(1, BarSpec(0x1000, BarKind.MEM32))
    with pytest.raises(ValueError):
        BarSpec(0x1001, BarKind.MEM32)
    with pytest.raises(ValueError):
        BarSpec(0x20000, BarKind.IO)


def test_decoded_bars_follow_command():
    c = make()
    c.write(BASE_ADDRESS_0, 4, 0xC0000000)
    c.write(BASE_ADDRESS_0 + 4, 4, 0xC000)
    c.write(BASE_ADDRESS_0 + 8, 4, 0x12340000)
    c.write(BASE_ADDRESS_0 + 12, 4, 0x1)
    assert list(c.decoded_bars()) == []
    c.write(COMMAND, 2, COMMAND_MEMORY)
    assert list(c.decoded_bars()) == [BarWindow(0, BarKind.MEM32, 0xC0000000, 0x100000),
                                      BarWindow(2, BarKind.MEM64, 0x1_12340000, 0x4000)]
    c.write(COMMAND, 2, COMMAND_IO)
    assert list(c.decoded_bars()) == [BarWindow(1, BarKind.IO, 0xC000, 0x100)]


def test_sizing_pattern_is_not_decoded():
    c = make()
    c.write(COMMAND, 2, COMMAND_MEMORY)
    c.write(BASE_ADDRESS_0, 4, 0xFFFFFFFF)
    assert all(w.index != 0 for w in c.decoded_bars())


def test_status_rw1c():
    c = make()
    c.set(STATUS, 2, c.get(STATUS, 2) | 0x2000 | 0x0100)
    c.write(STATUS, 2, 0x2000)
    assert c.read(STATUS, 2) & 0x2000 == 0
    assert c.read(STATUS, 2) & 0x0100
    assert c.read(STATUS, 2) & STATUS_CAP_LIST  # read-only bit survives


def test_rom_sizing_and_hidden_rom():
    c = make()
    c.write(ROM_ADDRESS, 4, 0xFFFFFFFF)
    assert c.read(ROM_ADDRESS, 4) == 0xFFFF0001
    c.set_rom(0)
    c.write(ROM_ADDRESS, 4, 0xFFFFFFFF)
    assert c.read(ROM_ADDRESS, 4) == 0


def test_capability_list():
    c = ConfigSpace()
    a = c.add_capability(0x05, bytes(12))
    b = c.add_capability(0x11, bytes(10))
    assert c.read(STATUS, 2) & STATUS_CAP_LIST
    assert c.read(CAPABILITY_LIST, 1) == a == 0x40
    assert b % 4 == 0 and b >= a + 14
    assert list(c.capabilities()) == [(0x05, a), (0x11, b)]
    assert c.find_capability(0x11) == b and c.find_capability(0x10) is None
    with pytest.raises(ValueError):
        c.add_capability(0x09, bytes(300))
    with pytest.raises(ValueError):
        c.add_capability(0x09, bytes(4), offset=a)


def test_capability_loop_is_bounded():
    c = ConfigSpace()
    a = c.add_capability(0x05, bytes(6))
    c.set(a + 1, 1, a)  # points at itself
    assert list(c.capabilities()) == [(0x05, a)]


@given(writes)
def test_random_writes_keep_read_only_bits_and_bar_alignment(ops):
    c = make()
    ro = bytes(~(w | x) & 0xFF for w, x in zip(c.wmask, c.w1cmask))
    before = bytes(c.data)
    for offset, size, value in ops:
        c.write(offset, size, value)
        assert c.read(offset, size) >= 0
    for i, (b0, b1, m) in enumerate(zip(before, c.data, ro)):
        assert b0 & m == b1 & m, f"read-only bits changed at {i:#x}"
    for index, spec in BARS.items():
        assert c.bar_address(index) % spec.size == 0
        low = c.read(BASE_ADDRESS_0 + 4 * index, 4)
        assert low & (0x3 if spec.kind is BarKind.IO else 0xF) == spec.type_bits
    for w in c.decoded_bars():
        assert w.size == BARS[w.index].size and w.address % w.size == 0
    assert c.read(INTERRUPT_LINE, 1) == c.get(INTERRUPT_LINE, 1)
