"""What several examples repeat: a one-vCPU VM with RAM at guest-physical 0,
starting it in real mode or in flat 32/64-bit mode, and x86 descriptor encodings.

Each example still shows its own mechanism in its own file; this module only
holds the plumbing. Guest code in the examples is hand-assembled bytes: every
line is ``"hex bytes"  # the instruction`` so the listing reads like an
assembler's output (no assembler needed to run anything).
"""
from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pykvm.kvm import Exit, IoExit, Kvm, Vcpu, Vm  # noqa: E402
from pykvm.memory import GuestMemory  # noqa: E402

SERIAL_PORT = 0x3F8  # COM1's data register: the guest's "print"
TSS_ADDR = 0xFFFBD000  # 3 pages Intel VMX needs to emulate real mode; harmless elsewhere

CR0_PE = 1 << 0  # protection enable
CR0_ET = 1 << 4  # extension type (always 1 on modern CPUs)
CR0_PG = 1 << 31  # paging
CR4_PAE = 1 << 5  # 64-bit page-table entries (required for long mode)
EFER_LME = 1 << 8  # long mode enable
EFER_LMA = 1 << 10  # long mode active (KVM wants it set together with CR0.PG)


@dataclass
class Guest:
    """The four objects every example needs; closing it closes them in order."""

    kvm: Kvm
    vm: Vm
    mem: GuestMemory
    vcpu: Vcpu

    def close(self) -> None:
        self.kvm.close()  # closes the vCPU, then the VM, then /dev/kvm
        self.mem.close()

    def __enter__(self) -> "Guest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_io(self, timeout: float = 5.0) -> IoExit:
        """Run until the next exit and insist that it is a port access."""
        return expect(self.vcpu.run(timeout=timeout), IoExit)


def new_guest(mem_size: int = 0x10000, irqchip: bool = False) -> Guest:
    """/dev/kvm -> a VM with ``mem_size`` bytes of RAM at GPA 0 -> one vCPU.

    With ``irqchip`` the VM gets the in-kernel PIC/IOAPIC/LAPIC, which must
    exist before the vCPU is created."""
    kvm = Kvm()
    try:
        vm = kvm.create_vm()
        vm.set_tss_addr(TSS_ADDR)
        if irqchip:
            vm.create_irqchip()
        mem = GuestMemory.flat(mem_size)
        vm.map_memory(mem)
        return Guest(kvm, vm, mem, vm.create_vcpu(0))
    except BaseException:
        kvm.close()
        raise


def expect(exit_: Exit, kind: type) -> Exit:
    """Return ``exit_`` if it is a ``kind``; otherwise stop with what the guest did."""
    if not isinstance(exit_, kind):
        raise SystemExit(f"expected {kind.__name__}, the guest gave {exit_!r}")
    return exit_


def start_real_mode(vcpu: Vcpu, ip: int, sp: int = 0) -> None:
    """CS:IP = 0000:ip (linear address = ip), all segments based at 0.

    A fresh vCPU is already in real mode, but at the reset vector
    (CS base 0xffff0000, IP 0xfff0) where our RAM is not."""
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs):
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = ip
    regs.rsp = sp
    regs.rflags = 0x2  # bit 1 always reads as 1; IF=0
    vcpu.set_regs(regs)


# -- descriptors ---------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """A segment as the CPU caches it (the fields of ``struct kvm_segment``)."""

    selector: int
    type: int  # 0xb: code, execute/read, accessed; 0x3: data, read/write, accessed
    db: int = 1  # default operand size 32 bits (0 in a 64-bit code segment)
    l: int = 0  # noqa: E741 - the architectural name: 64-bit code segment
    base: int = 0
    limit: int = 0xFFFFFFFF
    g: int = 1  # limit counts 4 KiB units

    def descriptor(self) -> bytes:
        """The 8-byte GDT entry the CPU would load this segment from."""
        limit = self.limit >> 12 if self.g else self.limit
        access = 0x80 | 0x10 | self.type  # present | code/data (S=1) | type; DPL 0
        flags = self.g << 3 | self.db << 2 | self.l << 1
        return struct.pack("<HHBBBB", limit & 0xFFFF, self.base & 0xFFFF, (self.base >> 16) & 0xFF,
                           access, flags << 4 | (limit >> 16) & 0xF, self.base >> 24)

    def load(self, kseg) -> None:
        """Put this segment straight into a vCPU's hidden segment state (kvm_sregs)."""
        kseg.selector, kseg.base, kseg.limit, kseg.type = self.selector, self.base, self.limit, self.type
        kseg.present, kseg.s, kseg.dpl, kseg.db, kseg.l, kseg.g = 1, 1, 0, self.db, self.l, self.g


CODE32 = Segment(0x08, type=0xB)
DATA = Segment(0x10, type=0x3)
CODE64 = Segment(0x18, type=0xB, db=0, l=1)


def gdt(*segments: Segment) -> bytes:
    """A GDT: the null descriptor, then each segment at index selector/8."""
    table = bytearray(8 * (1 + max(s.selector >> 3 for s in segments)))
    for s in segments:
        table[s.selector & ~7:(s.selector & ~7) + 8] = s.descriptor()
    return bytes(table)


def enter_flat_mode(guest: Guest, gdt_gpa: int, ip: int, cr0: int = CR0_PE | CR0_ET, cr3: int = 0,
                    cr4: int = 0, efer: int = 0, code: Optional[Segment] = None) -> None:
    """Start the vCPU in protected (or, with ``code=CODE64`` and EFER.LME/LMA, long)
    mode without any mode-switch code in the guest: write the GDT into guest RAM
    and load CS/DS/... with what the CPU would have loaded from it.
    KVM_SET_SREGS sets the hidden segment state and control registers directly."""
    code = code or CODE32
    table = gdt(CODE32, DATA, CODE64)
    guest.mem.write(gdt_gpa, table)
    sregs = guest.vcpu.get_sregs()
    sregs.gdt.base, sregs.gdt.limit = gdt_gpa, len(table) - 1
    code.load(sregs.cs)
    for seg in (sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs):
        DATA.load(seg)
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = cr0, cr3, cr4, efer
    guest.vcpu.set_sregs(sregs)
    regs = guest.vcpu.get_regs()
    regs.rip, regs.rflags = ip, 0x2
    guest.vcpu.set_regs(regs)
