"""Boot GDT descriptors and identity page tables, decoded the way the CPU reads them."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from pykvm.vmm.cpu_tables import (
    CODE32, CODE64, DATA, GDT_CODE32, GDT_CODE64, GDT_DATA, GDT_TSS, TSS, gdt_bytes, identity_page_tables,
    long_mode_sregs, page_tables_size, protected_mode_sregs,
)


def test_gdt_has_the_classic_flat_descriptors_at_the_boot_protocol_selectors():
    gdt = struct.unpack("<6Q", gdt_bytes())
    assert gdt[0] == 0
    assert gdt[GDT_CODE32 // 8] == 0x00CF9B000000FFFF  # 32-bit code, 4G flat
    assert gdt[GDT_CODE64 // 8] == 0x00AF9B000000FFFF  # 64-bit code (__BOOT_CS = 0x10)
    assert gdt[GDT_DATA // 8] == 0x00CF93000000FFFF  # data (__BOOT_DS = 0x18)
    assert gdt[GDT_TSS // 8] == 0x00008B0000000067 and gdt[GDT_TSS // 8 + 1] == 0  # 16-byte TSS
    assert [s.selector for s in (CODE32, CODE64, DATA, TSS)] == [GDT_CODE32, GDT_CODE64, GDT_DATA, GDT_TSS]


def _walk(tables: bytes, base: int, va: int) -> int:
    """Translate ``va`` through 4-level paging with 2 MiB pages, reading ``tables`` at ``base``."""
    def entry(table: int, index: int) -> int:
        e = struct.unpack_from("<Q", tables, table - base + 8 * index)[0]
        assert e & 1, f"not present: table {table:#x} index {index}"
        return e
    pml4e = entry(base, (va >> 39) & 511)
    pdpte = entry(pml4e & ~0xFFF, (va >> 30) & 511)
    assert not pdpte & 0x80
    pde = entry(pdpte & ~0xFFF, (va >> 21) & 511)
    assert pde & 0x80 and pde & 2  # 2 MiB, writable
    return (pde & ~0x1FFFFF & (1 << 52) - 1) | (va & 0x1FFFFF)


_TABLES = identity_page_tables(0x9000, 4)


@given(st.integers(0, (4 << 30) - 1))
def test_identity_map_translates_every_address_below_4g_to_itself(va):
    assert _walk(_TABLES, 0x9000, va) == va


def test_page_table_size_and_limits():
    assert len(_TABLES) == page_tables_size(4) == 6 * 4096
    assert len(identity_page_tables(0x1000, 1)) == 3 * 4096
    with pytest.raises(ValueError):
        identity_page_tables(0x9001)


def test_sregs():
    lm = long_mode_sregs(0x500, 0x540, 0x9000)
    assert (lm.gdt.base, lm.gdt.limit, lm.idt.limit) == (0x500, len(gdt_bytes()) - 1, 0)
    assert lm.cr0 == 0x80000011 and lm.cr4 == 0x20 and lm.efer == 0x500 and lm.cr3 == 0x9000
    pm = protected_mode_sregs(0x500, 0x540)
    assert pm.cr0 == 0x11 and pm.cr4 == pm.efer == pm.cr3 == 0 and pm.cs is CODE32 and pm.tr is TSS
