"""Names for PCI vendors, devices and classes, from the pci.ids database when installed.

Debian's ``pci.ids`` package installs ``/usr/share/misc/pci.ids`` (other
distributions use ``/usr/share/hwdata/pci.ids``).  Without it, class codes get
names from a small built-in table and vendors/devices stay numeric.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from pykvm.host.sysfs import Root

__all__ = ["PciIds", "PCI_IDS_PATHS"]

PCI_IDS_PATHS = ("/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids")

# Base classes and the subclasses a passthrough user meets, from the PCI Code and ID spec.
_BUILTIN_CLASSES: Dict[Tuple[int, ...], str] = {
    (0x00,): "Unclassified device",
    (0x01,): "Mass storage controller",
    (0x01, 0x01): "IDE interface",
    (0x01, 0x06): "SATA controller",
    (0x01, 0x08): "Non-Volatile memory controller",
    (0x02,): "Network controller",
    (0x02, 0x00): "Ethernet controller",
    (0x03,): "Display controller",
    (0x03, 0x00): "VGA compatible controller",
    (0x03, 0x02): "3D controller",
    (0x04,): "Multimedia controller",
    (0x04, 0x03): "Audio device",
    (0x05,): "Memory controller",
    (0x06,): "Bridge",
    (0x06, 0x00): "Host bridge",
    (0x06, 0x01): "ISA bridge",
    (0x06, 0x04): "PCI bridge",
    (0x07,): "Communication controller",
    (0x08,): "Generic system peripheral",
    (0x09,): "Input device controller",
    (0x0A,): "Docking station",
    (0x0B,): "Processor",
    (0x0C,): "Serial bus controller",
    (0x0C, 0x03): "USB controller",
    (0x0C, 0x05): "SMBus",
    (0x0D,): "Wireless controller",
    (0x0E,): "Intelligent controller",
    (0x0F,): "Satellite communications controller",
    (0x10,): "Encryption controller",
    (0x11,): "Signal processing controller",
    (0x12,): "Processing accelerators",
    (0x13,): "Non-Essential Instrumentation",
    (0xFF,): "Unassigned class",
}


@dataclass
class PciIds:
    """Lookup tables parsed from pci.ids (empty when it is not installed)."""

    vendors: Dict[int, str] = field(default_factory=dict)
    devices: Dict[Tuple[int, int], str] = field(default_factory=dict)
    classes: Dict[Tuple[int, ...], str] = field(default_factory=lambda: dict(_BUILTIN_CLASSES))
    source: Optional[str] = None

    @classmethod
    def load(cls, root: Root) -> "PciIds":
        """Parse the first pci.ids found under ``root``, else use the built-in class table."""
        for rel in PCI_IDS_PATHS:
            text = root.read_text(rel)
            if text is not None:
                ids = cls.parse(text)
                ids.source = rel
                return ids
        return cls()

    @classmethod
    def parse(cls, text: str) -> "PciIds":
        """Parse pci.ids: ``VVVV name`` / ``\\tDDDD name`` vendor blocks, then ``C cc name``
        / ``\\tss name`` / ``\\t\\tpp name`` class blocks.  Subsystem lines are skipped."""
        ids = cls()
        vendor: Optional[int] = None
        klass: Tuple[int, ...] = ()
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            depth = len(line) - len(line.lstrip("\t"))
            head, _, name = line.strip().partition(" ")
            try:
                if depth == 0 and head == "C":
                    code, _, name = name.strip().partition(" ")
                    vendor, klass = None, (int(code, 16),)
                    ids.classes[klass] = name.strip()
                elif depth == 0:
                    vendor, klass = int(head, 16), ()
                    ids.vendors[vendor] = name.strip()
                elif depth == 1 and vendor is not None:
                    ids.devices[(vendor, int(head, 16))] = name.strip()
                elif klass and depth in (1, 2):
                    klass = klass[:depth] + (int(head, 16),)
                    ids.classes[klass] = name.strip()
            except ValueError:
                vendor, klass = None, ()  # a line that is not an id: skip its block
        return ids

    def class_name(self, class_code: int) -> str:
        """Most specific name for a 24-bit class code (base, subclass, prog-if), or ``"Class XXXX"``."""
        base, sub = class_code >> 16, (class_code >> 8) & 0xFF
        for key in ((base, sub), (base,)):
            if key in self.classes:
                return self.classes[key]
        return f"Class {base:02x}{sub:02x}"

    def prog_if_name(self, class_code: int) -> Optional[str]:
        return self.classes.get((class_code >> 16, (class_code >> 8) & 0xFF, class_code & 0xFF))

    def vendor_name(self, vendor: int) -> Optional[str]:
        return self.vendors.get(vendor)

    def device_name(self, vendor: int, device: int) -> Optional[str]:
        return self.devices.get((vendor, device))
