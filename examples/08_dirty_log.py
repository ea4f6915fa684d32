"""08: dirty-page logging. The host learns which guest pages were written since it last asked.

A memslot registered with ``KVM_MEM_LOG_DIRTY_PAGES`` gets a bitmap, one bit
per page. KVM write-protects the slot's pages (or uses the CPU's dirty bits /
PML); the first guest write to a page sets its bit. ``KVM_GET_DIRTY_LOG``
copies the bitmap out, clears it and write-protects those pages again, so
each call answers "written since the previous call". The log may err on the
safe side, never the other: with EPT/NPT, a page the guest *reads* before
touching it in any other way can be mapped writable at once and reported
dirty too; a read of a page KVM has already mapped and re-protected never is.

Live migration is built on this: copy all memory, then repeatedly copy only
the pages dirtied meanwhile until the remainder is small enough to stop the VM.

The guest writes pages 1, 4 and 9 of a 16-page slot, reports in with an
``out``, then writes pages 4 and 15, reads page 9, and halts.

Run: python3 examples/08_dirty_log.py
"""
from _guest import expect, new_guest, start_real_mode
from pykvm.kvm import HltExit, MemFlag
from pykvm.memory import MemoryRegion

DATA_GPA = 0x10000
DATA_PAGES = 16
DATA_SLOT = 1
CODE_GPA = 0x1000

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
    "a0 00 90"        # mov al, [0x9000]            ; page 9: only read this round
    "f4"              # hlt
)


def main() -> None:
    with new_guest() as g:
        data = MemoryRegion(DATA_GPA, DATA_PAGES * 0x1000, name="logged")
        g.vm.set_user_memory_region(DATA_SLOT, DATA_GPA, data.size, data, flags=MemFlag.LOG_DIRTY_PAGES)
        print(f"memslot {DATA_SLOT}: {DATA_PAGES} pages at {DATA_GPA:#x} with KVM_MEM_LOG_DIRTY_PAGES")
        g.mem.write(CODE_GPA, CODE)
        start_real_mode(g.vcpu, CODE_GPA)

        print("before running: dirty pages", g.vm.get_dirty_log(DATA_SLOT).tolist())
        g.run_io()
        print("round 1: dirty pages", g.vm.get_dirty_log(DATA_SLOT).tolist())
        expect(g.vcpu.run(timeout=5), HltExit)
        print("round 2: dirty pages", g.vm.get_dirty_log(DATA_SLOT).tolist())
        print("asked again: dirty pages", g.vm.get_dirty_log(DATA_SLOT).tolist())
        g.vm.delete_memory_region(DATA_SLOT)
        data.close()


if __name__ == "__main__":
    main()
