"""PCI bus 0: mechanism #1 decoding, ECAM, slots, firmware-like BAR placement, BAR moves."""
from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from pykvm.vmm.bus import Bus
from pykvm.vmm.pci.allocator import BarAllocator
from pykvm.vmm.pci.bus import Ecam, PciBus, PciFunction
from pykvm.vmm.pci.config import BASE_ADDRESS_0, COMMAND, BarKind, BarSpec, BarWindow, ConfigSpace

GiB = 1 << 30
SPECS = {0: BarSpec(0x1000, BarKind.MEM32), 1: BarSpec(0x20, BarKind.IO), 2: BarSpec(0x4000, BarKind.MEM64)}


class Dev(PciFunction):
    name = "testdev"

    def __init__(self, pin=1):
        super().__init__(ConfigSpace.for_function(0x1234, 0x5678, 0xFF0000, interrupt_pin=pin))
        for i, s in SPECS.items():
            self.config.set_bar(i, s)
        self.moves = []
        self.written = []

    def bar_read(self, index, offset, size):
        return bytes([index]) * size

    def bar_write(self, index, offset, data):
        self.written.append((index, offset, data))

    def bar_moved(self, index, old, new):
        self.moves.append((index, old, new))


def machine():
    mmio, pio = Bus("mmio", 1 << 48), Bus("pio", 1 << 16)
    pci = PciBus(BarAllocator.for_layout(0xC000_0000, 0x3EC0_0000, 4 * GiB, 40), mmio, pio)
    pci.register_ports(pio)
    return pci, mmio, pio


def cfg_read(pio, slot, reg, size=4):
    pio.write(0xCF8, struct.pack("<I", 0x8000_0000 | slot << 11 | reg & 0xFC))
    return int.from_bytes(pio.read(0xCFC + (reg & 3), size), "little")


def cfg_write(pio, slot, reg, value, size=4):
    pio.write(0xCF8, struct.pack("<I", 0x8000_0000 | slot << 11 | reg & 0xFC))
    pio.write(0xCFC + (reg & 3), value.to_bytes(size, "little"))


def test_host_bridge_through_mechanism_1():
    pci, mmio, pio = machine()
    assert cfg_read(pio, 0, 0) == 0x00081B36
    assert cfg_read(pio, 0, 0x0A, 2) == 0x0600
    assert cfg_read(pio, 0, 0x02, 2) == 0x0008
    assert cfg_read(pio, 0, 0x0B, 1) == 0x06
    assert cfg_read(pio, 5, 0) == 0xFFFFFFFF  # empty slot
    pio.write(0xCF8, struct.pack("<I", 0x0000_0000))  # enable bit clear
    assert pio.read(0xCFC, 4) == b"\xff" * 4
    pio.write(0xCF8, struct.pack("<I", 0x8001_0000))  # bus 1
    assert pio.read(0xCFC, 4) == b"\xff" * 4
    pio.write(0xCF8, struct.pack("<I", 0x8000_0100))  # function 1
    assert pio.read(0xCFC, 4) == b"\xff" * 4


def test_config_address_is_dword_only():
    pci, _, pio = machine()
    pio.write(0xCF8, struct.pack("<I", 0x8000_0003))
    assert pio.read(0xCF8, 4) == struct.pack("<I", 0x8000_0000)
    pio.write(0xCFB, b"\x01")  # Linux's type-1 probe writes 0xCFB: ignored
    pio.write(0xCF8, b"\x00\x00")
    assert pio.read(0xCF8, 4) == struct.pack("<I", 0x8000_0000)
    assert pio.read(0xCF9, 1) == b"\xff"


def test_add_places_bars_and_maps_them():
    pci, mmio, pio = machine()
    dev = Dev()
    assert pci.add(dev) == 1
    assert pci.add(Dev(pin=2)) == 2
    assert cfg_read(pio, 1, 0) == 0x56781234
    mapped = pci.mapped_bars(1)
    assert mapped == {0: BarWindow(0, BarKind.MEM32, 0xC000_0000, 0x1000),
                      1: BarWindow(1, BarKind.IO, 0xC000, 0x20),
                      2: BarWindow(2, BarKind.MEM64, 4 * GiB, 0x4000)}
    assert cfg_read(pio, 1, COMMAND, 2) & 0x3 == 0x3
    assert mmio.read(0xC000_0010, 4) == b"\x00" * 4
    assert mmio.read(4 * GiB + 8, 2) == b"\x02\x02"
    assert pio.read(0xC004, 1) == b"\x01"
    mmio.write(0xC000_0004, b"\xaa")
    assert dev.written == [(0, 4, b"\xaa")]
    assert {m[0] for m in dev.moves} == {0, 1, 2}
    assert pci.intx_routes() == [(1, 0, 16), (2, 1, 18)]
    assert cfg_read(pio, 1, 0x3C, 1) == 16


