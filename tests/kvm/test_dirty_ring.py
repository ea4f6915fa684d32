"""The dirty ring on the real /dev/kvm: exactly the pages written per round, re-armed by
KVM_RESET_DIRTY_RINGS, a full ring stopping its vCPU, and the ring's mapping closed with its vCPU."""
from __future__ import annotations

import errno

import pytest

from pykvm.errors import ClosedError, KvmError
from pykvm.kvm import Cap, DirtyPage, DirtyRingFullExit, HltExit, IoExit, MemFlag
from pykvm.memory import PAGE_SIZE, MemoryRegion
from tests.conftest import open_fds, require_or_skip
from tests.kvm.guests import HLT, real_mode_vcpu
from tests.kvm.test_dirty_log import OUT, SLOT, SLOT_GPA, touch

pytestmark = pytest.mark.kvm

RING_OFFSET = 0x40000  # KVM_DIRTY_LOG_PAGE_OFFSET (64) pages into the vCPU fd


def ring_vm(vm, code: bytes, pages: int, ring_bytes: int = 0x10000):
    """``vm`` with a dirty ring and a vCPU running ``code``; slot SLOT logs ``pages`` pages."""
    __tracebackhide__ = True  # a skip shows the test's line
    if vm.check_extension(Cap.DIRTY_LOG_RING) < ring_bytes:
        require_or_skip("PYKVM_REQUIRE_KVM", f"no dirty ring of {ring_bytes} bytes")
    vm.enable_dirty_ring(ring_bytes)
    region = MemoryRegion(SLOT_GPA, pages * PAGE_SIZE)
    cpu, _ = real_mode_vcpu(vm, code)
    vm.set_user_memory_region(SLOT, SLOT_GPA, region.size, region, flags=MemFlag.LOG_DIRTY_PAGES)
    return cpu, region


def logged(*pages: int):
    return sorted(DirtyPage(SLOT, p) for p in pages)


def vcpu_mappings() -> list:
    """The file offsets of this process's mappings of vCPU fds (kvm_run at 0, rings at RING_OFFSET)."""
    with open("/proc/self/maps") as f:
        return [int(line.split()[2], 16) for line in f if "kvm-vcpu" in line]


def test_harvest_is_exactly_the_pages_written_and_reset_rearms_them(vm):
    code = touch([3, 70, 5, 99]) + OUT + touch([70, 99, 70], value=2) + OUT + HLT
    cpu, region = ring_vm(vm, code, 100)
    ring = cpu.dirty_ring()
    assert cpu.dirty_ring() is ring  # one ring per vCPU: it keeps the harvest position
    assert ring.harvest() == []
    assert isinstance(cpu.run(timeout=5), IoExit)
    assert sorted(ring.harvest()) == logged(3, 5, 70, 99)
    assert ring.harvest() == []  # already harvested
    assert vm.reset_dirty_rings() == 4
    assert vm.reset_dirty_rings() == 0
    assert isinstance(cpu.run(timeout=5), IoExit)
    # Only the pages written again: the reset write-protected them. KVM logs a page at its first
    # write; PVM emulates real-mode guests instruction by instruction and logs every emulated
    # write (the ring, unlike the bitmap, keeps duplicates), so page 70 may come twice.
    again = ring.harvest()
    assert set(again) == set(logged(70, 99)) and len(again) in (2, 3)
    assert vm.reset_dirty_rings() == len(again)
    assert isinstance(cpu.run(timeout=5), HltExit)
    assert ring.harvest() == [] and vm.reset_dirty_rings() == 0
    assert region.buffer[70 * PAGE_SIZE] == 2
    with pytest.raises(KvmError) as ei:  # the ring replaces the slots' bitmaps
        vm.get_dirty_log(SLOT)
    assert ei.value.errno == errno.ENXIO and ei.value.ioctl == "KVM_GET_DIRTY_LOG"
    region.close()


def test_a_full_ring_stops_its_vcpu_until_reset(vm):
    """A one-page ring (256 entries, the smallest this host takes) is soft-full well before
    220 pages: KVM keeps entries in reserve and stops the vCPU with DIRTY_RING_FULL at its next
    guest entry. PVM emulates this real-mode guest up to its OUT without entering it, so here
    the stop comes after the OUT; where writes fault one by one it comes before."""
    try:
        cpu, region = ring_vm(vm, touch(range(220)) + OUT + HLT, 220, ring_bytes=PAGE_SIZE)
    except KvmError as exc:  # Intel PML reserves 512 entries more: a bigger minimum ring
        assert exc.errno == errno.EINVAL
        require_or_skip("PYKVM_REQUIRE_KVM",
                        "this host's smallest dirty ring holds more than a real-mode guest can dirty")
    ring, harvested, exits = cpu.dirty_ring(), [], []
    for _ in range(10):
        e = cpu.run(timeout=5)
        exits.append(type(e))
        if isinstance(e, HltExit):
            break
        if isinstance(e, DirtyRingFullExit):
            assert isinstance(cpu.run(timeout=5), DirtyRingFullExit)  # nothing reset yet
            harvested += ring.harvest()
            assert vm.reset_dirty_rings() > 0
    assert DirtyRingFullExit in exits
    assert [t for t in exits if t is not DirtyRingFullExit] == [IoExit, HltExit]
    harvested += ring.harvest()
    assert sorted(set(harvested)) == logged(*range(220))
    # Where writes fault one by one (kvm_amd in L1), the write that filled the ring is cut
    # short by the stop, re-protected by the reset and logged again when it is retried:
    # at most one page more per stop.
    assert len(harvested) - len(set(harvested)) <= exits.count(DirtyRingFullExit)
    region.close()


def test_the_ring_is_set_up_before_vcpus(vm):
    cpu = vm.create_vcpu(0)
    with pytest.raises(RuntimeError, match="no dirty ring"):  # mapped, it would SIGBUS on access
        cpu.dirty_ring()
    with pytest.raises(KvmError) as ei:
        vm.enable_dirty_ring(0x10000)
    assert ei.value.errno == errno.EINVAL and ei.value.ioctl == "KVM_ENABLE_CAP"
    assert vm.dirty_ring_size == 0


def test_closing_the_vm_unmaps_and_closes_the_rings(kvm):
    fds, mappings = open_fds(), vcpu_mappings()
    vm = kvm.create_vm()
    cpu, region = ring_vm(vm, HLT, 1)
    rings = [cpu.dirty_ring(), vm.create_vcpu(1).dirty_ring()]
    assert sorted(vcpu_mappings()) == sorted(mappings + [0, 0, RING_OFFSET, RING_OFFSET])
    vm.close()
    assert all(r.closed for r in rings) and cpu.closed
    with pytest.raises(ClosedError):
        rings[0].harvest()
    with pytest.raises(ClosedError):
        vm.reset_dirty_rings()
    assert vcpu_mappings() == mappings
    assert open_fds() == fds
    region.close()


def test_closing_a_vcpu_closes_only_its_ring(vm):
    cpu, region = ring_vm(vm, HLT, 1)
    other = vm.create_vcpu(1).dirty_ring()
    ring = cpu.dirty_ring()
    cpu.close()
    assert ring.closed and not other.closed
    assert other.harvest() == [] and vm.reset_dirty_rings() == 0
    region.close()
