"""The C run loop and the Python run loop on the real /dev/kvm, with tiny real-mode guests."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pykvm.vmm.bus import Bus
from pykvm.vmm.console import ConsoleUart
from pykvm.vmm.devices.serial import COM1_PORT, MSR_IDLE
from pykvm.vmm.runloop import ALL_ONES, ConstantDevice, CRunLoop, PyRunLoop, RunLoop, Status
from tests.conftest import open_fds
from tests.kvm.guests import HLT, JMP_SELF, real_mode_vcpu

pytestmark = pytest.mark.kvm

LOOPS = (CRunLoop, PyRunLoop)
MMIO_SEG = 0x2000           # DS for MMIO accesses: linear 0x20000 + offset, above the 64 KiB of RAM
RESULTS = 0x8000            # where guests store what their reads returned (ES = 0)


# -- a tiny real-mode assembler --------------------------------------------------
def le(v: int, n: int) -> bytes:
    return (v & ((1 << (8 * n)) - 1)).to_bytes(n, "little")


def mov_acc(size: int, v: int) -> bytes:
    """mov al/ax/eax, imm"""
    return {1: b"\xB0", 2: b"\xB8", 4: b"\x66\xB8"}[size] + le(v, size)


def acc(size: int, op8: int) -> bytes:
    """The al/ax/eax form of an accumulator opcode (op8 is the byte form)."""
    return {1: bytes([op8]), 2: bytes([op8 + 1]), 4: bytes([0x66, op8 + 1])}[size]


def out_dx(port: int, size: int, v: int) -> bytes:
    return b"\xBA" + le(port, 2) + mov_acc(size, v) + acc(size, 0xEE)


def in_dx(port: int, size: int) -> bytes:
    return b"\xBA" + le(port, 2) + acc(size, 0xEC)


def store_es(size: int, off: int) -> bytes:
    """mov es:[off], al/ax/eax"""
    return b"\x26" + acc(size, 0xA2) + le(off, 2)


PROLOGUE = b"\x31\xC0\x8E\xC0" + b"\xB8" + le(MMIO_SEG, 2) + b"\x8E\xD8"  # es = 0; ds = MMIO_SEG


@dataclass(frozen=True)
class Access:
    mmio: bool
    addr: int  # port, or offset from MMIO_SEG*16
    size: int
    write: bool
    value: int


def assemble(accesses: List[Access]) -> bytes:
    """Each access in turn; each read's result is stored at RESULTS + 4*i; then hlt."""
    code = bytearray(PROLOGUE)
    for i, a in enumerate(accesses):
        if a.mmio:
            code += mov_acc(a.size, a.value) + acc(a.size, 0xA2) + le(a.addr, 2) if a.write else acc(a.size, 0xA0) + le(a.addr, 2)
        else:
            code += out_dx(a.addr, a.size, a.value) if a.write else in_dx(a.addr, a.size)
        if not a.write:
            code += store_es(a.size, RESULTS + 4 * i)
    return bytes(code + HLT)