def test_guest_moves_a_bar_and_toggles_decode():
    pci, mmio, pio = machine()
    dev = Dev()
    pci.add(dev)
    dev.moves.clear()
    cfg_write(pio, 1, COMMAND, 0x1, 2)  # memory decode off
    assert mmio.read(0xC000_0000, 1) == b"\xff" and mmio.find(0xC000_0000) is None
    assert sorted(i for i, old, new in dev.moves if new is None) == [0, 2]
    cfg_write(pio, 1, BASE_ADDRESS_0, 0xD000_0000)
    cfg_write(pio, 1, COMMAND, 0x3, 2)
    assert pci.mapped_bars(1)[0].address == 0xD000_0000
    assert mmio.read(0xD000_0000, 1) == b"\x00"
    # While decode is on, a move is an unmap at the old place and a map at the new one.
    dev.moves.clear()
    cfg_write(pio, 1, BASE_ADDRESS_0, 0xD100_0000)
    assert dev.moves == [(0, BarWindow(0, BarKind.MEM32, 0xD000_0000, 0x1000), None),
                         (0, None, BarWindow(0, BarKind.MEM32, 0xD100_0000, 0x1000))]


def test_placement_outside_windows_or_overlapping_is_refused():
    pci, mmio, pio = machine()
    a, b = Dev(), Dev()
    pci.add(a)
    pci.add(b)
    cfg_write(pio, 2, BASE_ADDRESS_0, 0x0010_0000)  # over RAM
    assert 0 not in pci.mapped_bars(2)
    cfg_write(pio, 2, BASE_ADDRESS_0, 0xC000_0000)  # over device 1's BAR0
    assert 0 not in pci.mapped_bars(2)
    assert mmio.read(0xC000_0000, 1) == b"\x00"  # still device 1
    cfg_write(pio, 2, BASE_ADDRESS_0, 0xC000_8000)
    assert pci.mapped_bars(2)[0].address == 0xC000_8000


def test_remove_unmaps():
    pci, mmio, _ = machine()
    dev = Dev()
    slot = pci.add(dev)
    pci.remove(slot)
    assert mmio.ranges() == () and pci.mapped_bars(slot) == {}


def test_ecam():
    pci, mmio, pio = machine()
    pci.add(Dev())
    ecam = pci.ecam()
    mmio.register(0xB000_0000, Ecam.SIZE, ecam, "ecam")
    assert mmio.read(0xB000_0000 + (1 << 15), 4) == struct.pack("<I", 0x56781234)
    assert mmio.read(0xB000_0000 + (1 << 15) + 0x100, 4) == b"\xff" * 4  # no extended space
    mmio.write(0xB000_0000 + (1 << 15) + COMMAND, b"\x00\x00")
    assert pci.mapped_bars(1) == {}


@given(st.lists(st.tuples(st.sampled_from([0xCF8, 0xCF9, 0xCFA, 0xCFB, 0xCFC, 0xCFD, 0xCFE, 0xCFF]),
                          st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF), st.booleans()), max_size=80))
def test_random_port_traffic_never_breaks_the_bus(ops):
    pci, mmio, pio = machine()
    dev = Dev()
    pci.add(dev)
    for port, size, value, is_write in ops:
        if is_write:
            pio.write(port, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))
        else:
            assert len(pio.read(port, size)) == size
        if port == 0xCF8 and is_write and size == 4:
            pio.write(0xCF8, struct.pack("<I", value & 0x8000_07FC | 0x8000_0000))  # aim at slots 0/1 often
    assert pio.faults == 0 and mmio.faults == 0
    for index, w in pci.mapped_bars(1).items():
        assert w.size == SPECS[index].size and w.address % w.size == 0
        assert pci.allocator.accepts(w.kind, w.address, w.size)
        bus = pio if w.kind is BarKind.IO else mmio
        assert bus.find(w.address).device.function is dev
    mapped_ranges = [r for r in mmio.ranges() + pio.ranges() if r.name.startswith("testdev")]
    assert len(mapped_ranges) == len(pci.mapped_bars(1))
