"""ioeventfd and irqfd on the real /dev/kvm.

ioeventfd: guest writes signal an eventfd with no exit (PIO and MMIO, with and without
datamatch, only for the registered length, never after deassign). Interrupts: an
eventfd write (KVM_IRQFD) or KVM_IRQ_LINE reaches the in-kernel PIC and the guest's
handler for vector 0x25 runs while the vCPU was halted in the kernel.
"""
from __future__ import annotations

import errno
import os
import threading
from typing import List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.errors import KvmError
from pykvm.kvm import HltExit, InterruptedExit, IoExit, IrqchipRoute, MmioExit, MpState, Vcpu
from tests.kvm.guests import real_mode_vcpu

pytestmark = pytest.mark.kvm

PORT = 0x600
MMIO = 0xD0000  # no memslot: MMIO


@pytest.fixture
def efd():
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    yield fd
    os.close(fd)


def count(fd: int) -> int:
    """Take the eventfd's counter (0 if it was never signalled)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def run_collecting(cpu: Vcpu) -> List[tuple]:
    """Run to HLT; the exits on the way as (port or address, size, value) of each write
    (taken at once: an exit's data view is only valid until the next run)."""
    seen = []
    for _ in range(10000):
        e = cpu.run(timeout=5)
        if isinstance(e, HltExit):
            return seen
        if isinstance(e, IoExit):
            assert e.is_out and e.count == 1
            seen.append((e.port, e.size, e.value))
        else:
            assert isinstance(e, MmioExit) and e.is_write, e
            seen.append((e.address, e.length, e.value))
    raise AssertionError("guest never halted")


def out_loop(n: int, size: int) -> bytes:
    """mov dx, PORT ; mov cx, n ; L: out dx, al|ax|eax ; loop L ; hlt"""
    out = {1: b"\xee", 2: b"\xef", 4: b"\x66\xef"}[size]
    head = bytes([0xBA, PORT & 0xFF, PORT >> 8, 0xB9, n & 0xFF, n >> 8])
    return head + out + bytes([0xE2, -(len(out) + 2) & 0xFF, 0xF4])  # loop back over out and itself


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=20)
@given(n=st.integers(1, 500), size=st.sampled_from([1, 2, 4]))
def test_pio_ioeventfd_counts_every_write_without_exits(kvm, n, size):
    with kvm.create_vm() as vm:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            cpu, _ = real_mode_vcpu(vm, out_loop(n, size))
            vm.ioeventfd(fd, PORT, size, pio=True)
            assert run_collecting(cpu) == []
            assert count(fd) == n
        finally:
            os.close(fd)


def test_pio_ioeventfd_matches_only_its_length(vm, efd):
    cpu, _ = real_mode_vcpu(vm, out_loop(3, 1))
    vm.ioeventfd(efd, PORT, 2, pio=True)  # 2-byte writes only; the guest writes bytes
    exits = run_collecting(cpu)
    assert [(port, size) for port, size, _ in exits] == [(PORT, 1)] * 3
    assert count(efd) == 0


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=20)
@given(values=st.lists(st.integers(0, 255), min_size=1, max_size=20), match=st.integers(0, 255))
def test_pio_datamatch_signals_only_that_value(kvm, values, match):
    code = bytes([0xBA, PORT & 0xFF, PORT >> 8])  # mov dx, PORT
    for v in values:
        code += bytes([0xB0, v, 0xEE])  # mov al, v ; out dx, al
    code += b"\xf4"
    with kvm.create_vm() as vm:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            cpu, _ = real_mode_vcpu(vm, code)
            vm.ioeventfd(fd, PORT, 1, pio=True, datamatch=match)
            exits = run_collecting(cpu)
            assert exits == [(PORT, 1, v) for v in values if v != match]
            assert count(fd) == values.count(match)
        finally:
            os.close(fd)


# mov ax, 0xd000 ; mov ds, ax ; mov dword ptr [0], 0x11223344 ; mov dword ptr [4], 0x55 ;
# mov dword ptr [0], 0x7 ; hlt
MMIO_WRITES = bytes.fromhex("b8 00 d0 8e d8"
                            "66 c7 06 00 00 44 33 22 11"
                            "66 c7 06 04 00 55 00 00 00"
                            "66 c7 06 00 00 07 00 00 00"
                            "f4")


def test_mmio_ioeventfd_swallows_writes_to_its_address_only(vm, efd):
    cpu, _ = real_mode_vcpu(vm, MMIO_WRITES)
    vm.ioeventfd(efd, MMIO, 4)
    exits = run_collecting(cpu)
    assert exits == [(MMIO + 4, 4, 0x55)]
    assert count(efd) == 2


def test_mmio_datamatch(vm, efd):
    cpu, _ = real_mode_vcpu(vm, MMIO_WRITES)
    vm.ioeventfd(efd, MMIO, 4, datamatch=0x11223344)
    exits = run_collecting(cpu)
    assert exits == [(MMIO + 4, 4, 0x55), (MMIO, 4, 7)]
    assert count(efd) == 1


def test_deassigned_ioeventfd_no_longer_fires(vm, efd):
    cpu, _ = real_mode_vcpu(vm, out_loop(4, 1))
    vm.ioeventfd(efd, PORT, 1, pio=True)
    vm.ioeventfd_deassign(efd, PORT, 1, pio=True)
    assert len(run_collecting(cpu)) == 4
    assert count(efd) == 0
    with pytest.raises(KvmError) as exc:
        vm.ioeventfd_deassign(efd, PORT, 1, pio=True)
    assert exc.value.errno == errno.ENOENT and "KVM_IOEVENTFD" in str(exc.value)


