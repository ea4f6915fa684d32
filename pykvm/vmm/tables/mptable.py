"""Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI finds its CPUs and IRQs.

Linux scans the BIOS ROM area (0xF0000-0xFFFFF) on 16-byte boundaries for the
floating pointer ``_MP_``; it points at the configuration table ``PCMP``,
which lists one processor entry per local APIC, the buses, the I/O APIC and
how each bus interrupt reaches an I/O APIC pin or the local APICs' LINT0/1.
Each structure carries a checksum making its bytes sum to zero.

Routing follows what QEMU/SeaBIOS and kvmtool give Linux: ISA IRQ n goes to
IOAPIC pin n, except IRQ0 (the PIT), which the IOAPIC receives on pin 2
(so ISA IRQ2, the PIC cascade, is not routed); the 8259 reaches the BSP's
LINT0 as ExtINT, and LINT1 is NMI.
"""
from __future__ import annotations

import struct
from typing import Iterable, List, Tuple

from ..layout import IOAPIC_ADDR, LAPIC_ADDR

SPEC_REV = 4  # MP spec 1.4
APIC_VERSION = 0x14  # integrated local APIC
IOAPIC_VERSION = 0x11  # 82093AA
CPU_SIGNATURE = 0x600  # family 6: a placeholder, Linux takes the real one from CPUID
CPU_FEATURES = 0x201  # FPU and APIC
MAX_CPUS = 254  # APIC ids 0..n-1, the I/O APIC takes id n, and 0xFF is broadcast

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IOINT, ENTRY_LINT = 0, 1, 2, 3, 4
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_EXTINT = 0, 1, 3
CPU_ENABLED, CPU_BSP = 1, 2
IRQ_CONFORMS = 0x0  # polarity and trigger as the bus defines them (ISA: edge, active high)
IRQ_LEVEL_LOW = 0xF  # PCI: level triggered, active low
# Linux matches a PCI device's bus number against the MP bus id, so PCI bus 0 is
# MP bus 0 and ISA comes after it (as SeaBIOS and kvmtool number them).
PCI_BUS, ISA_BUS = 0, 1
IRQ0_IOAPIC_PIN = 2
ALL_LAPICS = 0xFF

PciIrq = Tuple[int, int, int]  # (device slot 0-31, INTx pin 0=INTA..3=INTD, IOAPIC pin)


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def _entries(cpus: int, pci_irqs: Iterable[PciIrq]) -> List[bytes]:
    ioapic_id = cpus
    out = [
        struct.pack("<BBBBII8s", ENTRY_PROCESSOR, i, APIC_VERSION, CPU_ENABLED | (CPU_BSP if i == 0 else 0),
                    CPU_SIGNATURE, CPU_FEATURES, bytes(8))
        for i in range(cpus)
    ]
    out.append(struct.pack("<BB6s", ENTRY_BUS, PCI_BUS, b"PCI   "))
    out.append(struct.pack("<BB6s", ENTRY_BUS, ISA_BUS, b"ISA   "))
    out.append(struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, IOAPIC_ADDR))
    for irq in range(16):
        if irq == 2:
            continue  # the cascade; pin 2 carries IRQ0
        pin = IRQ0_IOAPIC_PIN if irq == 0 else irq
        out.append(struct.pack("<BBHBBBB", ENTRY_IOINT, INT_TYPE_INT, IRQ_CONFORMS, ISA_BUS, irq, ioapic_id, pin))
    for slot, intx, pin in pci_irqs:
        if not (0 <= slot < 32 and 0 <= intx < 4 and 0 <= pin < 256):
            raise ValueError(f"bad PCI interrupt route: slot {slot} (0-31), INT{'ABCD'[intx] if 0 <= intx < 4 else intx} (0-3), IOAPIC pin {pin}")
        # MP spec: a PCI source IRQ is the device number in bits 2-6 and the INTx pin in bits 0-1.
        out.append(struct.pack("<BBHBBBB", ENTRY_IOINT, INT_TYPE_INT, IRQ_LEVEL_LOW, PCI_BUS, slot << 2 | intx, ioapic_id, pin))
    out.append(struct.pack("<BBHBBBB", ENTRY_LINT, INT_TYPE_EXTINT, IRQ_CONFORMS, ISA_BUS, 0, ALL_LAPICS, 0))
    out.append(struct.pack("<BBHBBBB", ENTRY_LINT, INT_TYPE_NMI, IRQ_CONFORMS, ISA_BUS, 0, ALL_LAPICS, 1))
    return out


def build_mptable(address: int, cpus: int, pci_irqs: Iterable[PciIrq] = ()) -> bytes:
    """The floating pointer at ``address`` (16-byte aligned) followed by the config table.

    ``pci_irqs`` routes (device slot, INTx pin, IOAPIC pin) on PCI bus 0.
    """
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"the MP table describes 1 to {MAX_CPUS} CPUs, not {cpus}")
    if address % 16 or not 0 <= address < 1 << 32:
        raise ValueError(f"MP floating pointer address {address:#x} must be 16-byte aligned and below 4 GiB")
    entries = _entries(cpus, pci_irqs)
    body = b"".join(entries)
    header = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", 44 + len(body), SPEC_REV, 0,
                                   b"PYKVM   ", b"PYKVM VMM   ", 0, 0, len(entries), LAPIC_ADDR, 0, 0, 0))
    header[7] = _checksum(bytes(header) + body)
    floating = bytearray(struct.pack("<4sIBBB5s", b"_MP_", address + 16, 1, SPEC_REV, 0, bytes(5)))
    floating[10] = _checksum(bytes(floating))
    return bytes(floating) + bytes(header) + body
