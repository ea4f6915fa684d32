"""Trapped BAR accesses of a passed-through function (VfioPciDevice.bar_read/bar_write) when
the device cannot answer: past the end of its VFIO region (the BAR the guest sees is rounded
up to a power of two, at least 4 or 16 bytes) or failed by the device (pread/pwrite EIO). They
answer as hardware does, all ones for a read and nothing for a write, and are counted; only the
first few are logged. The region here is a fake (the logic is pure); the lab runs real devices."""
from __future__ import annotations

import errno
import logging
from typing import List, Tuple

from hypothesis import given
from hypothesis import strategies as st

from pykvm.errors import VfioError, ioctl_error
from pykvm.vmm.pci.passthrough import BAR_FAULT_LOG_LIMIT, VfioPciDevice
from pykvm.vmm.pci.preflight import Target


class FakeRegion:
    """A VFIO region of ``size`` bytes backed by a bytearray; ``fail`` makes every access EIO."""

    def __init__(self, size: int, fail: bool = False) -> None:
        self.size = size
        self.data = bytearray(range(256)) * (size // 256 + 1)
        self.fail = fail
        self.writes: List[Tuple[int, bytes]] = []

    def _check(self, offset: int, size: int) -> None:
        if self.fail:
            raise ioctl_error(VfioError, errno.EIO, "pread", "device gone")
        if offset < 0 or offset + size > self.size:
            raise ValueError("outside the region")  # what pykvm.vfio.regions.Region raises

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.writes.append((offset, bytes(data)))


def device(*regions: FakeRegion) -> VfioPciDevice:
    """A VfioPciDevice with just what bar_read/bar_write use (no VFIO, no KVM)."""
    dev = VfioPciDevice.__new__(VfioPciDevice)
    dev.target = Target("0000:00:05.0", 7, "1b36:0010")
    dev.msix = None
    dev.closed = False
    dev.bar_faults = 0
    dev.regions = dict(enumerate(regions))
    return dev


def test_an_access_inside_the_region_reaches_the_device():
    dev = device(FakeRegion(0x20))
    assert dev.bar_read(0, 0x10, 4) == bytes([0x10, 0x11, 0x12, 0x13])
    dev.bar_write(0, 0x1C, b"\xaa\xbb\xcc\xdd")
    assert dev.regions[0].writes == [(0x1C, b"\xaa\xbb\xcc\xdd")] and dev.bar_faults == 0


def test_past_the_region_reads_all_ones_and_writes_are_dropped():
    """An I/O BAR of 0x14 bytes is shown as 0x20: the last 12 bytes have no device behind them.
    Before, Region.read's ValueError went up to the bus (a traceback per access)."""
    dev = device(FakeRegion(0x14))
    assert dev.bar_read(0, 0x18, 4) == b"\xff" * 4
    assert dev.bar_read(0, 0x12, 4) == b"\xff" * 4  # straddling the end
    dev.bar_write(0, 0x1C, b"\x01\x02")
    assert dev.regions[0].writes == [] and dev.bar_faults == 3


def test_a_device_error_reads_all_ones_and_drops_the_write():
    dev = device(FakeRegion(0x1000, fail=True))
    assert dev.bar_read(0, 0, 8) == b"\xff" * 8
    dev.bar_write(0, 0, b"\x00" * 4)
    assert dev.bar_faults == 2


def test_a_closed_device_or_a_missing_bar_reads_all_ones():
    dev = device(FakeRegion(0x100))
    assert dev.bar_read(3, 0, 2) == b"\xff\xff"
    dev.bar_write(3, 0, b"\x00")
    dev.closed = True
    assert dev.bar_read(0, 0, 4) == b"\xff" * 4
    dev.bar_write(0, 0, b"\x00")
    assert dev.regions[0].writes == [] and dev.bar_faults == 0


def test_only_the_first_faults_are_logged_all_are_counted(caplog):
    dev = device(FakeRegion(0x10, fail=True))
    with caplog.at_level(logging.WARNING, logger="pykvm.vmm.pci.passthrough"):
        for _ in range(1000):
            assert dev.bar_read(0, 0, 4) == b"\xff" * 4
    assert dev.bar_faults == 1000
    assert len(caplog.records) == BAR_FAULT_LOG_LIMIT
    assert "further faults are only counted" in caplog.records[-1].getMessage()


@given(size=st.integers(1, 0x100), offset=st.integers(0, 0x200), width=st.sampled_from([1, 2, 4, 8]),
       fail=st.booleans())
def test_any_access_answers_like_hardware_and_never_raises(size, offset, width, fail):
    region = FakeRegion(size, fail)
    dev = device(region)
    inside = offset + width <= size and not fail
    data = dev.bar_read(0, offset, width)
    assert data == (bytes(region.data[offset:offset + width]) if inside else b"\xff" * width)
    dev.bar_write(0, offset, b"\x5a" * width)
    assert region.writes == ([(offset, b"\x5a" * width)] if inside else [])
    assert dev.bar_faults == (0 if inside else 2)
