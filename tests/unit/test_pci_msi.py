"""MSI and MSI-X emulation: what the guest programs becomes Vectors; nothing else moves."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.vmm.pci.config import CAP_ID_MSIX, ConfigSpace
from pykvm.vmm.pci.msi import MsiCap, MsiMessage, Vectors
from pykvm.vmm.pci.msix import Msix


def msi(vectors=4, is64=True, maskable=True):
    c = ConfigSpace.for_function(1, 2, 3)
    calls = []
    cap = MsiCap.add(c, vectors, is64, maskable, on_change=lambda: calls.append(1))
    return c, cap, calls


@pytest.mark.parametrize("is64", [True, False])
def test_msi_program_and_enable(is64):
    c, cap, calls = msi(is64=is64)
    o = cap.offset
    assert cap.vectors() == Vectors(False, ())
    c.write(o + 4, 4, 0xFEE01003)  # low address bits are read-only zero
    if is64:
        c.write(o + 8, 4, 0x1)
    data = o + (0xC if is64 else 0x8)
    c.write(data, 2, 0x4041)
    c.write(o + 2, 2, 0x1 | 0x1 << 4)  # enable, 2 vectors
    high = (1 << 32) if is64 else 0
    assert cap.vectors() == Vectors(True, (MsiMessage(high | 0xFEE01000, 0x4040), MsiMessage(high | 0xFEE01000, 0x4041)))
    c.write(data + 4, 4, 0b10)
    assert cap.vectors().messages[1] is None
    assert calls, "on_change fires on writes"


def test_msi_multiple_message_enable_is_clamped():
    c, cap, _ = msi(vectors=2)
    c.write(cap.offset + 2, 2, 0x1 | 0x5 << 4)  # asks for 32
    assert cap.vectors().count == 2


def test_msi_capability_bits_are_read_only():
    c, cap, _ = msi(vectors=4, maskable=False)
    control = c.read(cap.offset + 2, 2)
    c.write(cap.offset + 2, 2, 0xFFFF)
    assert c.read(cap.offset + 2, 2) & ~0x71 == control & ~0x71


@given(st.lists(st.tuples(st.integers(0x3C, 0x70), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)), max_size=40),
       st.sampled_from([1, 2, 8, 32]), st.booleans(), st.booleans())
def test_msi_random_writes(ops, vectors, is64, maskable):
    c, cap, _ = msi(vectors, is64, maskable)
    for off, size, value in ops:
        c.write(off, size, value)
    v = cap.vectors()
    assert v.count <= vectors
    for m in v.messages:
        assert m is None or (m.address & 3 == 0 and m.data <= 0xFFFF)


# -- MSI-X -----------------------------------------------------------------------------
def msix(size=8, table_bar=0, table_offset=0x2000, pba_bar=0, pba_offset=0x3000):
    c = ConfigSpace.for_function(1, 2, 3)
    body = struct.pack("<HII", size - 1, table_offset | table_bar, pba_offset | pba_bar)
    calls = []
    m = Msix(c, c.add_capability(CAP_ID_MSIX, body), on_change=lambda: calls.append(1))
    return c, m, calls


def entry(addr, data, ctrl):
    return struct.pack("<QII", addr, data, ctrl)


def test_msix_geometry():
    _, m, _ = msix(size=65, table_bar=4, pba_bar=2, pba_offset=0x8000)
    assert (m.size, m.table_bar, m.table_offset, m.table_size) == (65, 4, 0x2000, 65 * 16)
    assert (m.pba_bar, m.pba_offset, m.pba_size) == (2, 0x8000, 16)


def test_msix_vectors_masked_until_unmasked_and_enabled():
    c, m, calls = msix(size=4)
    assert all(m.masked(v) for v in range(4))
    m.table_write(16, entry(0xFEE00000, 0x41, 1))
    c.write(m.offset + 2, 2, 0x8000)
    assert m.vectors() == Vectors(True, (None,) * 4)
    m.table_write(16 + 12, (0).to_bytes(4, "little"))
    assert m.vectors().messages[1] == MsiMessage(0xFEE00000, 0x41)
    c.write(m.offset + 2, 2, 0xC000)  # function mask
    assert m.vectors() == Vectors(True, (None,) * 4)
    c.write(m.offset + 2, 2, 0)
    assert m.vectors() == Vectors(False, ())
    assert calls


def test_msix_table_reserved_bits_and_bounds():
    _, m, _ = msix(size=2)
    m.table_write(0, b"\xff" * 16)
    assert m.table_read(0, 16) == b"\xfc" + b"\xff" * 11 + b"\x01\x00\x00\x00"
    assert m.table_read(32, 4) == b"\xff" * 4
    m.table_write(30, b"\x00" * 4)  # crosses the end: dropped
    assert m.table_read(28, 4) == b"\x01\x00\x00\x00"
    assert m.pba_read(0, 8) == bytes(8) and m.pba_read(8, 4) == b"\xff" * 4


@given(st.lists(st.tuples(st.integers(-4, 0x90), st.binary(min_size=0, max_size=9)), max_size=50))
def test_msix_random_table_writes(ops):
    _, m, _ = msix(size=8)
    for off, data in ops:
        m.table_write(off, data)
    for v in range(8):
        e = m.table_read(v * 16, 16)
        assert e[0] & 3 == 0 and e[12] & ~1 == 0 and e[13:16] == b"\0\0\0"
