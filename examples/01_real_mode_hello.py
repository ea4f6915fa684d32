"""01: real mode hello. The smallest useful VM: add two numbers, print the sum, halt.

The whole KVM life cycle is four objects:

* ``open("/dev/kvm")`` (``Kvm``) -> ``KVM_CREATE_VM`` (``Vm``): an empty machine,
  no memory, no CPUs.
* ``KVM_SET_USER_MEMORY_REGION``: a memslot maps guest-physical pages onto our
  own anonymous mmap. The guest's RAM *is* our memory: writing the code bytes
  into it is all "loading a program" means.
* ``KVM_CREATE_VCPU`` (``Vcpu``) and an ``mmap`` of its fd: the shared
  ``struct kvm_run`` page through which the kernel reports exits.
* ``KVM_SET_REGS`` / ``KVM_SET_SREGS`` place the vCPU at our code, then
  ``KVM_RUN`` executes the guest until it does something only userspace can
  answer. An ``out`` to a port nobody in the kernel owns comes back as
  ``KVM_EXIT_IO`` with port, size, direction and the byte in the kvm_run page;
  ``hlt`` (without an in-kernel irqchip) comes back as ``KVM_EXIT_HLT``.

The vCPU starts in 16-bit real mode, like a PC after reset: no descriptor
tables, no paging, linear address = segment * 16 + offset. The host hands the
two numbers over in AX and BX; the guest adds them, turns the sum into two
ASCII digits with ``aam`` and writes them to the COM1 data port 0x3f8.

Run: python3 examples/01_real_mode_hello.py [A B]   (A + B < 100)
"""
import sys

from _guest import SERIAL_PORT, expect, new_guest, start_real_mode
from pykvm.kvm import HltExit, IoExit

CODE_GPA = 0x1000
# .code16
CODE = bytes.fromhex(
    "01 d8"     # add ax, bx        ; AX = A + B
    "d4 0a"     # aam               ; AH = AL / 10, AL = AL % 10
    "05 30 30"  # add ax, 0x3030    ; both digits to ASCII
    "ba f8 03"  # mov dx, 0x3f8     ; COM1 data port
    "86 e0"     # xchg al, ah       ; tens digit first
    "ee"        # out dx, al        ; -> KVM_EXIT_IO
    "88 e0"     # mov al, ah
    "ee"        # out dx, al        ; -> KVM_EXIT_IO
    "b0 0a"     # mov al, 0x0a
    "ee"        # out dx, al        ; -> KVM_EXIT_IO ('\n')
    "f4"        # hlt               ; -> KVM_EXIT_HLT
)


def main() -> None:
    a, b = (int(x) for x in sys.argv[1:3]) if len(sys.argv) >= 3 else (19, 23)
    if not (0 <= a and 0 <= b and a + b < 100):
        raise SystemExit("give two non-negative numbers whose sum is below 100")
    with new_guest() as g:
        g.mem.write(CODE_GPA, CODE)
        start_real_mode(g.vcpu, CODE_GPA)
        regs = g.vcpu.get_regs()
        regs.rax, regs.rbx = a, b
        g.vcpu.set_regs(regs)
        print(f"guest: {len(CODE)} bytes at {CODE_GPA:#x}, real mode, AX={a} BX={b}")

        printed = bytearray()
        while True:
            exit_ = g.vcpu.run(timeout=5)
            if isinstance(exit_, IoExit) and exit_.is_out and exit_.port == SERIAL_PORT:
                printed += exit_.data
                print(f"exit IO: out port {exit_.port:#x} size {exit_.size} value {bytes(exit_.data)!r}")
                continue
            expect(exit_, HltExit)
            print(f"exit HLT at rip={g.vcpu.get_regs().rip:#x}")
            break
        print(f"guest printed: {printed.decode().strip()}")


if __name__ == "__main__":
    main()
