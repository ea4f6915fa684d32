"""05: MMIO. A guest load from an address no memslot backs is answered by the host.

Memslots cover guest RAM. An access to a guest-physical address outside every
memslot cannot be satisfied from memory, so KVM decodes the faulting
instruction and exits with ``KVM_EXIT_MMIO``: ``phys_addr``, ``len``,
``is_write`` and up to 8 ``data`` bytes in the kvm_run page.

* A write: ``data`` holds what the guest stored; the host just takes it.
* A read: the guest's instruction is paused half-way. The host writes the
  answer into ``data`` and calls ``KVM_RUN`` again; KVM completes the
  instruction with those bytes in the destination register.

This is how every emulated device register (a UART, a PCI BAR, a virtio
notify area) works. Here a two-register "device" sits at 0xd0000: an ID
register the guest reads, and a register it writes the ID + 1 to.

Run: python3 examples/05_mmio.py
"""
from _guest import expect, new_guest, start_real_mode
from pykvm.kvm import HltExit, MmioExit

DEVICE_GPA = 0xD0000  # RAM is only 0-0xffff: nothing backs this
DEVICE_ID = 0x1234ABCD
CODE_GPA = 0x1000

# .code16
CODE = bytes.fromhex(
    "b8 00 d0"     # mov ax, 0xd000
    "8e d8"        # mov ds, ax           ; DS base = 0xd0000
    "66 a1 00 00"  # mov eax, [0]         ; 4-byte read of 0xd0000 -> KVM_EXIT_MMIO
    "66 40"        # inc eax
    "66 a3 04 00"  # mov [4], eax         ; 4-byte write of 0xd0004 -> KVM_EXIT_MMIO
    "f4"           # hlt
)


class Device:
    """The host side: registers answered by Python code."""

    def __init__(self) -> None:
        self.written = {}

    def read(self, offset: int, size: int) -> int:
        return DEVICE_ID if offset == 0 else 0xFFFFFFFF  # unknown registers read as all-ones

    def write(self, offset: int, value: int) -> None:
        self.written[offset] = value


def main() -> None:
    device = Device()
    with new_guest() as g:
        g.mem.write(CODE_GPA, CODE)
        start_real_mode(g.vcpu, CODE_GPA)
        while True:
            exit_ = g.vcpu.run(timeout=5)
            if isinstance(exit_, HltExit):
                print("exit HLT")
                break
            mmio = expect(exit_, MmioExit)
            offset = mmio.address - DEVICE_GPA
            if mmio.is_write:
                device.write(offset, mmio.value)
                print(f"exit MMIO write {mmio.address:#x} len {mmio.length}: guest stored {mmio.value:#x}")
            else:
                mmio.value = device.read(offset, mmio.length)  # lands in the guest's EAX on the next KVM_RUN
                print(f"exit MMIO read  {mmio.address:#x} len {mmio.length}: host answers {mmio.value:#x}")
        print(f"guest EAX = {g.vcpu.get_regs().rax & 0xFFFFFFFF:#x}; device register 4 = {device.written.get(4, 0):#x}")


if __name__ == "__main__":
    main()
