"""PCI bus 0: a host bridge, configuration mechanism #1 (0xCF8/0xCFC), ECAM, BAR mapping.

Configuration mechanism #1 is two I/O ports: the guest writes an address
(enable bit 31, bus 23:16, device 15:11, function 10:8, dword register 7:2)
as a DWORD to 0xCF8, then reads or writes 1, 2 or 4 bytes at 0xCFC-0xCFF,
the byte offset within that dword. ECAM (PCI Express) maps each function's
4 KiB configuration space into memory at ``bus << 20 | device << 15 |
function << 12``. Both end at :meth:`PciBus.config_read`/``config_write``.

Only bus 0, function 0 of each slot exists: the host bridge at slot 0 and the
added functions from slot 1 in the order they were added, so a device keeps
its address from run to run. Accesses to anything else read all-ones (a
master abort) and writes vanish.

After every configuration write the bus compares the function's decoded BARs
(address and command-register decode) with what it had mapped: it moves the
BAR's range on the machine's MMIO or PIO :class:`~pykvm.vmm.bus.Bus` (so
accesses that trap reach ``function.bar_read/bar_write``) and calls
``function.bar_moved(index, old, new)`` so the owner can remap what it maps
itself (a passthrough device's memslots). A placement outside the
allocator's windows or over another range is refused: that BAR stays
unmapped, as if it did not decode.
"""
from __future__ import annotations

import threading
from typing import Dict, List, Optional, Tuple

from pykvm._log import get_logger
from pykvm.vmm.bus import Bus, Range
from pykvm.vmm.pci.allocator import BarAllocator
from pykvm.vmm.pci.config import (
    ALL_ONES, BASE_ADDRESS_0, COMMAND, COMMAND_IO, COMMAND_MEMORY, CONFIG_EXP_SIZE, INTERRUPT_LINE,
    INTERRUPT_PIN, BarKind, BarWindow, ConfigSpace,
)

log = get_logger(__name__)

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_ENABLE = 0x8000_0000
CONFIG_ADDRESS_MASK = 0x80FF_FFFC  # enable, bus, device, function, dword register
ECAM_BUS_SIZE = 1 << 20  # 32 devices x 8 functions x 4 KiB
MAX_SLOTS = 32
# INTx: slot s, pin INTx (0=INTA) raises IOAPIC pin 16 + (s - 1 + INTx) % 8, so up to eight
# single-pin devices get a line each (16-23 are the IOAPIC pins no ISA device uses).
INTX_FIRST_PIN = 16
INTX_PINS = 8

HOST_BRIDGE_ID = (0x1B36, 0x0008)  # Red Hat, Inc. "QEMU PCIe Host bridge" (as in pci.ids)
CLASS_HOST_BRIDGE = 0x060000

PciIrq = Tuple[int, int, int]  # (slot, INTx pin 0-3, IOAPIC pin), as pykvm.vmm.tables.mptable takes it


class PciFunction:
    """A function on the bus: its configuration space and what happens in its BARs.

    Subclasses override ``config_read``/``config_write`` when part of the space
    lives elsewhere (a real device), ``bar_read``/``bar_write`` to serve trapped
    BAR accesses (offsets relative to the BAR), and ``bar_moved`` to follow
    the guest's placement of BARs it maps by itself.
    """

    name = "pci-function"

    def __init__(self, config: ConfigSpace):
        self.config = config

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.config.write(offset, size, value)

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        pass

    def bar_moved(self, index: int, old: Optional[BarWindow], new: Optional[BarWindow]) -> None:
        pass

    def plugged(self, slot: int, intx_gsi: Optional[int]) -> None:
        """Called once the bus gave the function ``slot``; ``intx_gsi`` is the IOAPIC pin its INTx drives."""


class HostBridge(PciFunction):
    """Device 00:00.0: a host bridge with no BARs (Linux looks for one when it probes mechanism #1)."""

    name = "host-bridge"

    def __init__(self, vendor: int = HOST_BRIDGE_ID[0], device: int = HOST_BRIDGE_ID[1]):
        super().__init__(ConfigSpace.for_function(vendor, device, CLASS_HOST_BRIDGE))


