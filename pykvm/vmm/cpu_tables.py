"""Boot-time CPU structures as plain bytes and data: GDT, identity page tables, sregs.

Linux's 64-bit boot protocol (Documentation/arch/x86/boot.rst) wants long mode
with paging on, an identity map covering the kernel, zero page and command line,
and a GDT with flat 4G segments at __BOOT_CS (0x10, code) and __BOOT_DS (0x18,
data). PVH wants 32-bit protected mode, paging off, flat CS/DS and a 32-bit TSS
in TR. One GDT serves both; which selectors go into the segment registers
differs. Nothing here touches KVM: ``cpu.py`` turns :class:`SpecialRegs` into
``struct kvm_sregs``.
"""
from __future__ import annotations

import array
import struct
import sys
from typing import NamedTuple, Tuple

GDT_NULL = 0x00
GDT_CODE32 = 0x08  # PVH entry: 32-bit flat code
GDT_CODE64 = 0x10  # __BOOT_CS of the 64-bit boot protocol
GDT_DATA = 0x18  # __BOOT_DS: flat read/write data (32- and 64-bit)
GDT_TSS = 0x20  # a 16-byte system descriptor in long mode

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 always reads as 1

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_HUGE = 1 << 7  # PS: a 2 MiB page in a PD entry


class Segment(NamedTuple):
    """A segment register's hidden state, field for field like ``struct kvm_segment``."""

    base: int
    limit: int
    selector: int
    type: int
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 (the architectural name)
    g: int = 0
    avl: int = 0
    unusable: int = 0

    def descriptor(self) -> int:
        """The 8-byte GDT descriptor encoding this segment (the low half for system segments)."""
        limit = self.limit >> 12 if self.g else self.limit
        flags = self.avl | (self.l << 1) | (self.db << 2) | (self.g << 3)
        access = self.type | (self.s << 4) | (self.dpl << 5) | (self.present << 7)
        return (
            (limit & 0xFFFF)
            | (self.base & 0xFFFFFF) << 16
            | access << 40
            | ((limit >> 16) & 0xF) << 48
            | flags << 52
            | ((self.base >> 24) & 0xFF) << 56
        )


class DescriptorTable(NamedTuple):
    """A GDTR/IDTR value: the table's linear base and its limit (size - 1)."""

    base: int
    limit: int


class SpecialRegs(NamedTuple):
    """The initial system state of a boot vCPU (the parts of kvm_sregs that matter)."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr3: int
    cr4: int
    efer: int


_FLAT = 0xFFFFFFFF
CODE32 = Segment(0, _FLAT, GDT_CODE32, type=0xB, db=1, g=1)  # execute/read, accessed
CODE64 = Segment(0, _FLAT, GDT_CODE64, type=0xB, l=1, g=1)
DATA = Segment(0, _FLAT, GDT_DATA, type=0x3, db=1, g=1)  # read/write, accessed
TSS = Segment(0, 0x67, GDT_TSS, type=0xB, s=0)  # busy 32/64-bit TSS


def gdt_bytes() -> bytes:
    """The boot GDT: null, code32, code64, data, then a 16-byte TSS descriptor."""
    entries = [0, CODE32.descriptor(), CODE64.descriptor(), DATA.descriptor(), TSS.descriptor(), 0]
    return struct.pack("<6Q", *entries)


def identity_page_tables(base: int, gib: int = 4) -> bytes:
    """PML4, PDPT and ``gib`` page directories mapping [0, gib GiB) 1:1 with 2 MiB pages.

    The tables are laid out contiguously at ``base`` (page aligned): CR3 = base.
    """
    if base % 4096 or not 1 <= gib <= 512:
        raise ValueError(f"page tables need a 4K-aligned base and 1..512 GiB (got {base:#x}, {gib})")
    rw = PTE_PRESENT | PTE_WRITABLE
    pml4 = struct.pack("<Q", (base + 0x1000) | rw).ljust(4096, b"\0")
    pdpt = _u64s(range((base + 0x2000) | rw, (base + 0x2000 + gib * 0x1000) | rw, 0x1000)).ljust(4096, b"\0")
    leaf = rw | PTE_HUGE
    pds = _u64s(range(leaf, (gib << 30) | leaf, 1 << 21))  # entry i maps i * 2 MiB
    return pml4 + pdpt + pds


def _u64s(values: range) -> bytes:
    """Little-endian u64s, packed in C (start-up runs under TCG in the lab, where a Python
    loop over the 2048 directory entries costs milliseconds)."""
    out = array.array("Q", values)
    if sys.byteorder != "little":
        out.byteswap()
    return out.tobytes()


def page_tables_size(gib: int = 4) -> int:
    return (2 + gib) * 4096


def _tables(gdt_base: int, idt_base: int) -> Tuple[DescriptorTable, DescriptorTable]:
    return DescriptorTable(gdt_base, len(gdt_bytes()) - 1), DescriptorTable(idt_base, 0)


def long_mode_sregs(gdt_base: int, idt_base: int, cr3: int) -> SpecialRegs:
    """64-bit boot protocol state: long mode, paging on with CR3, CS=__BOOT_CS, data=__BOOT_DS."""
    gdt, idt = _tables(gdt_base, idt_base)
    return SpecialRegs(
        cs=CODE64, ds=DATA, es=DATA, fs=DATA, gs=DATA, ss=DATA, tr=TSS,
        gdt=gdt, idt=idt,
        cr0=CR0_PE | CR0_ET | CR0_PG, cr3=cr3, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
    )


def protected_mode_sregs(gdt_base: int, idt_base: int) -> SpecialRegs:
    """PVH entry state: 32-bit protected mode, paging off, flat CS/DS, 32-bit TSS in TR."""
    gdt, idt = _tables(gdt_base, idt_base)
    return SpecialRegs(
        cs=CODE32, ds=DATA, es=DATA, fs=DATA, gs=DATA, ss=DATA, tr=TSS,
        gdt=gdt, idt=idt, cr0=CR0_PE | CR0_ET, cr3=0, cr4=0, efer=0,
    )


__all__ = [
    "Segment", "DescriptorTable", "SpecialRegs", "CODE32", "CODE64", "DATA", "TSS",
    "GDT_CODE32", "GDT_CODE64", "GDT_DATA", "GDT_TSS", "gdt_bytes", "identity_page_tables",
    "page_tables_size", "long_mode_sregs", "protected_mode_sregs",
]
