"""VM-wide x86 controls on the real /dev/kvm: MSR filters answered from user space, IRQ line
status, the boot CPU, PIT reinjection and PMU event filters."""
from __future__ import annotations

import errno

import pytest

from pykvm.errors import ClosedError, KvmError
from pykvm.kvm import (Cap, HltExit, IoExit, MpState, MsrAccess, MsrExit, MsrExitReason, MsrFilterRange,
                       PmuEventAction)
from tests.conftest import require_or_skip
from tests.kvm.guests import HLT, real_mode_vcpu

pytestmark = pytest.mark.kvm

SYSENTER_CS, SYSENTER_ESP, APIC_BASE = 0x174, 0x175, 0x1B  # MSRs KVM reads back as set
APIC_BASE_BSP = 1 << 8
APIC_BASE_RESET = 0xFEE00000 | (1 << 11) | APIC_BASE_BSP  # enabled, at the default base, BSP


def need(vm, *caps: int) -> None:
    __tracebackhide__ = True  # a skip shows the test's line
    for cap in caps:
        if not vm.check_extension(cap):
            require_or_skip("PYKVM_REQUIRE_KVM", f"{Cap(cap).name} not offered")


def mov_ecx(value: int) -> bytes:
    return bytes([0x66, 0xB9]) + value.to_bytes(4, "little")


RDMSR, WRMSR = bytes([0x0F, 0x32]), bytes([0x0F, 0x30])


def out_eax(port: int) -> bytes:
    return bytes([0x66, 0xE7, port])


def user_space_msr_filter(vm, ranges) -> None:
    need(vm, Cap.X86_MSR_FILTER, Cap.X86_USER_SPACE_MSR)
    vm.enable_cap(Cap.X86_USER_SPACE_MSR, MsrExitReason.FILTER)
    vm.set_msr_filter(ranges)


def expect_out(cpu, port: int, value: int) -> None:
    e = cpu.run(timeout=5)
    assert isinstance(e, IoExit) and e.port == port and e.value == value, e


def test_denied_msr_read_is_answered_from_user_space_until_the_filter_is_removed(vm):
    # Of the SYSENTER MSRs only ESP may be read: CS is denied, ESP is KVM's.
    user_space_msr_filter(vm, [MsrFilterRange(SYSENTER_CS, 3, MsrAccess.READ, allowed={SYSENTER_ESP})])
    start = mov_ecx(SYSENTER_CS) + RDMSR + out_eax(0x10) + mov_ecx(SYSENTER_ESP) + RDMSR + out_eax(0x11) + HLT
    cpu, _ = real_mode_vcpu(vm, start + bytes([0xEB, 0x100 - len(start) - 2]))  # jmp start
    cpu.set_msrs({SYSENTER_CS: 0x10, SYSENTER_ESP: 0x1234})
    e = cpu.run(timeout=5)
    assert isinstance(e, MsrExit) and not e.is_write and e.index == SYSENTER_CS
    assert e.msr_reason == MsrExitReason.FILTER
    e.data = 0xCAFE
    expect_out(cpu, 0x10, 0xCAFE)
    expect_out(cpu, 0x11, 0x1234)  # allowed: read by KVM without an exit
    assert isinstance(cpu.run(timeout=5), HltExit)
    vm.set_msr_filter([])  # the vCPU exists and has run: KVM takes the new filter on its next entry
    expect_out(cpu, 0x10, 0x10)
    expect_out(cpu, 0x11, 0x1234)


def test_denied_msr_write_reaches_user_space_with_the_value_and_not_the_msr(vm):
    user_space_msr_filter(vm, [MsrFilterRange(SYSENTER_ESP, 1, MsrAccess.WRITE)])
    # wrmsr SYSENTER_ESP <- 0x9_11223344 ; rdmsr it (reads are not filtered) ; rdmsr APIC_BASE (no range)
    code = mov_ecx(SYSENTER_ESP) + bytes([0x66, 0xB8, 0x44, 0x33, 0x22, 0x11, 0x66, 0xBA, 9, 0, 0, 0]) + WRMSR
    code += RDMSR + out_eax(0x10) + mov_ecx(APIC_BASE) + RDMSR + out_eax(0x11) + HLT
    cpu, _ = real_mode_vcpu(vm, code)
    cpu.set_msrs({SYSENTER_ESP: 0x5678})
    e = cpu.run(timeout=5)
    assert isinstance(e, MsrExit) and e.is_write and e.index == SYSENTER_ESP
    assert e.msr_reason == MsrExitReason.FILTER and e.data == 0x9_11223344
    expect_out(cpu, 0x10, 0x5678)  # the write stayed in user space
    expect_out(cpu, 0x11, APIC_BASE_RESET)  # outside every range: KVM's answer, no exit
    assert isinstance(cpu.run(timeout=5), HltExit)
    assert cpu.get_msrs([SYSENTER_ESP])[SYSENTER_ESP] == 0x5678


