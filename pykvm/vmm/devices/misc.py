"""Trivial legacy ports Linux touches while booting.

- 0x80, the POST code port: Linux writes to it as an I/O delay (``io_delay``);
  firmware writes progress codes. The last value is kept and can be reported
  to ``on_write`` (a guest can use it as a boot-timing marker).
- 0x61, system control port B: PIT channel 2 gate and speaker enable (bits
  0-1, kept), refresh toggle (bit 4, flips on each read) and PIT channel 2
  output (bit 5, shown high when the gate is on, so polling loops end). KVM's
  in-kernel PIT claims this port itself; this model is for machines without it.
- 0x70/0x71, the CMOS RTC: index then data. Time registers read the host's
  UTC time in BCD, 24-hour mode; status A/B/C/D read as an idle, valid clock;
  the rest is 128 bytes of RAM (zero, writable).
"""
from __future__ import annotations

import time
from typing import Callable, Optional

POST_PORT = 0x80
PORT_B = 0x61
CMOS_PORT = 0x70  # index at 0x70, data at 0x71

RTC_SECONDS, RTC_MINUTES, RTC_HOURS = 0x00, 0x02, 0x04
RTC_WEEKDAY, RTC_DAY, RTC_MONTH, RTC_YEAR = 0x06, 0x07, 0x08, 0x09
RTC_STATUS_A, RTC_STATUS_B, RTC_STATUS_C, RTC_STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
RTC_CENTURY = 0x32
STATUS_A_IDLE = 0x26  # 32.768 kHz time base, 1024 Hz rate, no update in progress
STATUS_B_24H_BCD = 0x02
STATUS_D_VALID = 0x80  # battery good, RAM and time valid
CMOS_NMI_DISABLE = 0x80  # bit 7 of the index masks NMIs; not part of the index


class PostCode:
    def __init__(self, on_write: Optional[Callable[[int], None]] = None):
        self.last = 0
        self._on_write = on_write

    def read(self, offset: int, size: int) -> bytes:
        return bytes((self.last,)) * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.last = data[0]
            if self._on_write is not None:
                self._on_write(self.last)


class PortB:
    def __init__(self) -> None:
        self._value = 0
        self._refresh = 0

    def read(self, offset: int, size: int) -> bytes:
        self._refresh ^= 0x10
        out2 = 0x20 if self._value & 0x01 else 0
        return bytes((self._value | self._refresh | out2,)) * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self._value = data[0] & 0x0F


def _bcd(n: int) -> int:
    return (n // 10) << 4 | n % 10


class Cmos:
    """The RTC/CMOS pair at 0x70 (index) and 0x71 (data); register it with length 2."""

    def __init__(self, clock: Callable[[], time.struct_time] = time.gmtime):
        self._clock = clock
        self._index = 0
        self._ram = bytearray(128)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._read(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        for i, value in enumerate(data):
            if offset + i == 0:
                self._index = value & ~CMOS_NMI_DISABLE
            elif offset + i == 1 and self._index not in _TIME_FIELDS and self._index not in _STATUS:
                self._ram[self._index] = value

    def _read(self, port: int) -> int:
        if port != 1:
            return 0xFF  # the index register is write-only
        if self._index in _STATUS:
            return _STATUS[self._index]
        if self._index in _TIME_FIELDS:
            return _bcd(_TIME_FIELDS[self._index](self._clock()))
        return self._ram[self._index]


_STATUS = {RTC_STATUS_A: STATUS_A_IDLE, RTC_STATUS_B: STATUS_B_24H_BCD, RTC_STATUS_C: 0, RTC_STATUS_D: STATUS_D_VALID}
_TIME_FIELDS = {
    RTC_SECONDS: lambda t: min(t.tm_sec, 59),
    RTC_MINUTES: lambda t: t.tm_min,
    RTC_HOURS: lambda t: t.tm_hour,
    RTC_WEEKDAY: lambda t: (t.tm_wday + 1) % 7 + 1,  # 1 = Sunday
    RTC_DAY: lambda t: t.tm_mday,
    RTC_MONTH: lambda t: t.tm_mon,
    RTC_YEAR: lambda t: t.tm_year % 100,
    RTC_CENTURY: lambda t: t.tm_year // 100,
}
