"""POST code port, system control port B and the CMOS RTC."""
from __future__ import annotations

import time

from pykvm.vmm.devices.misc import Cmos, PortB, PostCode


def test_post_code_keeps_and_reports_the_last_value():
    seen = []
    post = PostCode(on_write=seen.append)
    post.write(0, b"\x42")
    assert post.read(0, 1) == b"\x42" and post.last == 0x42 and seen == [0x42]


def test_port_b_gate_and_refresh_toggle():
    b = PortB()
    b.write(0, b"\x01")
    first, second = b.read(0, 1)[0], b.read(0, 1)[0]
    assert first & 0x01 and first & 0x20  # gate on, OUT2 high
    assert (first ^ second) & 0x10  # refresh bit toggles


def test_cmos_reads_the_clock_in_bcd():
    fixed = time.struct_time((2026, 11, 25, 23, 45, 7, 2, 329, 0))  # a Wednesday
    cmos = Cmos(clock=lambda: fixed)

    def reg(i):
        cmos.write(0, bytes((i | 0x80,)))  # bit 7 (NMI mask) is not part of the index
        return cmos.read(1, 1)[0]

    assert [reg(i) for i in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [0x07, 0x45, 0x23, 0x04, 0x25, 0x11, 0x26, 0x20]
    assert not reg(0x0A) & 0x80 and reg(0x0B) == 0x02 and reg(0x0D) & 0x80
    cmos.write(0, b"\x40")
    cmos.write(1, b"\x99")
    assert reg(0x40) == 0x99
    cmos.write(0, b"\x00")
    cmos.write(1, b"\x99")  # time registers are not RAM
    assert reg(0) == 0x07
