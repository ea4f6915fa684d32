"""The KVM API against the real /dev/kvm: system queries, exits, state, lifetime, errors."""
from __future__ import annotations

import errno
import threading
import time

import pytest

from pykvm.errors import ClosedError, KvmError
from pykvm.kvm import (Cap, HltExit, InternalErrorExit, InterruptedExit, IoExit, Kvm, MemFlag, MmioExit,
                       MpState, ShutdownExit)
from pykvm.memory import GuestMemory
from tests.conftest import open_fds
from tests.kvm.guests import CODE, HLT, JMP_SELF, OUT_AL_3F8, mov_al, real_mode_vcpu

pytestmark = pytest.mark.kvm


def test_system_queries(kvm):
    assert kvm.api_version == 12
    assert kvm.check_extension(Cap.USER_MEMORY) == 1
    assert kvm.check_extension("KVM_CAP_USER_MEMORY") == kvm.check_extension(int(Cap.USER_MEMORY))
    assert kvm.vcpu_mmap_size >= 4096 and kvm.vcpu_mmap_size % 4096 == 0
    assert 1 <= kvm.nr_vcpus <= kvm.max_vcpus
    assert kvm.nr_memslots >= 32
    leaves = {e.function for e in kvm.supported_cpuid()}
    assert {0, 1, 0x80000000} <= leaves
    assert 0x10 in kvm.msr_index_list()  # IA32_TSC is always saved/restored


def test_unknown_capability_name_is_rejected(kvm):
    with pytest.raises(ValueError, match="unknown capability"):
        kvm.check_extension("NOT_A_CAP")


def test_real_mode_add_and_out(vm):
    cpu, _ = real_mode_vcpu(vm, mov_al(2) + bytes([0x04, 3]) + OUT_AL_3F8 + HLT)  # add al,3
    e = cpu.run(timeout=5)
    assert isinstance(e, IoExit) and e.is_out and e.port == 0x3F8 and e.size == 1 and e.count == 1
    assert e.value == 5
    assert isinstance(cpu.run(timeout=5), HltExit)
    assert cpu.get_regs().rip == CODE + 9  # just past the hlt


def test_io_in_is_answered_through_the_data_view(vm):
    # mov dx,0x10 ; in ax,dx ; out 0x11,ax ; hlt
    cpu, _ = real_mode_vcpu(vm, bytes([0xBA, 0x10, 0x00, 0xED, 0xE7, 0x11]) + HLT)
    e = cpu.run(timeout=5)
    assert isinstance(e, IoExit) and e.is_in and e.port == 0x10 and e.size == 2
    e.value = 0xBEEF
    e = cpu.run(timeout=5)
    assert e.is_out and e.port == 0x11 and e.value == 0xBEEF
    assert cpu.get_regs().rax & 0xFFFF == 0xBEEF


def test_string_out_reports_count(vm):
    # mov si,0x2000 ; mov cx,3 ; mov dx,0x3f8 ; rep outsb ; hlt
    code = bytes([0xBE, 0x00, 0x20, 0xB9, 0x03, 0x00, 0xBA, 0xF8, 0x03, 0xF3, 0x6E]) + HLT
    cpu, mem = real_mode_vcpu(vm, code)
    mem.write(0x2000, b"abc")
    out = b""
    while True:
        e = cpu.run(timeout=5)
        if isinstance(e, HltExit):
            break
        assert isinstance(e, IoExit) and e.port == 0x3F8
        out += bytes(e.data)
    assert out == b"abc"


def test_mmio_read_and_write(vm):
    # mov ax,0x2000 ; mov ds,ax ; mov ax,[0] ; mov [2],ax ; hlt   (GPA 0x20000 has no memslot)
    cpu, _ = real_mode_vcpu(vm, bytes([0xB8, 0x00, 0x20, 0x8E, 0xD8, 0xA1, 0x00, 0x00, 0xA3, 0x02, 0x00]) + HLT)
    e = cpu.run(timeout=5)
    assert isinstance(e, MmioExit) and not e.is_write and e.address == 0x20000 and e.length == 2
    e.value = 0x1234
    e = cpu.run(timeout=5)
    assert isinstance(e, MmioExit) and e.is_write and e.address == 0x20002 and e.value == 0x1234


def test_readonly_slot_turns_writes_into_mmio(vm):
    rom = GuestMemory.flat(0x1000, gpa=0x20000)
    rom.write(0x20000, b"\x42")
    vm.set_user_memory_region(1, 0x20000, 0x1000, rom.regions[0], MemFlag.READONLY)
    # mov ax,0x2000 ; mov ds,ax ; mov al,[0] ; mov [1],al ; hlt
    cpu, _ = real_mode_vcpu(vm, bytes([0xB8, 0x00, 0x20, 0x8E, 0xD8, 0xA0, 0x00, 0x00, 0xA2, 0x01, 0x00]) + HLT)
    e = cpu.run(timeout=5)
    assert isinstance(e, MmioExit) and e.is_write and e.address == 0x20001 and e.value == 0x42
    assert rom.read(0x20001, 1) == b"\x00"


