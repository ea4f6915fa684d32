"""06: a read-only memslot. Reads come from memory at full speed; writes become MMIO exits.

``KVM_SET_USER_MEMORY_REGION`` with ``KVM_MEM_READONLY`` (capability
KVM_CAP_READONLY_MEM) maps host memory into the guest for reading only. KVM
maps the pages read-only in the guest's second-level page tables, so loads
never leave the guest; a store faults, KVM decodes it and exits to userspace
with ``KVM_EXIT_MMIO`` (``is_write`` set), leaving the memory untouched.

This is how a VMM shows firmware (a BIOS ROM, a flash device whose writes are
commands, not data): the host decides what a write means.

Run: python3 examples/06_readonly_memslot.py
"""
from _guest import expect, new_guest, start_real_mode
from pykvm.kvm import Cap, HltExit, IoExit, MemFlag, MmioExit
from pykvm.memory import MemoryRegion

ROM_GPA = 0x20000
ROM_SIZE = 0x1000
ROM_SLOT = 1  # slot 0 is the RAM new_guest() registered
CODE_GPA = 0x1000
UNSUPPORTED = 77

# .code16
CODE = bytes.fromhex(
    "b8 00 20"        # mov ax, 0x2000
    "8e d8"           # mov ds, ax                ; DS base = 0x20000 (the ROM)
    "a0 00 00"        # mov al, [0]               ; read: from memory, no exit
    "e6 10"           # out 0x10, al              ; show what was read
    "c6 06 00 00 58"  # mov byte ptr [0], 0x58    ; write 'X': KVM_EXIT_MMIO
    "a0 00 00"        # mov al, [0]               ; read again
    "e6 10"           # out 0x10, al
    "f4"              # hlt
)


def main() -> None:
    with new_guest() as g:
        if not g.kvm.check_extension(Cap.READONLY_MEM):
            print("this KVM has no KVM_CAP_READONLY_MEM")
            raise SystemExit(UNSUPPORTED)
        rom = MemoryRegion(ROM_GPA, ROM_SIZE, name="rom")
        rom.buffer[:9] = b"PYKVM ROM"
        g.vm.set_user_memory_region(ROM_SLOT, ROM_GPA, ROM_SIZE, rom, flags=MemFlag.READONLY)
        print(f"memslot {ROM_SLOT}: {ROM_GPA:#x}+{ROM_SIZE:#x} READONLY, holds {bytes(rom.buffer[:9])!r}")
        g.mem.write(CODE_GPA, CODE)
        start_real_mode(g.vcpu, CODE_GPA)

        while True:
            exit_ = g.vcpu.run(timeout=5)
            if isinstance(exit_, IoExit):
                print(f"exit IO: guest read {bytes(exit_.data)!r} from the ROM")
            elif isinstance(exit_, MmioExit):
                print(f"exit MMIO write {exit_.address:#x} len {exit_.length} data {bytes(exit_.data)!r} "
                      f"(is_write={exit_.is_write})")
            else:
                expect(exit_, HltExit)
                print("exit HLT")
                break
        print(f"ROM still holds {bytes(rom.buffer[:9])!r}")
        g.vm.delete_memory_region(ROM_SLOT)
        rom.close()


if __name__ == "__main__":
    main()
