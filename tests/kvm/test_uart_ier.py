"""The 16550's IER writes in the C run loop, on the real /dev/kvm with tiny real-mode guests.

Linux's 8250 driver toggles IER.THRI on every start_tx/stop_tx of interrupt-driven
output. In interrupt mode (DLAB=0, no loopback, C owns the line) the C loop answers
those writes: it keeps IER, latches THRE when THRI goes on (THR is always empty) and
drives the line. Every test runs the same guest through the Python loop too: the
16550 model there is the reference, and the model must see C's IER when it takes over.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pykvm.vmm.bus import Bus
from pykvm.vmm.console import ConsoleUart
from pykvm.vmm.devices.serial import COM1_IRQ, COM1_PORT, IER_THRE, IIR_NONE, IIR_THRE, LCR_DLAB, MCR_LOOP
from pykvm.vmm.runloop import CRunLoop, PyRunLoop, RunLoop, Status
from tests.kvm.guests import HLT, JMP_SELF, real_mode_vcpu
from tests.kvm.test_runloop import LOOPS, RESULTS, Access, Machine, Scratch, assemble, jcc, le, out_dx, run_guest

pytestmark = pytest.mark.kvm

THR, IER, IIR, LCR, MCR, LSR = 0, 1, 2, 3, 4, 5
DONE_PORT, FLAG, MSG = 0x300, 0x6800, 0x8000


def uart(reg: int, write: bool = False, value: int = 0) -> Access:
    return Access(False, COM1_PORT + reg, 1, write, value)


def reads(mem: bytes, accesses: List[Access]) -> List[int]:
    """The byte each read access of ``assemble(accesses)`` stored."""
    return [mem[4 * i] for i, a in enumerate(accesses) if not a.write]


def model_view(u: ConsoleUart) -> Tuple[int, bool, int]:
    """(IER, line level, pending IIR) as the model sees them after taking over from C."""
    ier = u.read(IER, 1)[0]  # a read takes over what C did; IER has no read side effect
    return ier, u.irq_level, u._pending()


# -- IER writes answered in C, and what they do --------------------------------------
THRI_SEQUENCE = [
    uart(MCR, True, 0x08),              # OUT2: pending interrupts reach the line (Python)
    uart(IER, True, 0x02),              # start_tx: THRI on with THR empty latches THRE
    uart(IIR), uart(IIR),               # THRE, acknowledged; then none
    uart(THR, True, ord("a")),          # latches THRE again
    uart(IER, True, 0x00),              # stop_tx: THRE stays latched but masked
    uart(IIR),                          # none
    uart(IER, True, 0x02),              # on again: THRE
    uart(IIR), uart(IIR),
    uart(IER, True, 0x02),              # already on: nothing new
    uart(IIR),
    uart(IER, True, 0xF7),              # a 16550 keeps bits 0-3
    uart(LCR, True, 0x03),              # Python takes over here and must keep C's IER
    uart(IER),
    uart(THR, True, ord("b")),
]
THRI_READS = [0x02, 0x01, 0x01, 0x02, 0x01, 0x01, 0x07]


def test_thri_toggles_are_answered_in_c_as_the_model_answers_them(kvm):
    code = assemble(THRI_SEQUENCE)
    views = []
    for cls in LOOPS:
        with kvm.create_vm() as vm:
            m, loop, result, mem = run_guest(vm, cls, code)
            assert result.status is Status.EXIT and result.exit.name == "HLT"
            assert bytes(m.console) == b"ab"
            assert reads(mem.read(RESULTS, 0x100), THRI_SEQUENCE) == THRI_READS
            views.append((loop.stats, model_view(m.uart)))
    (sc, vc), (sp, vp) = views
    assert vc == vp == (0x07, True, IIR_THRE)  # THRE from the last THR write, enabled, OUT2 on
    assert sc.exits == sp.exits
    assert sc.python_handled["IO"] == 2 and sc.c_handled["IO"] == len(THRI_SEQUENCE) - 2  # MCR, LCR


def test_ier_write_with_dlab_or_loopback_goes_to_the_model(vm):
    """DLAB=1 makes port 1 the divisor latch's high byte; in loopback C does not own the line."""
    seq = [uart(LCR, True, 0x83), uart(IER, True, 0x01), uart(LCR, True, 0x03),
           uart(MCR, True, 0x18), uart(IER, True, 0x02), uart(IIR), uart(MCR, True, 0x08), uart(IER)]
    m, loop, result, mem = run_guest(vm, CRunLoop, assemble(seq))
    assert result.status is Status.EXIT
    assert m.uart.divisor == 0x100 | 12  # the IER write set the divisor's high byte
    assert reads(mem.read(RESULTS, 0x100), seq) == [0x02, 0x02]  # THRE latched by the model; C has its IER
    assert loop.stats.python_handled["IO"] == 7 and loop.stats.c_handled["IO"] == 1  # the last IER read


