"""Lifetime and threads on the real /dev/kvm: exits that outlive their vCPU, close() during
a run, runs in forked children and in threads that block signals, memslots that outlive
their backing's close(), and the guest clock's save/restore."""
from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pykvm.errors import ClosedError
from pykvm.kvm import InterruptedExit, IoExit, MemFlag
from pykvm.kvm.vcpu import KICK_SIGNAL
from pykvm.memory import GuestMemory, GuestMemoryError, MemoryRegion
from tests.kvm.guests import CODE, HLT, JMP_SELF, mov_al, real_mode_vcpu

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[2]

OUT_AL_10 = bytes([0xE6, 0x10])  # out 0x10, al
IN_AL_60 = bytes([0xE4, 0x60])  # in al, 0x60
MOV_AL_FROM_8000 = bytes([0xA0, 0x00, 0x80])  # mov al, [0x8000]: an MMIO read where no memslot is


def _python(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a crash there must not take pytest with it)."""
    prelude = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


def test_an_in_exit_answered_after_its_vcpu_closed_does_not_touch_unmapped_memory(kvm):
    r = _python(f"""
        from pykvm.kvm import Kvm
        from tests.kvm.guests import real_mode_vcpu, HLT
        kvm = Kvm(); vm = kvm.create_vm()
        cpu, mem = real_mode_vcpu(vm, {IN_AL_60!r} + HLT)
        ex = cpu.run(timeout=5)
        cpu.close()
        ex.value = 0x42           # the view keeps the page mapped
        print("answered", bytes(ex.data).hex(), cpu.closed)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["answered", "42", "True"]


