"""Initial BAR placement, as firmware does before the OS starts.

pykvm has no BIOS, so the VMM assigns every BAR an address and turns decode on
before the guest boots; Linux then finds the BARs assigned and keeps them. Each
BAR is naturally aligned (a BAR's address is a multiple of its size: the
hardware decodes only the bits above the size). Three windows, like a PC:

- 32-bit memory: the PCI hole below 4 GiB (up to the I/O APIC);
- 64-bit memory: from above RAM (and 4 GiB) up to what the CPU can address,
  ``1 << phys_bits``; 64-bit BARs go here, falling back to the 32-bit window;
- I/O ports: 0xC000-0xFFFF, above the legacy ISA ports.

The same windows tell the bus which guest placements it accepts: a guest may
move a BAR anywhere inside a window of its kind, never over RAM.
"""
from __future__ import annotations

import bisect
from typing import List, Tuple

from pykvm._record import record_eq, record_repr
from pykvm.vmm.pci.config import BarKind, BarSpec

IO_WINDOW = (0xC000, 0x10000)


class BarAllocationError(ValueError):
    """No room left for a BAR in any window that may hold it."""


class Window:
    """``[base, end)`` handed out bottom-up with first fit; ``used`` is sorted (start, end) pairs."""

    __slots__ = ("name", "base", "end", "used")
    name: str
    base: int
    end: int
    used: List[Tuple[int, int]]

    _repr_fields = _eq_fields = ("name", "base", "end")

    def __init__(self, name: str, base: int, end: int) -> None:
        self.name = name
        self.base = base
        self.end = end
        if not 0 <= base <= end:
            raise ValueError(f"{name} window [{base:#x}, {end:#x}) is empty or negative")
        self.used = []

    __repr__ = record_repr
    __eq__ = record_eq

    def contains(self, address: int, size: int) -> bool:
        return self.base <= address and address + size <= self.end

    def allocate(self, size: int) -> int:
        """The lowest ``size``-aligned free address for ``size`` bytes; raises when full."""
        candidate = (self.base + size - 1) // size * size
        for start, end in self.used:
            if candidate + size <= start:
                break
            if end > candidate:
                candidate = (end + size - 1) // size * size
        if candidate + size > self.end:
            raise BarAllocationError(f"no room for {size:#x} bytes in the {self.name} window "
                                     f"[{self.base:#x}, {self.end:#x})")
        bisect.insort(self.used, (candidate, candidate + size))
        return candidate

    def free(self, address: int, size: int) -> None:
        self.used.remove((address, address + size))


class BarAllocator:
    """Hands out naturally aligned BAR addresses from the three windows."""

    def __init__(self, mmio32: Tuple[int, int], mmio64: Tuple[int, int], io: Tuple[int, int] = IO_WINDOW):
        self.mmio32 = Window("32-bit MMIO", *mmio32)
        self.mmio64 = Window("64-bit MMIO", *mmio64)
        self.io = Window("I/O port", *io)

    @classmethod
    def for_layout(cls, mmio32_base: int, mmio32_size: int, mmio64_base: int, phys_bits: int) -> "BarAllocator":
        """Windows for a machine: the 32-bit hole and ``[mmio64_base, 1 << phys_bits)``.

        ``phys_bits`` is the guest CPU's physical address width (CPUID 0x80000008 EAX[7:0]).
        """
        if not 32 < phys_bits <= 52:
            raise ValueError(f"physical address bits {phys_bits} outside 33..52")
        return cls((mmio32_base, mmio32_base + mmio32_size), (mmio64_base, max(mmio64_base, 1 << phys_bits)))

    def _windows(self, kind: BarKind) -> Tuple[Window, ...]:
        if kind is BarKind.IO:
            return (self.io,)
        if kind is BarKind.MEM64:
            return (self.mmio64, self.mmio32)
        return (self.mmio32,)

    def allocate(self, spec: BarSpec) -> int:
        """An address for ``spec`` (64-bit BARs prefer the window above 4 GiB)."""
        errors = []
        for w in self._windows(spec.kind):
            try:
                return w.allocate(spec.size)
            except BarAllocationError as exc:
                errors.append(str(exc))
        raise BarAllocationError("; ".join(errors))

    def free(self, spec: BarSpec, address: int) -> None:
        for w in self._windows(spec.kind):
            if (address, address + spec.size) in w.used:
                w.free(address, spec.size)
                return

    def accepts(self, kind: BarKind, address: int, size: int) -> bool:
        """May a BAR of ``kind`` be decoded at ``[address, address+size)``?"""
        return any(w.contains(address, size) for w in self._windows(kind))
