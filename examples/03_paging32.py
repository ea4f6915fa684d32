"""03: 32-bit paging. A virtual address the guest uses lands on a physical page the host chose.

With CR0.PG set, every linear address goes through the page tables CR3 points
at. Classic 32-bit paging has two levels of 1024 4-byte entries:

    linear = | dir (10 bits) | table (10 bits) | offset (12 bits) |
    CR3 -> page directory[dir] -> page table[table] -> 4 KiB frame + offset

Each entry is ``frame address | flags`` (bit 0 present, bit 1 writable, bit 5
accessed, bit 6 dirty). The host builds the tables as plain bytes in guest RAM:
an identity map for the code, and 0xc0000000 (a "higher half" address) mapped
onto physical page 0x8000. The vCPU starts directly in paged protected mode:
KVM_SET_SREGS loads CR0 (PE|PG), CR3 and flat segments in one call.

What the kernel does: KVM must translate the guest's virtual addresses to host
memory. With EPT/NPT the hardware walks both levels; without them (and on this
host's PVM) KVM shadows the guest's tables. Either way the guest's own table
entries get their accessed/dirty bits set as the guest touches pages, and
``KVM_TRANSLATE`` walks the guest's tables for the host.

Run: python3 examples/03_paging32.py
"""
from _guest import CR0_ET, CR0_PE, CR0_PG, enter_flat_mode, new_guest

GDT_GPA = 0x0500
CODE_GPA = 0x1000
PD_GPA = 0x2000  # page directory
PT_LOW_GPA = 0x3000  # page table for 0x00000000-0x003fffff (identity)
PT_HIGH_GPA = 0x4000  # page table for 0xc0000000-0xc03fffff
DATA_GPA = 0x8000  # the frame behind virtual 0xc0000000
VIRT = 0xC0000000
UNSUPPORTED = 77  # exit status: this KVM cannot show the mechanism
PRESENT, WRITABLE, ACCESSED, DIRTY = 1 << 0, 1 << 1, 1 << 5, 1 << 6

# .code32
CODE = bytes.fromhex(
    "c7 05 00 00 00 c0 fe ca 0d 60"  # mov dword ptr [0xc0000000], 0x600dcafe
    "a1 00 00 00 c0"                 # mov eax, [0xc0000000]
    "e7 10"                          # out 0x10, eax
    "f4"                             # hlt
)


def build_page_tables(mem) -> int:
    """Identity-map the first 16 pages and map VIRT -> DATA_GPA; returns the PTE's address."""
    mem.write_u32(PD_GPA + 4 * 0, PT_LOW_GPA | PRESENT | WRITABLE)
    for page in range(16):
        mem.write_u32(PT_LOW_GPA + 4 * page, page << 12 | PRESENT | WRITABLE)
    mem.write_u32(PD_GPA + 4 * (VIRT >> 22), PT_HIGH_GPA | PRESENT | WRITABLE)
    pte_gpa = PT_HIGH_GPA + 4 * ((VIRT >> 12) & 0x3FF)
    mem.write_u32(pte_gpa, DATA_GPA | PRESENT | WRITABLE)
    return pte_gpa


def flags(pte: int) -> str:
    names = [n for n, bit in (("P", PRESENT), ("W", WRITABLE), ("A", ACCESSED), ("D", DIRTY)) if pte & bit]
    return "|".join(names)


def main() -> None:
    with new_guest() as g:
        pte_gpa = build_page_tables(g.mem)
        g.mem.write(CODE_GPA, CODE)
        enter_flat_mode(g, GDT_GPA, CODE_GPA, cr0=CR0_PE | CR0_ET | CR0_PG, cr3=PD_GPA)
        if not g.vcpu.get_sregs().cr0 & CR0_PG:
            print("this KVM does not run 32-bit paged guests: KVM_SET_SREGS dropped CR0.PG "
                  "(PVM supports paging only in long mode); try it on VMX/SVM, e.g. in the lab")
            raise SystemExit(UNSUPPORTED)
        pte = g.mem.read_u32(pte_gpa)
        print(f"PTE for {VIRT:#x} before: {pte:#010x} ({flags(pte)})")
        t = g.vcpu.translate(VIRT)  # a walk like the CPU's: it sets the accessed bit too
        print(f"KVM_TRANSLATE {VIRT:#x} -> physical {t['physical_address']:#x} valid={t['valid']}")

        out = g.run_io()
        pte = g.mem.read_u32(pte_gpa)
        print(f"exit IO: out port {out.port:#x} value {out.value:#x}")
        print(f"guest wrote {out.value:#x} at virtual {VIRT:#x}; host reads {g.mem.read_u32(DATA_GPA):#x} "
              f"at physical {DATA_GPA:#x}")
        print(f"PTE for {VIRT:#x} after: {pte:#010x} ({flags(pte)})")


if __name__ == "__main__":
    main()