def test_msr_filter_input_is_checked_before_the_ioctl(vm):
    deny_cs = MsrFilterRange(SYSENTER_CS, 1, MsrAccess.READ)
    with pytest.raises(ValueError, match="17 MSR filter ranges: KVM takes at most 16"):
        vm.set_msr_filter([deny_cs] * 17)
    with pytest.raises(ValueError, match="covers 12289 MSRs: KVM takes 1 to 12288"):
        vm.set_msr_filter([MsrFilterRange(0, 12289, MsrAccess.READ)])
    with pytest.raises(ValueError, match="covers 0 MSRs"):
        vm.set_msr_filter([MsrFilterRange(0, 0, MsrAccess.READ)])
    with pytest.raises(ValueError, match="access must be READ, WRITE or both"):
        vm.set_msr_filter([MsrFilterRange(0, 1, MsrAccess(0))])
    with pytest.raises(ValueError, match="cannot allow 0x20, 0x30"):
        vm.set_msr_filter([MsrFilterRange(0x10, 0x10, MsrAccess.READ, allowed={0x30, 0x11, 0x20})])
    with pytest.raises(ValueError, match="deny-by-default MSR filter needs at least one range"):
        vm.set_msr_filter([], default_allow=False)
    # the largest accepted range: a full 1536-byte bitmap, bit i allowing MSR base + i
    assert MsrFilterRange(0, 12288, MsrAccess.READ | MsrAccess.WRITE).bitmap() == bytes(1536)
    assert MsrFilterRange(0x40, 65, MsrAccess.READ, {0x40, 0x80}).bitmap() == b"\x01" + bytes(7) + b"\x01" + bytes(7)
    need(vm, Cap.X86_MSR_FILTER)
    vm.set_msr_filter([deny_cs] * 16, default_allow=False)
    vm.set_msr_filter([MsrFilterRange(0, 12288, MsrAccess.READ | MsrAccess.WRITE, allowed=set(range(0, 12288, 2)))])


def test_irq_line_status_counts_deliveries(vm):
    need(vm, Cap.IRQ_INJECT_STATUS)
    with pytest.raises(KvmError) as ei:
        vm.irq_line_status(4, 1)
    assert ei.value.errno == errno.ENXIO and ei.value.ioctl == "KVM_IRQ_LINE_STATUS"  # no irqchip yet
    vm.create_irqchip()
    cpu, _ = real_mode_vcpu(vm, HLT)
    lapic = cpu.get_lapic()
    lapic.set_reg(0xF0, 0x1FF)  # spurious-vector register: software-enable the LAPIC
    cpu.set_lapic(lapic)
    ioapic = vm.get_irqchip(2)
    ioapic.set_ioapic_redirection(20, 0x31)  # edge, fixed, vector 0x31, unmasked, to APIC ID 0
    ioapic.set_ioapic_redirection(21, 0x32 | (1 << 15))  # the same, level-triggered
    vm.set_irqchip(ioapic)  # pin 22 stays masked, as all pins start
    # GSIs 20-22 reach the IOAPIC only: the status is the number of LAPICs it delivered to
    assert vm.irq_line_status(20, 1) == 1
    assert vm.irq_line_status(20, 1) == 0  # the edge line was already high: coalesced, nothing new
    assert vm.irq_line_status(21, 1) == 1
    assert vm.irq_line_status(21, 1) == -1  # remote IRR: the IOAPIC waits for the EOI, takes nothing
    assert vm.irq_line_status(22, 1) == -1  # masked: no chip took it
    # GSI 4 reaches the PIC (unmasked after reset: latched, 1) and IOAPIC pin 4 (masked, not counted)
    assert vm.irq_line_status(4, 1) == 1
    assert vm.irq_line_status(4, 0) == 2  # lowering: 1 from each chip, masked or not
    assert vm.get_irqchip(2).ioapic_irr & (1 << 20 | 1 << 21) == 1 << 20 | 1 << 21