def test_an_mmio_read_exit_outlives_a_vcpu_that_was_garbage_collected(kvm):
    r = _python(f"""
        import gc
        from pykvm.kvm import Kvm, MmioExit
        from tests.kvm.guests import real_mode_vcpu, HLT
        def one_exit():
            kvm = Kvm(); vm = kvm.create_vm()
            cpu, mem = real_mode_vcpu(vm, {MOV_AL_FROM_8000!r} + HLT, mem_size=0x8000)
            return cpu.run(timeout=5)   # cpu, vm and kvm go when this returns
        ex = one_exit(); gc.collect()
        assert isinstance(ex, MmioExit) and not ex.is_write and ex.address == 0x8000, ex
        ex.value = 0x5A
        print("value", ex.value)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["value", "90"]


@pytest.mark.parametrize("what", ["vcpu", "vm"])
def test_close_from_another_thread_ends_a_run_that_would_never_exit(vm, what):
    cpu, _ = real_mode_vcpu(vm, JMP_SELF)
    got = []

    def runner():
        try:
            got.append(cpu.run(timeout=30))  # only the close may end it this soon
        except Exception as exc:
            got.append(exc)

    t = threading.Thread(target=runner, daemon=True)
    t.start()
    time.sleep(0.1)
    t0 = time.monotonic()
    (cpu if what == "vcpu" else vm).close()
    t.join(5)
    assert not t.is_alive(), "the run survived close()"
    assert time.monotonic() - t0 < 2
    assert cpu.closed and len(got) == 1 and isinstance(got[0], ClosedError), got
    with pytest.raises(ClosedError):
        cpu.run(timeout=1)


def test_run_timeout_works_in_a_forked_child(kvm):
    r = _python("""
        import os, time
        from pykvm.kvm import Kvm, InterruptedExit
        from tests.kvm.guests import real_mode_vcpu, JMP_SELF
        def spin():
            kvm = Kvm(); vm = kvm.create_vm()
            cpu, mem = real_mode_vcpu(vm, JMP_SELF)
            t0 = time.monotonic(); ex = cpu.run(timeout=0.3)
            return ex, time.monotonic() - t0, (kvm, vm, cpu, mem)
        print("parent", type(spin()[0]).__name__, flush=True)   # the watchdog thread now exists
        pid = os.fork()
        if pid == 0:
            ex, took, _ = spin()
            print("child", type(ex).__name__, took < 2, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
    """, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["parent", "InterruptedExit", "child", "InterruptedExit", "True"]


def test_a_thread_that_blocks_the_kick_signal_is_still_kicked_out_and_not_twice(vm):
    """VMMs often block every signal in vCPU threads: pykvm gives KVM_RUN a mask without
    the kick signal (KVM_SET_SIGNAL_MASK) and takes a kick left pending after the run."""
    code = JMP_SELF + mov_al(7) + OUT_AL_10 + HLT
    cpu, _ = real_mode_vcpu(vm, code)
    got = []

    def runner():
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.valid_signals()))
        assert KICK_SIGNAL in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        t0 = time.monotonic()
        got.append((cpu.run(timeout=0.3), time.monotonic() - t0))
        cpu.kick()  # lands after the run: pending, blocked, and must not cut the next run short
        cpu.immediate_exit = False
        regs = cpu.get_regs()
        regs.rip = CODE + len(JMP_SELF)
        cpu.set_regs(regs)
        got.append((cpu.run(timeout=5), None))

    t = threading.Thread(target=runner, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive()
    (first, took), (second, _) = got
    assert isinstance(first, InterruptedExit) and 0.25 < took < 2
    assert isinstance(second, IoExit) and second.port == 0x10 and second.value == 7


def _mapped(address: int) -> bool:
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if lo <= address < hi:
                return True
    return False


def test_a_memslot_keeps_its_backing_mapped_after_the_region_closes(vm):
    mem = GuestMemory.flat(0x10000)
    mem.write(CODE, mov_al(0x11) + OUT_AL_10 + HLT)
    region = mem.regions[0]
    slot = vm.set_user_memory_region(0, 0, region.size, region)
    cpu = vm.create_vcpu(0)
    s = cpu.get_sregs()
    s.cs.base = s.cs.selector = 0
    cpu.set_sregs(s)
    r = cpu.get_regs()
    r.rip, r.rflags = CODE, 2
    cpu.set_regs(r)
    address = region.host_address
    region.close()
    assert _mapped(address)  # the slot holds it
    other = MemoryRegion(0, 0x10000)  # were the pages unmapped, this could land there
    other.buffer[CODE:CODE + 5] = mov_al(0x22) + OUT_AL_10 + HLT
    e = cpu.run(timeout=5)
    assert isinstance(e, IoExit) and e.value == 0x11  # the guest still runs on its own RAM
    with pytest.raises(GuestMemoryError, match="closed"):
        vm.set_user_memory_region(1, 0x20000, region.size, region)
    vm.delete_memory_region(slot.slot)
    if other.host_address != address:
        assert not _mapped(address)  # the slot let go, and so did the mapping
    other.close()


def test_a_read_only_buffer_needs_a_read_only_memslot(vm):
    ro = mmap.mmap(-1, 0x1000, prot=mmap.PROT_READ)
    with pytest.raises(ValueError, match="read-only"):
        vm.set_user_memory_region(0, 0x20000, 0x1000, ro)
    slot = vm.set_user_memory_region(0, 0x20000, 0x1000, ro, flags=MemFlag.READONLY)
    assert slot.flags == MemFlag.READONLY
    vm.close()
    ro.close()  # the VM let it go: closing no longer meets an export


def test_the_guest_clock_saves_and_restores_with_wall_time_folded_in(vm):
    from pykvm._native import lib

    saved = vm.get_clock()
    vm.set_clock(saved)  # what get_clock gave, whatever its flags
    assert vm.get_clock().clock >= saved.clock
    with pytest.raises(ValueError, match="realtime"):
        vm.set_clock(saved.clock, lib.KVM_CLOCK_REALTIME)
    base = vm.get_clock().clock
    vm.set_clock(base, lib.KVM_CLOCK_REALTIME, realtime=time.time_ns() - 3_000_000_000)  # read 3 s ago
    jumped = vm.get_clock().clock - base
    assert 3e9 <= jumped < 3e9 + 1e9  # KVM added the 3 s that "passed" (and not the epoch)
    vm.set_clock(base)
    assert 0 <= vm.get_clock().clock - base < 1e9


def test_arguments_past_what_the_kernel_takes_are_refused(vm):
    cpu = vm.create_vcpu(0)
    with pytest.raises(ValueError, match="4 debug address registers"):
        cpu.set_guest_debug(0, [0x1000] * 5)
    with pytest.raises(ValueError, match="at most 4"):
        vm.enable_cap("KVM_CAP_X86_DISABLE_EXITS", 0, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="negative"):
        cpu._ioctl("KVM_SET_TSC_KHZ", -5)
    with pytest.raises(ValueError, match="2\\^31"):  # KVM_GET_TSC_KHZ could not report it (an int result)
        cpu.set_tsc_khz(1 << 31)
