"""SREGS2, XSAVE2, machine checks, KVMCLOCK_CTRL, the KVM_RUN signal mask and SMI on the real /dev/kvm
(and every new vCPU/system method refusing a closed object)."""
from __future__ import annotations

import errno
import os
import signal
import threading
import time

import pytest

from pykvm._native import ffi
from pykvm.errors import ClosedError, KvmError
from pykvm.kvm import Cap, HltExit, InterruptedExit, IoExit
from pykvm.kvm.regs import Sregs2, Xsave
from pykvm.kvm.mce import McgStatus, MciStatus
from pykvm.kvm.nested import NestedState
from pykvm.kvm.vcpu import KICK_SIGNAL
from tests.kvm.guests import CODE, HLT, JMP_SELF, real_mode_vcpu

pytestmark = pytest.mark.kvm

CR0_AM = 1 << 18
CR0_PE, CR0_PG = 1 << 0, 1 << 31
CR4_PAE, CR4_MCE, CR4_OSFXSR = 1 << 5, 1 << 6, 1 << 9
EFER_SCE = 1 << 0
XSTATE_SSE = 1 << 1
MSR_IA32_MC0_STATUS, MSR_IA32_MC0_ADDR, MSR_IA32_MCG_STATUS = 0x401, 0x402, 0x17A
MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D01
PVCLOCK_FLAGS_OFFSET, PVCLOCK_GUEST_STOPPED = 29, 1 << 1


def rdmsr_out(msr: int, port: int) -> bytes:
    """mov ecx,msr ; rdmsr ; out port,eax   (real mode: 0x66 selects 32-bit operands)."""
    return bytes([0x66, 0xB9]) + msr.to_bytes(4, "little") + bytes([0x0F, 0x32, 0x66, 0xE7, port])


def outs_until_hlt(cpu) -> dict:
    """Run to the guest's hlt; {port: value} of every OUT on the way (each run bounded)."""
    seen = {}
    while True:
        e = cpu.run(timeout=5)
        if isinstance(e, HltExit):
            return seen
        assert isinstance(e, IoExit) and e.is_out, e
        seen[e.port] = e.value


def expect_kvm_error(ioctl: str, err: int, fn, *args) -> None:
    with pytest.raises(KvmError) as ei:
        fn(*args)
    assert ei.value.ioctl == ioctl and ei.value.errno == err and ioctl in str(ei.value)


# -- SREGS2 ------------------------------------------------------------------
def test_sregs2_round_trips_and_agrees_with_sregs(vm):
    cpu, _ = real_mode_vcpu(vm, HLT)
    s = cpu.get_sregs2()
    legacy = cpu.get_sregs()
    assert (s.cr0, s.cs.selector, s.gdt.limit) == (legacy.cr0, legacy.cs.selector, legacy.gdt.limit)
    assert s.flags == 0  # no PAE paging in real mode: no PDPTRs to report
    s.cr0 |= CR0_AM
    s.efer |= EFER_SCE
    s.fs.base, s.fs.selector = 0x12340, 0x1234
    cpu.set_sregs2(s)
    back = cpu.get_sregs2()
    assert back.cr0 & CR0_AM and back.efer & EFER_SCE and (back.fs.base, back.fs.selector) == (0x12340, 0x1234)
    legacy = cpu.get_sregs()
    assert (legacy.cr0, legacy.efer, legacy.fs.base) == (back.cr0, back.efer, 0x12340)
    assert isinstance(cpu.run(timeout=5), HltExit)  # the vCPU still runs with that state


def test_sregs2_refuses_unknown_flags_and_pdptrs_without_pae(vm):
    cpu, _ = real_mode_vcpu(vm, HLT)
    s = cpu.get_sregs2()
    s.flags = Sregs2.PDPTRS_VALID << 1
    expect_kvm_error("KVM_SET_SREGS2", errno.EINVAL, cpu.set_sregs2, s)
    s.flags = Sregs2.PDPTRS_VALID  # real mode has no PDPTRs to load
    expect_kvm_error("KVM_SET_SREGS2", errno.EINVAL, cpu.set_sregs2, s)