def test_hlt_without_irqchip_exits(vm):
    cpu, _ = real_mode_vcpu(vm, HLT)
    assert isinstance(cpu.run(timeout=5), HltExit)


def test_hlt_with_irqchip_blocks_until_timeout(vm):
    vm.create_irqchip()
    cpu, _ = real_mode_vcpu(vm, HLT)
    t = time.monotonic()
    e = cpu.run(timeout=0.3)
    assert isinstance(e, InterruptedExit)
    assert 0.25 < time.monotonic() - t < 3


def test_kick_from_another_thread_stops_a_spinning_guest(vm):
    cpu, _ = real_mode_vcpu(vm, JMP_SELF)
    result = {}

    def runner():
        t = time.monotonic()
        result["exit"] = cpu.run(timeout=5)  # bounded even if kick() is broken (the deadline kicks too)
        result["took"] = time.monotonic() - t

    th = threading.Thread(target=runner, daemon=True)  # a run that never returns cannot hold up exit
    th.start()
    time.sleep(0.2)
    cpu.kick()
    th.join(7)
    assert not th.is_alive(), "the vCPU thread is still inside KVM_RUN"
    assert isinstance(result["exit"], InterruptedExit)
    assert result["took"] < 2.5, f"the run ended after {result['took']:.1f} s: its own deadline, not the kick, stopped it"
    assert cpu.immediate_exit  # kick()'s flag stays set (a deadline's own kick is cleared)
    cpu.immediate_exit = False
    assert isinstance(cpu.run(timeout=0.2), InterruptedExit)  # still spinning, bounded by timeout


def test_triple_fault_never_hangs_the_vmm(vm):
    # lidt [0x1100] (limit 0) ; int3 -> #GP -> #DF -> triple fault
    cpu, _ = real_mode_vcpu(vm, bytes([0x0F, 0x01, 0x1E, 0x00, 0x11, 0xCC]))
    t = time.monotonic()
    e = cpu.run(timeout=1)
    # Hardware KVM reports SHUTDOWN; PVM spins in the kernel until kicked (see LAB.md).
    assert isinstance(e, (ShutdownExit, InterruptedExit, InternalErrorExit))
    assert time.monotonic() - t < 4
    assert isinstance(cpu.run(timeout=0.2), (ShutdownExit, InterruptedExit, InternalErrorExit))
    cpu.get_regs()  # the vCPU fd is still usable


def test_register_state_round_trips(vm):
    cpu, _ = real_mode_vcpu(vm, HLT)
    r = cpu.get_regs()
    r.rax, r.r15, r.rflags = 0x1122334455667788, 42, 0x202
    cpu.set_regs(r)
    back = cpu.get_regs()
    assert (back.rax, back.r15, back.rflags) == (0x1122334455667788, 42, 0x202)
    s = cpu.get_sregs()
    assert s.cr4 == 0  # the reset value
    s.cr4 = 0x608  # DE | OSFXSR | OSXMMEXCPT: allowed in real mode
    s.ds.selector, s.ds.base = 0x1234, 0x12340
    cpu.set_sregs(s)
    back = cpu.get_sregs()
    assert (back.cr4, back.ds.selector, back.ds.base) == (0x608, 0x1234, 0x12340)
    fpu = cpu.get_fpu()
    fpu.fcw = 0x27F
    cpu.set_fpu(fpu)
    assert cpu.get_fpu().fcw == 0x27F
    assert cpu.get_xsave().region[6] == 0x1F80  # MXCSR's reset value, in the legacy XSAVE area
    cpu.set_msrs({0x10: 12345})
    assert cpu.get_msrs([0x10])[0x10] >= 12345  # the TSC keeps counting
    assert cpu.get_mp_state() == MpState.RUNNABLE
    from pykvm._native import lib

    events = cpu.get_vcpu_events()
    assert events.nmi.pending == 0
    events.nmi.pending = 1
    events.flags = lib.KVM_VCPUEVENT_VALID_NMI_PENDING
    cpu.set_vcpu_events(events)
    assert cpu.get_vcpu_events().nmi.pending == 1  # its delivery: tests/kvm/test_state_roundtrip.py
    entries = kvm_cpuid = vm.kvm.supported_cpuid()
    cpu.set_cpuid2(entries)
    assert {e.function for e in cpu.get_cpuid2()} == {e.function for e in kvm_cpuid}
    assert cpu.translate(0x1000)["physical_address"] == 0x1000
    xcrs = cpu.get_xcrs()
    assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].value & 1  # XCR0.x87 is always set


