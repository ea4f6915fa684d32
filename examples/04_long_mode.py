"""04: long mode with 4-level paging. 64-bit code, and a "higher half" address mapped by the host.

x86-64 long mode always pages. A 48-bit virtual address is split into four
9-bit table indices and a 12-bit offset:

    | PML4 (47:39) | PDPT (38:30) | PD (29:21) | PT (20:12) | offset (11:0) |
    CR3 -> PML4[i] -> PDPT[j] -> PD[k] -> PT[l] -> 4 KiB frame + offset

Every entry is 8 bytes: ``next table or frame | flags`` (bit 0 present, bit 1
writable). ``map_page`` below walks the four levels and creates the missing
tables, exactly as a kernel does. The host identity-maps the code's pages and
maps 0xffff800000000000 (the start of the canonical upper half, where Linux
keeps its direct map) onto one physical page.

Entering long mode architecturally takes CR4.PAE, EFER.LME, then CR0.PG (the
CPU sets EFER.LMA) and a far jump to a code segment with L=1. KVM_SET_SREGS
lets the host set the end state in one call: CR0/CR3/CR4/EFER and a CS with
L=1 (the GDT is written too, so the guest could reload its segments).

Run: python3 examples/04_long_mode.py
"""
from _guest import CODE64, CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, enter_flat_mode, new_guest

GDT_GPA = 0x0500
CODE_GPA = 0x1000
PML4_GPA = 0x2000
TABLES_GPA = 0x3000  # further page tables are allocated from here, one page each
DATA_GPA = 0xF000
HIGH_VIRT = 0xFFFF800000000000
PRESENT, WRITABLE = 1 << 0, 1 << 1
ADDR_MASK = 0x000FFFFFFFFFF000

# .code64
CODE = bytes.fromhex(
    "48 b8 88 77 66 55 44 33 22 11"  # mov rax, 0x1122334455667788
    "48 bb 00 00 00 00 00 80 ff ff"  # mov rbx, 0xffff800000000000
    "48 89 03"                       # mov [rbx], rax      ; through 4 levels of page tables
    "48 03 03"                       # add rax, [rbx]      ; rax = 2 * 0x1122334455667788
    "e7 10"                          # out 0x10, eax       ; low 32 bits
    "48 c1 e8 20"                    # shr rax, 32
    "e7 10"                          # out 0x10, eax       ; high 32 bits
    "f4"                             # hlt
)


class PageTables:
    """4-level x86-64 page tables built in guest RAM."""

    def __init__(self, mem, pml4: int, free: int):
        self.mem, self.pml4, self.free = mem, pml4, free

    def _table(self, entry_gpa: int) -> int:
        """The table an entry points to, allocating a zeroed page if it is not present."""
        entry = self.mem.read_u64(entry_gpa)
        if not entry & PRESENT:
            table, self.free = self.free, self.free + 0x1000
            self.mem.write(table, bytes(0x1000))
            entry = table | PRESENT | WRITABLE
            self.mem.write_u64(entry_gpa, entry)
        return entry & ADDR_MASK

    def map_page(self, virt: int, phys: int) -> None:
        table = self.pml4
        for shift in (39, 30, 21):  # PML4 -> PDPT -> PD -> PT
            table = self._table(table + 8 * ((virt >> shift) & 0x1FF))
        self.mem.write_u64(table + 8 * ((virt >> 12) & 0x1FF), phys | PRESENT | WRITABLE)


def main() -> None:
    with new_guest() as g:
        pt = PageTables(g.mem, PML4_GPA, TABLES_GPA)
        pt.map_page(CODE_GPA, CODE_GPA)  # identity: the code keeps running after paging is on
        pt.map_page(HIGH_VIRT, DATA_GPA)
        g.mem.write(CODE_GPA, CODE)
        enter_flat_mode(g, GDT_GPA, CODE_GPA, cr0=CR0_PE | CR0_ET | CR0_PG, cr3=PML4_GPA, cr4=CR4_PAE,
                        efer=EFER_LME | EFER_LMA, code=CODE64)
        print(f"page tables: PML4 at {PML4_GPA:#x}, {(pt.free - TABLES_GPA) // 0x1000} more tables at {TABLES_GPA:#x}")
        sregs = g.vcpu.get_sregs()
        print(f"sregs: cr0={sregs.cr0:#x} cr3={sregs.cr3:#x} cr4={sregs.cr4:#x} efer={sregs.efer:#x} "
              f"cs.l={sregs.cs.l} cs.db={sregs.cs.db}")
        t = g.vcpu.translate(HIGH_VIRT)
        print(f"KVM_TRANSLATE {HIGH_VIRT:#x} -> physical {t['physical_address']:#x} valid={t['valid']}")

        low = g.run_io().value
        high = g.run_io().value
        result = high << 32 | low
        print(f"exit IO: out port 0x10 values {low:#x}, {high:#x}")
        print(f"64-bit result: {result:#x}")
        print(f"host reads {g.mem.read_u64(DATA_GPA):#x} at physical {DATA_GPA:#x} "
              f"(the guest wrote it at virtual {HIGH_VIRT:#x})")


if __name__ == "__main__":
    main()