def test_sregs2_pdptrs_under_pae_paging(vm):
    """KVM accepts PDPTRS_VALID with PAE paging on. Hardware KVM keeps the PDPTRs as given
    (not what guest memory at CR3 holds, here zeros) and reports them back; PVM, which has
    no 32-bit paging, accepts the call but clears CR0.PG, and then reports no PDPTRs."""
    cpu, _ = real_mode_vcpu(vm, HLT)
    s = cpu.get_sregs2()
    s.cr0, s.cr4, s.cr3, s.efer = CR0_PG | CR0_PE | 0x10, CR4_PAE, 0x3000, 0
    s.flags = Sregs2.PDPTRS_VALID
    pdptrs = [0x5001, 0x6001, 0x7001, 0x8001]
    s.pdptrs = pdptrs
    cpu.set_sregs2(s)
    back = cpu.get_sregs2()
    if back.cr0 & CR0_PG:
        assert back.flags == Sregs2.PDPTRS_VALID and list(back.pdptrs) == pdptrs
    else:
        assert os.environ.get("PYKVM_IN_LAB") != "1", "hardware KVM (L1's kvm_amd) dropped CR0.PG"
        assert back.flags == 0 and back.cr4 & CR4_PAE  # PVM


# -- XSAVE2 ------------------------------------------------------------------
def test_xsave2_size_and_contents_match_xsave(vm):
    cpu, _ = real_mode_vcpu(vm, HLT)
    x2 = cpu.get_xsave2()
    assert x2.size == vm.check_extension(Cap.XSAVE2) >= 4096 and len(x2.to_bytes()) == x2.size
    assert x2.to_bytes()[:4096] == cpu.get_xsave().to_bytes()
    assert x2.copy() == x2 and x2.copy().ptr != x2.ptr
    assert Xsave(16).size == 4096  # never smaller than struct kvm_xsave


