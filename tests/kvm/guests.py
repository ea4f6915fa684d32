"""Tiny hand-assembled guests for tests on the real /dev/kvm (real mode, CS:IP = 0:0x1000)."""
from __future__ import annotations

from typing import Tuple

from pykvm.kvm import Vcpu, Vm
from pykvm.memory import GuestMemory

CODE = 0x1000


def real_mode_vcpu(vm: Vm, code: bytes, mem_size: int = 0x10000, vcpu_id: int = 0) -> Tuple[Vcpu, GuestMemory]:
    """Map ``mem_size`` bytes at GPA 0, put ``code`` at 0x1000 and point a vCPU at it."""
    mem = GuestMemory.flat(mem_size)
    mem.write(CODE, code)
    vm.map_memory(mem)
    cpu = vm.create_vcpu(vcpu_id)
    s = cpu.get_sregs()
    s.cs.base = 0
    s.cs.selector = 0
    cpu.set_sregs(s)
    r = cpu.get_regs()
    r.rip = CODE
    r.rflags = 2
    cpu.set_regs(r)
    return cpu, mem


# Real-mode snippets (bytes with their assembly).
OUT_AL_3F8 = bytes([0xBA, 0xF8, 0x03, 0xEE])  # mov dx,0x3f8 ; out dx,al
HLT = bytes([0xF4])
JMP_SELF = bytes([0xEB, 0xFE])  # jmp $


def mov_al(v: int) -> bytes:
    return bytes([0xB0, v & 0xFF])