def test_ioeventfd_on_the_same_address_twice_is_refused(vm, efd):
    vm.ioeventfd(efd, PORT, 1, pio=True)
    with pytest.raises(KvmError) as exc:
        vm.ioeventfd(efd, PORT, 1, pio=True)
    assert exc.value.errno == errno.EEXIST


# -- interrupts -------------------------------------------------------------------------
GSI = 5
VECTOR = 0x25  # the guest maps master PIC IRQ 0-7 to vectors 0x20-0x27; IVT entry at 0x94
HANDLER_GPA = 0x1100
PIC_GUEST = bytes.fromhex(
    "c7 06 94 00 00 11"  # mov word ptr [0x94], 0x1100  ; IVT[0x25] = 0000:1100
    "c7 06 96 00 00 00"  # mov word ptr [0x96], 0
    "b0 11 e6 20"        # mov al, 0x11 ; out 0x20, al   ; ICW1
    "b0 20 e6 21"        # mov al, 0x20 ; out 0x21, al   ; ICW2: vector base 0x20
    "b0 04 e6 21"        # mov al, 0x04 ; out 0x21, al   ; ICW3
    "b0 01 e6 21"        # mov al, 0x01 ; out 0x21, al   ; ICW4
    "b0 df e6 21"        # mov al, 0xdf ; out 0x21, al   ; unmask IRQ 5 only
    "e6 11"              # out 0x11, al                  ; ready
    "fb"                 # sti
    "f4 eb fd"           # L: hlt ; jmp L
)
HANDLER = bytes.fromhex(
    "50"                 # push ax
    "ff 06 00 05"        # inc word ptr [0x500]          ; count interrupts
    "a1 00 05"           # mov ax, [0x500]
    "e7 10"              # out 0x10, ax                  ; report the count
    "b0 20 e6 20"        # mov al, 0x20 ; out 0x20, al   ; EOI
    "58 cf"              # pop ax ; iret
)


def halted_pic_guest(vm) -> Vcpu:
    """A real-mode guest with the in-kernel irqchip, IRQ 5 unmasked, halted with IF=1."""
    vm.create_irqchip()
    cpu, mem = real_mode_vcpu(vm, PIC_GUEST)
    mem.write(HANDLER_GPA, HANDLER)
    r = cpu.get_regs()
    r.rsp = 0x8000
    cpu.set_regs(r)
    e = cpu.run(timeout=5)
    assert isinstance(e, IoExit) and e.port == 0x11
    assert (mem.read_u16(4 * VECTOR), mem.read_u16(4 * VECTOR + 2)) == (HANDLER_GPA, 0)  # the guest's IVT entry
    assert_stays_halted(cpu)
    return cpu


def assert_stays_halted(cpu: Vcpu, timeout: float = 0.2) -> None:
    e = cpu.run(timeout=timeout)
    assert isinstance(e, InterruptedExit), e
    assert cpu.get_mp_state() == MpState.HALTED
    cpu.immediate_exit = False


def expect_interrupt(cpu: Vcpu, inject, n: int) -> None:
    """Fire ``inject`` from another thread while the vCPU sleeps; the handler reports count n."""
    t = threading.Timer(0.05, inject)
    t.start()
    try:
        e = cpu.run(timeout=5)
    finally:
        t.join()
    assert isinstance(e, IoExit) and e.port == 0x10 and e.value == n, e
    # At an OUT exit RIP is at the OUT (SVM/VMX complete it on the next KVM_RUN) or past it (PVM).
    assert cpu.get_regs().rip in (HANDLER_GPA + 8, HANDLER_GPA + 10)
    assert_stays_halted(cpu)  # EOI, iret, back to hlt: exactly one interrupt per injection


def test_irqfd_write_interrupts_the_halted_guest(vm, efd):
    cpu = halted_pic_guest(vm)
    vm.irqfd(efd, GSI)
    for n in (1, 2, 3):
        expect_interrupt(cpu, lambda: os.eventfd_write(efd, 1), n)
    vm.irqfd_deassign(efd, GSI)
    os.eventfd_write(efd, 1)
    assert_stays_halted(cpu)  # no longer wired to the GSI


def test_irq_line_interrupts_the_halted_guest(vm):
    cpu = halted_pic_guest(vm)

    def pulse():
        vm.irq_line(GSI, 1)
        vm.irq_line(GSI, 0)

    expect_interrupt(cpu, pulse, 1)
    expect_interrupt(cpu, pulse, 2)
    vm.irq_line(GSI + 1, 1)  # IRQ 6 is masked in the guest's PIC: nothing happens
    assert_stays_halted(cpu)


def test_irqfd_through_a_custom_gsi_route(vm, efd):
    cpu = halted_pic_guest(vm)
    vm.set_gsi_routing(vm.default_irqchip_routes() + [IrqchipRoute(40, 0, GSI)])  # GSI 40 -> master pin 5
    vm.irqfd(efd, 40)
    expect_interrupt(cpu, lambda: os.eventfd_write(efd, 1), 1)


def test_irqfd_needs_an_irqchip(vm, efd):
    real_mode_vcpu(vm, b"\xf4")
    with pytest.raises(KvmError) as exc:
        vm.irqfd(efd, GSI)
    assert "KVM_IRQFD" in str(exc.value)
