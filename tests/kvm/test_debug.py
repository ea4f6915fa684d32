"""Guest debugging on the real /dev/kvm: single-step RIP sequences and hardware breakpoints."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.kvm import DebugExit, GuestDebug, HltExit, IoExit
from tests.conftest import IN_LAB, skip_covered_by
from tests.kvm.guests import CODE, real_mode_vcpu

pytestmark = pytest.mark.kvm

DB_VECTOR = 1
DR6_B0 = 1 << 0  # breakpoint 0 matched
DR6_BS = 1 << 14  # single step
STEP = GuestDebug.ENABLE | GuestDebug.SINGLESTEP

MOV_CX, XOR_AX, ADD, LOOP_INSN, OUT, HLT_AT = (CODE + o for o in (0, 3, 5, 7, 9, 11))


def loop_code(n: int) -> bytes:
    """Sum n + (n-1) + ... + 1 and report it."""
    return bytes([
        0xB9, n, 0x00,  # mov cx, n
        0x31, 0xC0,     # xor ax, ax
        0x01, 0xC8,     # L: add ax, cx
        0xE2, 0xFC,     # loop L
        0xE7, 0x10,     # out 0x10, ax
        0xF4,           # hlt
    ])


def expected_rips(n: int) -> list:
    """What single-stepping the loop must visit, from the first instruction to the OUT."""
    return [MOV_CX, XOR_AX] + [ADD, LOOP_INSN] * n + [OUT]


def step_until_io(cpu) -> tuple:
    rips, axes = [cpu.get_regs().rip], []
    for _ in range(1000):
        e = cpu.run(timeout=5)
        if isinstance(e, IoExit):
            return rips, axes, e
        assert isinstance(e, DebugExit), e
        assert e.exception == DB_VECTOR and e.dr6 & DR6_BS
        r = cpu.get_regs()
        assert e.pc == r.rip  # real mode, CS base 0: linear pc == rip
        rips.append(e.pc)
        axes.append(r.rax & 0xFFFF)
    raise AssertionError("single-stepping never reached the OUT")


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=15)
@given(n=st.integers(1, 20))
def test_single_step_visits_every_instruction(kvm, n):
    with kvm.create_vm() as vm:
        cpu, _ = real_mode_vcpu(vm, loop_code(n))
        cpu.set_guest_debug(STEP)
        rips, axes, out = step_until_io(cpu)
        assert rips == expected_rips(n)
        assert out.port == 0x10 and out.value == n * (n + 1) // 2
        # AX after each step: 0, 0, then each partial sum n, n + (n-1), ... twice (after ADD and LOOP).
        sums = [sum(range(n, n - k, -1)) for k in range(1, n + 1)]
        assert axes == [0, 0] + [s for s in sums for _ in (0, 1)]


def test_stepping_resumes_after_an_io_exit_and_can_be_switched_off(vm):
    cpu, _ = real_mode_vcpu(vm, loop_code(1) + bytes.fromhex("f4"))  # a second hlt after the first
    cpu.set_guest_debug(STEP)
    step_until_io(cpu)
    cpu.set_guest_debug(0)
    assert isinstance(cpu.run(timeout=5), HltExit)
    assert cpu.get_regs().rip == HLT_AT + 1


THIS_TEST = "tests/kvm/test_debug.py::test_hardware_breakpoint_stops_before_the_instruction"


def test_hardware_breakpoint_stops_before_the_instruction(vm):
    cpu, _ = real_mode_vcpu(vm, loop_code(3))
    cpu.set_guest_debug(GuestDebug.ENABLE | GuestDebug.USE_HW_BP, [OUT])
    e = cpu.run(timeout=5)
    if isinstance(e, IoExit) and IN_LAB:
        # Measured: in L1 (kvm_amd on QEMU TCG's SVM) the guest runs through the breakpoint.
        skip_covered_by(THIS_TEST, "in L1 (QEMU TCG's SVM) the breakpoint never fires; the host's KVM runs this test")
    assert isinstance(e, DebugExit) and e.exception == DB_VECTOR, f"the hardware breakpoint did not fire: {e}"
    assert e.pc == OUT and e.dr6 & DR6_B0 and not e.dr6 & DR6_BS
    r = cpu.get_regs()
    assert r.rip == OUT and r.rax & 0xFFFF == 6 and r.rcx & 0xFFFF == 0  # the loop ran, the OUT did not
    cpu.set_guest_debug(0)
    e = cpu.run(timeout=5)
    assert isinstance(e, IoExit) and e.value == 6
    assert isinstance(cpu.run(timeout=5), HltExit)
