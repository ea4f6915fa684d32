"""MP table: parsed back as Linux's mpparse reads it, checksums, CPUs and interrupt routing."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from pykvm.vmm.layout import IOAPIC_ADDR, LAPIC_ADDR, MPTABLE_ADDR
from pykvm.vmm.tables.mptable import ISA_BUS, MAX_CPUS, PCI_BUS, build_mptable

_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def parse(table: bytes, base: int):
    """Check signatures, lengths and checksums; return the config table's entries as tuples."""
    assert table[:4] == b"_MP_" and table[8] == 1 and table[9] == 4
    assert sum(table[:16]) & 0xFF == 0
    config = struct.unpack_from("<I", table, 4)[0] - base
    sig, length, rev, _, oem, product, _, _, count, lapic, ext_len, _, _ = struct.unpack_from("<4sHBB8s12sIHHIHBB", table, config)
    assert (sig, rev, lapic, ext_len) == (b"PCMP", 4, LAPIC_ADDR, 0)
    assert config + length == len(table) and sum(table[config:config + length]) & 0xFF == 0
    entries, pos = [], config + 44
    for _ in range(count):
        kind = table[pos]
        size = _SIZES[kind]
        entries.append((kind, table[pos:pos + size]))
        pos += size
    assert pos == len(table)
    return entries


def _of(entries, kind):
    return [e for k, e in entries if k == kind]


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_cpus_buses_ioapic_and_routing(cpus):
    entries = parse(build_mptable(MPTABLE_ADDR, cpus, [(3, 0, 16), (5, 1, 17)]), MPTABLE_ADDR)
    procs = _of(entries, 0)
    assert [p[1] for p in procs] == list(range(cpus))  # APIC ids
    assert [p[3] for p in procs] == [3] + [1] * (cpus - 1)  # enabled; the BSP flag only on CPU 0
    assert [(b[1], b[2:8]) for b in _of(entries, 1)] == [(PCI_BUS, b"PCI   "), (ISA_BUS, b"ISA   ")]
    (ioapic,) = _of(entries, 2)
    assert ioapic[1] == cpus and ioapic[3] & 1 and struct.unpack_from("<I", ioapic, 4)[0] == IOAPIC_ADDR
    ints = [struct.unpack("<BBHBBBB", e) for e in _of(entries, 3)]
    isa = {irq: (pin, apic) for _, _, _, bus, irq, apic, pin in ints if bus == ISA_BUS}
    assert isa[0] == (2, cpus) and 2 not in isa
    assert all(isa[i] == (i, cpus) for i in range(1, 16) if i != 2)
    pci = [(irq >> 2, irq & 3, pin, flags) for _, _, flags, bus, irq, _, pin in ints if bus == PCI_BUS]
    assert pci == [(3, 0, 16, 0xF), (5, 1, 17, 0xF)]  # level, active low
    lints = [struct.unpack("<BBHBBBB", e) for e in _of(entries, 4)]
    assert [(t, apic, lint) for _, t, _, _, _, apic, lint in lints] == [(3, 0xFF, 0), (1, 0xFF, 1)]  # ExtINT, NMI


@given(cpus=st.integers(1, MAX_CPUS),
       pci=st.lists(st.tuples(st.integers(0, 31), st.integers(0, 3), st.integers(16, 23)), max_size=32),
       base=st.sampled_from([MPTABLE_ADDR, 0x9FC00, 0xF5A30]))
def test_checksums_valid_and_table_fits_the_bios_area(cpus, pci, base):
    table = build_mptable(base, cpus, pci)
    entries = parse(table, base)
    assert len(_of(entries, 0)) == cpus
    assert len(table) <= 0x10000


@pytest.mark.parametrize("args,match", [
    ((MPTABLE_ADDR, 0), "1 to 254 CPUs"), ((MPTABLE_ADDR, MAX_CPUS + 1), "1 to 254"),
    ((MPTABLE_ADDR + 4, 1), "16-byte aligned"), ((MPTABLE_ADDR, 1, [(32, 0, 16)]), "slot 32"),
    ((MPTABLE_ADDR, 1, [(1, 4, 16)]), "INT4"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_mptable(*args)