def test_input_fed_between_c_ier_writes_keeps_the_guest_ier(kvm):
    """feed() takes over and publishes between two exits C answered: the IER the guest
    wrote survives it, and enabling RDA with data waiting raises the receive interrupt."""
    seq = [uart(IER, True, 0x02), uart(IER), uart(IIR), uart(IER, True, 0x03), uart(IIR), uart(THR), uart(IIR)]
    results = []
    for cls in LOOPS:
        with kvm.create_vm() as vm:
            m = Machine()
            cpu, mem = real_mode_vcpu(vm, assemble(seq))
            loop = cls(RunLoop(m.pio, m.mmio), cpu)
            assert loop.run_until(max_exits=1, timeout=10).status is Status.MAX_EXITS
            assert m.uart.feed(b"x") == 1
            result = loop.run_until(timeout=10)
            assert result.status is Status.EXIT and result.exit.name == "HLT"
            results.append((reads(mem.read(RESULTS, 0x100), seq), model_view(m.uart), loop.stats))
    (rc, vc, sc), (rp, vp, sp) = results
    assert rc == rp == [0x02, 0x02, 0x04, ord("x"), 0x01]  # IER, THRE, RDA, the byte, none
    assert vc == vp == (0x03, False, IIR_NONE)  # no OUT2: nothing on the line
    # in C: both IER writes, the IER read, the IIR reads with no receive interrupt pending
    assert sc.c_handled["IO"] == 5 and sc.python_handled["IO"] == 2


def test_feeds_racing_c_ier_writes_never_restore_a_stale_ier(vm):
    """A console thread feeding input while the guest toggles IER in C: every IER read
    returns what the guest just wrote (a publish of the model's stale IER would not)."""
    values = [0x02, 0x00, 0x01, 0x03, 0x0F, 0x08] * 50
    seq = [a for v in values for a in (uart(IER, True, v), uart(IER))]
    m = Machine()
    cpu, mem = real_mode_vcpu(vm, assemble(seq))
    loop = CRunLoop(RunLoop(m.pio, m.mmio), cpu)
    done = threading.Event()
    feeds = []

    def feeder() -> None:
        while not done.is_set():
            feeds.append(m.uart.feed(b"z"))

    t = threading.Thread(target=feeder)
    t.start()
    try:
        result = loop.run_until(timeout=20)
    finally:
        done.set()
        t.join(10)
    assert result.status is Status.EXIT and result.exit.name == "HLT"
    assert reads(mem.read(RESULTS, 0x1000), seq) == values
    assert len(feeds) > 1 and m.uart.read(IER, 1) == bytes([values[-1]])
    assert loop.stats.python_handled["IO"] == 0