def test_lapic_and_irqchip_state(vm):
    vm.create_irqchip()
    vm.create_pit2()
    cpu, _ = real_mode_vcpu(vm, HLT)
    lapic = cpu.get_lapic()
    assert lapic.reg(0x20) >> 24 == 0  # APIC ID of vCPU 0
    lapic.set_reg(0x350, 0x700)  # LINT0 = ExtINT
    cpu.set_lapic(lapic)
    assert cpu.get_lapic().reg(0x350) & 0x700 == 0x700
    ioapic = vm.get_irqchip(2)
    vm.set_irqchip(ioapic)
    pit = vm.get_pit2()
    assert pit.channels[0].count == 0x10000  # the reset count (a programmed 0 means 65536)
    pit.channels[0].count, pit.channels[0].mode = 0x1234, 2  # rate generator
    pit.channels[2].count, pit.channels[2].mode = 0x100, 3  # square wave (the speaker's channel)
    vm.set_pit2(pit)
    back = vm.get_pit2().channels
    assert (back[0].count, back[0].mode, back[2].count, back[2].mode) == (0x1234, 2, 0x100, 3)
    vm.irq_line(4, 1)
    vm.irq_line(4, 0)
    assert vm.get_clock().clock > 0


def test_two_vms_at_once(kvm):
    with kvm.create_vm() as a, kvm.create_vm() as b:
        ca, _ = real_mode_vcpu(a, mov_al(1) + OUT_AL_3F8 + HLT)
        cb, _ = real_mode_vcpu(b, mov_al(2) + OUT_AL_3F8 + HLT)
        assert cb.run(timeout=5).value == 2
        assert ca.run(timeout=5).value == 1


def test_closing_in_the_wrong_order_closes_dependents(kvm):
    before = open_fds()
    vm = kvm.create_vm()
    cpu, mem = real_mode_vcpu(vm, HLT)
    vm.close()  # the vCPU goes first, then the VM
    assert cpu.closed and vm.closed
    with pytest.raises(ClosedError):
        cpu.run()
    vm.close()
    cpu.close()  # idempotent
    mem.close()
    assert open_fds() == before


def test_invalid_and_overlapping_slots(vm):
    mem = GuestMemory.flat(0x10000)
    vm.set_user_memory_region(0, 0, 0x10000, mem.regions[0])
    with pytest.raises(KvmError) as ei:
        vm.set_user_memory_region(1, 0x8000, 0x1000, mem.regions[0])
    assert ei.value.errno == errno.EEXIST and ei.value.ioctl == "KVM_SET_USER_MEMORY_REGION"
    assert isinstance(ei.value, FileExistsError)
    with pytest.raises(KvmError) as ei:
        vm.set_user_memory_region(2, 0x20000, 0x1000, userspace_addr=mem.host_address(0) + 1)  # unaligned
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(KvmError):
        vm.set_user_memory_region(100000, 0x40000, 0x1000, mem.regions[0])
    with pytest.raises(ValueError, match="larger than its backing"):
        vm.set_user_memory_region(3, 0x40000, 0x20000, mem.regions[0])


def test_too_many_vcpus_and_duplicate_ids(kvm):
    with kvm.create_vm() as vm:
        vm.create_vcpu(0)
        with pytest.raises(KvmError) as ei:
            vm.create_vcpu(0)
        assert ei.value.errno == errno.EEXIST
        with pytest.raises(KvmError):
            vm.create_vcpu(1 << 24)


def test_wrong_fd_type_is_a_clear_error(tmp_path):
    path = tmp_path / "not-kvm"
    path.write_bytes(b"")
    with pytest.raises(KvmError) as ei:
        Kvm(str(path))
    assert ei.value.ioctl == "KVM_GET_API_VERSION"
    assert ei.value.errno == errno.ENOTTY


def test_missing_device_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="kvm_intel or kvm_amd") as ei:
        Kvm(str(tmp_path / "kvm"))
    assert isinstance(ei.value, KvmError)


def test_no_fd_leaks_over_many_vms(kvm):
    before = open_fds()
    for _ in range(20):
        with kvm.create_vm() as vm:
            real_mode_vcpu(vm, HLT)
    assert open_fds() == before


def test_create_vfio_device_support_is_reported(vm):
    from pykvm.kvm.device import VFIO

    try:
        vm.create_device(VFIO, test=True)
    except KvmError as exc:  # kernel without CONFIG_KVM_VFIO (this host: no VFIO at all)
        assert exc.ioctl == "KVM_CREATE_DEVICE" and exc.errno in (errno.ENODEV, errno.ENOENT)
    else:
        with vm.create_device(VFIO) as dev:
            assert dev.fileno() >= 0


