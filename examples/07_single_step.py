"""07: single-stepping with guest debug. One KVM_RUN, one guest instruction.

``KVM_SET_GUEST_DEBUG`` with ``KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP``
makes KVM set the trap flag on guest entry (or, when it emulates, stop after
one emulated instruction) and intercept the resulting debug exception (#DB,
vector 1) instead of delivering it to the guest. Each ``KVM_RUN`` therefore
executes one instruction and returns ``KVM_EXIT_DEBUG`` with the exception
number, DR6 (bit 14, BS: "single step") and ``pc``, the linear address of
the next instruction. The guest never sees the #DB. This is what a debugger
stub (gdbstub) builds on.

The guest sums 3 + 2 + 1 with a ``loop``; the RIP sequence shows the loop
going round three times. An ``out`` still exits as IO in between; after it,
guest debug is switched off (control 0) and the guest runs freely to ``hlt``.

Run: python3 examples/07_single_step.py
"""
from _guest import expect, new_guest, start_real_mode
from pykvm.kvm import DebugExit, GuestDebug, HltExit, IoExit

CODE_GPA = 0x1000
DR6_BS = 1 << 14

# .code16
CODE = bytes.fromhex(
    "b9 03 00"  # mov cx, 3            ; 0x1000
    "31 c0"     # xor ax, ax           ; 0x1003
    "01 c8"     # L: add ax, cx        ; 0x1005
    "e2 fc"     # loop L               ; 0x1007: cx -= 1, jump while cx != 0
    "e7 10"     # out 0x10, ax         ; 0x1009
    "f4"        # hlt                  ; 0x100b
)


def main() -> None:
    with new_guest() as g:
        g.mem.write(CODE_GPA, CODE)
        start_real_mode(g.vcpu, CODE_GPA)
        g.vcpu.set_guest_debug(GuestDebug.ENABLE | GuestDebug.SINGLESTEP)

        rips = [g.vcpu.get_regs().rip]
        while True:
            exit_ = g.vcpu.run(timeout=5)
            if isinstance(exit_, IoExit):
                print(f"exit IO: out port {exit_.port:#x} value {exit_.value} (the sum)")
                break
            step = expect(exit_, DebugExit)
            regs = g.vcpu.get_regs()
            rips.append(step.pc)
            print(f"exit DEBUG #{step.exception} pc={step.pc:#x} dr6.BS={int(bool(step.dr6 & DR6_BS))} "
                  f"ax={regs.rax & 0xFFFF} cx={regs.rcx & 0xFFFF}")
        print("RIP sequence:", " ".join(f"{r:#x}" for r in rips))

        g.vcpu.set_guest_debug(0)
        expect(g.vcpu.run(timeout=5), HltExit)
        print(f"debug off: ran to HLT, rip={g.vcpu.get_regs().rip:#x}")


if __name__ == "__main__":
    main()
