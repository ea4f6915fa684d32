"""11: MSR filters. The host decides which model-specific registers the guest may touch.

KVM handles RDMSR/WRMSR of the MSRs it knows in the kernel. ``KVM_X86_SET_MSR_FILTER``
lets the host take some of them back: a filter is a list of ranges, each a bitmap over
a run of MSR indexes for reads, writes or both, where a set bit lets KVM handle the
access and a clear bit denies it. A denied access raises #GP in the guest, unless the
VM enabled ``KVM_CAP_X86_USER_SPACE_MSR`` for the reason FILTER: then KVM_RUN returns
``KVM_EXIT_X86_RDMSR`` / ``KVM_EXIT_X86_WRMSR`` and the host answers (or refuses) the
access itself. VMMs use this to hide or emulate MSRs per guest, and to watch a guest
program them, without changing the kernel.

Here the filter covers IA32_SYSENTER_CS (0x174) and IA32_SYSENTER_ESP (0x175), reads
and writes, and allows only 0x175. The guest reads both, prints each value with
``out``, writes 0x174 and halts: the read and the write of 0x174 come to the host, the
read of 0x175 is answered by KVM with the value the host stored there beforehand.

Run: python3 examples/11_msr_filter.py
"""
from _guest import expect, new_guest, start_real_mode
from pykvm.kvm import Cap, HltExit, MsrAccess, MsrExit, MsrExitReason, MsrFilterRange

SYSENTER_CS, SYSENTER_ESP = 0x174, 0x175
CODE_GPA = 0x1000
ANSWER = 0x1234ABCD  # what the host makes the guest's read of 0x174 return

# .code16
CODE = bytes.fromhex(
    "66 b9 74 01 00 00"  # mov ecx, 0x174
    "0f 32"              # rdmsr                 ; denied: the host answers
    "66 e7 10"           # out 0x10, eax
    "66 b9 75 01 00 00"  # mov ecx, 0x175
    "0f 32"              # rdmsr                 ; allowed: KVM answers
    "66 e7 10"           # out 0x10, eax
    "66 b9 74 01 00 00"  # mov ecx, 0x174
    "66 b8 fe ca 00 00"  # mov eax, 0xcafe
    "66 31 d2"           # xor edx, edx
    "0f 30"              # wrmsr                 ; denied: the host sees the value
    "f4"                 # hlt
)


def main() -> None:
    with new_guest() as g:
        if not (g.vm.check_extension(Cap.X86_MSR_FILTER) and g.vm.check_extension(Cap.X86_USER_SPACE_MSR)):
            print("this KVM has no MSR filters (KVM_CAP_X86_MSR_FILTER / KVM_CAP_X86_USER_SPACE_MSR)")
            raise SystemExit(77)
        g.vm.enable_cap(Cap.X86_USER_SPACE_MSR, MsrExitReason.FILTER)
        g.vm.set_msr_filter([MsrFilterRange(SYSENTER_CS, 2, MsrAccess.READ | MsrAccess.WRITE,
                                            allowed={SYSENTER_ESP})])
        print("filter: MSRs 0x174-0x175, reads and writes, only 0x175 allowed")
        g.vcpu.set_msrs({SYSENTER_ESP: 0x5555})  # KVM_SET_MSRS: not filtered (the host is not the guest)
        g.mem.write(CODE_GPA, CODE)
        start_real_mode(g.vcpu, CODE_GPA)

        e = expect(g.vcpu.run(timeout=5), MsrExit)
        print(f"exit {'WRMSR' if e.is_write else 'RDMSR'} of {e.index:#x}: answered by the host with {ANSWER:#x}")
        e.data = ANSWER
        print(f"guest read 0x174 = {g.run_io().value:#x}")
        print(f"guest read 0x175 = {g.run_io().value:#x} (KVM, no exit)")
        e = expect(g.vcpu.run(timeout=5), MsrExit)
        print(f"exit {'WRMSR' if e.is_write else 'RDMSR'} of {e.index:#x}: the guest wrote {e.data:#x}")
        expect(g.vcpu.run(timeout=5), HltExit)
        print("guest halted")


if __name__ == "__main__":
    main()
