"""09: ioeventfd. A guest write to a "doorbell" signals an eventfd inside the kernel, no exit.

Normally every ``out`` to a port KVM does not own costs a full exit to
userspace and back. ``KVM_IOEVENTFD`` registers an (address, length
[, value]) on KVM's PIO or MMIO bus: when the guest writes there, KVM adds 1
to the eventfd's counter and resumes the guest at once. The VMM (or a vhost
worker, or another thread) reads the eventfd whenever it likes; N writes
between two reads show up as a counter of N. With ``datamatch`` only writes of
that exact value signal; others exit as usual.

This is how virtio "kick" notifications avoid exits. The guest here writes
port 0x600 1000 times, first without an ioeventfd (1000 IO exits), then with
one (no IO exit at all; the eventfd counts 1000).

Run: python3 examples/09_ioeventfd.py
"""
import os
import time

from _guest import expect, new_guest, start_real_mode
from pykvm.kvm import HltExit, IoExit

DOORBELL_PORT = 0x600
WRITES = 1000
CODE_GPA = 0x1000

# .code16
CODE = bytes.fromhex(
    "ba 00 06"  # mov dx, 0x600
    "b9 e8 03"  # mov cx, 1000
    "ee"        # L: out dx, al     ; the doorbell
    "e2 fd"     # loop L
    "f4"        # hlt
)


def run_guest(g) -> int:
    """Run the doorbell loop from the start; the number of IO exits it took."""
    start_real_mode(g.vcpu, CODE_GPA)
    io_exits = 0
    while True:
        exit_ = g.vcpu.run()  # no irqchip: hlt exits, so this cannot block
        if isinstance(exit_, IoExit) and exit_.port == DOORBELL_PORT:
            io_exits += 1
            continue
        expect(exit_, HltExit)
        return io_exits


def main() -> None:
    with new_guest() as g:
        g.mem.write(CODE_GPA, CODE)

        t = time.perf_counter()
        exits = run_guest(g)
        print(f"without ioeventfd: {WRITES} guest writes, {exits} IO exits to userspace "
              f"({(time.perf_counter() - t) * 1e3:.1f} ms)")

        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            g.vm.ioeventfd(efd, DOORBELL_PORT, 1, pio=True)  # any 1-byte write to port 0x600
            t = time.perf_counter()
            exits = run_guest(g)
            elapsed = (time.perf_counter() - t) * 1e3
            count = os.eventfd_read(efd)
            print(f"with ioeventfd:    {WRITES} guest writes, {exits} IO exits to userspace ({elapsed:.1f} ms)")
            print(f"eventfd count: {count}")
            g.vm.ioeventfd_deassign(efd, DOORBELL_PORT, 1, pio=True)
        finally:
            os.close(efd)


if __name__ == "__main__":
    main()
