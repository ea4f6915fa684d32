"""13: machine checks. The host reports a hardware error to the guest as the CPU would.

Real hardware reports memory and bus errors through machine-check banks: each bank's
MCi_STATUS says what happened (valid, uncorrected, address valid, an error code), MCi_ADDR
where, and for an uncorrected error the CPU raises #MC (vector 18) with IA32_MCG_STATUS
saying whether the interrupted code can resume. ``KVM_X86_SETUP_MCE`` gives a vCPU emulated
banks (IA32_MCG_CAP: the bank count in the low byte, feature bits above it from
``KVM_X86_GET_MCE_CAP_SUPPORTED``); ``KVM_X86_SET_MCE`` fills one bank and, for an
uncorrected error, queues #MC. VMMs use it to forward a host memory error (SIGBUS from
poisoned RAM) to the guest that owns the page; fault-injection research uses it to test
how guests cope.

The guest enables machine checks (CR4.MCE, set by the host here), has a real-mode #MC
handler at IVT vector 18 that reads MC0_STATUS, MC0_ADDR and MCG_STATUS with ``rdmsr`` and
reports them with ``out``, and halts. A corrected error is only recorded in the bank; the
uncorrected one then raises #MC, and its status has OVER set: the bank still held the first.

Run: python3 examples/13_machine_check.py
"""
from _guest import expect, new_guest, start_real_mode
from pykvm.kvm import Cap, HltExit, MciStatus

CODE_GPA = 0x1000
HANDLER_GPA = 0x1100
MC_VECTOR = 18
CR4_MCE = 1 << 6
MC0_STATUS, MC0_ADDR = 0x401, 0x402
BAD_PAGE = 0x7F000  # the guest-physical address the error is reported at


def flags(status: int) -> str:
    """MCi_STATUS's flag bits by name, and its error code (the low 16 bits)."""
    return f"{MciStatus(status & ~((1 << 57) - 1)).name} code {status & 0xFFFF:#06x}"

# .code16
MAIN = bytes.fromhex(
    "f4"                 # hlt                   ; wait: the host injects the errors
    "f4"                 # hlt
)
# .code16
HANDLER = bytes.fromhex(
    "66 b9 01 04 00 00"  # mov ecx, 0x401        ; IA32_MC0_STATUS
    "0f 32"              # rdmsr
    "66 e7 10"           # out 0x10, eax         ; low half
    "66 89 d0"           # mov eax, edx
    "66 e7 11"           # out 0x11, eax         ; high half
    "66 b9 02 04 00 00"  # mov ecx, 0x402        ; IA32_MC0_ADDR
    "0f 32"              # rdmsr
    "66 e7 12"           # out 0x12, eax
    "66 b9 7a 01 00 00"  # mov ecx, 0x17a        ; IA32_MCG_STATUS
    "0f 32"              # rdmsr
    "66 e7 13"           # out 0x13, eax
    "f4"                 # hlt
)


def main() -> None:
    with new_guest() as g:
        banks = g.vm.check_extension(Cap.MCE)
        if not banks:
            print("this KVM emulates no machine-check banks (KVM_CAP_MCE is 0)")
            raise SystemExit(77)
        mcg_cap = (g.kvm.mce_cap_supported() & ~0xFF) | banks
        g.vcpu.setup_mce(mcg_cap)
        print(f"KVM_X86_SETUP_MCE: IA32_MCG_CAP {mcg_cap:#x} ({banks} banks)")
        g.mem.write(CODE_GPA, MAIN)
        g.mem.write(HANDLER_GPA, HANDLER)
        g.mem.write_u32(MC_VECTOR * 4, HANDLER_GPA)  # IVT entry 18 -> 0000:1100
        start_real_mode(g.vcpu, CODE_GPA)
        sregs = g.vcpu.get_sregs()
        sregs.cr4 |= CR4_MCE
        g.vcpu.set_sregs(sregs)
        expect(g.vcpu.run(timeout=5), HltExit)

        corrected = MciStatus.VAL | MciStatus.EN | MciStatus.ADDRV | 0x0005
        g.vcpu.set_mce(0, corrected, addr=BAD_PAGE)
        expect(g.vcpu.run(timeout=5), HltExit)
        status = g.vcpu.get_msrs([MC0_STATUS])[MC0_STATUS]
        print(f"corrected error: no #MC (the guest ran on to its next hlt, rip {g.vcpu.get_regs().rip:#x}); "
              f"KVM_GET_MSRS: MC0_STATUS {flags(status)}")

        uncorrected = MciStatus.VAL | MciStatus.UC | MciStatus.EN | MciStatus.ADDRV | 0x0134
        g.vcpu.set_mce(0, uncorrected, addr=BAD_PAGE)
        low, high, addr, mcg = (g.run_io().value for _ in range(4))
        print(f"uncorrected error: the guest's #MC handler read MC0_STATUS {flags(high << 32 | low)}, "
              f"MC0_ADDR {addr:#x}, MCG_STATUS {mcg:#x} (MCIP|RIPV)")
        expect(g.vcpu.run(timeout=5), HltExit)


if __name__ == "__main__":
    main()