def test_xmm0_written_through_set_xsave_is_what_the_guest_reads(vm):
    # movaps [0x2000],xmm0 ; hlt   (SSE in real mode needs CR4.OSFXSR; PVM runs real mode in KVM's
    # instruction emulator, which has movaps but not movd)
    cpu, mem = real_mode_vcpu(vm, bytes([0x0F, 0x29, 0x06, 0x00, 0x20]) + HLT)
    s = cpu.get_sregs2()
    s.cr4 |= CR4_OSFXSR
    cpu.set_sregs2(s)
    x = cpu.get_xsave2()
    xmm0 = bytes(range(0xA0, 0xB0))
    ffi.buffer(x.ptr, x.size)[160:176] = xmm0  # legacy area: XMM0 at byte 160
    x.region[512 // 4] |= XSTATE_SSE  # XSAVE header's XSTATE_BV: without it KVM loads SSE's init state (zeros)
    cpu.set_xsave(x)
    fpu = cpu.get_fpu()  # kept in a name: fpu.xmm is a view into its memory
    assert bytes(list(fpu.xmm[0])) == xmm0
    assert isinstance(cpu.run(timeout=5), HltExit)
    assert mem.read(0x2000, 16) == xmm0
    fpu.xmm[1] = list(b"\x5a" * 16)
    cpu.set_fpu(fpu)  # and the other way round: KVM_SET_FPU shows in KVM_GET_XSAVE2
    assert cpu.get_xsave2().to_bytes()[176:192] == b"\x5a" * 16


# -- machine checks ------------------------------------------------------------
# #MC handler: MC0_STATUS to ports 0x10/0x11 (low/high: mov eax,edx), MC0_ADDR to 0x12, MCG_STATUS to 0x13
MCE_HANDLER = (rdmsr_out(MSR_IA32_MC0_STATUS, 0x10) + bytes([0x66, 0x89, 0xD0, 0x66, 0xE7, 0x11])
               + rdmsr_out(MSR_IA32_MC0_ADDR, 0x12) + rdmsr_out(MSR_IA32_MCG_STATUS, 0x13) + HLT)
MCE_HANDLER_AT = 0x1100


def mce_vcpu(vm, kvm):
    """A real-mode vCPU halting at CODE, with CR4.MCE, every bank KVM offers and MCE_HANDLER."""
    cpu, mem = real_mode_vcpu(vm, HLT)
    mem.write(MCE_HANDLER_AT, MCE_HANDLER)
    mem.write_u32(18 * 4, MCE_HANDLER_AT)  # IVT vector 18 (#MC) -> 0000:1100
    s = cpu.get_sregs2()
    s.cr4 |= CR4_MCE
    cpu.set_sregs2(s)
    cpu.setup_mce((kvm.mce_cap_supported() & ~0xFF) | kvm.check_extension(Cap.MCE))
    return cpu


def test_uncorrected_mce_reaches_the_guest_handler(kvm, vm):
    """KVM queues #MC for an uncorrected error; the guest's handler (real-mode IVT vector 18)
    reads exactly the injected MC0_STATUS, MC0_ADDR and MCG_STATUS with rdmsr."""
    supported = kvm.mce_cap_supported()
    assert supported & 0xFF == 0 and kvm.check_extension(Cap.MCE) >= 1  # bank count comes from Cap.MCE
    cpu = mce_vcpu(vm, kvm)
    status = MciStatus.VAL | MciStatus.UC | MciStatus.EN | MciStatus.ADDRV | 0x0134
    cpu.set_mce(0, status, addr=0xABC000)
    seen = outs_until_hlt(cpu)
    assert seen[0x10] | seen[0x11] << 32 == status
    assert seen[0x12] == 0xABC000
    assert seen[0x13] == McgStatus.MCIP | McgStatus.RIPV
    assert cpu.get_regs().rip == MCE_HANDLER_AT + len(MCE_HANDLER)  # halted at the handler's end


def test_corrected_mce_is_only_recorded_in_the_bank(kvm, vm):
    """A corrected error (no UC) raises no #MC (the guest halts where it was); MC0_STATUS/ADDR
    read back through KVM_GET_MSRS hold it, and a second one sets OVER."""
    cpu = mce_vcpu(vm, kvm)
    status = MciStatus.VAL | MciStatus.EN | 0x0005
    cpu.set_mce(0, status, addr=0x1000)
    assert isinstance(cpu.run(timeout=5), HltExit) and cpu.get_regs().rip == CODE + 1  # no #MC
    assert cpu.get_msrs([MSR_IA32_MC0_STATUS, MSR_IA32_MC0_ADDR]) == {
        MSR_IA32_MC0_STATUS: status, MSR_IA32_MC0_ADDR: 0x1000}
    cpu.set_mce(0, status)  # a second error in a bank that holds one overflows it
    assert cpu.get_msrs([MSR_IA32_MC0_STATUS])[MSR_IA32_MC0_STATUS] == status | MciStatus.OVER


def test_mce_setup_and_injection_errors(kvm, vm):
    cpu, _ = real_mode_vcpu(vm, HLT)
    expect_kvm_error("KVM_X86_SETUP_MCE", errno.EINVAL, cpu.setup_mce, 0)  # zero banks
    expect_kvm_error("KVM_X86_SETUP_MCE", errno.EINVAL, cpu.setup_mce, kvm.check_extension(Cap.MCE) + 1)
    cpu.setup_mce(2)
    expect_kvm_error("KVM_X86_SET_MCE", errno.EINVAL, cpu.set_mce, 2, MciStatus.VAL)  # bank 2 of 2
    expect_kvm_error("KVM_X86_SET_MCE", errno.EINVAL, cpu.set_mce, 1, MciStatus.EN)  # no VAL
    cpu.set_mce(1, MciStatus.VAL)
    assert cpu.get_msrs([0x405])[0x405] == MciStatus.VAL  # MC1_STATUS


# -- KVMCLOCK_CTRL -----------------------------------------------------------
def test_kvmclock_ctrl_marks_the_guest_stopped(vm):
    pvclock = 0x2000
    # mov ecx,MSR_KVM_SYSTEM_TIME_NEW ; mov eax,pvclock|1 ; xor edx,edx ; wrmsr ; l: hlt ; jmp l
    code = (bytes([0x66, 0xB9]) + MSR_KVM_SYSTEM_TIME_NEW.to_bytes(4, "little")
            + bytes([0x66, 0xB8]) + (pvclock | 1).to_bytes(4, "little")
            + bytes([0x66, 0x31, 0xD2, 0x0F, 0x30]) + HLT + bytes([0xEB, 0xFD]))
    cpu, mem = real_mode_vcpu(vm, code)
    expect_kvm_error("KVM_KVMCLOCK_CTRL", errno.EINVAL, cpu.kvmclock_ctrl)  # no kvmclock page yet
    assert isinstance(cpu.run(timeout=5), HltExit)
    assert mem.read(pvclock, 4) != b"\0" * 4  # KVM filled the page (version, TSC scale, ...)
    assert not mem.read(pvclock + PVCLOCK_FLAGS_OFFSET, 1)[0] & PVCLOCK_GUEST_STOPPED
    cpu.kvmclock_ctrl()
    assert isinstance(cpu.run(timeout=5), HltExit)  # KVM writes the flag as it enters the guest
    assert mem.read(pvclock + PVCLOCK_FLAGS_OFFSET, 1)[0] & PVCLOCK_GUEST_STOPPED


# -- KVM_SET_SIGNAL_MASK -----------------------------------------------------
def timed_run_with_signal(cpu, sig: int, timeout: float) -> float:
    """Send ``sig`` to this thread 0.2 s into ``cpu.run(timeout)`` of a spinning guest;
    returns how long the run took (it always ends: the deadline's kick signal is never blocked)."""
    timer = threading.Timer(0.2, signal.pthread_kill, (threading.get_ident(), sig))
    start = time.monotonic()
    timer.start()
    try:
        e = cpu.run(timeout=timeout)
    finally:
        timer.join()
    assert isinstance(e, InterruptedExit)
    return time.monotonic() - start


def test_signal_mask_keeps_a_signal_from_interrupting_kvm_run(vm):
    """With the signal in the vCPU's mask the guest runs on to the deadline and the signal
    is delivered only after KVM_RUN returns; without a mask it ends KVM_RUN at once."""
    sig = signal.SIGRTMIN + 5
    assert sig != KICK_SIGNAL
    handled = []
    previous = signal.signal(sig, lambda *_: handled.append(time.monotonic()))
    try:
        cpu, _ = real_mode_vcpu(vm, JMP_SELF)
        cpu.set_signal_mask([sig])
        start = time.monotonic()
        assert timed_run_with_signal(cpu, sig, timeout=1.0) >= 0.9
        assert len(handled) == 1 and handled[0] - start >= 0.9  # held pending through KVM_RUN
        assert not cpu.immediate_exit
        cpu.set_signal_mask(None)
        assert timed_run_with_signal(cpu, sig, timeout=5.0) < 2.5
        assert len(handled) == 2
    finally:
        signal.signal(sig, previous)


def test_signal_mask_arguments(vm):
    cpu, _ = real_mode_vcpu(vm, HLT)
    cpu.set_signal_mask([])  # every signal unblocked in KVM_RUN
    cpu.set_signal_mask([signal.SIGUSR1, signal.SIGKILL])  # KVM silently keeps SIGKILL deliverable
    with pytest.raises(ValueError, match="kick signal"):
        cpu.set_signal_mask([KICK_SIGNAL])
    with pytest.raises(ValueError, match="outside"):
        cpu.set_signal_mask([65])
    wrong = ffi.new("struct kvm_signal_mask *", {"len": 4, "sigset": [0] * 4})  # not the kernel's sigset size
    expect_kvm_error("KVM_SET_SIGNAL_MASK", errno.EINVAL, cpu._ioctl, "KVM_SET_SIGNAL_MASK", wrong)


# -- SMI ---------------------------------------------------------------------
def test_smi_becomes_pending(kvm, vm):
    if not kvm.check_extension(Cap.X86_SMM):
        pytest.skip("KVM_CAP_X86_SMM is 0: this KVM has no SMM emulation (KVM_SMI answers ENOTTY)")
    cpu, _ = real_mode_vcpu(vm, HLT)
    before = cpu.get_vcpu_events()
    assert not before.smi.pending
    cpu.smi()
    after = cpu.get_vcpu_events()
    assert after.smi.pending


# -- lifetime ------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda c: c.get_sregs2(), lambda c: c.set_sregs2(Sregs2()), lambda c: c.get_xsave2(),
    lambda c: c.setup_mce(1), lambda c: c.set_mce(0, MciStatus.VAL), lambda c: c.kvmclock_ctrl(),
    lambda c: c.set_signal_mask(None), lambda c: c.smi(), lambda c: c.get_nested_state(),
    lambda c: c.set_nested_state(NestedState()),
], ids=["get_sregs2", "set_sregs2", "get_xsave2", "setup_mce", "set_mce", "kvmclock_ctrl", "set_signal_mask", "smi",
        "get_nested_state", "set_nested_state"])
def test_closed_vcpu_raises_closed_error(vm, call):
    cpu = vm.create_vcpu(0)
    cpu.close()
    with pytest.raises(ClosedError):
        call(cpu)


@pytest.mark.parametrize("call", [lambda k: k.mce_cap_supported(), lambda k: k.supported_hv_cpuid()],
                         ids=["mce_cap_supported", "supported_hv_cpuid"])
def test_closed_kvm_raises_closed_error(kvm, call):
    kvm.close()
    with pytest.raises(ClosedError):
        call(kvm)
