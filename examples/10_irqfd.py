"""10: interrupt injection with irqfd. An eventfd write becomes a guest interrupt, all in the kernel.

``KVM_CREATE_IRQCHIP`` puts the PC's interrupt controllers in the kernel: two
8259 PICs, an IOAPIC and a local APIC per vCPU. Their inputs are numbered
GSIs (global system interrupts); by default GSI 0-15 reach the PIC pins and
IOAPIC pins of the same number. ``KVM_IRQFD`` ties an eventfd to a GSI: a
write to the eventfd (from any thread, or from another kernel driver such as
VFIO when a device interrupts) pulses that GSI inside the kernel. The PIC
raises the interrupt, the LAPIC (whose LINT0 is wired to the PIC at reset)
delivers it, the guest's IDT handler runs, and userspace never takes part.
``KVM_IRQ_LINE`` does the same from an ioctl.

With an in-kernel irqchip, ``hlt`` no longer exits: KVM parks the vCPU thread
inside ``KVM_RUN`` until an interrupt arrives. So every run here is bounded
(``run(timeout=...)`` kicks the thread with a signal) and the eventfd is
written by a second thread while the vCPU sleeps in ``hlt``.

The guest runs in real mode, where the interrupt descriptor table is the
interrupt vector table at address 0 (entry n: 4 bytes of offset:segment at
n * 4; ``lidt`` could move it). It points vector 0x25 at its handler, programs
the master PIC (IRQ 0-7 -> vectors 0x20-0x27, only IRQ 5 unmasked), enables
interrupts and halts. The handler writes its vector to port 0x10, acknowledges
the PIC (EOI) and returns to ``hlt``.

Run: python3 examples/10_irqfd.py
"""
import os
import threading
import time

from _guest import expect, new_guest, start_real_mode
from pykvm.kvm import InterruptedExit, IoExit

GSI = 5  # master PIC pin 5 (and IOAPIC pin 5, masked)
VECTOR = 0x20 + GSI  # where the guest's PIC setup sends IRQ 5
CODE_GPA, HANDLER_GPA, STACK_TOP = 0x1000, 0x1100, 0x8000
READY_PORT, VECTOR_PORT = 0x11, 0x10

# .code16
CODE = bytes.fromhex(
    "c7 06 94 00 00 11"     # mov word ptr [0x94], 0x1100  ; IVT[0x25].offset  (entry n is at n * 4)
    "c7 06 96 00 00 00"     # mov word ptr [0x96], 0       ; IVT[0x25].segment
    "b0 11"                 # mov al, 0x11      ; PIC ICW1: edge triggered, cascade, ICW4 follows
    "e6 20"                 # out 0x20, al      ; (ports 0x20/0x21 are the in-kernel PIC: no exits)
    "b0 20"                 # mov al, 0x20      ; ICW2: IRQ 0-7 -> vectors 0x20-0x27
    "e6 21"                 # out 0x21, al
    "b0 04"                 # mov al, 0x04      ; ICW3: the slave PIC hangs off IRQ 2
    "e6 21"                 # out 0x21, al
    "b0 01"                 # mov al, 0x01      ; ICW4: 8086 mode
    "e6 21"                 # out 0x21, al
    "b0 df"                 # mov al, 0xdf      ; OCW1: mask every IRQ but 5
    "e6 21"                 # out 0x21, al
    "e6 11"                 # out 0x11, al      ; tell the host we are ready (an exit)
    "fb"                    # sti
    "f4"                    # L: hlt            ; sleeps inside KVM_RUN
    "eb fd"                 # jmp L
)
# .code16
HANDLER = bytes.fromhex(
    "50"                    # push ax
    "b0 25"                 # mov al, 0x25
    "e6 10"                 # out 0x10, al      ; report the vector (an exit)
    "b0 20"                 # mov al, 0x20      ; OCW2: non-specific end of interrupt
    "e6 20"                 # out 0x20, al
    "58"                    # pop ax
    "cf"                    # iret
)


def wait_for_vector(g, inject, how: str) -> None:
    """Let the vCPU sleep in hlt, fire ``inject`` from another thread, and see the handler run."""
    fired = threading.Timer(0.2, inject)
    start = time.monotonic()
    fired.start()
    out = expect(g.vcpu.run(timeout=5), IoExit)
    fired.join()
    if out.port != VECTOR_PORT:
        raise SystemExit(f"expected the handler's report on port {VECTOR_PORT:#x}, got {out!r}")
    print(f"{how}: the handler reported vector {out.value:#x} on port {out.port:#x} "
          f"{time.monotonic() - start:.2f} s after KVM_RUN began")


def main() -> None:
    with new_guest(irqchip=True) as g:
        g.mem.write(CODE_GPA, CODE)
        g.mem.write(HANDLER_GPA, HANDLER)
        start_real_mode(g.vcpu, CODE_GPA, sp=STACK_TOP)  # an interrupt pushes FLAGS, CS, IP here

        efd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            g.vm.irqfd(efd, GSI)
            print(f"KVM_IRQFD: eventfd {efd} -> GSI {GSI} "
                  f"(master PIC IRQ {GSI}: vector {VECTOR:#x} once the guest programs the PIC)")
            ready = g.run_io()
            if ready.port != READY_PORT:
                raise SystemExit(f"expected the guest's ready signal on port {READY_PORT:#x}, got {ready!r}")
            print(f"exit IO: port {ready.port:#x}: guest set up its IVT and PIC, now sti; hlt")

            exit_ = expect(g.vcpu.run(timeout=0.3), InterruptedExit)
            print(f"run(timeout=0.3) -> {exit_.name}: no exit while halted; "
                  f"mp_state={g.vcpu.get_mp_state().name}")
            g.vcpu.immediate_exit = False  # the kick left it set

            wait_for_vector(g, lambda: os.eventfd_write(efd, 1), "eventfd write (irqfd)")
            expect(g.vcpu.run(timeout=0.3), InterruptedExit)  # EOI, iret, back to hlt
            g.vcpu.immediate_exit = False

            def pulse_line() -> None:
                g.vm.irq_line(GSI, 1)
                g.vm.irq_line(GSI, 0)

            wait_for_vector(g, pulse_line, "KVM_IRQ_LINE pulse")
            g.vm.irqfd_deassign(efd, GSI)
        finally:
            os.close(efd)


if __name__ == "__main__":
    main()
