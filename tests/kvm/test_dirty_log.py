"""Dirty-page logging on the real /dev/kvm: exact page sets and counts per round, reads of
mapped pages not counted, bitmaps wider than one 64-bit word, and manual protection with
KVM_CLEAR_DIRTY_LOG."""
from __future__ import annotations

import errno
from typing import Iterable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.errors import KvmError
from pykvm.kvm import Cap, HltExit, IoExit, MemFlag
from pykvm.memory import MemoryRegion
from tests.conftest import require_or_skip
from tests.kvm.guests import real_mode_vcpu

pytestmark = pytest.mark.kvm

SLOT, SLOT_GPA, SLOT_PAGES = 1, 0x10000, 100  # 100 pages: the bitmap spans two u64 words


def touch(pages: Iterable[int], value: int = 1, write: bool = True) -> bytes:
    """Real-mode code writing (or reading) the first byte of each page of the logged slot."""
    code = b""
    for p in pages:
        seg = (SLOT_GPA + p * 0x1000) >> 4
        code += bytes([0xB8, seg & 0xFF, seg >> 8, 0x8E, 0xC0])  # mov ax, seg ; mov es, ax
        if write:
            code += bytes([0x26, 0xC6, 0x06, 0x00, 0x00, value])  # mov byte ptr es:[0], value
        else:
            code += bytes([0x26, 0xA0, 0x00, 0x00])  # mov al, es:[0]
    return code


OUT = bytes([0xE6, 0x10])  # out 0x10, al: the end of a round
HLT = bytes([0xF4])


def logged_vm(vm, code: bytes, flags: int = MemFlag.LOG_DIRTY_PAGES):
    region = MemoryRegion(SLOT_GPA, SLOT_PAGES * 0x1000)
    cpu, _ = real_mode_vcpu(vm, code)
    vm.set_user_memory_region(SLOT, SLOT_GPA, region.size, region, flags=flags)
    return cpu, region


def run_round(cpu, end: type) -> None:
    e = cpu.run(timeout=5)
    assert isinstance(e, end), e


pages = st.lists(st.integers(0, SLOT_PAGES - 1), max_size=12)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=25)
@given(first=pages, first_reads=pages, second=pages, second_reads=pages)
def test_dirty_log_is_exactly_the_pages_written_each_round(kvm, first, first_reads, second, second_reads):
    """Round 1 may also report pages whose first touch was a read (EPT/NPT map them writable
    at once, PVM's shadow paging does not); round 2 reads only pages KVM has already mapped
    and re-protected, so its log is exact."""
    second_reads = [p for p in second_reads if p in first or p in first_reads]
    code = touch(first) + touch(first_reads, write=False) + OUT
    code += touch(second, value=2) + touch(second_reads, write=False) + HLT
    with kvm.create_vm() as vm:
        cpu, region = logged_vm(vm, code)
        assert vm.get_dirty_log(SLOT).tolist() == []
        run_round(cpu, IoExit)
        log = set(vm.get_dirty_log(SLOT).tolist())
        assert set(first) <= log <= set(first) | set(first_reads)
        run_round(cpu, HltExit)
        log = vm.get_dirty_log(SLOT)
        assert log.tolist() == sorted(set(second)) and len(log) == len(set(second))
        assert vm.get_dirty_log(SLOT).tolist() == []  # each call resets the log
        for p in second:
            assert region.buffer[p * 0x1000] == 2
        region.close()


def test_slot_without_logging_refuses_get_dirty_log(vm):
    _, region = logged_vm(vm, HLT, flags=0)
    with pytest.raises(KvmError) as exc:
        vm.get_dirty_log(SLOT)
    assert exc.value.errno == errno.ENOENT and "KVM_GET_DIRTY_LOG" in str(exc.value)  # the slot has no bitmap
    region.close()


def test_manual_protect_keeps_bits_until_cleared(kvm):
    with kvm.create_vm() as vm:
        if not vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2):
            require_or_skip("PYKVM_REQUIRE_KVM", "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not supported")
        vm.enable_cap(Cap.MANUAL_DIRTY_LOG_PROTECT2, 1)  # bit 0: manual protect, bit 1 (INITIALLY_SET) off
        code = touch([2, 70]) + OUT + touch([70, 99], value=3) + HLT
        cpu, region = logged_vm(vm, code)
        run_round(cpu, IoExit)
        assert vm.get_dirty_log(SLOT).tolist() == [2, 70]
        assert vm.get_dirty_log(SLOT).tolist() == [2, 70]  # not reset by reading
        vm.clear_dirty_log(SLOT, 0, SLOT_PAGES)  # re-protect and clear
        assert vm.get_dirty_log(SLOT).tolist() == []
        run_round(cpu, HltExit)
        assert vm.get_dirty_log(SLOT).tolist() == [70, 99]
        region.close()
