"""Reading a PCI function's config space and its sysfs ``resource`` file (pure parsing).

The standard capability list starts at the byte at 0x34 when bit 4 of the status
register (0x06) is set; each entry is ``id, next``.  PCIe functions have a second,
extended list at 0x100 whose 32-bit headers hold ``id:16, version:4, next:12``.
Both lists come from the device, so the walk guards against loops and pointers
out of range: any bytes give an answer, never an exception.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List

__all__ = ["Capability", "Region", "parse_capabilities", "parse_resources"]

CAP_NAMES = {
    0x01: "Power Management", 0x02: "AGP", 0x03: "Vital Product Data", 0x04: "Slot Identification",
    0x05: "MSI", 0x06: "CompactPCI Hot Swap", 0x07: "PCI-X", 0x08: "HyperTransport", 0x09: "Vendor Specific",
    0x0A: "Debug port", 0x0B: "CompactPCI Central Resource Control", 0x0C: "PCI Hot-Plug", 0x0D: "Bridge Subsystem Vendor ID",
    0x0E: "AGP 8x", 0x0F: "Secure Device", 0x10: "Express", 0x11: "MSI-X", 0x12: "SATA", 0x13: "PCI Advanced Features",
    0x14: "Enhanced Allocation", 0x15: "Flattening Portal Bridge",
}
EXT_CAP_NAMES = {
    0x0001: "Advanced Error Reporting", 0x0002: "Virtual Channel", 0x0003: "Device Serial Number",
    0x0004: "Power Budgeting", 0x0005: "Root Complex Link Declaration", 0x000B: "Vendor Specific",
    0x000D: "Access Control Services", 0x000E: "Alternative Routing-ID Interpretation",
    0x000F: "Address Translation Services", 0x0010: "Single Root I/O Virtualization", 0x0013: "Page Request",
    0x0015: "Resizable BAR", 0x0017: "TLP Processing Hints", 0x0018: "Latency Tolerance Reporting",
    0x0019: "Secondary PCI Express", 0x001B: "Process Address Space ID", 0x001E: "L1 PM Substates",
    0x0023: "Designated Vendor-Specific", 0x0025: "Data Link Feature", 0x0026: "Physical Layer 16.0 GT/s",
}
EXPRESS_TYPES = {
    0: "Endpoint", 1: "Legacy Endpoint", 4: "Root Port", 5: "Upstream Port", 6: "Downstream Port",
    7: "PCI-Express to PCI/PCI-X Bridge", 8: "PCI/PCI-X to PCI-Express Bridge",
    9: "Root Complex Integrated Endpoint", 10: "Root Complex Event Collector",
}
# ACS capability/control bits, in register order (PCIe spec 7.7.8).
ACS_BITS = ("SrcValid", "TransBlk", "ReqRedir", "CmpltRedir", "UpstreamFwd", "EgressCtrl", "DirectTrans")
PM_STATES = ("D0", "D1", "D2", "D3hot")
# include/linux/ioport.h flags in the sysfs resource file
IORESOURCE_IO, IORESOURCE_MEM = 0x100, 0x200
IORESOURCE_PREFETCH, IORESOURCE_MEM_64 = 0x2000, 0x100000
ROM_INDEX = 6


@dataclass
class Capability:
    offset: int
    id: int
    name: str
    extended: bool
    detail: str = ""


@dataclass
class Region:
    index: int
    start: int
    size: int
    kind: str  # "Memory", "I/O ports", "Expansion ROM"
    flags: str  # "64-bit, prefetchable"


def _u8(b: bytes, off: int) -> int:
    return b[off] if 0 <= off < len(b) else 0


def _u16(b: bytes, off: int) -> int:
    return struct.unpack_from("<H", b, off)[0] if 0 <= off and off + 2 <= len(b) else 0


def _u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0] if 0 <= off and off + 4 <= len(b) else 0


def _flag(name: str, on: int) -> str:
    return f"{name}{'+' if on else '-'}"


def _detail(b: bytes, cap_id: int, off: int) -> str:
    """The few fields of a standard capability a passthrough user looks at first."""
    ctrl = _u16(b, off + 2)
    if cap_id == 0x05:
        return (f"{_flag('Enable', ctrl & 1)} Count={1 << ((ctrl >> 4) & 7)}/{1 << ((ctrl >> 1) & 7)} "
                f"{_flag('64bit', ctrl & 0x80)} {_flag('Maskable', ctrl & 0x100)}")
    if cap_id == 0x11:
        table, pba = _u32(b, off + 4), _u32(b, off + 8)
        return (f"{_flag('Enable', ctrl & 0x8000)} Count={(ctrl & 0x7FF) + 1} {_flag('Masked', ctrl & 0x4000)} "
                f"Vector table: BAR={table & 7} offset={table & ~7:08x} PBA: BAR={pba & 7} offset={pba & ~7:08x}")
    if cap_id == 0x01:
        return f"version {ctrl & 7}, state {PM_STATES[_u16(b, off + 4) & 3]}"
    if cap_id == 0x10:
        return f"v{ctrl & 0xF} {EXPRESS_TYPES.get((ctrl >> 4) & 0xF, 'type %d' % ((ctrl >> 4) & 0xF))}"
    if cap_id == 0x09:
        return f"Len={_u8(b, off + 2):02x}"
    return ""


def _ext_detail(b: bytes, cap_id: int, off: int) -> str:
    if cap_id == 0x000D:
        cap, ctl = _u16(b, off + 4), _u16(b, off + 6)
        return ("ACSCap: " + " ".join(_flag(n, cap >> i & 1) for i, n in enumerate(ACS_BITS))
                + "; ACSCtl: " + " ".join(_flag(n, ctl >> i & 1) for i, n in enumerate(ACS_BITS)))
    if cap_id == 0x0003:
        return f"{_u32(b, off + 8):08x}{_u32(b, off + 4):08x}"
    return ""


def parse_capabilities(config: bytes) -> List[Capability]:
    """The standard and extended capability lists in ``config`` (any length; a short read yields fewer)."""
    caps: List[Capability] = []
    if _u16(config, 0x06) & 0x10:
        ptr, seen = _u8(config, 0x34) & 0xFC, set()
        while ptr >= 0x40 and ptr not in seen and ptr + 2 <= min(len(config), 0x100):
            seen.add(ptr)
            cap_id = config[ptr]
            caps.append(Capability(ptr, cap_id, CAP_NAMES.get(cap_id, f"Capability {cap_id:#04x}"), False,
                                   _detail(config, cap_id, ptr)))
            ptr = config[ptr + 1] & 0xFC
    ptr, seen = 0x100, set()
    while ptr >= 0x100 and ptr not in seen and ptr + 4 <= len(config):
        seen.add(ptr)
        header = _u32(config, ptr)
        if header in (0, 0xFFFFFFFF):
            break
        cap_id = header & 0xFFFF
        caps.append(Capability(ptr, cap_id, EXT_CAP_NAMES.get(cap_id, f"Extended Capability {cap_id:#06x}"), True,
                               _ext_detail(config, cap_id, ptr)))
        ptr = (header >> 20) & 0xFFC
    return caps


def parse_resources(text: str) -> List[Region]:
    """BARs 0-5 and the expansion ROM from sysfs ``resource`` (``start end flags`` per line, hex).

    Unused entries are all zero and skipped; lines after the ROM (bridge windows,
    SR-IOV BARs) are not device regions and are ignored.
    """
    regions = []
    for index, line in enumerate(text.splitlines()[: ROM_INDEX + 1]):
        try:
            start, end, flags = (int(x, 16) for x in line.split())
        except ValueError:
            continue
        if end == 0 or end < start:
            continue
        if index == ROM_INDEX:
            kind = "Expansion ROM"
        elif flags & IORESOURCE_IO:
            kind = "I/O ports"
        elif flags & IORESOURCE_MEM:
            kind = "Memory"
        else:
            continue
        attrs = []
        if kind == "Memory":
            attrs.append("64-bit" if flags & IORESOURCE_MEM_64 else "32-bit")
            attrs.append("prefetchable" if flags & IORESOURCE_PREFETCH else "non-prefetchable")
        regions.append(Region(index, start, end - start + 1, kind, ", ".join(attrs)))
    return regions


def human_size(n: int) -> str:
    """``lspci``'s size notation: 16K, 1M, 256."""
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)