# -- machines --------------------------------------------------------------------
class Scratch:
    """A Python-only device: remembers writes, reads them back."""

    def __init__(self, size: int):
        self.mem = bytearray(size)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.mem[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.mem[offset:offset + len(data)] = data


class Machine:
    """Buses with an ignored port, a PIO counter range, an MMIO counter range,
    Python-only devices on both buses and a UART at COM1."""

    def __init__(self):
        self.console = bytearray()
        self.pio, self.mmio = Bus("pio", 1 << 16), Bus("mmio", 1 << 64)
        self.post = ConstantDevice()                # 0x80, ignored
        self.pio_counter = ConstantDevice(0x1234_5678)
        self.mmio_counter = ConstantDevice(0xCAFE_F00D_DEAD_BEEF)
        self.pio_scratch, self.mmio_scratch = Scratch(16), Scratch(0x100)
        self.uart = ConsoleUart(self.console.extend)
        self.pio.register(0x80, 1, self.post, "post")
        self.pio.register(0x10, 0x10, self.pio_counter, "counter")
        self.pio.register(0x300, 16, self.pio_scratch, "scratch")
        self.pio.register(COM1_PORT, 8, self.uart, "com1")
        self.mmio.register(MMIO_SEG * 16 + 0x100, 0x100, self.mmio_counter, "mmio-counter")
        self.mmio.register(MMIO_SEG * 16 + 0x1000, 0x100, self.mmio_scratch, "mmio-scratch")

    def observable(self) -> Tuple:
        return (bytes(self.console), self.post.reads, self.post.writes, self.pio_counter.reads,
                self.pio_counter.writes, self.mmio_counter.reads, self.mmio_counter.writes,
                bytes(self.pio_scratch.mem), bytes(self.mmio_scratch.mem), self.pio.unclaimed, self.mmio.unclaimed)


def run_guest(vm, loop_cls, code: bytes, timeout: float = 10.0):
    m = Machine()
    cpu, mem = real_mode_vcpu(vm, code)
    loop = loop_cls(RunLoop(m.pio, m.mmio), cpu)
    result = loop.run_until(timeout=timeout)
    return m, loop, result, mem


def fresh_run(kvm, loop_cls, code: bytes):
    with kvm.create_vm() as vm:
        m, loop, result, mem = run_guest(vm, loop_cls, code)
        return m, loop.stats, result, mem.read(RESULTS, 0x1000)


def uart_hello(lsr_poll: bool) -> bytes:
    code = bytearray()
    for ch in b"hello\n":
        if lsr_poll:
            code += in_dx(COM1_PORT + 5, 1)  # Linux polls LSR.THRE before each byte
        code += out_dx(COM1_PORT, 1, ch)
    return bytes(code + HLT)


# -- tests -----------------------------------------------------------------------
@pytest.mark.parametrize("loop_cls", LOOPS)
def test_uart_output_reaches_console(vm, loop_cls):
    m, loop, result, _ = run_guest(vm, loop_cls, uart_hello(lsr_poll=True))
    assert result.status is Status.EXIT and result.exit.name == "HLT"
    assert bytes(m.console) == b"hello\n"
    assert loop.stats.exits["IO"] == 12


def test_uart_fast_path_answers_thr_and_lsr_in_c(vm):
    m, loop, result, _ = run_guest(vm, CRunLoop, uart_hello(lsr_poll=True))
    assert loop.uart_fast_path
    assert bytes(m.console) == b"hello\n"
    assert loop.stats.c_handled["IO"] == 12 and loop.stats.python_handled["IO"] == 0


def test_uart_bytes_without_newline_reach_console_while_guest_runs(vm):
    """A prompt with no newline, then a guest that stays in KVM_RUN: the drain thread delivers it."""
    m = Machine()
    cpu, _ = real_mode_vcpu(vm, out_dx(COM1_PORT, 1, ord("$")) + out_dx(COM1_PORT, 1, ord(" ")) + JMP_SELF)
    loop = CRunLoop(RunLoop(m.pio, m.mmio), cpu)
    assert loop.uart_fast_path
    runner = threading.Thread(target=loop.run_until, kwargs={"timeout": 10})
    runner.start()
    t0 = time.monotonic()
    while bytes(m.console) != b"$ " and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    loop.stop()
    runner.join(10)
    assert bytes(m.console) == b"$ " and not runner.is_alive()
    assert loop.stats.c_handled["IO"] == 2


def test_uart_drain_thread_sleeps_while_the_guest_prints_nothing(vm):
    """C wakes the drain thread through an eventfd only when output waits without a newline:
    a quiet guest costs no wakeups (a 50 Hz poll would drain ~25 times in 0.5 s), and the
    thread and its eventfd go away once no loop runs."""
    assert no_drain_thread_within(5)  # earlier tests' threads (and eventfds) are gone
    m = Machine()
    cpu, _ = real_mode_vcpu(vm, out_dx(COM1_PORT, 1, ord("$")) + JMP_SELF)
    desc = RunLoop(m.pio, m.mmio)
    loop = CRunLoop(desc, cpu)
    fast = desc.fast_uart()
    drains: List[float] = []
    drain = fast.drain
    fast.drain = lambda: (drains.append(time.monotonic()), drain())  # type: ignore[method-assign]
    before = open_fds()
    runner = threading.Thread(target=loop.run_until, kwargs={"timeout": 10})
    runner.start()
    deadline = time.monotonic() + 5
    while bytes(m.console) != b"$" and time.monotonic() < deadline:
        time.sleep(0.01)
    quiet_from = time.monotonic()
    time.sleep(0.5)
    woken = [t for t in drains if t > quiet_from]
    loop.stop()
    runner.join(10)
    assert bytes(m.console) == b"$" and not runner.is_alive()
    assert woken == []
    assert no_drain_thread_within(5)
    assert open_fds() == before


def no_drain_thread_within(seconds: float) -> bool:
    """Wait for every UART drain thread to end (each lingers IDLE_EXIT after its last loop)."""
    deadline = time.monotonic() + seconds
    while any(t.name == "pykvm-uart-drain" for t in threading.enumerate()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("loop_cls", LOOPS)
def test_input_fed_from_another_thread_reaches_a_guest_polling_lsr(vm, loop_cls):
    """LSR reads are answered in C until input arrives; then DR shows and RBR goes to the model."""
    poll = b"\xBA" + le(COM1_PORT + 5, 2) + b"\xEC\xA8\x01\x74\xFB"  # l: in al,dx; test al,1; jz l
    code = PROLOGUE + poll + in_dx(COM1_PORT, 1) + store_es(1, RESULTS) + HLT
    m = Machine()
    cpu, mem = real_mode_vcpu(vm, code)
    loop = loop_cls(RunLoop(m.pio, m.mmio), cpu)
    threading.Timer(0.05, m.uart.feed, args=(b"A",)).start()
    result = loop.run_until(timeout=10)
    assert result.status is Status.EXIT and result.exit.name == "HLT"
    assert mem.read(RESULTS, 1) == b"A"
    if loop_cls is CRunLoop:
        assert loop.stats.c_handled["IO"] >= 1 and loop.stats.python_handled["IO"] >= 1


@pytest.mark.parametrize("loop_cls", LOOPS)
def test_msr_without_deltas_is_answered_in_c(vm, loop_cls):
    """The 8250 driver reads MSR in every interrupt: with no delta bits to clear it has no side effect."""
    code = PROLOGUE + in_dx(COM1_PORT + 6, 1) + store_es(1, RESULTS) + HLT
    m, loop, result, mem = run_guest(vm, loop_cls, code)
    assert mem.read(RESULTS, 1) == bytes([MSR_IDLE])
    assert loop.stats.c_handled["IO"] == (1 if loop_cls is CRunLoop else 0)


@pytest.mark.parametrize("loop_cls", LOOPS)
def test_uart_with_thre_interrupt_enabled_transmits_in_c(vm, loop_cls):
    """IER.THRE on: the IER write and the THR writes (latching THRE) are all answered in C."""
    code = out_dx(COM1_PORT + 1, 1, 0x02) + uart_hello(lsr_poll=False)
    m, loop, result, _ = run_guest(vm, loop_cls, code)
    assert bytes(m.console) == b"hello\n"
    assert loop.stats.python_handled["IO"] == (0 if loop_cls is CRunLoop else 7)
    assert m.uart.read(1, 1) == b"\x02" and m.uart._pending() == 0x02  # the model took over C's IER and THRE


# -- interrupt-driven transmit through the in-kernel irqchip ---------------------------
IRQ_FLAG, IRQ_RX, IRQ_MSG, IRQ_DONE_PORT = 0x6800, 0x6801, 0x8000, 0x300  # message: up to 32 KiB


def jcc(op: int, target: int, at: int) -> bytes:
    """A short jump (opcode ``op``) at offset ``at`` to offset ``target``."""
    return bytes([op, (target - (at + 2)) & 0xFF])


def irq_tx_guest(base: int, rx: bool) -> Tuple[bytes, int]:
    """Program the master PIC (vectors 8-15, only IRQ 4 unmasked), set OUT2, FIFOs and
    IER.THRE (and IER.RDA if ``rx``), then halt until the handler has sent the
    NUL-terminated string at IRQ_MSG one byte per THRE interrupt (read IIR, write THR,
    EOI) and, if ``rx``, stored a received byte at IRQ_RX; then report on port 0x300.
    Returns (code, handler address)."""
    ier = 0x03 if rx else 0x02
    main = bytearray(b"\x31\xC0\x8E\xD8\x8E\xC0\x8E\xD0\xBC\x00\x70")  # ds = es = ss = 0; sp = 0x7000
    for port, v in ((0x20, 0x11), (0x21, 0x08), (0x21, 0x04), (0x21, 0x01), (0x21, 0xEF),
                    (COM1_PORT + 4, 0x08), (COM1_PORT + 2, 0x01), (COM1_PORT + 1, ier)):
        main += out_dx(port, 1, v)
    main += b"\xBE" + le(IRQ_MSG, 2) + b"\xFB"  # mov si, msg; sti
    loop = len(main)
    main += b"\xF4" + b"\x80\x3E" + le(IRQ_FLAG, 2) + b"\x01"  # hlt; cmp byte [flag], 1
    main += jcc(0x75, loop, len(main))  # jne loop
    if rx:
        main += b"\x80\x3E" + le(IRQ_RX, 2) + b"\x00"  # cmp byte [rx], 0
        main += jcc(0x74, loop, len(main))  # je loop
    main += out_dx(IRQ_DONE_PORT, 1, 0xAA) + JMP_SELF
    top = b"\x50\x52" + in_dx(COM1_PORT + 2, 1) + b"\xA8\x01"  # push ax, dx; in IIR; test al, 1
    rda = b"\x24\x0E\x3C\x04"  # and al, 0x0e; cmp al, 4 (receive data)
    read_rx = in_dx(COM1_PORT, 1) + b"\xA2" + le(IRQ_RX, 2)  # in RBR; mov [rx], al
    send = b"\xAC\x84\xC0"  # lodsb; test al, al
    thr = b"\xBA" + le(COM1_PORT, 2) + b"\xEE"  # out THR
    fin = out_dx(COM1_PORT + 1, 1, ier & ~0x02) + b"\xC6\x06" + le(IRQ_FLAG, 2) + b"\x01"  # THRE off; flag = 1
    eoi = b"\xB0\x20\xE6\x20\x5A\x58\xCF"  # EOI; pop dx, ax; iret
    # top jnz(eoi) rda jne(send) read_rx jmp(IIR read) send jz(fin) thr jmp(eoi) fin eoi: on an
    # edge-triggered PIC the handler must re-read IIR after RX, as THRE keeps the line high
    at_rda = len(top) + 2
    at_read = at_rda + len(rda) + 2
    at_send = at_read + len(read_rx) + 2
    at_fin = at_send + len(send) + 2 + len(thr) + 2
    at_eoi = at_fin + len(fin)
    h = bytearray(top) + jcc(0x75, at_eoi, len(top))
    h += rda + jcc(0x75, at_send, at_rda + len(rda))
    h += read_rx + jcc(0xEB, 2, at_read + len(read_rx))  # back to the IIR read: THRE may still be pending
    h += send + jcc(0x74, at_fin, at_send + len(send))
    h += thr + jcc(0xEB, at_eoi, at_send + len(send) + 2 + len(thr))
    h += fin + eoi
    assert len(h) == at_eoi + len(eoi)
    return bytes(main) + bytes(h), base + len(main)


def run_irq_tx(kvm, loop_cls, msg: bytes, feed: bytes = b""):
    """Run irq_tx_guest on an in-kernel irqchip; ``feed`` arrives from another thread mid-run."""
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        console = bytearray()
        pio, mmio = Bus("pio", 1 << 16), Bus("mmio", 1 << 64)
        uart = ConsoleUart(console.extend, irq_line=(vm, 4))
        done = Scratch(1)
        pio.register(COM1_PORT, 8, uart, "com1")
        pio.register(IRQ_DONE_PORT, 1, done, "done")
        code, handler = irq_tx_guest(0x1000, rx=bool(feed))
        cpu, mem = real_mode_vcpu(vm, code)
        mem.write(4 * (0x08 + 4), le(handler, 2) + le(0, 2))  # IVT: IRQ 4 -> vector 0x0C
        mem.write(IRQ_MSG, msg + b"\0")
        loop = loop_cls(RunLoop(pio, mmio), cpu)
        timer = threading.Timer(0.02, uart.feed, args=(feed,)) if feed else None
        if timer:
            timer.start()
        result = loop.run_until(lambda: done.mem[0] == 0xAA, timeout=20)
        if timer:
            timer.join()
        return bytes(console), loop.stats, result, uart.irq_level, mem.read(IRQ_RX, 1)


def test_interrupt_driven_transmit_is_answered_in_c_and_matches_python(kvm):
    msg = bytes(range(0x20, 0x7F)) * 2 + b"\n"
    (oc, sc, rc, lc, _), (op, sp, rp, lp, _) = [run_irq_tx(kvm, cls, msg) for cls in LOOPS]
    assert rc.status is rp.status is Status.PREDICATE
    assert oc == op == msg
    assert sc.exits == sp.exits and lc is lp is False
    # C: every THR write and IIR read (one per byte, one more for the last interrupt), both IER writes
    assert sc.c_handled["IO"] == 2 * len(msg) + 1 + 2
    assert sc.python_handled["IO"] == sp.python_handled["IO"] - sc.c_handled["IO"] == 3  # MCR, FCR, done


@pytest.mark.parametrize("loop_cls", LOOPS)
def test_input_during_interrupt_driven_transmit_is_not_lost(kvm, loop_cls):
    """A byte fed from another thread while C latches THRE and drives the line: the
    receive interrupt still arrives (one owner for the line level) and no output is lost."""
    msg = b"y" * 4000 + b"\n"
    out, stats, result, level, rx = run_irq_tx(kvm, loop_cls, msg, feed=b"Z")
    assert result.status is Status.PREDICATE
    assert out == msg and rx == b"Z" and level is False


def test_ignored_and_counter_ports_never_reach_python(vm):
    code = PROLOGUE + out_dx(0x80, 1, 0x42) * 5 + in_dx(0x80, 1) + store_es(1, RESULTS) \
        + in_dx(0x14, 4) + store_es(4, RESULTS + 4) + out_dx(0x1c, 2, 7) + HLT
    m, loop, result, mem = run_guest(vm, CRunLoop, code)
    assert result.status is Status.EXIT and result.exit.name == "HLT"
    assert loop.stats.c_handled["IO"] == 8 and loop.stats.python_handled["IO"] == 0
    assert (m.post.writes, m.post.reads, m.pio_counter.reads, m.pio_counter.writes) == (5, 1, 1, 1)
    assert mem.read(RESULTS, 1) == b"\xff" and mem.read_u32(RESULTS + 4) == 0x1234_5678


def test_c_and_python_loops_agree(kvm):
    accesses = [Access(False, 0x80, 1, True, 1), Access(False, 0x10, 2, False, 0),
                Access(False, 0x302, 2, True, 0xBEEF), Access(False, 0x302, 2, False, 0),
                Access(True, 0x108, 4, False, 0), Access(True, 0x1010, 4, True, 0x11223344),
                Access(True, 0x1010, 2, False, 0), Access(False, COM1_PORT, 1, True, ord("x")),
                Access(False, 0x9999, 4, False, 0), Access(True, 0x8000, 8 // 2, False, 0)]
    code = assemble(accesses)
    runs = [fresh_run(kvm, cls, code) for cls in LOOPS]
    (mc, sc, rc, memc), (mp, sp, rp, memp) = runs
    assert rc.status is rp.status is Status.EXIT and rc.exit == rp.exit
    assert sc.exits == sp.exits
    assert mc.observable() == mp.observable()
    assert memc == memp
    assert memp[4:6] == le(0x1234_5678, 2) and memp[4 * 4:4 * 4 + 4] == le(0xDEAD_BEEF, 4)
    assert memp[4 * 6:4 * 6 + 2] == le(0x3344, 2)
    # in C: the writes to 0x80 and the UART, the read of 0x10, the MMIO counter read
    assert (sc.c_handled["IO"], sc.c_handled["MMIO"]) == (3, 1) and sum(sp.c_handled.values()) == 0


@pytest.mark.parametrize("loop_cls", LOOPS)
def test_unclaimed_port_and_unmapped_mmio_read_all_ones(vm, loop_cls):
    accesses = [Access(False, 0x9999, 4, False, 0), Access(True, 0x4000, 2, False, 0),
                Access(False, 0x9999, 1, True, 5), Access(True, 0x4000, 1, True, 5)]
    m, loop, result, mem = run_guest(vm, loop_cls, assemble(accesses))
    assert result.status is Status.EXIT and result.exit.name == "HLT"
    assert mem.read_u32(RESULTS) == 0xFFFF_FFFF and mem.read_u16(RESULTS + 4) == 0xFFFF
    assert (m.pio.unclaimed, m.mmio.unclaimed) == (2, 2)


@pytest.mark.parametrize("loop_cls", LOOPS)
def test_kick_from_another_thread_stops_a_spinning_guest(vm, loop_cls):
    cpu, _ = real_mode_vcpu(vm, JMP_SELF)
    loop = loop_cls(RunLoop(Bus("pio", 1 << 16), Bus("mmio", 1 << 64)), cpu)
    threading.Timer(0.2, loop.kick).start()
    t0 = time.monotonic()
    result = loop.run_until(timeout=10)
    assert result.status is Status.INTERRUPTED and time.monotonic() - t0 < 5
    assert not cpu.immediate_exit  # the kick is consumed: the next run enters the guest
    assert loop.run_until(timeout=0.2).status is Status.DEADLINE
    threading.Timer(0.1, loop.stop).start()
    assert loop.run_until(timeout=10).status is Status.STOPPED
    assert loop.run_until(timeout=10).status is Status.STOPPED


@pytest.mark.parametrize("loop_cls", LOOPS)
def test_exit_budget_bounds_a_run(vm, loop_cls):
    code = b"\xE6\x80\xEB\xFC"  # l: out 0x80, al ; jmp l
    cpu, _ = real_mode_vcpu(vm, code)
    pio = Bus("pio", 1 << 16)
    post = ConstantDevice()
    pio.register(0x80, 1, post)
    loop = loop_cls(RunLoop(pio, Bus("mmio", 1 << 64)), cpu)
    assert loop.run_until(max_exits=100, timeout=10).status is Status.MAX_EXITS
    assert post.writes == 100 and loop.stats.exits["IO"] == 100


@pytest.mark.parametrize("loop_cls", LOOPS)
def test_failing_handler_stops_the_loop_without_raising(vm, loop_cls, caplog):
    """The handler for HLT (exit reason 5) runs, raises, and the loop ends with that exit."""
    cpu, _ = real_mode_vcpu(vm, HLT)
    calls = []

    def broken(ex):
        calls.append(ex.name)
        raise RuntimeError("handler bug")

    desc = RunLoop(Bus("pio", 1 << 16), Bus("mmio", 1 << 64), handlers={5: broken})
    result = loop_cls(desc, cpu).run_until(timeout=10)
    assert calls == ["HLT"] and "exit handler for HLT failed" in caplog.text
    assert result.status is Status.EXIT and result.exit.name == "HLT"


# -- hypothesis: random port and MMIO accesses -------------------------------------
SIZES = st.sampled_from([1, 2, 4])
PORTS = st.one_of(st.sampled_from([0x80, 0x10, 0x1c, 0x300, 0x30c, COM1_PORT, COM1_PORT + 1, COM1_PORT + 2,
                                    COM1_PORT + 5, COM1_PORT + 6, COM1_PORT + 3, COM1_PORT + 4]),
                  st.integers(0, 0xFFFC))
MMIO_OFFSETS = st.one_of(st.sampled_from([0x100, 0x1f8, 0x1000, 0x10f8, 0x40]), st.integers(0, 0x7FF8))


@st.composite
def accesses(draw) -> Access:
    mmio = draw(st.booleans())
    size = draw(SIZES)
    addr = draw(MMIO_OFFSETS if mmio else PORTS)
    return Access(mmio, addr - addr % size, size, draw(st.booleans()), draw(st.integers(0, ALL_ONES)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # one Kvm for all
@given(st.lists(accesses(), min_size=1, max_size=24))
def test_random_accesses_both_loops_survive_and_agree(kvm, program):
    code = assemble(program)
    (mc, sc, rc, memc), (mp, sp, rp, memp) = [fresh_run(kvm, cls, code) for cls in LOOPS]
    assert rc.status is rp.status is Status.EXIT and rc.exit.name == rp.exit.name == "HLT"
    assert sc.exits == sp.exits
    assert mc.observable() == mp.observable()
    assert memc == memp


@pytest.mark.parametrize("loop_cls", LOOPS)
def test_run_on_a_closed_vcpu_raises_instead_of_touching_its_page(vm, loop_cls):
    cpu, _ = real_mode_vcpu(vm, HLT)
    loop = loop_cls(RunLoop(Bus("pio", 1 << 16), Bus("mmio", 1 << 64)), cpu)
    cpu.close()
    with pytest.raises(OSError):
        loop.run_until(timeout=1)


def test_two_vcpus_share_the_uart_ring_without_losing_bytes(vm):
    """Each vCPU thread runs its own C loop; both append to the machine's one UART ring."""
    m = Machine()
    n = 300

    def spin(ch: int) -> bytes:  # mov cx,n; mov dx,COM1; mov al,ch; l: out dx,al; loop l; hlt
        return b"\xB9" + le(n, 2) + b"\xBA" + le(COM1_PORT, 2) + bytes([0xB0, ch]) + b"\xEE\xE2\xFD" + HLT

    cpu0, mem = real_mode_vcpu(vm, spin(ord("a")))
    mem.write(0x2000, spin(ord("b")))
    cpu1 = vm.create_vcpu(1)
    s = cpu1.get_sregs()
    s.cs.base = s.cs.selector = 0
    cpu1.set_sregs(s)
    r = cpu1.get_regs()
    r.rip, r.rflags = 0x2000, 2
    cpu1.set_regs(r)
    desc = RunLoop(m.pio, m.mmio)
    loops = [CRunLoop(desc, cpu0), CRunLoop(desc, cpu1)]
    results = [None, None]

    def run(i):
        results[i] = loops[i].run_until(timeout=20)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r.exit.name for r in results] == ["HLT", "HLT"]
    assert sorted(bytes(m.console)) == sorted(b"a" * n + b"b" * n)
    assert sum(loop.stats.c_handled["IO"] for loop in loops) == 2 * n