class _BarAccess:
    """The machine-bus face of one BAR: forwards trapped accesses to the function."""

    def __init__(self, function: PciFunction, index: int):
        self.function = function
        self.index = index

    def read(self, offset: int, size: int) -> bytes:
        return self.function.bar_read(self.index, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.function.bar_write(self.index, offset, data)


class PciBus:
    """Bus 0 with its host bridge; ``mmio``/``pio`` are the machine buses BAR ranges go on.

    The MMIO bus's limit must cover the allocator's 64-bit window (``1 << phys_bits``):
    a BAR whose range the bus refuses stays unmapped.
    """

    def __init__(self, allocator: Optional[BarAllocator] = None, mmio: Optional[Bus] = None,
                 pio: Optional[Bus] = None, host_bridge: Optional[PciFunction] = None):
        self.allocator = allocator
        self.mmio = mmio
        self.pio = pio
        self.functions: Dict[int, PciFunction] = {0: host_bridge or HostBridge()}
        self._mapped: Dict[Tuple[int, int], Tuple[BarWindow, Optional[Range]]] = {}
        self._lock = threading.RLock()
        self.address = 0  # the latched CONFIG_ADDRESS
        self.config_address_port = _ConfigAddressPort(self)
        self.config_data_port = _ConfigDataPort(self)

    # -- building the machine ----------------------------------------------------------
    def add(self, function: PciFunction, slot: Optional[int] = None, place_bars: bool = True) -> int:
        """Put ``function`` in ``slot`` (default: the lowest free one) and return the slot.

        With an allocator and ``place_bars``, every BAR gets a firmware-like address
        and decode is turned on, so the guest finds the function ready to use.
        """
        with self._lock:
            if slot is None:
                slot = next((s for s in range(1, MAX_SLOTS) if s not in self.functions), None)
                if slot is None:
                    raise ValueError(f"PCI bus 0 is full ({MAX_SLOTS - 1} devices)")
            elif not 0 < slot < MAX_SLOTS or slot in self.functions:
                raise ValueError(f"PCI slot {slot} is {'taken' if slot in self.functions else 'not 1-31'}")
            self.functions[slot] = function
            intx = function.config.get(INTERRUPT_PIN, 1)
            gsi = self.ioapic_pin(slot, intx - 1) if 1 <= intx <= 4 else None
            if gsi is not None:
                function.config.set(INTERRUPT_LINE, 1, gsi)
            function.plugged(slot, gsi)
            if place_bars and self.allocator is not None:
                self._place_bars(slot, function)
            return slot

    def _place_bars(self, slot: int, function: PciFunction) -> None:
        command = 0
        for index, spec in sorted(function.config.bars.items(), key=lambda item: -item[1].size):
            address = self.allocator.allocate(spec)
            offset = BASE_ADDRESS_0 + 4 * index
            self.config_write(0, slot, 0, offset, 4, address & ALL_ONES)
            if spec.kind is BarKind.MEM64:
                self.config_write(0, slot, 0, offset + 4, 4, address >> 32)
            command |= COMMAND_IO if spec.kind is BarKind.IO else COMMAND_MEMORY
        if command:
            old = self.config_read(0, slot, 0, COMMAND, 2)
            self.config_write(0, slot, 0, COMMAND, 2, old | command)

    def remove(self, slot: int) -> PciFunction:
        """Take the function out: its BAR ranges leave the machine buses first."""
        with self._lock:
            function = self.functions[slot]
            if slot == 0:
                raise ValueError("the host bridge stays")
            for (s, index), (window, rng) in list(self._mapped.items()):
                if s == slot:
                    self._unmap(slot, function, index, window, rng)
            del self.functions[slot]
            return function

    @staticmethod
    def ioapic_pin(slot: int, intx: int) -> int:
        """The IOAPIC input that INTx pin ``intx`` (0 = INTA) of ``slot`` drives."""
        return INTX_FIRST_PIN + (slot - 1 + intx) % INTX_PINS

    def intx_routes(self) -> List[PciIrq]:
        """(slot, INTx, IOAPIC pin) for every function that has an interrupt pin: for the MP table."""
        out = []
        for slot, function in sorted(self.functions.items()):
            intx = function.config.get(INTERRUPT_PIN, 1)
            if 1 <= intx <= 4:
                out.append((slot, intx - 1, self.ioapic_pin(slot, intx - 1)))
        return out

    def register_ports(self, pio: Bus) -> None:
        """Claim 0xCF8-0xCFB (address) and 0xCFC-0xCFF (data) on the machine's port bus."""
        pio.register(CONFIG_ADDRESS_PORT, 4, self.config_address_port, "pci-config-address")
        pio.register(CONFIG_DATA_PORT, 4, self.config_data_port, "pci-config-data")

    def ecam(self) -> "Ecam":
        """An MMIO device for ECAM over bus 0 (register it at the MCFG base, length ``Ecam.SIZE``)."""
        return Ecam(self)

    # -- configuration accesses --------------------------------------------------------
    def _function(self, bus: int, slot: int, fn: int) -> Optional[PciFunction]:
        return self.functions.get(slot) if bus == 0 and fn == 0 else None

    def config_read(self, bus: int, slot: int, fn: int, offset: int, size: int) -> int:
        function = self._function(bus, slot, fn)
        if function is None:
            return (1 << 8 * size) - 1
        with self._lock:
            return function.config_read(offset, size)

    def config_write(self, bus: int, slot: int, fn: int, offset: int, size: int, value: int) -> None:
        function = self._function(bus, slot, fn)
        if function is None:
            return
        with self._lock:
            function.config_write(offset, size, value)
            self._sync(slot, function)

    # -- BAR mapping -------------------------------------------------------------------
    def _sync(self, slot: int, function: PciFunction) -> None:
        """Bring the machine buses and the function's own mappings in line with its decoded BARs."""
        wanted = {w.index: w for w in function.config.decoded_bars()
                  if self.allocator is None or self.allocator.accepts(w.kind, w.address, w.size)}
        indices = {i for (s, i) in self._mapped if s == slot} | set(wanted)
        for index in sorted(indices):
            old = self._mapped.get((slot, index))
            new = wanted.get(index)
            if old is not None and old[0] == new:
                continue
            if old is not None:
                self._unmap(slot, function, index, *old)
            if new is not None:
                self._map(slot, function, new)

    def _bus_for(self, kind: BarKind) -> Optional[Bus]:
        return self.pio if kind is BarKind.IO else self.mmio

    def _map(self, slot: int, function: PciFunction, window: BarWindow) -> None:
        bus = self._bus_for(window.kind)
        rng = None
        if bus is not None:
            try:
                rng = bus.register(window.address, window.size, _BarAccess(function, window.index),
                                   f"{function.name} BAR{window.index}")
            except ValueError as exc:
                log.warning("00:%02x.0 BAR%d not mapped: %s", slot, window.index, exc)
                return
        self._mapped[(slot, window.index)] = (window, rng)
        function.bar_moved(window.index, None, window)

    def _unmap(self, slot: int, function: PciFunction, index: int, window: BarWindow, rng: Optional[Range]) -> None:
        if rng is not None:
            self._bus_for(window.kind).unregister(rng)
        del self._mapped[(slot, index)]
        function.bar_moved(index, window, None)

    def mapped_bars(self, slot: int) -> Dict[int, BarWindow]:
        """The BARs of ``slot`` that are mapped now, by index."""
        return {i: w for (s, i), (w, _r) in self._mapped.items() if s == slot}


class _ConfigAddressPort:
    """0xCF8: a DWORD register; byte and word accesses do not reach it (0xCF9 is reset control on PCs)."""

    def __init__(self, pci: PciBus):
        self.pci = pci

    def read(self, offset: int, size: int) -> bytes:
        if offset or size != 4:
            return b"\xff" * size
        return self.pci.address.to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 4:
            self.pci.address = int.from_bytes(data, "little") & CONFIG_ADDRESS_MASK


class _ConfigDataPort:
    """0xCFC-0xCFF: the register the latched address selects, at byte ``offset`` in it."""

    def __init__(self, pci: PciBus):
        self.pci = pci

    def _decode(self, offset: int, size: int) -> Optional[Tuple[int, int, int, int]]:
        a = self.pci.address
        if not a & CONFIG_ENABLE or size not in (1, 2, 4) or offset + size > 4:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, (a & 0xFC) + offset

    def read(self, offset: int, size: int) -> bytes:
        target = self._decode(offset, size)
        if target is None:
            return b"\xff" * size
        return self.pci.config_read(*target, size).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        target = self._decode(offset, len(data))
        if target is not None:
            self.pci.config_write(*target, len(data), int.from_bytes(data, "little"))


class Ecam:
    """ECAM for bus 0: 1 MiB of MMIO, 4 KiB per function; DWORD-or-smaller accesses."""

    SIZE = ECAM_BUS_SIZE

    def __init__(self, pci: PciBus):
        self.pci = pci

    @staticmethod
    def _decode(offset: int) -> Tuple[int, int, int, int]:
        return offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & (CONFIG_EXP_SIZE - 1)

    def read(self, offset: int, size: int) -> bytes:
        if size not in (1, 2, 4) or (offset & 0xFFF) + size > CONFIG_EXP_SIZE:
            return b"\xff" * size
        return self.pci.config_read(*self._decode(offset), size).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        if len(data) in (1, 2, 4) and (offset & 0xFFF) + len(data) <= CONFIG_EXP_SIZE:
            self.pci.config_write(*self._decode(offset), len(data), int.from_bytes(data, "little"))