# -- interrupt-driven transmit the way the 8250 driver does it ------------------------
def start_stop_tx_guest(base: int) -> Tuple[bytes, int]:
    """Send the NUL-terminated text at MSG a line at a time, like the 8250 driver: per
    line, enable THRI (start_tx) and sleep until the IRQ 4 handler has sent the line,
    one byte per THRE interrupt (read IIR, write THR), and, at the THRE interrupt after
    the newline (nothing left to send), disabled THRI (stop_tx); then report on
    DONE_PORT. FLAG: 0 sending, 2 newline sent, 1 stopped. Returns (code, handler address)."""
    main = bytearray(b"\x31\xC0\x8E\xD8\x8E\xC0\x8E\xD0\xBC\x00\x70")  # ds = es = ss = 0; sp = 0x7000
    for port, v in ((0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x01), (0x21, 0xEF), (COM1_PORT + MCR, 0x08)):
        main += out_dx(port, 1, v)
    main += b"\xBE" + le(MSG, 2)  # mov si, msg
    line = len(main)
    main += b"\xC6\x06" + le(FLAG, 2) + b"\x00" + out_dx(COM1_PORT + IER, 1, 0x02)  # flag = 0; start_tx
    wait = len(main)
    main += b"\xFA\x80\x3E" + le(FLAG, 2) + b"\x01"  # cli; cmp byte [flag], 1
    sleep = b"\xFB\xF4"  # sti; hlt (the interrupt shadow of sti covers hlt: no lost wake-up)
    main += jcc(0x74, len(main) + 2 + len(sleep) + 2, len(main)) + sleep
    main += jcc(0xEB, wait, len(main))
    main += b"\x80\x7C\xFF\x00"  # cmp byte [si-1], 0: was that the end of the text?
    main += jcc(0x75, line, len(main))
    main += out_dx(DONE_PORT, 1, 0xAA) + JMP_SELF
    top = b"\x50\x52" + b"\xBA" + le(COM1_PORT + IIR, 2) + b"\xEC\xA8\x01"  # push ax, dx; in IIR; test al, 1
    newline_sent = b"\x80\x3E" + le(FLAG, 2) + b"\x02"  # cmp byte [flag], 2
    send = b"\xAC\x84\xC0"  # lodsb; test al, al
    thr = b"\xBA" + le(COM1_PORT, 2) + b"\xEE\x3C\x0A"  # out THR; cmp al, '\n'
    mark = b"\xC6\x06" + le(FLAG, 2) + b"\x02"  # flag = 2
    stop = out_dx(COM1_PORT + IER, 1, 0x00) + b"\xC6\x06" + le(FLAG, 2) + b"\x01"  # stop_tx; flag = 1
    eoi = b"\xB0\x20\xE6\x20\x5A\x58\xCF"  # EOI; pop dx, ax; iret
    at_check = len(top) + 2
    at_send = at_check + len(newline_sent) + 2
    at_thr = at_send + len(send) + 2
    at_mark = at_thr + len(thr) + 2
    at_stop = at_mark + len(mark) + 2
    at_eoi = at_stop + len(stop)
    h = bytearray(top) + jcc(0x75, at_eoi, len(top))  # no interrupt pending
    h += newline_sent + jcc(0x74, at_stop, at_check + len(newline_sent))
    h += send + jcc(0x74, at_stop, at_send + len(send))
    h += thr + jcc(0x75, at_eoi, at_thr + len(thr))
    h += mark + jcc(0xEB, at_eoi, at_mark + len(mark))
    h += stop + eoi
    assert len(h) == at_eoi + len(eoi)
    return bytes(main) + bytes(h), base + len(main)


@dataclass
class IrqRun:
    console: bytes
    stats: object
    status: Status
    view: Tuple[int, bool, int]
    kernel_line: bool  # the IOAPIC's record of the COM1 input


def run_start_stop_tx(kvm, loop_cls, text: bytes) -> IrqRun:
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        console = bytearray()
        pio = Bus("pio", 1 << 16)
        u = ConsoleUart(console.extend, irq_line=(vm, COM1_IRQ))
        done = Scratch(1)
        pio.register(COM1_PORT, 8, u, "com1")
        pio.register(DONE_PORT, 1, done, "done")
        code, handler = start_stop_tx_guest(0x1000)
        cpu, mem = real_mode_vcpu(vm, code)
        mem.write(4 * (0x08 + COM1_IRQ), le(handler, 2) + le(0, 2))  # IVT: IRQ 4 -> vector 0x0C
        mem.write(MSG, text + b"\0")
        loop = loop_cls(RunLoop(pio, Bus("mmio", 1 << 64)), cpu)
        result = loop.run_until(lambda: done.mem[0] == 0xAA, timeout=20)
        kernel_line = bool(vm.get_irqchip(2).ioapic_irr & (1 << COM1_IRQ))
        return IrqRun(bytes(console), loop.stats, result.status, model_view(u), kernel_line)


def test_start_tx_stop_tx_per_line_stays_in_c_and_matches_python(kvm):
    text = b"".join(b"line %d of interrupt-driven output\n" % i for i in range(40))
    c, p = [run_start_stop_tx(kvm, cls, text) for cls in LOOPS]
    assert c.status is p.status is Status.PREDICATE
    assert c.console == p.console == text
    assert c.stats.exits == p.stats.exits
    assert c.view == p.view == (0x00, False, IIR_NONE) and not c.kernel_line and not p.kernel_line
    lines = text.count(b"\n")
    # per line: start_tx, an IIR read and a THR write per byte, the IIR read of the THRE
    # interrupt after the newline and stop_tx; the empty last "line": start_tx, IIR read, stop_tx
    assert c.stats.c_handled["IO"] == 3 * lines + 2 * len(text) + 3
    assert c.stats.python_handled["IO"] == 2  # MCR, the done port


# -- hypothesis: random UART programs, input fed between exits ------------------------
@dataclass(frozen=True)
class Op:
    access: Optional[Access]  # a guest access, or None: the console feeds ``feed``
    feed: bytes = b""