def test_boot_cpu_id_moves_the_bsp_and_is_fixed_once_a_vcpu_exists(kvm):
    with kvm.create_vm() as vm:
        need(vm, Cap.SET_BOOT_CPU_ID)
        vm.create_irqchip()
        vm.set_boot_cpu_id(1)
        cpu0, cpu1 = vm.create_vcpu(0), vm.create_vcpu(1)
        assert cpu1.get_msrs([APIC_BASE])[APIC_BASE] & APIC_BASE_BSP
        assert cpu1.get_sregs().apic_base & APIC_BASE_BSP
        assert not cpu0.get_msrs([APIC_BASE])[APIC_BASE] & APIC_BASE_BSP
        assert not cpu0.get_sregs().apic_base & APIC_BASE_BSP
        # with the in-kernel LAPICs only the BSP starts; the other waits for INIT/SIPI
        assert (cpu0.get_mp_state(), cpu1.get_mp_state()) == (MpState.UNINITIALIZED, MpState.RUNNABLE)
        with pytest.raises(KvmError) as ei:
            vm.set_boot_cpu_id(0)
        assert ei.value.errno == errno.EBUSY and ei.value.ioctl == "KVM_SET_BOOT_CPU_ID"
    with kvm.create_vm() as vm:  # the default: vCPU 0
        assert vm.create_vcpu(0).get_msrs([APIC_BASE])[APIC_BASE] & APIC_BASE_BSP


def test_reinject_control_needs_the_in_kernel_pit(vm):
    """The ioctl's contract; the policy acting on a guest's ticks is
    test_pit_reinjection_delivers_the_ticks_a_stalled_guest_missed."""
    need(vm, Cap.REINJECT_CONTROL)
    with pytest.raises(KvmError) as ei:
        vm.reinject_control(False)
    assert ei.value.errno == errno.ENXIO and ei.value.ioctl == "KVM_REINJECT_CONTROL"
    vm.create_irqchip()
    vm.create_pit2()
    vm.reinject_control(False)
    vm.reinject_control(True)


def test_pmu_event_filter_is_accepted_and_checked(vm):
    """Contract only: acceptance and the kernel's checks, not the filter's effect. No KVM we can
    run gives guests a vPMU, so no guest counter (RDPMC) can show an event denied: this host's
    PVM reports CPUID leaf 0xA of KVM_GET_SUPPORTED_CPUID all zero, and so does the lab's L1,
    whose kvm_amd says "SVM: PMU virtualization is disabled" (QEMU TCG has no PMU to virtualize)."""
    need(vm, Cap.PMU_EVENT_FILTER)
    instructions, cycles = 0x00C0, 0x003C  # retired instructions, unhalted core cycles
    vm.set_pmu_event_filter(PmuEventAction.ALLOW, [instructions, cycles], fixed_counter_bitmap=0b11)
    vm.set_pmu_event_filter(PmuEventAction.DENY, iter([cycles]))
    vm.set_pmu_event_filter(PmuEventAction.DENY, [])  # denies nothing
    vm.create_vcpu(0)
    vm.set_pmu_event_filter(PmuEventAction.ALLOW, [instructions])  # also once vCPUs exist
    with pytest.raises(KvmError) as ei:
        vm.set_pmu_event_filter(2, [instructions])
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_SET_PMU_EVENT_FILTER"
    with pytest.raises(KvmError) as ei:
        vm.set_pmu_event_filter(PmuEventAction.DENY, range(1000))  # KVM takes at most 300
    assert ei.value.errno == errno.E2BIG


def test_closed_vm_raises_closed_error(kvm):
    vm = kvm.create_vm()
    vm.close()
    for call in (lambda: vm.set_msr_filter([]), lambda: vm.irq_line_status(4, 1), lambda: vm.set_boot_cpu_id(1),
                 lambda: vm.reinject_control(True), lambda: vm.set_pmu_event_filter(PmuEventAction.DENY, []),
                 lambda: vm.enable_dirty_ring(4096), vm.reset_dirty_rings):
        with pytest.raises(ClosedError):
            call()


