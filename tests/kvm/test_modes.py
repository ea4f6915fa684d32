"""CPU modes on the real /dev/kvm: real, protected (guest-switched and set by the host),
32-bit paging and long mode with 4-level paging, checked register by register."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pykvm.kvm import HltExit, IoExit, Vcpu
from pykvm.memory import GuestMemory
from tests.kvm.guests import CODE, real_mode_vcpu

pytestmark = pytest.mark.kvm

CR0_PE, CR0_ET, CR0_PG = 1 << 0, 1 << 4, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
CF, ZF = 1 << 0, 1 << 6
P, W, A, D = 1 << 0, 1 << 1, 1 << 5, 1 << 6
GDT = 0x500
SEL_CODE32, SEL_DATA, SEL_CODE64 = 0x08, 0x10, 0x18
# Flat descriptors: base 0, limit 0xfffff pages; access 0x9b code / 0x93 data; flags G|D (0xc) or G|L (0xa).
GDT_BYTES = bytes(8) + bytes.fromhex("ffff0000009bcf00" "ffff00000093cf00" "ffff0000009baf00")


def run_to_hlt(cpu: Vcpu) -> None:
    e = cpu.run(timeout=5)
    assert isinstance(e, HltExit), e


def flat_mode(cpu: Vcpu, mem: GuestMemory, cr0: int, cr3: int = 0, cr4: int = 0, efer: int = 0,
              long_mode: bool = False) -> None:
    """Load the hidden segment state a flat GDT would give, plus control registers."""
    mem.write(GDT, GDT_BYTES)
    s = cpu.get_sregs()
    s.gdt.base, s.gdt.limit = GDT, len(GDT_BYTES) - 1
    for seg, sel in ((s.cs, SEL_CODE64 if long_mode else SEL_CODE32), (s.ds, SEL_DATA), (s.es, SEL_DATA),
                     (s.ss, SEL_DATA), (s.fs, SEL_DATA), (s.gs, SEL_DATA)):
        seg.selector, seg.base, seg.limit, seg.present, seg.s, seg.dpl, seg.g = sel, 0, 0xFFFFFFFF, 1, 1, 0, 1
        seg.type = 0x3 if sel == SEL_DATA else 0xB
        seg.l = 1 if sel == SEL_CODE64 else 0
        seg.db = 0 if sel == SEL_CODE64 else 1
    s.cr0, s.cr3, s.cr4, s.efer = cr0, cr3, cr4, efer
    cpu.set_sregs(s)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=25)
@given(a=st.integers(0, 0xFFFF), b=st.integers(0, 0xFFFF))
def test_real_mode_16_bit_add_sets_result_and_flags(kvm, a, b):
    with kvm.create_vm() as vm:
        cpu, _ = real_mode_vcpu(vm, bytes.fromhex("01 d8 f4"))  # add ax, bx ; hlt
        r = cpu.get_regs()
        r.rax, r.rbx = a | 0xABCD0000, b  # the upper half of EAX must survive a 16-bit add
        cpu.set_regs(r)
        run_to_hlt(cpu)
        r = cpu.get_regs()
        assert r.rax == 0xABCD0000 | ((a + b) & 0xFFFF)
        assert bool(r.rflags & CF) == (a + b > 0xFFFF)
        assert bool(r.rflags & ZF) == ((a + b) & 0xFFFF == 0)
        assert r.rip == CODE + 3
        s = cpu.get_sregs()
        assert s.cr0 & CR0_PE == 0 and s.cs.base == 0 and s.cs.selector == 0


def test_real_mode_segment_arithmetic(vm):
    # mov ax, 0x1234 ; mov es, ax ; mov byte ptr es:[0x10], 0x5a ; hlt  -> linear 0x12340 + 0x10
    cpu, mem = real_mode_vcpu(vm, bytes.fromhex("b8 34 12 8e c0 26 c6 06 10 00 5a f4"), mem_size=0x20000)
    run_to_hlt(cpu)
    assert mem.read_u8(0x12350) == 0x5A
    assert cpu.get_sregs().es.base == 0x12340


def test_guest_switches_itself_to_protected_mode(vm):
    real = bytes.fromhex(
        "fa"              # cli
        "0f 01 16 00 0f"  # lgdt [0xf00]
        "0f 20 c0"        # mov eax, cr0
        "0c 01"           # or al, 1
        "0f 22 c0"        # mov cr0, eax
        "ea 00 11 08 00"  # jmp 0x08:0x1100
    )
    prot = bytes.fromhex(
        "66 b8 10 00"     # mov ax, 0x10
        "8e d8"           # mov ds, ax
        "8e d0"           # mov ss, ax
        "a1 f0 ff 1f 00"  # mov eax, [0x1ffff0]
        "f4"              # hlt
    )
    cpu, mem = real_mode_vcpu(vm, real, mem_size=2 << 20)
    mem.write(GDT, GDT_BYTES)
    mem.write(0xF00, struct.pack("<HI", len(GDT_BYTES) - 1, GDT))
    mem.write(0x1100, prot)
    mem.write_u32(0x1FFFF0, 0xCAFEF00D)
    run_to_hlt(cpu)
    r, s = cpu.get_regs(), cpu.get_sregs()
    assert r.rax & 0xFFFFFFFF == 0xCAFEF00D
    assert r.rip == 0x1100 + len(prot)
    assert s.cr0 & CR0_PE
    assert (s.gdt.base, s.gdt.limit) == (GDT, len(GDT_BYTES) - 1)
    assert (s.cs.selector, s.cs.base, s.cs.limit, s.cs.type, s.cs.db, s.cs.s, s.cs.present) == (
        0x08, 0, 0xFFFFFFFF, 0xB, 1, 1, 1)
    assert (s.ds.selector, s.ds.base, s.ds.limit, s.ds.db) == (0x10, 0, 0xFFFFFFFF, 1)
    assert (s.ss.selector, s.ss.db) == (0x10, 1)


def test_protected_mode_from_sregs_runs_32_bit_code(vm):
    # mov eax, 0x12345678 ; add eax, eax ; mov [0x3000], eax ; hlt
    # Decoded as 16-bit code, b8 would take a 2-byte immediate: the result proves CS.D=1.
    code = bytes.fromhex("b8 78 56 34 12 01 c0 a3 00 30 00 00 f4")
    cpu, mem = real_mode_vcpu(vm, code)
    flat_mode(cpu, mem, CR0_PE | CR0_ET)
    run_to_hlt(cpu)
    r = cpu.get_regs()
    assert r.rax == 0x2468ACF0
    assert mem.read_u32(0x3000) == 0x2468ACF0
    assert r.rip == CODE + len(code)


def test_32_bit_paging_translates_and_sets_accessed_dirty(vm):
    # mov dword ptr [0xc0000000], 0x600dcafe ; mov eax, [0xc0000004] ; hlt
    code = bytes.fromhex("c7 05 00 00 00 c0 fe ca 0d 60 a1 04 00 00 c0 f4")
    cpu, mem = real_mode_vcpu(vm, code)
    pd, pt_low, pt_high, frame = 0x2000, 0x3000, 0x4000, 0x8000
    mem.write_u32(pd, pt_low | P | W)
    mem.write_u32(pt_low + 4, 0x1000 | P | W)  # the code page, identity
    mem.write_u32(pd + 4 * 0x300, pt_high | P | W)
    mem.write_u32(pt_high, frame | P | W)  # 0xc0000000 -> 0x8000
    mem.write_u32(frame + 4, 0x11223344)
    flat_mode(cpu, mem, CR0_PE | CR0_ET | CR0_PG, cr3=pd)
    if not cpu.get_sregs().cr0 & CR0_PG:
        pytest.skip("this KVM drops CR0.PG outside long mode (PVM has no 32-bit paging); runs on VMX/SVM")
    assert mem.read_u32(pt_high) == frame | P | W
    t = cpu.translate(0xC0000004)
    assert (t["physical_address"], t["valid"]) == (frame + 4, 1)
    assert cpu.translate(0xC0001000)["valid"] == 0
    run_to_hlt(cpu)
    assert mem.read_u32(frame) == 0x600DCAFE
    assert cpu.get_regs().rax == 0x11223344
    assert mem.read_u32(pt_high) == frame | P | W | A | D


def map_4k(mem: GuestMemory, pml4: int, virt: int, phys: int, next_table: list) -> None:
    """Walk PML4 -> PDPT -> PD -> PT for ``virt``, allocating tables from ``next_table[0]``."""
    table = pml4
    for shift in (39, 30, 21):
        entry_at = table + 8 * ((virt >> shift) & 0x1FF)
        entry = mem.read_u64(entry_at)
        if not entry & P:
            entry = next_table[0] | P | W
            next_table[0] += 0x1000
            mem.write_u64(entry_at, entry)
        table = entry & 0xFFFFFFFFFF000
    mem.write_u64(table + 8 * ((virt >> 12) & 0x1FF), phys | P | W)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=15)
@example(virt_page=(1 << 47) - 0x1000, value=(1 << 64) - 1)  # the last canonical lower-half page
@given(virt_page=st.integers(0x100, (1 << 35) - 1).map(lambda p: p << 12), value=st.integers(0, (1 << 64) - 1))
def test_long_mode_4_level_paging_64_bit_registers(kvm, virt_page, value):
    """Any canonical lower-half page (bit 47 clear) maps through four levels; 64-bit arithmetic is intact."""
    code = bytes.fromhex(
        "48 8b 03"        # mov rax, [rbx]      ; through the page tables
        "48 01 c0"        # add rax, rax
        "48 89 43 08"     # mov [rbx + 8], rax
        "48 0f c8"        # bswap rax
        "f4"              # hlt
    )
    with kvm.create_vm() as vm:
        cpu, mem = real_mode_vcpu(vm, code)
        pml4, frame, tables = 0x2000, 0xF000, [0x3000]
        map_4k(mem, pml4, CODE, CODE, tables)
        map_4k(mem, pml4, virt_page, frame, tables)
        mem.write_u64(frame, value)
        flat_mode(cpu, mem, CR0_PE | CR0_ET | CR0_PG, cr3=pml4, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
                  long_mode=True)
        r = cpu.get_regs()
        r.rbx = virt_page
        cpu.set_regs(r)
        assert cpu.translate(virt_page + 8) == {"physical_address": frame + 8, "valid": 1, "writeable": 1,
                                                "usermode": 0}
        run_to_hlt(cpu)
        doubled = (2 * value) & ((1 << 64) - 1)
        r, s = cpu.get_regs(), cpu.get_sregs()
        assert mem.read_u64(frame + 8) == doubled
        assert r.rax == int.from_bytes(doubled.to_bytes(8, "little"), "big")
        assert r.rip == CODE + len(code)
        assert s.efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
        assert (s.cs.l, s.cs.db) == (1, 0)
        assert s.cr0 & CR0_PG and s.cr4 & CR4_PAE and s.cr3 == pml4


def test_long_mode_high_canonical_address_and_io(vm):
    # mov rbx, 0xffff800000000000 ; mov eax, [rbx] ; out 0x10, eax ; hlt
    code = bytes.fromhex("48 bb 00 00 00 00 00 80 ff ff 8b 03 e7 10 f4")
    cpu, mem = real_mode_vcpu(vm, code)
    tables = [0x3000]
    map_4k(mem, 0x2000, CODE, CODE, tables)
    map_4k(mem, 0x2000, 0xFFFF800000000000, 0xF000, tables)
    assert tables[0] == 0x3000 + 6 * 0x1000  # two separate PDPT/PD/PT chains
    mem.write_u32(0xF000, 0xFEEDFACE)
    flat_mode(cpu, mem, CR0_PE | CR0_ET | CR0_PG, cr3=0x2000, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
              long_mode=True)
    e = cpu.run(timeout=5)
    assert isinstance(e, IoExit) and e.is_out and e.port == 0x10 and e.size == 4 and e.value == 0xFEEDFACE
    run_to_hlt(cpu)