OPS = st.one_of(
    st.builds(lambda v: Op(uart(IER, True, v)), st.one_of(st.sampled_from([0x00, 0x02, 0x03, 0x0D, 0xFF]),
                                                          st.integers(0, 0xFF))),
    st.builds(lambda ch: Op(uart(THR, True, ch)), st.sampled_from(b"ab\n")),
    st.just(Op(uart(IIR))), st.just(Op(uart(IER))), st.just(Op(uart(LSR))), st.just(Op(uart(THR))),
    st.builds(lambda v: Op(uart(LCR, True, v)), st.sampled_from([0x03, 0x83])),
    st.builds(lambda v: Op(uart(MCR, True, v)), st.sampled_from([0x00, 0x08, 0x0B, 0x18])),
    st.builds(lambda v: Op(uart(IIR, True, v)), st.sampled_from([0x00, 0x01, 0x07])),  # FCR
    st.builds(lambda b: Op(None, b), st.sampled_from([b"x", b"yz"])),
)


class CountingUart(ConsoleUart):
    """The console UART, counting the IER writes that reach the model."""

    ier_writes = 0

    def write(self, offset: int, data: bytes) -> None:
        self.ier_writes += offset == IER
        super().write(offset, data)


@dataclass
class UartRun:
    results: List[int]
    console: bytes
    exits: object
    view: Tuple[int, bool, int]
    kernel_line: bool
    python_ier_writes: int  # IER writes the model saw (the C loop's misses)


def run_ops(kvm, loop_cls, ops: List[Op]) -> UartRun:
    """Run the guest accesses of ``ops`` with an in-kernel irqchip, stopping after the
    exits before each feed to feed it; then read the model's view and the kernel's line."""
    accesses = [op.access for op in ops if op.access is not None]
    code = assemble(accesses)[:-len(HLT)] + out_dx(DONE_PORT, 1, 0xAA) + JMP_SELF
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        console = bytearray()
        u = CountingUart(console.extend, irq_line=(vm, COM1_IRQ))
        done, pio = Scratch(1), Bus("pio", 1 << 16)
        pio.register(COM1_PORT, 8, u, "com1")
        pio.register(DONE_PORT, 1, done, "done")
        cpu, mem = real_mode_vcpu(vm, code)
        loop = loop_cls(RunLoop(pio, Bus("mmio", 1 << 64)), cpu)
        pending = 0
        for op in ops:
            if op.access is not None:
                pending += 1
                continue
            if pending:
                assert loop.run_until(max_exits=pending, timeout=10).status is Status.MAX_EXITS
                pending = 0
            u.feed(op.feed)
        assert loop.run_until(lambda: done.mem[0] == 0xAA, timeout=10).status is Status.PREDICATE
        view = model_view(u)
        kernel_line = bool(vm.get_irqchip(2).ioapic_irr & (1 << COM1_IRQ))
        return UartRun(reads(mem.read(RESULTS, 0x1000), accesses), bytes(console), loop.stats.exits, view,
                       kernel_line, u.ier_writes)


def ier_writes_outside_irq_mode(ops: List[Op]) -> int:
    """IER writes made with DLAB or loopback set: only those may reach the model through the C loop."""
    lcr = mcr = n = 0
    for op in ops:
        a = op.access
        if a is None or not a.write:
            continue
        reg = a.addr - COM1_PORT
        lcr, mcr = (a.value if reg == LCR else lcr), (a.value if reg == MCR else mcr)
        n += reg == IER and bool(lcr & LCR_DLAB or mcr & MCR_LOOP)
    return n


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(OPS, min_size=1, max_size=40))
def test_random_uart_programs_with_input_agree_between_c_and_python(kvm, ops):
    c, p = [run_ops(kvm, cls, ops) for cls in (CRunLoop, PyRunLoop)]
    assert (c.results, c.console, c.exits, c.view) == (p.results, p.console, p.exits, p.view)
    assert c.kernel_line == c.view[1] and p.kernel_line == p.view[1]  # the line KVM has is the model's
    ier_writes = [op for op in ops if op.access and op.access.write and op.access.addr == COM1_PORT + IER]
    assert p.python_ier_writes == len(ier_writes)
    assert c.python_ier_writes == ier_writes_outside_irq_mode(ops)


@pytest.mark.parametrize("loop_cls", LOOPS)
def test_thri_enable_raises_the_line_only_through_out2(vm, loop_cls):
    """The THRE interrupt THRI's enabling latches reaches the line only with MCR.OUT2, as PC boards wire it."""
    seq = [uart(IER, True, IER_THRE)]
    m, loop, result, _ = run_guest(vm, loop_cls, assemble(seq))
    assert result.status is Status.EXIT and loop.stats.python_handled["IO"] == (0 if loop_cls is CRunLoop else 1)
    assert model_view(m.uart) == (IER_THRE, False, IIR_THRE)
    m.uart.write(MCR, b"\x08")
    assert m.uart.irq_level is True