def test_feature_msrs_and_tsc_khz(kvm, vm):
    indices = kvm.feature_msr_index_list()
    values = kvm.feature_msrs(indices)
    assert set(values) == set(indices)
    cpu, _ = real_mode_vcpu(vm, HLT)
    assert cpu.get_tsc_khz() > 100_000  # a TSC of at least 100 MHz


def test_user_space_msr_exits_through_enable_cap(vm):
    from pykvm._native import lib
    from pykvm.kvm import MsrExit

    if not vm.check_extension(Cap.X86_USER_SPACE_MSR):
        from tests.conftest import require_or_skip
        require_or_skip("PYKVM_REQUIRE_KVM", "KVM_CAP_X86_USER_SPACE_MSR not offered")
    vm.enable_cap(Cap.X86_USER_SPACE_MSR, lib.KVM_MSR_EXIT_REASON_UNKNOWN)
    # mov ecx,0x12345678 ; rdmsr ; out 0x10,al ; hlt   (an MSR KVM does not know)
    cpu, _ = real_mode_vcpu(vm, bytes([0x66, 0xB9, 0x78, 0x56, 0x34, 0x12, 0x0F, 0x32, 0xE6, 0x10]) + HLT)
    e = cpu.run(timeout=5)
    assert isinstance(e, MsrExit) and not e.is_write and e.index == 0x12345678
    e.data = 0x99
    e = cpu.run(timeout=5)
    assert isinstance(e, IoExit) and e.value == 0x99


def test_coalesced_mmio_queues_writes_without_exits(vm):
    if not vm.kvm.check_extension(Cap.COALESCED_MMIO):
        from tests.conftest import require_or_skip
        require_or_skip("PYKVM_REQUIRE_KVM", "KVM_CAP_COALESCED_MMIO not offered")
    vm.register_coalesced_mmio(0x20000, 0x1000)
    # mov ax,0x2000 ; mov ds,ax ; mov byte [0],0x11 ; mov byte [1],0x22 ; hlt
    code = bytes([0xB8, 0x00, 0x20, 0x8E, 0xD8, 0xC6, 0x06, 0x00, 0x00, 0x11, 0xC6, 0x06, 0x01, 0x00, 0x22]) + HLT
    cpu, _ = real_mode_vcpu(vm, code)
    assert isinstance(cpu.run(timeout=5), HltExit)  # no MMIO exit in between
    writes = cpu.drain_coalesced_mmio()
    assert [(w.address, w.data) for w in writes] == [(0x20000, b"\x11"), (0x20001, b"\x22")]
    assert cpu.drain_coalesced_mmio() == []
    vm.unregister_coalesced_mmio(0x20000, 0x1000)


def test_interrupt_injection_without_irqchip(vm):
    from pykvm.kvm import IrqWindowOpenExit

    # IVT entry 0x20 -> 0:0x1100; handler: out 0x10,al ; hlt.  Main: sti ; hlt ... jmp
    cpu, mem = real_mode_vcpu(vm, bytes([0xFB, 0xF4, 0xEB, 0xFD]))
    mem.write_u32(0x20 * 4, 0x1100)
    mem.write(0x1100, bytes([0xB0, 0x20, 0xE6, 0x10]) + HLT)
    assert isinstance(cpu.run(timeout=5), HltExit)  # halted with IF=1
    cpu.kvm_run.request_interrupt_window = 1
    e = cpu.run(timeout=5)
    if not isinstance(e, IrqWindowOpenExit):
        assert cpu.kvm_run.ready_for_interrupt_injection
    cpu.kvm_run.request_interrupt_window = 0
    cpu.interrupt(0x20)
    e = cpu.run(timeout=5)
    assert isinstance(e, IoExit) and e.port == 0x10 and e.value == 0x20


def test_ioapic_and_pic_state_show_asserted_lines(vm):
    vm.create_irqchip()
    ioapic = vm.get_irqchip(2)
    assert ioapic.ioapic_base == 0xFEC00000
    assert ioapic.ioapic_redirection(5) & (1 << 16)  # pins start masked
    vm.irq_line(5, 1)
    assert vm.get_irqchip(2).ioapic_irr & (1 << 5)
    assert vm.get_irqchip(0).pic_irr & (1 << 5)
    vm.irq_line(5, 0)
    assert not vm.get_irqchip(2).ioapic_irr & (1 << 5)
    ioapic.set_ioapic_redirection(5, 0x31 | (1 << 15))  # vector 0x31, level, unmasked
    vm.set_irqchip(ioapic)
    assert vm.get_irqchip(2).ioapic_redirection(5) & 0x1FFFF == 0x31 | (1 << 15)
    with pytest.raises(IndexError):
        ioapic.ioapic_redirection(24)