# -- the PIT's reinjection policy, seen by a guest ---------------------------------------
PIT_HZ = 1_193_182
TICKS_AT = 0x3000  # the guest's tick counter (a word)
# ICW1-4 for the master PIC (IRQ 0-7 -> vectors 8-15, 8086 mode), then mask all but IRQ 0
PIC_INIT = bytes([0xB0, 0x11, 0xE6, 0x20, 0xB0, 0x08, 0xE6, 0x21, 0xB0, 0x04, 0xE6, 0x21,
                  0xB0, 0x01, 0xE6, 0x21, 0xB0, 0xFE, 0xE6, 0x21])
# IRQ 0 handler: inc word [TICKS_AT] ; push ax ; mov al,0x20 ; out 0x20,al (EOI) ; pop ax ; iret
TICK_HANDLER = bytes([0xFF, 0x06]) + TICKS_AT.to_bytes(2, "little") + bytes([0x50, 0xB0, 0x20, 0xE6, 0x20, 0x58, 0xCF])


def ticks_after_a_stall(kvm, reinject: bool, stall: float, window: float, hz: int = 1000):
    """A guest counts PIT ticks (IRQ 0 through the in-kernel PIC) while KVM_RUN is left alone for
    ``stall`` s, then runs ``window`` s; returns (ticks it counted, ticks due while it ran, ticks
    due while it was stalled)."""
    import time

    from pykvm.kvm import InterruptedExit

    with kvm.create_vm() as vm:
        need(vm, Cap.REINJECT_CONTROL)
        vm.create_irqchip()
        vm.create_pit2()
        vm.reinject_control(reinject)
        # PIC set-up ; out 0x10,al ; sti ; again: hlt ; jmp again
        cpu, mem = real_mode_vcpu(vm, PIC_INIT + bytes([0xE6, 0x10, 0xFB, 0xF4, 0xEB, 0xFD]))
        mem.write(0x1100, TICK_HANDLER)
        mem.write(8 * 4, (0x1100).to_bytes(2, "little") + b"\0\0")  # IVT vector 8 (IRQ 0)
        lapic = cpu.get_lapic()
        lapic.set_reg(0x350, 0x700)  # LINT0 = ExtINT: the PIC's interrupts reach the vCPU
        cpu.set_lapic(lapic)
        e = cpu.run(timeout=5)
        assert isinstance(e, IoExit) and e.port == 0x10, e  # PIC programmed, interrupts still off
        pit = vm.get_pit2()
        pit.channels[0].count, pit.channels[0].mode = PIT_HZ // hz, 2  # rate generator: hz ticks/s
        vm.set_pit2(pit)
        started = time.monotonic()
        time.sleep(stall)
        entered = time.monotonic()
        while time.monotonic() - entered < window:  # the guest only halts and takes interrupts
            assert isinstance(cpu.run(timeout=max(0.01, window - (time.monotonic() - entered))), InterruptedExit)
        left = time.monotonic()
        counted = int.from_bytes(mem.read(TICKS_AT, 2), "little")
        rate = PIT_HZ / (PIT_HZ // hz)
        return counted, (left - entered) * rate, (entered - started) * rate


def test_pit_reinjection_delivers_the_ticks_a_stalled_guest_missed(kvm):
    """With reinjection (KVM's default) the PIT counts the ticks a guest could not take (here,
    while its vCPU was out of KVM_RUN) and delivers them when it runs again, one per EOI; without
    it they are lost (the PIC's edge coalesces them into one)."""
    counted, due, missed = ticks_after_a_stall(kvm, True, stall=0.3, window=0.2)
    assert missed > 250
    assert counted - due > missed / 2, f"{counted} ticks in {due:.0f} due: the {missed:.0f} missed were not made up"
    counted, due, missed = ticks_after_a_stall(kvm, False, stall=0.3, window=0.2)
    assert counted > due / 10  # the timer runs and the guest takes its ticks
    assert counted - due < missed / 10, f"{counted} ticks in {due:.0f} due: the {missed:.0f} missed were made up"
