"""The run loop's Python path (pure logic over decoded exits; no /dev/kvm)."""
from __future__ import annotations

from collections import Counter

from hypothesis import given, strategies as st

from pykvm._native import lib
from pykvm.kvm.exits import HltExit, IoExit, MmioExit, ShutdownExit
from pykvm.vmm.bus import Bus
from pykvm.vmm.runloop import ALL_ONES, ConstantDevice, RunLoop, RunStats


class Echo:
    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return bytes(range(offset, offset + size))

    def write(self, offset, data):
        self.writes.append((offset, data))


def desc(**kw) -> RunLoop:
    pio, mmio = Bus("pio", 1 << 16), Bus("mmio", 1 << 64)
    pio.register(0x60, 0x10, Echo(), "echo")
    mmio.register(0x1000, 0x100, Echo(), "echo")
    return RunLoop(pio, mmio, **kw)


def test_constant_device_reads_low_bytes_of_value_and_counts():
    d = ConstantDevice(0x1122_3344_5566_7788)
    assert d.read(0, 2) == b"\x88\x77" and ConstantDevice().read(0, 4) == b"\xff" * 4
    d.write(0, b"\x01")
    assert (d.reads, d.writes) == (1, 1) and ConstantDevice(-1).value == ALL_ONES


def test_string_in_fills_every_element_from_the_bus():
    d = desc()
    ex = IoExit(lib.KVM_EXIT_IO, 0x62, 2, 3, lib.KVM_EXIT_IO_IN, bytearray(6))
    assert d.dispatch(ex) is False
    assert bytes(ex.data) == bytes([2, 3]) * 3


def test_mmio_read_and_write_go_to_the_device_at_their_offset():
    d = desc()
    rd = MmioExit(lib.KVM_EXIT_MMIO, 0x1010, 4, False, bytearray(4))
    d.dispatch(rd)
    assert bytes(rd.data) == bytes([0x10, 0x11, 0x12, 0x13])
    d.dispatch(MmioExit(lib.KVM_EXIT_MMIO, 0x1020, 2, True, bytearray(b"\xaa\xbb")))
    assert d.mmio.find(0x1000).device.writes == [(0x20, b"\xaa\xbb")]


@given(st.integers(0, 0xFFFF), st.sampled_from([1, 2, 4]))
def test_any_port_read_is_answered(port, size):
    ex = IoExit(lib.KVM_EXIT_IO, port, size, 1, lib.KVM_EXIT_IO_IN, bytearray(size))
    desc().dispatch(ex)
    inside = 0x60 <= port and port + size <= 0x70
    assert bytes(ex.data) == (bytes(range(port - 0x60, port - 0x60 + size)) if inside else b"\xff" * size)


def test_unhandled_exits_stop_by_default_and_handlers_decide():
    seen = []
    d = desc(handlers={lib.KVM_EXIT_HLT: lambda ex: seen.append(ex) or False})
    assert d.dispatch(HltExit(lib.KVM_EXIT_HLT)) is False and len(seen) == 1
    assert d.dispatch(ShutdownExit(lib.KVM_EXIT_SHUTDOWN)) is True


def test_a_raising_handler_stops_instead_of_propagating():
    d = desc(on_unhandled=lambda ex: 1 / 0)
    assert d.dispatch(ShutdownExit(lib.KVM_EXIT_SHUTDOWN)) is True


def test_stats_table_lists_each_reason():
    s = RunStats(Counter(IO=10, HLT=1), Counter(IO=8), Counter(IO=2, HLT=1),
                 Counter(IO=100_000, HLT=5), Counter(IO=20_000, HLT=1_000))
    lines = s.table().splitlines()
    assert lines[1].split()[:4] == ["IO", "10", "8", "2"] and lines[2].split()[0] == "HLT"
    assert lines[1].split()[-1] == "2.00"  # 20 us of VMM time over 10 exits
