"""12: the dirty ring. KVM tells the host which pages were written, page by page, as it happens.

Example 08's bitmap answers "which pages were written?" by a scan of one bit per page
of the slot, however few were written. With ``KVM_CAP_DIRTY_LOG_RING`` (enabled on the
VM before any vCPU exists) KVM instead appends a ``struct kvm_dirty_gfn`` (slot, page
offset) to a ring of the writing vCPU, which the host maps from the vCPU fd at page
``KVM_DIRTY_LOG_PAGE_OFFSET``. The host harvests entries in ring order up to the first
one not flagged DIRTY, flags each harvested one RESET, and ``KVM_RESET_DIRTY_RINGS``
hands them back to KVM and write-protects those pages again, so that their next write
is logged anew. A vCPU whose ring fills up exits with ``KVM_EXIT_DIRTY_RING_FULL``
until the host catches up: the ring also paces a guest that dirties memory too fast.
The cost of a harvest follows what was written, not the size of memory: what migration
of large guests wants.

The guest writes pages 1, 4 and 9 of a 16-page slot, reports in with an ``out``, then
writes pages 4 and 15 and halts.

Run: python3 examples/12_dirty_ring.py
"""
from _guest import TSS_ADDR, expect, start_real_mode
from pykvm.kvm import Cap, HltExit, IoExit, Kvm, MemFlag
from pykvm.memory import GuestMemory, MemoryRegion

DATA_GPA = 0x10000
DATA_PAGES = 16
DATA_SLOT = 1
CODE_GPA = 0x1000
RING_BYTES = 0x10000  # 4096 entries of 16 bytes (hosts with Intel PML keep 512 of them in reserve)

# .code16
CODE = bytes.fromhex(
    "b8 00 10"        # mov ax, 0x1000
    "8e d8"           # mov ds, ax                  ; DS base = 0x10000: page n is at [n * 0x1000]
    "c6 06 00 10 01"  # mov byte ptr [0x1000], 1    ; page 1
    "c6 06 00 40 01"  # mov byte ptr [0x4000], 1    ; page 4
    "c6 06 00 90 01"  # mov byte ptr [0x9000], 1    ; page 9
    "e6 10"           # out 0x10, al                ; round 1 done: exit to the host
    "c6 06 00 40 02"  # mov byte ptr [0x4000], 2    ; page 4 again
    "c6 06 00 f0 02"  # mov byte ptr [0xf000], 2    ; page 15
    "f4"              # hlt
)


def main() -> None:
    # closed in reverse: the VM (its vCPU and ring first), /dev/kvm, then the memory
    with GuestMemory.flat(0x10000) as mem, MemoryRegion(DATA_GPA, DATA_PAGES * 0x1000, name="logged") as data, \
            Kvm() as kvm, kvm.create_vm() as vm:
        if vm.check_extension(Cap.DIRTY_LOG_RING) < RING_BYTES:
            print("this KVM has no dirty ring of that size (KVM_CAP_DIRTY_LOG_RING)")
            raise SystemExit(77)
        vm.set_tss_addr(TSS_ADDR)
        vm.enable_dirty_ring(RING_BYTES)  # KVM_ENABLE_CAP: before the first vCPU
        print(f"dirty ring: {RING_BYTES // 16} entries per vCPU")
        vm.map_memory(mem)
        vm.set_user_memory_region(DATA_SLOT, DATA_GPA, data.size, data, flags=MemFlag.LOG_DIRTY_PAGES)
        vcpu = vm.create_vcpu(0)
        ring = vcpu.dirty_ring()  # mmap of the vCPU fd at KVM_DIRTY_LOG_PAGE_OFFSET
        mem.write(CODE_GPA, CODE)
        start_real_mode(vcpu, CODE_GPA)

        print("before running: harvested", ring.harvest())
        expect(vcpu.run(timeout=5), IoExit)
        print("round 1: harvested pages", [p.offset for p in ring.harvest() if p.slot == DATA_SLOT])
        print(f"round 1: KVM_RESET_DIRTY_RINGS reset {vm.reset_dirty_rings()} entries")
        expect(vcpu.run(timeout=5), HltExit)
        print("round 2: harvested pages", [p.offset for p in ring.harvest() if p.slot == DATA_SLOT])
        print(f"round 2: KVM_RESET_DIRTY_RINGS reset {vm.reset_dirty_rings()} entries")
        print("asked again: harvested", ring.harvest())


if __name__ == "__main__":
    main()
