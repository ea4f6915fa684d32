"""INTx of a passed-through device, end to end, inside L1 of the lab.

edu (0000:00:04.0) is opened through VfioPciDevice with MSI left off, so vfio-pci
delivers its INTx: the host handler masks the line and signals an eventfd that KVM
consumes as a level-triggered irqfd on the slot's IOAPIC pin. A tiny 32-bit guest
(IDT entry 0x41, LAPIC enabled, IOAPIC pin programmed level-triggered to 0x41) takes
the interrupt, reports it on port 0x10, writes its LAPIC EOI and reports that on
port 0x11. The EOI makes KVM lower the pin and signal the resample eventfd, on which
vfio-pci unmasks the line: only then can the next interrupt come in.

What each step is checked against is the kernel's own state: the in-kernel IOAPIC
(IRR, Remote IRR), the vCPU's LAPIC (ISR, TMR), and the host's view of edu's
config space in sysfs, where vfio-pci's masking shows as the real command register's
INTx-disable bit (edu supports PCI 2.3 masking).
"""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pykvm.kvm import InterruptedExit, IoExit, MpState
from pykvm.lab import EDU_BDF
from pykvm.vmm.pci.config import COMMAND, COMMAND_INTX_DISABLE, COMMAND_MEMORY, STATUS, STATUS_INTERRUPT
from tests.lab.support import wait_for
from tests.lab.test_passthrough_device import bound, machine, open_device  # noqa: F401 (fixtures)

pytestmark = pytest.mark.lab

VECTOR = 0x41
GDT, IDT, CODE, HANDLER, COUNT, STACK = 0x500, 0x800, 0x1000, 0x1100, 0x3000, 0x8000
SEL_CODE, SEL_DATA = 0x08, 0x10
GDT_BYTES = bytes(8) + bytes.fromhex("ffff0000009bcf00" "ffff00000093cf00")  # flat 32-bit code, data
IDLE = bytes.fromhex("fb f4 eb fd")  # sti ; L: hlt ; jmp L
HANDLER_CODE = bytes.fromhex(
    "50"                             # push eax
    "ff 05 00 30 00 00"              # inc dword [0x3000]        ; interrupts taken
    "a1 00 30 00 00"                 # mov eax, [0x3000]
    "e7 10"                          # out 0x10, eax             ; report: interrupt n taken
    "c7 05 b0 00 e0 fe 00 00 00 00"  # mov dword [0xfee000b0], 0 ; LAPIC EOI
    "e7 11"                          # out 0x11, eax             ; report: EOI written
    "58 cf"                          # pop eax ; iret
)
TAKEN, EOI_DONE = 0x10, 0x11
LEVEL, REMOTE_IRR, MASKED = 1 << 15, 1 << 14, 1 << 16  # IOAPIC redirection entry bits
APIC_SVR, APIC_ISR, APIC_TMR = 0xF0, 0x100, 0x180
EDU_STATUS, EDU_RAISE, EDU_ACK = 0x24, 0x60, 0x64


