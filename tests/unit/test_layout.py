"""Memory layout: size parsing, the PCI hole split, the e820 map and the boot structure addresses."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from pykvm.vmm import layout as L
from pykvm.vmm.cpu_tables import gdt_bytes, page_tables_size


@pytest.mark.parametrize("text,expected", [
    ("512M", 512 * L.MiB), ("2G", 2 * L.GiB), ("2g", 2 * L.GiB), ("1024K", L.MiB), ("1T", 1 << 40),
    ("2GiB", 2 * L.GiB), ("512MB", 512 * L.MiB), (" 64M ", 64 * L.MiB), ("256", 256 * L.MiB), (4096, 4096),
])
def test_parse_size(text, expected):
    assert L.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1G", "1.5G", "12X", "0x100", "lots"])
def test_parse_size_rejects_garbage_with_an_example(text):
    with pytest.raises(L.LayoutError, match="e.g. 512M"):
        L.parse_size(text)


@pytest.mark.parametrize("text,expected", [
    ("4096B", 4096), ("4096b", 4096), ("512 B", 512), ("2097152B", 2 * L.MiB), ("1KiB", L.KiB), ("3kb", 3 * L.KiB),
])
def test_a_bare_b_means_bytes_not_mib(text, expected):
    """Review finding 7: the B of a unit-less size used to be dropped, so 4096B meant 4 GiB."""
    assert L.parse_size(text) == expected


@pytest.mark.parametrize("text", ["4096iB", "iB", "B", "512MiBB", "1BB", "2 G B"])
def test_b_or_ib_without_a_number_and_unit_is_refused(text):
    with pytest.raises(L.LayoutError, match="e.g. 512M"):
        L.parse_size(text)


def test_a_size_in_bytes_below_the_minimum_is_refused_not_read_as_mib():
    with pytest.raises(L.LayoutError, match="below the minimum"):
        L.memory_layout("4096B")


_UNITS = {"": L.MiB, "B": 1, "K": L.KiB, "M": L.MiB, "G": L.GiB, "T": 1 << 40}


@given(n=st.integers(0, 1 << 50), unit=st.sampled_from(sorted(_UNITS)), tail=st.sampled_from(["", "B", "iB"]),
       lower=st.booleans(), space=st.sampled_from(["", " "]))
def test_parse_size_scales_by_the_unit_and_only_by_it(n, unit, tail, lower, space):
    """Every spelling: a K/M/G/T unit may take B or iB after it and means the same; without a
    unit the number is MiB; a bare B is bytes; B or iB after a bare B, or iB alone, is refused."""
    text = f"{n}{space}{unit}{tail}"
    text = text.lower() if lower else text
    if unit in "KMGT" and unit:
        assert L.parse_size(text) == n * _UNITS[unit]
    elif unit == "" and tail in ("", "B"):
        assert L.parse_size(text) == n * (L.MiB if tail == "" else 1)
    elif unit == "B" and tail == "":
        assert L.parse_size(text) == n
    else:  # "5iB", "5BB", "5BiB"
        with pytest.raises(L.LayoutError):
            L.parse_size(text)


@pytest.mark.parametrize("size,match", [
    ("0", "must be positive"), (0, "must be positive"), ("0G", "must be positive"),
    ("1M", "below the minimum"), ("2T", "exceeds the maximum"), (64 * L.MiB + 1, "multiple of 4K"),
])
def test_bad_sizes_are_refused_clearly(size, match):
    with pytest.raises(L.LayoutError, match=match):
        L.memory_layout(size)


def test_small_memory_is_all_below_the_hole():
    lay = L.memory_layout("512M")
    assert lay.ram == (L.RamRegion(0, 512 * L.MiB),)
    assert lay.low_ram_end == lay.ram_end == 512 * L.MiB
    assert [(e.addr, e.end, e.type) for e in lay.e820] == [
        (0, 0x9FC00, L.E820_RAM), (0x9FC00, 0x100000, L.E820_RESERVED), (0x100000, 512 * L.MiB, L.E820_RAM),
    ]


def test_memory_beyond_the_hole_goes_above_4g():
    lay = L.memory_layout("4G")
    assert lay.ram == (L.RamRegion(0, 0xC000_0000), L.RamRegion(1 << 32, L.GiB))
    assert lay.e820[-1] == L.E820Entry(1 << 32, L.GiB, L.E820_RAM)
    assert lay.mmio32 == (0xC000_0000, 0xFEC0_0000 - 0xC000_0000)
    assert lay.mmio64_base == 5 * L.GiB
    assert not lay.is_ram(L.IOAPIC_ADDR) and not lay.is_ram(L.LAPIC_ADDR)
    assert lay.is_ram(0xBFFF_F000, 0x1000) and not lay.is_ram(0xBFFF_F000, 0x2000)


def test_custom_hole_start():
    lay = L.memory_layout("4G", pci_hole_start=0xE000_0000)
    assert lay.ram[0].size == 0xE000_0000 and lay.ram[1].size == 4 * L.GiB - 0xE000_0000
    with pytest.raises(L.LayoutError, match="PCI hole"):
        L.memory_layout("4G", pci_hole_start=0xE000_1000)


def test_boot_structures_fit_below_the_ebda_without_overlapping():
    spans = sorted([
        (L.BOOT_GDT_ADDR, len(gdt_bytes())), (L.PVH_START_INFO_ADDR, 0x1000), (L.ZERO_PAGE_ADDR, 0x1000),
        (L.BOOT_STACK_TOP - 0xFF0, 0xFF0), (L.PAGE_TABLES_ADDR, page_tables_size(4)), (L.CMDLINE_ADDR, L.CMDLINE_MAX),
    ])
    for (a, n), (b, _) in zip(spans, spans[1:]):
        assert a + n <= b, f"{a:#x}+{n:#x} overlaps {b:#x}"
    assert spans[-1][0] + spans[-1][1] <= L.EBDA_START
    assert L.PAGE_TABLES_ADDR + page_tables_size(4) <= L.PAGE_TABLES_END
    assert L.BIOS_ROM_START <= L.MPTABLE_ADDR < L.HIGH_MEMORY_START


@given(pages=st.integers(L.MIN_MEMORY // 4096, (64 * L.GiB) // 4096),
       hole=st.sampled_from([0x8000_0000, 0xC000_0000, 0xE000_0000]))
def test_e820_covers_exactly_the_ram(pages, hole):
    size = pages * 4096
    lay = L.memory_layout(size, pci_hole_start=hole)
    assert sum(r.size for r in lay.ram) == size
    entries = list(lay.e820)
    assert entries == sorted(entries, key=lambda e: e.addr)
    for a, b in zip(entries, entries[1:]):
        assert a.end <= b.addr  # no overlap
    # Merging adjacent entries gives back exactly the RAM regions (no RAM missing, nothing invented).
    merged = []
    for e in entries:
        if merged and merged[-1][1] == e.addr:
            merged[-1][1] = e.end
        else:
            merged.append([e.addr, e.end])
    assert merged == [[r.gpa, r.end] for r in lay.ram]
    usable = sum(e.size for e in entries if e.type == L.E820_RAM)
    assert usable == size - (L.HIGH_MEMORY_START - L.EBDA_START)
    assert all(e.end <= hole or e.addr >= 1 << 32 for e in entries)
