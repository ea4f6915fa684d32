"""02: protected mode. The guest switches itself from real mode to flat 32-bit segments.

In protected mode a segment register holds a *selector*: an index into the
Global Descriptor Table (GDT), a table of 8-byte descriptors in guest memory
that give each segment's base, limit, type and default operand size. Loading a
selector makes the CPU read the descriptor and cache it in the register's
hidden part. "Flat" segments (base 0, limit 4 GiB) make linear address =
offset, so 32-bit code reaches all of memory, including above real mode's 1 MiB.

The guest does what a boot loader does:
  ``lgdt`` (tell the CPU where the GDT is), set CR0.PE, far ``jmp 0x08:target``
  (loads CS from GDT entry 1: now executing 32-bit code), load DS/ES/SS with
  selector 0x10 (GDT entry 2, flat data).
KVM has nothing special to do: the instructions run in the guest (on this
host's PVM they are emulated by KVM's x86 emulator). Afterwards the host reads
the vCPU's segment state with KVM_GET_SREGS and sees what the CPU cached.
(Examples 03/04 skip this dance: KVM_SET_SREGS can load that hidden state directly.)

Run: python3 examples/02_protected_mode.py
"""
from _guest import CODE32, DATA, gdt, new_guest, start_real_mode

GDTR_GPA = 0x0F00  # the 6-byte operand of lgdt: limit (u16), base (u32)
GDT_GPA = 0x0F10
REAL_GPA = 0x1000
PROT_GPA = 0x1100
MAGIC_GPA = 0x1FFFF0  # above 1 MiB: out of reach for real-mode addressing
MAGIC = 0xCAFEF00D
OUT_PORT = 0x10

# .code16
REAL_CODE = bytes.fromhex(
    "fa"              # cli
    "0f 01 16 00 0f"  # lgdt [0x0f00]        ; GDTR <- {limit, base} at 0xf00
    "0f 20 c0"        # mov eax, cr0
    "0c 01"           # or al, 1             ; CR0.PE: protection enable
    "0f 22 c0"        # mov cr0, eax
    "ea 00 11 08 00"  # jmp 0x08:0x1100      ; CS <- GDT[1]: 32-bit code from here on
)
# .code32
PROT_CODE = bytes.fromhex(
    "66 b8 10 00"     # mov ax, 0x10         ; selector of GDT[2], flat data
    "8e d8"           # mov ds, ax
    "8e c0"           # mov es, ax
    "8e d0"           # mov ss, ax
    "a1 f0 ff 1f 00"  # mov eax, [0x1ffff0]  ; a 32-bit address
    "40"              # inc eax
    "e7 10"           # out 0x10, eax        ; -> KVM_EXIT_IO, 4 bytes
    "f4"              # hlt
)


def main() -> None:
    with new_guest(mem_size=2 << 20) as g:
        table = gdt(CODE32, DATA)
        g.mem.write(GDT_GPA, table)
        g.mem.write_u16(GDTR_GPA, len(table) - 1)
        g.mem.write_u32(GDTR_GPA + 2, GDT_GPA)
        g.mem.write(REAL_GPA, REAL_CODE)
        g.mem.write(PROT_GPA, PROT_CODE)
        g.mem.write_u32(MAGIC_GPA, MAGIC)
        start_real_mode(g.vcpu, REAL_GPA)
        for name, seg in (("code", CODE32), ("data", DATA)):
            print(f"GDT[{seg.selector >> 3}] {name}: {seg.descriptor().hex(' ')}")

        out = g.run_io()
        sregs = g.vcpu.get_sregs()
        print(f"after the switch: cr0={sregs.cr0:#x} (PE={sregs.cr0 & 1})")
        print(f"cs: selector={sregs.cs.selector:#x} base={sregs.cs.base:#x} limit={sregs.cs.limit:#x} db={sregs.cs.db}")
        print(f"ds: selector={sregs.ds.selector:#x} base={sregs.ds.base:#x} limit={sregs.ds.limit:#x}")
        print(f"exit IO: out port {out.port:#x} size {out.size} value {out.value:#x}")
        print(f"guest read {MAGIC:#x} at {MAGIC_GPA:#x} and sent back {out.value:#x}")


if __name__ == "__main__":
    main()