class Guest:
    """One vCPU in flat 32-bit protected mode, halted with IF=1, whose IOAPIC pin ``pin``
    is level-triggered, unmasked, to VECTOR on APIC 0."""

    def __init__(self, m, pin: int):
        self.vm, self.memory, self.pin = m.vm, m.memory, pin
        mem = m.memory
        mem.write(GDT, GDT_BYTES)
        mem.write(IDT + 8 * VECTOR, struct.pack("<HHBBH", HANDLER & 0xFFFF, SEL_CODE, 0, 0x8E, HANDLER >> 16))
        mem.write(CODE, IDLE)
        mem.write(HANDLER, HANDLER_CODE)
        mem.write_u32(COUNT, 0)
        self.cpu = cpu = m.vm.create_vcpu(0)
        s = cpu.get_sregs()
        s.gdt.base, s.gdt.limit = GDT, len(GDT_BYTES) - 1
        s.idt.base, s.idt.limit = IDT, 256 * 8 - 1  # only VECTOR's gate is present
        for seg, sel in ((s.cs, SEL_CODE), (s.ds, SEL_DATA), (s.es, SEL_DATA), (s.ss, SEL_DATA),
                         (s.fs, SEL_DATA), (s.gs, SEL_DATA)):
            seg.selector, seg.base, seg.limit, seg.present, seg.s, seg.dpl, seg.g, seg.l, seg.db = (
                sel, 0, 0xFFFFFFFF, 1, 1, 0, 1, 0, 1)
            seg.type = 0xB if sel == SEL_CODE else 0x3
        s.cr0 = 0x11  # PE | ET, no paging
        cpu.set_sregs(s)
        r = cpu.get_regs()
        r.rip, r.rsp, r.rflags = CODE, STACK, 2
        cpu.set_regs(r)
        lapic = cpu.get_lapic()
        lapic.set_reg(APIC_SVR, 0x1FF)  # software-enabled
        cpu.set_lapic(lapic)
        ioapic = m.vm.get_irqchip(2)
        ioapic.set_ioapic_redirection(pin, VECTOR | LEVEL)  # fixed, physical, APIC 0
        m.vm.set_irqchip(ioapic)
        self.halted()

    def expect(self, port: int, count: int) -> None:
        """Run until the handler reports ``port`` with ``count`` interrupts taken so far."""
        e = self.cpu.run(timeout=10)
        assert isinstance(e, IoExit) and e.is_out and (e.port, e.value) == (port, count), (
            f"expected OUT {port:#x} = {count}, got {e} (interrupts taken: {self.memory.read_u32(COUNT)})")

    def halted(self, timeout: float = 0.5) -> None:
        """The vCPU sleeps in hlt for ``timeout``: no interrupt is pending for it."""
        e = self.cpu.run(timeout=timeout)
        assert isinstance(e, InterruptedExit), f"expected the guest to stay halted, got {e}"
        assert self.cpu.get_mp_state() == MpState.HALTED
        self.cpu.immediate_exit = False

    def pin_asserted(self) -> bool:
        return bool(self.vm.get_irqchip(2).ioapic_irr >> self.pin & 1)

    def remote_irr(self) -> bool:
        return bool(self.vm.get_irqchip(2).ioapic_redirection(self.pin) & REMOTE_IRR)

    def lapic_bit(self, base: int) -> bool:
        return bool(self.cpu.get_lapic().reg(base + 0x10 * (VECTOR // 32)) >> VECTOR % 32 & 1)


def host_config() -> tuple:
    """(command, status) of edu as the host's PCI core reads them from the device."""
    raw = (Path("/sys/bus/pci/devices") / EDU_BDF / "config").read_bytes()[:8]
    return int.from_bytes(raw[4:6], "little"), int.from_bytes(raw[6:8], "little")


def masked_by_vfio() -> bool:
    return bool(host_config()[0] & COMMAND_INTX_DISABLE)


@pytest.fixture
def edu_intx(machine, bound):  # noqa: F811 (fixtures)
    """edu on its slot with INTx wired, plus a halted guest listening on the slot's pin."""
    m = machine
    dev = open_device(m, bound(EDU_BDF))
    ack_all = lambda: dev.bar_write(0, EDU_ACK, b"\xff" * 4)  # noqa: E731
    try:
        ack_all()  # edu keeps its status across resets: start with no interrupt pending
        slot = m.pci.add(dev)
        [(s, intx, gsi)] = m.pci.intx_routes()
        assert (s, intx) == (slot, 0) and dev.interrupt_mode == "intx"
        assert m.vm.get_irqchip(2).ioapic_redirection(gsi) & MASKED  # until the guest (Guest below) programs it
        command = m.pci.config_read(0, slot, 0, COMMAND, 2)
        assert command & COMMAND_MEMORY and not command & COMMAND_INTX_DISABLE

        class E:
            pass

        e = E()
        e.m, e.dev, e.slot, e.pin = m, dev, slot, gsi  # default routing: GSI n is IOAPIC pin n
        e.guest = Guest(m, gsi)
        e.reg = lambda off: int.from_bytes(dev.bar_read(0, off, 4), "little")  # noqa: E731
        e.write = lambda off, v: dev.bar_write(0, off, v.to_bytes(4, "little"))  # noqa: E731
        assert e.reg(EDU_STATUS) == 0 and not masked_by_vfio() and not e.guest.pin_asserted()
        yield e
        e.guest.cpu.close()
    finally:
        ack_all()  # nothing left pending for the next user of edu
        dev.close()


def test_intx_reaches_the_guest_and_its_eoi_unmasks_the_line(edu_intx):
    e, g = edu_intx, edu_intx.guest
    e.write(EDU_RAISE, 1)
    assert e.reg(EDU_STATUS) == 1
    g.expect(TAKEN, 1)
    # In the handler, before the EOI: the pin is high and waits for the EOI (Remote IRR);
    # the LAPIC has VECTOR in service, level-triggered; vfio-pci masked the line at the host.
    assert g.pin_asserted() and g.remote_irr()
    assert g.lapic_bit(APIC_ISR) and g.lapic_bit(APIC_TMR)
    command, status = host_config()
    assert command & COMMAND_INTX_DISABLE and status & STATUS_INTERRUPT
    e.write(EDU_ACK, 1)
    assert e.reg(EDU_STATUS) == 0 and not host_config()[1] & STATUS_INTERRUPT  # the device lowered INTx ...
    assert g.pin_asserted() and masked_by_vfio()  # ... but the guest's pin stays high until its EOI
    g.expect(EOI_DONE, 1)
    # The EOI: KVM lowered the pin and signalled the resample eventfd, on which vfio-pci unmasked.
    assert wait_for(lambda: not masked_by_vfio(), timeout=5), "vfio-pci did not unmask INTx after the EOI"
    assert not g.pin_asserted() and not g.remote_irr() and not g.lapic_bit(APIC_ISR)
    g.halted()  # iret, hlt: the acknowledged device raises nothing more
    # Unmasked: the next interrupt is delivered the same way.
    e.write(EDU_RAISE, 1)
    g.expect(TAKEN, 2)
    assert g.pin_asserted() and g.remote_irr() and masked_by_vfio()
    e.write(EDU_ACK, 1)
    g.expect(EOI_DONE, 2)
    assert wait_for(lambda: not masked_by_vfio(), timeout=5) and not g.pin_asserted()
    g.halted()
    assert g.memory.read_u32(COUNT) == 2


def test_a_line_still_high_at_the_eoi_interrupts_again(edu_intx):
    """Level semantics: the guest EOIs without acknowledging edu, so the unmasked line
    is still asserted and vfio-pci signals it again at once; once acknowledged, it stops."""
    e, g = edu_intx, edu_intx.guest
    e.write(EDU_RAISE, 1)
    g.expect(TAKEN, 1)
    g.expect(EOI_DONE, 1)  # edu not acknowledged
    g.expect(TAKEN, 2)  # after iret: the same, still pending interrupt, through resample -> unmask -> trigger
    assert g.pin_asserted() and g.remote_irr() and masked_by_vfio() and e.reg(EDU_STATUS) == 1
    e.write(EDU_ACK, 1)
    g.expect(EOI_DONE, 2)
    g.halted()
    assert not g.pin_asserted() and not masked_by_vfio() and g.memory.read_u32(COUNT) == 2


def test_guest_intx_disable_holds_the_interrupt_until_cleared(edu_intx):
    """The guest's INTx-disable bit (command register) masks the line, as on hardware,
    while the status register's interrupt bit shows the device asserting it; clearing
    the bit lets the pending interrupt through."""
    e, g, m = edu_intx, edu_intx.guest, edu_intx.m
    cfg_read = lambda off: m.pci.config_read(0, e.slot, 0, off, 2)  # noqa: E731
    command = cfg_read(COMMAND)
    assert not cfg_read(STATUS) & STATUS_INTERRUPT
    m.pci.config_write(0, e.slot, 0, COMMAND, 2, command | COMMAND_INTX_DISABLE)
    e.write(EDU_RAISE, 1)
    assert wait_for(lambda: cfg_read(STATUS) & STATUS_INTERRUPT, timeout=5), "guest status misses the pending INTx"
    g.halted()
    assert not g.pin_asserted()
    m.pci.config_write(0, e.slot, 0, COMMAND, 2, command)
    g.expect(TAKEN, 1)
    e.write(EDU_ACK, 1)
    assert not cfg_read(STATUS) & STATUS_INTERRUPT
    g.expect(EOI_DONE, 1)
    g.halted()
    assert not g.pin_asserted()


def test_intx_is_wired_again_after_the_guest_turns_msi_off(edu_intx):
    """MSI on and off again (as a driver that falls back does): INTx is back on the same pin."""
    e, g, m = edu_intx, edu_intx.guest, edu_intx.m
    o = e.dev.msi.offset
    m.pci.config_write(0, e.slot, 0, o + 4, 4, 0xFEE0_0000)
    m.pci.config_write(0, e.slot, 0, o + 2, 2, 0x1)
    assert e.dev.interrupt_mode == "msi"
    m.pci.config_write(0, e.slot, 0, o + 2, 2, 0x0)
    assert e.dev.interrupt_mode == "intx"
    e.write(EDU_RAISE, 1)
    g.expect(TAKEN, 1)
    assert g.pin_asserted() and masked_by_vfio()
    e.write(EDU_ACK, 1)
    g.expect(EOI_DONE, 1)
    assert wait_for(lambda: not masked_by_vfio(), timeout=5)
    g.halted()
