"""16550A UART model: registers as Linux's 8250 driver probes and drives them."""
from __future__ import annotations

import threading
import time

from hypothesis import given, strategies as st

from pykvm.vmm.bus import Bus
from pykvm.vmm.devices.serial import COM1_PORT, Serial16550

THR, IER, IIR, FCR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 2, 3, 4, 5, 6, 7


class Uart:
    """A UART with its output and interrupt line recorded."""

    def __init__(self, **kw):
        self.out = bytearray()
        self.levels = []
        self.dev = Serial16550(self.out.extend, irq=self.levels.append, **kw)

    def w(self, reg, value):
        self.dev.write(reg, bytes((value,)))

    def r(self, reg):
        return self.dev.read(reg, 1)[0]


def test_transmit_reaches_the_sink():
    u = Uart()
    for ch in b"hi\n":
        u.w(THR, ch)
    assert bytes(u.out) == b"hi\n"
    assert u.r(LSR) & 0x60 == 0x60  # THR empty, transmitter empty


def test_divisor_latch_and_scratch():
    u = Uart()
    u.w(LCR, 0x83)  # DLAB, 8N1
    u.w(0, 0x01)
    u.w(1, 0x00)  # 115200 baud
    assert (u.r(0), u.r(1), u.dev.divisor) == (1, 0, 1)
    assert not u.out  # a DLAB write is not data
    u.w(LCR, 0x03)
    u.w(SCR, 0x5A)
    assert u.r(SCR) == 0x5A and u.r(LCR) == 0x03


def test_linux_autoconfig_sees_a_16550a():
    u = Uart()
    # Loopback check (8250_port.c autoconfig): MCR = LOOP|OUT2|RTS must show DCD|CTS in MSR.
    u.w(MCR, 0x1A)
    assert u.r(MSR) & 0xF0 == 0x90
    u.w(MCR, 0)
    # FIFO detection: IIR bits 7:6 = 11 once FIFOs are enabled.
    u.w(FCR, 0x01)
    assert u.r(IIR) >> 6 == 3
    u.w(FCR, 0)
    assert u.r(IIR) >> 6 == 0 and u.r(IIR) & 1  # no interrupt pending


def test_receive_through_the_fifo_with_backpressure():
    freed = []
    u = Uart(on_rx_space=lambda: freed.append(1))
    assert u.dev.feed(b"abc") == 1  # FIFOs off: one holding register
    u.w(FCR, 0x07)  # enable and clear FIFOs
    assert not u.r(LSR) & 1
    assert u.dev.feed(b"x" * 20) == 16 and u.dev.rx_space() == 0
    assert u.r(LSR) & 1
    assert bytes(u.r(0) for _ in range(16)) == b"x" * 16
    assert not u.r(LSR) & 1 and len(freed) == 16 and u.r(0) == 0


def test_rx_and_thre_interrupts_with_out2_gate_and_priority():
    u = Uart()
    u.w(IER, 0x03)  # RDA + THRE
    assert u.r(IIR) & 0x0F == 0x02 and u.levels == []  # THRE pending but OUT2 gates the line
    u.w(MCR, 0x08)  # OUT2
    u.w(THR, ord("a"))  # THRE again after a write
    assert u.levels == [True]
    u.dev.feed(b"k")
    assert u.r(IIR) & 0x0F == 0x04  # RDA outranks THRE
    assert u.r(0) == ord("k")
    assert u.r(IIR) & 0x0F == 0x02  # now THRE; reading it acknowledges it
    assert u.r(IIR) & 0x0F == 0x01 and u.levels == [True, False] and not u.dev.irq_level


def test_loopback_returns_transmitted_bytes_and_refuses_the_line():
    u = Uart()
    u.w(MCR, 0x10)
    u.w(THR, 0x41)
    assert not u.out and u.r(LSR) & 1 and u.r(0) == 0x41
    assert u.dev.feed(b"z") == 0


def test_modem_status_interrupt_on_loopback_line_changes():
    u = Uart()
    u.w(IER, 0x08)
    u.w(MCR, 0x10)  # loopback, all outputs low
    u.r(MSR)
    u.w(MCR, 0x11)  # DTR -> DSR
    assert u.r(IIR) & 0x0F == 0x00
    assert u.r(MSR) == 0x20 | 0x02  # DSR and its delta; the delta clears on read
    assert u.r(MSR) == 0x20 and u.r(IIR) & 1


def test_the_bus_routes_com1():
    out = bytearray()
    bus = Bus("pio", 1 << 16)
    bus.register(COM1_PORT, 8, Serial16550(out.extend), "com1")
    bus.write(COM1_PORT, b"!")
    assert out == b"!" and bus.read(COM1_PORT + 5, 1)[0] & 0x20


def test_feed_from_a_console_thread_delivers_everything_in_order():
    u = Uart()
    u.w(FCR, 0x01)
    data = bytes(range(256)) * 8
    got = bytearray()

    def console():
        pos = 0
        while pos < len(data):
            pos += u.dev.feed(data[pos:pos + 64])
            time.sleep(0)

    t = threading.Thread(target=console, daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while len(got) < len(data) and time.monotonic() < deadline:
        if u.r(LSR) & 1:
            got.append(u.r(0))
    t.join(timeout=5)
    assert bytes(got) == data


_ops = st.lists(st.tuples(st.sampled_from(["r", "w", "feed"]), st.integers(0, 7), st.integers(1, 4),
                          st.binary(min_size=1, max_size=4)), max_size=60)


@given(_ops)
def test_any_access_sequence_keeps_the_model_consistent(ops):
    u = Uart()
    for op, offset, size, data in ops:
        if op == "r":
            assert len(u.dev.read(offset, size)) == size
        elif op == "w":
            u.dev.write(offset, data)
        else:
            assert 0 <= u.dev.feed(data) <= len(data)
        assert 0 <= u.dev.rx_space() <= 16
    # The line toggles: never reported at the same level twice in a row, and it ends where reported.
    assert all(a != b for a, b in zip(u.levels, u.levels[1:]))
    assert u.dev.irq_level == (u.levels[-1] if u.levels else False)
    assert u.r(LSR) & 0x60 == 0x60
