"""Guest-physical memory layout: where RAM, the PCI hole and the boot structures live.

A PC has a 32-bit hole below 4 GiB for device MMIO (PCI BARs, the I/O APIC at
0xFEC00000, the local APICs at 0xFEE00000, firmware flash). RAM that does not
fit below the hole is placed above 4 GiB, as firmware does. The first MiB
keeps the legacy holes (EBDA, VGA, BIOS ROM) out of the usable RAM map, and
the VMM puts its boot structures there, below the kernel at >= 1 MiB.

The e820 map handed to the guest (in the zero page, or in PVH's memmap) says
exactly this: usable RAM, plus the reserved low-memory holes that still have
RAM behind them.
"""
from __future__ import annotations

import re
from typing import NamedTuple, Tuple, Union

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4 * KiB

# The 32-bit MMIO hole: [PCI_HOLE_START, 4 GiB). The APICs sit at its top.
PCI_HOLE_START = 0xC000_0000
PCI_HOLE_END = 1 << 32
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
MMIO32_END = IOAPIC_ADDR  # PCI BARs go in [pci_hole_start, MMIO32_END)

# Low-memory holes (legacy PC): EBDA below 640 KiB, VGA and BIOS ROM above.
EBDA_START = 0x9_FC00
BIOS_ROM_START = 0xF_0000  # MP table lives here; Linux scans 0xF0000-0xFFFFF
HIGH_MEMORY_START = 0x10_0000  # 1 MiB: the kernel and initrd go at or above this

# Fixed addresses of the boot structures (all below 640 KiB, page aligned).
BOOT_GDT_ADDR = 0x500
BOOT_IDT_ADDR = 0x540  # an empty IDT (limit 0): no exception may happen before the kernel sets its own
PVH_START_INFO_ADDR = 0x6000  # hvm_start_info + module list + memmap (PVH boot)
ZERO_PAGE_ADDR = 0x7000  # struct boot_params (bzImage / 64-bit boot)
BOOT_STACK_TOP = 0x8FF0  # initial rsp; the stack grows down into 0x8000-0x8FF0
PAGE_TABLES_ADDR = 0x9000  # PML4, PDPT, then one PD per GiB identity mapped
PAGE_TABLES_END = 0x1_0000  # room for PML4 + PDPT + 4 PDs + slack
CMDLINE_ADDR = 0x2_0000
CMDLINE_MAX = 0x1_0000  # bytes reserved for the command line, NUL included
MPTABLE_ADDR = BIOS_ROM_START

E820_RAM = 1
E820_RESERVED = 2

MIN_MEMORY = 2 * MiB
MAX_MEMORY = 1 << 40  # 1 TiB: a sanity bound on what this VMM will map

_SUFFIX = {"": MiB, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}
# A number, then nothing (MiB), a bare B (bytes), or K/M/G/T with an optional B or iB.
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(?:([KMGT])(?:I?B)?|(B)?)\s*$", re.IGNORECASE)


class LayoutError(ValueError):
    """A memory size or layout the VMM cannot use; the message says what to change."""


def parse_size(size: Union[str, int]) -> int:
    """Parse ``512M``, ``2G``, ``1024K``, ``1T`` (also ``2GiB``/``2GB``) into bytes.

    A bare number means MiB, as with ``qemu -m`` and ``lkvm -m``; a number with a bare
    ``B`` means bytes (``4096B`` is 4 KiB, not 4 GiB); an int is bytes.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    if not isinstance(size, str):
        raise LayoutError(f"memory size must be a string like '512M' or an int of bytes, not {size!r}")
    m = _SIZE_RE.match(size)
    if not m:
        raise LayoutError(f"cannot parse memory size {size!r}: use a number with an optional K, M, G or T suffix, e.g. 512M or 2G")
    unit = (m.group(2) or m.group(3) or "").upper()
    return int(m.group(1)) * _SUFFIX[unit]


def human_size(n: int) -> str:
    """``n`` bytes for a message: ``512 MiB``, ``1.5 GiB``, ``4 KiB``, ``100 bytes``."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} bytes"


class RamRegion(NamedTuple):
    """A contiguous run of guest RAM: one KVM memory slot."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class E820Entry(NamedTuple):
    """One entry of the e820 memory map the zero page gives the kernel."""

    addr: int
    size: int
    type: int  # E820_RAM or E820_RESERVED

    @property
    def end(self) -> int:
        return self.addr + self.size


class Layout(NamedTuple):
    """The guest-physical map for a machine with ``memory`` bytes of RAM."""

    memory: int
    pci_hole_start: int
    ram: Tuple[RamRegion, ...]  # low RAM, then (if any) high RAM at 4 GiB
    e820: Tuple[E820Entry, ...]

    @property
    def low_ram_end(self) -> int:
        """End of RAM below the PCI hole: the 32-bit boot structures must fit below it."""
        return self.ram[0].end

    @property
    def ram_end(self) -> int:
        return self.ram[-1].end

    @property
    def mmio32(self) -> Tuple[int, int]:
        """(base, size) of the 32-bit window for PCI BARs, below the I/O APIC."""
        return self.pci_hole_start, MMIO32_END - self.pci_hole_start

    @property
    def mmio64_base(self) -> int:
        """First 1 GiB-aligned address above RAM and 4 GiB: where 64-bit BARs can go."""
        return _align_up(max(self.ram_end, PCI_HOLE_END), GiB)

    def is_ram(self, gpa: int, size: int = 1) -> bool:
        """True if [gpa, gpa+size) lies inside one RAM region."""
        return size >= 0 and any(r.gpa <= gpa and gpa + size <= r.end for r in self.ram)


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def memory_layout(memory: Union[str, int], pci_hole_start: int = PCI_HOLE_START) -> Layout:
    """Lay out ``memory`` (bytes, or a size string) around the 32-bit PCI hole."""
    size = parse_size(memory)
    if size <= 0:
        raise LayoutError(f"memory size must be positive (got {memory!r}); try 512M")
    if size < MIN_MEMORY:
        raise LayoutError(f"memory size {size:#x} is below the minimum of {MIN_MEMORY // MiB}M")
    if size > MAX_MEMORY:
        raise LayoutError(f"memory size {size:#x} exceeds the maximum of {MAX_MEMORY // GiB}G")
    if size % PAGE_SIZE:
        raise LayoutError(f"memory size {size:#x} is not a multiple of 4K")
    if not (HIGH_MEMORY_START + MIN_MEMORY <= pci_hole_start <= MMIO32_END) or pci_hole_start % (2 * MiB):
        raise LayoutError(f"PCI hole start {pci_hole_start:#x} must be 2M aligned, above {HIGH_MEMORY_START + MIN_MEMORY:#x} and at most {MMIO32_END:#x}")
    low = min(size, pci_hole_start)
    ram = [RamRegion(0, low)]
    if size > low:
        ram.append(RamRegion(PCI_HOLE_END, size - low))
    e820 = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, HIGH_MEMORY_START - EBDA_START, E820_RESERVED),
        E820Entry(HIGH_MEMORY_START, low - HIGH_MEMORY_START, E820_RAM),
    ]
    e820 += [E820Entry(r.gpa, r.size, E820_RAM) for r in ram[1:]]
    return Layout(size, pci_hole_start, tuple(ram), tuple(e820))
