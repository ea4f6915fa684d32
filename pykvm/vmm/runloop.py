"""The vCPU run loop: enter the guest, route each exit, repeat.

One ``RunLoop`` description (the machine's PIO and MMIO buses, exit handlers)
drives two implementations that behave the same:

- ``CRunLoop``: ``pykvm_runloop_run()`` (csrc/runloop.c) calls KVM_RUN without
  the GIL and answers the frequent, simple exits in C: accesses to ranges whose
  device is a ``ConstantDevice`` (ignored ports, counters) and, while the 16550
  model says it is safe, THR writes (into a ring Python drains) and LSR and MSR reads;
  and IIR reads and IER reads and writes, latching THRE and driving the UART's
  interrupt line with KVM_IRQ_LINE as the model would (interrupt-driven
  transmit, with the 8250 driver's THRI toggling, stays in C).
  Every other exit comes back here and takes the Python path.
- ``PyRunLoop``: ``Vcpu.run()`` and the same Python path for every exit.

The Python path is one walk: IO/MMIO exit -> the bus that owns the address ->
the device -> the bytes of a read written into the exit's data. Other exits go
to ``handlers[reason]`` or ``on_unhandled`` (default: stop and report); a
handler that raises is logged and stops the loop. Nothing a guest does raises
out of ``run_until``.

``kick()`` and ``stop()`` may be called from any thread: ``kick`` makes the
current ``run_until`` return INTERRUPTED, ``stop`` makes it (and every later
one) return STOPPED.
"""
from __future__ import annotations

import enum
import os
import select
import threading
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from pykvm._log import get_logger
from pykvm._native import ffi, lib
from pykvm._record import record_eq, record_repr
from pykvm.errors import KvmError, ioctl_error
from pykvm.kvm import exits
from pykvm.kvm.exits import Exit, IoExit, MmioExit
from pykvm.kvm.vcpu import Vcpu
from pykvm.kvm.watchdog import WATCHDOG
from pykvm.vmm.bus import Bus

log = get_logger(__name__)

ALL_ONES = (1 << 64) - 1
_COUNTER_LOCK = threading.Lock()
NREASONS = lib.PYKVM_RL_NREASONS
UART_LSR = 5


class ConstantDevice:
    """A range answered without state: reads return the low bytes of ``value``
    (little-endian, per access), writes are dropped; both are counted.

    The C loop answers such ranges itself; ``ALL_ONES`` makes an ignored range
    (what an absent device reads as on a PC)."""

    def __init__(self, value: int = ALL_ONES):
        self.value = value & ALL_ONES
        self.reads = 0
        self.writes = 0

    def read(self, offset: int, size: int) -> bytes:
        self.reads += 1
        return (self.value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1


class FastPathUart(Protocol):
    """What a UART model offers for the C fast path (duck-typed; see pykvm.vmm.console.ConsoleUart)."""

    fast_path: Optional["UartFastPath"]  # set once: the model publishes to it and takes over from it
    irq_line: Optional[Tuple[object, int]]  # (vm, gsi) C may drive with KVM_IRQ_LINE, or None
    irq_level: bool  # the interrupt line's level

    def fast_path_state(self) -> tuple:
        """(tx_ok, lsr, msr, irq_mode, iir_fifo, other_sources, line_enable): see struct pykvm_rl_uart."""

    def emit(self, data: bytes) -> None:
        """Send bytes written to THR through the fast path to the model's output."""


class UartFastPath:
    """The C side of a 16550 fast path (``struct pykvm_rl_uart``), one per machine:
    every vCPU's C loop appends transmitted bytes to its ring; ``drain()`` (any
    thread) hands them to the model's output in order. In interrupt-driven
    transmit C also latches and acknowledges THRE, keeps IER and drives the UART's line."""

    FLUSH_INTERVAL = 0.02  # seconds from C's first queued byte to the drain (lets a line complete)
    IDLE_EXIT = 1.0  # the drain thread ends this long after the last loop left

    def __init__(self, base: int, model: FastPathUart, flush_on_newline: bool = True):
        self.model = model
        self.c = ffi.new("struct pykvm_rl_uart *")
        self.c.base = base
        self.c.flush_on_newline = int(flush_on_newline)
        self.c.vm_fd = -1
        self.c.notify_fd = -1
        self.c.level = int(model.irq_level)  # the line as the model left it: C drives it from here
        self._vm = None
        if model.irq_line is not None:
            self._vm, gsi = model.irq_line
            self.c.vm_fd, self.c.gsi = self._vm.fileno(), gsi
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._active = 0  # loops inside run_until
        self._stopping = False  # stop(): the drain thread ends without waiting IDLE_EXIT
        self._flusher: Optional[threading.Thread] = None
        self._buf = ffi.new("uint8_t[]", lib.PYKVM_RL_UART_RING)
        model.fast_path = self

    def publish(self, state: tuple, thre_pending: Optional[bool], ier: Optional[int]) -> bool:
        """The model's new state (``thre_pending``, ``ier`` None: keep C's); returns the line's level."""
        tx_ok, lsr, msr, irq_mode, iir_fifo, other, line_enable = state
        if self._vm is not None and self._vm.closed:
            self.c.vm_fd = -1  # input fed after the machine closed: the fd number may be reused
        rc = lib.pykvm_uart_publish(self.c, int(tx_ok), lsr, msr, int(irq_mode), iir_fifo,
                                    -1 if ier is None else ier, other, int(line_enable),
                                    -1 if thre_pending is None else int(thre_pending))
        if rc < 0:
            log.warning("UART interrupt line: %s", ioctl_error(KvmError, -rc, "KVM_IRQ_LINE"))
            return bool(self.c.level)
        return bool(rc)

    def c_state(self) -> Tuple[bool, int, bool]:
        """(THRE latched, IER, line level) as C left them, read at one instant."""
        state = lib.pykvm_uart_take(self.c)
        return bool(state & lib.PYKVM_RL_UART_THRE), state & 0x0F, bool(state & lib.PYKVM_RL_UART_LEVEL)

    def enter(self) -> None:
        """A loop starts running: keep one drain thread alive (not one per run_until)."""
        with self._cond:
            self._active += 1
            if self._flusher is None:
                # C signals this eventfd when output waits without a newline; the thread
                # sleeps on it, so an idle guest costs no wakeups (a 50 Hz poll cost ~3% of
                # the lab's L1 CPU during passthrough DMA).
                self._notify = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self.c.notify_fd = self._notify
                self._flusher = threading.Thread(target=self._flush_loop, daemon=True, name="pykvm-uart-drain")
                self._flusher.start()

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            os.eventfd_write(self._notify, 1)  # the thread re-checks _active (the fd is open: it
            self._cond.notify_all()            # is closed only under this lock with no loop active)
        self.drain()

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                if not self._active:
                    if not self._stopping:
                        self._cond.wait(self.IDLE_EXIT)
                    if not self._active:  # no C loop runs (enter() takes this lock): C cannot signal
                        self.c.notify_fd = -1
                        os.close(self._notify)
                        self._flusher = None
                        return
            select.select([self._notify], [], [])
            try:
                os.eventfd_read(self._notify)
            except BlockingIOError:
                pass
            time.sleep(self.FLUSH_INTERVAL)
            self.drain()

    def stop(self, timeout: float = 2.0) -> None:
        """End the drain thread now and close its eventfd, if no loop runs (the machine's
        close: its resources go with it, not IDLE_EXIT later). A later enter() starts another."""
        with self._cond:
            flusher = self._flusher
            if self._active or flusher is None or flusher is threading.current_thread():
                return
            self._stopping = True
            os.eventfd_write(self._notify, 1)  # out of select(); open while _flusher is set (closed under this lock)
            self._cond.notify_all()
        flusher.join(timeout)
        with self._cond:
            self._stopping = False

    def drain(self) -> None:
        """Send the bytes C queued to the model's output. Any thread."""
        with self._lock:
            while True:
                n = lib.pykvm_uart_drain(self.c, self._buf, lib.PYKVM_RL_UART_RING)
                if not n:
                    return
                self.model.emit(bytes(ffi.buffer(self._buf, n)))


Handler = Callable[[Exit], bool]  # returns True to stop the loop


def stop_and_report(ex: Exit) -> bool:
    """Default for exits nobody handles (SHUTDOWN, SYSTEM_EVENT, FAIL_ENTRY, ...): stop."""
    log.info("vCPU exit %s stops the run loop: %r", ex.name, ex)
    return True


class RunLoop:
    """What both loops share: buses, exit handlers, and the ranges C may answer."""

    __slots__ = ("pio", "mmio", "handlers", "on_unhandled", "uart_flush_on_newline", "_uart")
    pio: Bus
    mmio: Bus
    handlers: Dict[int, Handler]
    on_unhandled: Handler
    uart_flush_on_newline: bool
    _uart: Optional[UartFastPath]  # made by fast_uart() (not in repr)

    _repr_fields = ("pio", "mmio", "handlers", "on_unhandled", "uart_flush_on_newline")
    _eq_fields = _repr_fields + ("_uart",)

    def __init__(self, pio: Bus, mmio: Bus, handlers: Optional[Dict[int, Handler]] = None,
                 on_unhandled: Handler = stop_and_report, uart_flush_on_newline: bool = True) -> None:
        self.pio = pio
        self.mmio = mmio
        self.handlers = {} if handlers is None else handlers
        self.on_unhandled = on_unhandled
        self.uart_flush_on_newline = uart_flush_on_newline
        self._uart = None

    __repr__ = record_repr
    __eq__ = record_eq

    def constant_ranges(self) -> List[Tuple[int, "object"]]:
        """(space, Range) of every ConstantDevice on the buses: these the C loop answers."""
        out = [(lib.PYKVM_RL_SPACE_PIO, r) for r in self.pio.ranges() if isinstance(r.device, ConstantDevice)]
        out += [(lib.PYKVM_RL_SPACE_MMIO, r) for r in self.mmio.ranges() if isinstance(r.device, ConstantDevice)]
        return out

    def fast_uart(self) -> Optional[UartFastPath]:
        """The fast path of the first PIO device that offers one (made once, shared by all loops)."""
        if self._uart is None:
            for r in self.pio.ranges():
                if r.length > UART_LSR and all(hasattr(r.device, a) for a in ("fast_path_state", "emit", "fast_path")):
                    self._uart = UartFastPath(r.base, r.device, self.uart_flush_on_newline)
                    break
        return self._uart

    def dispatch(self, ex: Exit) -> bool:
        """Handle one exit on the Python path; True means stop the loop."""
        if isinstance(ex, IoExit):
            bus, size = self.pio, ex.size
            for i in range(ex.count):
                chunk = slice(i * size, (i + 1) * size)
                if ex.is_in:
                    ex.data[chunk] = bus.read(ex.port, size)
                else:
                    bus.write(ex.port, bytes(ex.data[chunk]))
            return False
        if isinstance(ex, MmioExit):
            if ex.is_write:
                self.mmio.write(ex.address, bytes(ex.data))
            else:
                ex.data[:] = self.mmio.read(ex.address, ex.length)
            return False
        handler = self.handlers.get(ex.reason, self.on_unhandled)
        try:
            return bool(handler(ex))
        except Exception:
            log.exception("exit handler for %s failed; stopping the run loop", ex.name)
            return True


class Status(enum.Enum):
    """Why ``run_until`` returned."""

    EXIT = "exit"                # a handler asked to stop on ``exit`` (or failed)
    STOPPED = "stopped"          # stop() was called
    INTERRUPTED = "interrupted"  # kick() (or another signal) interrupted KVM_RUN
    PREDICATE = "predicate"      # the caller's predicate became true
    DEADLINE = "deadline"        # the timeout passed
    MAX_EXITS = "max_exits"      # the exit budget is spent
    ERROR = "error"              # KVM_RUN failed (``error``)


class RunResult:
    """Why a run loop returned: its status, and the exit or the error that ended it."""

    __slots__ = ("status", "exit", "error")
    status: Status
    exit: Optional[Exit]
    error: Optional[OSError]

    _repr_fields = _eq_fields = __slots__

    def __init__(self, status: Status, exit: Optional[Exit] = None, error: Optional[OSError] = None) -> None:
        self.status = status
        self.exit = exit
        self.error = error

    __repr__ = record_repr
    __eq__ = record_eq


class RunStats:
    """Exits and time by reason name, like ``perf kvm stat``."""

    __slots__ = ("exits", "c_handled", "python_handled", "run_ns", "handle_ns")
    exits: Counter
    c_handled: Counter
    python_handled: Counter
    run_ns: Counter     # inside KVM_RUN, by the reason it ended with
    handle_ns: Counter  # in the VMM between that exit and the next entry

    _repr_fields = _eq_fields = __slots__

    def __init__(self, exits: Counter, c_handled: Counter, python_handled: Counter, run_ns: Counter,
                 handle_ns: Counter) -> None:
        self.exits = exits
        self.c_handled = c_handled
        self.python_handled = python_handled
        self.run_ns = run_ns
        self.handle_ns = handle_ns

    __repr__ = record_repr
    __eq__ = record_eq

    def table(self) -> str:
        lines = [f"{'reason':<16}{'exits':>10}{'in C':>10}{'in Py':>10}{'guest ms':>11}{'vmm ms':>10}{'vmm us/exit':>12}"]
        for name, n in self.exits.most_common():
            h = self.handle_ns[name]
            lines.append(f"{name:<16}{n:>10}{self.c_handled[name]:>10}{self.python_handled[name]:>10}"
                         f"{self.run_ns[name] / 1e6:>11.2f}{h / 1e6:>10.2f}{h / 1e3 / n:>12.2f}")
        return "\n".join(lines)


_TICKS0 = (lib.pykvm_ticks(), time.monotonic_ns())


def ns_per_tick() -> float:
    """The TSC rate the C loop's times are in, measured against CLOCK_MONOTONIC
    since import (waiting until 10 ms have passed, for precision)."""
    while True:
        t1, n1 = lib.pykvm_ticks(), time.monotonic_ns()
        if n1 - _TICKS0[1] >= 10_000_000 and t1 > _TICKS0[0]:
            return (n1 - _TICKS0[1]) / (t1 - _TICKS0[0])
        time.sleep(0.01)


def _slot_name(slot: int) -> str:
    return exits.reason_name(slot) if slot < NREASONS - 1 else "OTHER"


class _Loop:
    """The parts both loops share: control from other threads, budget, deadline, stats."""

    def __init__(self, desc: RunLoop, vcpu: Vcpu):
        self.desc = desc
        self.vcpu = vcpu
        self._stopped = False

    def kick(self) -> None:
        """Make the current (or next) ``run_until`` return INTERRUPTED. Any thread."""
        self.vcpu.kick()

    def stop(self) -> None:
        """Make ``run_until`` return STOPPED now and from now on. Any thread."""
        self._stopped = True
        self._set_stop_flag()
        self.vcpu.kick()

    def _set_stop_flag(self) -> None:
        pass

    def run_until(self, predicate: Optional[Callable[[], bool]] = None, timeout: Optional[float] = None,
                  max_exits: Optional[int] = None) -> RunResult:
        """Run the vCPU until a handler stops it, ``predicate()`` is true (checked
        after each exit Python sees), ``timeout`` seconds pass, ``max_exits``
        exits happened, or another thread calls kick()/stop()."""
        deadline = None if timeout is None else time.monotonic_ns() + int(timeout * 1e9)
        self.vcpu.fileno()  # a closed vCPU raises ClosedError here, as in Vcpu.run()
        fired: List[bool] = []

        def on_deadline() -> None:  # a guest that never exits still stops
            fired.append(True)
            self.vcpu.kick()

        token = None if timeout is None else WATCHDOG.arm(timeout, on_deadline)
        try:
            result = self._run(predicate, deadline, max_exits)
        finally:
            if token is not None:
                WATCHDOG.disarm(token)  # after this no kick can land in a later run
        if result.status is Status.INTERRUPTED:
            result.status = Status.STOPPED if self._stopped else Status.DEADLINE if fired else Status.INTERRUPTED
        if not self._stopped and (result.status in (Status.INTERRUPTED, Status.DEADLINE) or fired):
            self.vcpu.immediate_exit = False  # the kick is consumed
        return result

    def release(self) -> None:
        """Let go of what outlives runs (the C loop's UART drain thread); the loop may run again."""

    def _run(self, predicate, deadline, max_exits) -> RunResult:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def _make_stats(exits_: List[int], c_handled: List[int], run_ns: List[float], handle_ns: List[float]) -> RunStats:
        e, c, p, r, h = Counter(), Counter(), Counter(), Counter(), Counter()
        for slot in range(NREASONS):
            if exits_[slot]:
                name = _slot_name(slot)
                e[name] += exits_[slot]
                c[name] += c_handled[slot]
                p[name] += exits_[slot] - c_handled[slot]
                r[name] += int(run_ns[slot])
                h[name] += int(handle_ns[slot])
        return RunStats(e, c, p, r, h)


class PyRunLoop(_Loop):
    """The pure-Python loop: ``Vcpu.run()`` and the Python path for every exit."""

    def __init__(self, desc: RunLoop, vcpu: Vcpu):
        super().__init__(desc, vcpu)
        self._exits = [0] * NREASONS
        self._run_ns = [0] * NREASONS
        self._handle_ns = [0] * NREASONS

    def _run(self, predicate, deadline, max_exits) -> RunResult:
        left = max_exits
        vcpu, desc = self.vcpu, self.desc
        now = time.monotonic_ns
        last_slot, last_exit = -1, 0  # VMM time counts from an exit to the next entry, as in C
        while True:
            if self._stopped:
                return RunResult(Status.STOPPED)
            t0 = now()
            if last_slot >= 0:
                self._handle_ns[last_slot] += t0 - last_exit
            try:
                ex = vcpu.run()
            except OSError as exc:
                return RunResult(Status.ERROR, error=exc)
            last_exit = now()
            last_slot = min(ex.reason, NREASONS - 1)
            self._exits[last_slot] += 1
            self._run_ns[last_slot] += last_exit - t0
            if ex.reason == lib.KVM_EXIT_INTR:
                return RunResult(Status.INTERRUPTED, ex)
            if desc.dispatch(ex):
                return RunResult(Status.EXIT, ex)
            if left is not None:
                left -= 1
                if left <= 0:
                    return RunResult(Status.MAX_EXITS, ex)
            if predicate is not None and predicate():
                return RunResult(Status.PREDICATE, ex)
            if deadline is not None and last_exit >= deadline:
                return RunResult(Status.DEADLINE, ex)

    @property
    def stats(self) -> RunStats:
        return self._make_stats(self._exits, [0] * NREASONS, self._run_ns, self._handle_ns)


class CRunLoop(_Loop):
    """The C loop (csrc/runloop.c) with the Python path for the exits it returns."""

    def __init__(self, desc: RunLoop, vcpu: Vcpu):
        super().__init__(desc, vcpu)
        rl = ffi.new("struct pykvm_runloop *")
        rl.vcpu_fd = vcpu.fileno()
        rl.run = vcpu.kvm_run
        rl.run_size = vcpu.vm.kvm.vcpu_mmap_size
        rl.exits_left = ALL_ONES
        rl.last_reason = -1
        ranges = desc.constant_ranges()
        if len(ranges) > lib.PYKVM_RL_MAX_RANGES:
            raise ValueError(f"{len(ranges)} constant ranges; the C loop holds {lib.PYKVM_RL_MAX_RANGES}: "
                             "merge adjacent ones or use fewer")
        for i, (space, r) in enumerate(ranges):
            c = rl.ranges[i]
            c.base, c.length, c.value, c.space = r.base, r.length, r.device.value, space
        rl.nranges = len(ranges)
        self._ranges = [r for _, r in ranges]
        self._rl = rl
        self._uart = desc.fast_uart()
        if self._uart is not None:
            rl.uart = self._uart.c

    @property
    def uart_fast_path(self) -> bool:
        """Whether the C loop has a UART transmit fast path (the model supports it)."""
        return self._uart is not None

    def _set_stop_flag(self) -> None:
        self._rl.stop = 1

    def release(self) -> None:
        if self._uart is not None:
            self._uart.stop()

    def drain_uart(self) -> None:
        """Hand bytes the guest transmitted through C to the UART model's output. Any thread."""
        if self._uart is not None:
            self._uart.drain()

    def _collect_counters(self) -> None:
        rl = self._rl
        with _COUNTER_LOCK:  # vCPU threads of one machine share the devices
            for i, r in enumerate(self._ranges):
                c = rl.ranges[i]
                r.device.reads += c.reads
                r.device.writes += c.writes
                c.reads = c.writes = 0

    def _run(self, predicate, deadline, max_exits) -> RunResult:
        rl, vcpu, desc = self._rl, self.vcpu, self.desc
        rl.exits_left = ALL_ONES if max_exits is None else max(max_exits, 1)
        rl.deadline_ns = deadline or 0  # C compares the coarse clock: at most a tick late
        if self._uart is not None:
            self._uart.enter()
        try:
            # the vCPU's run protocol: kick() signals this thread, close() waits for it, and
            # run_c/page keep the kvm_run page mapped for C and the exits until the loop returns
            _fd, run_c, page = vcpu._enter_run()
            try:
                return self._loop(rl, run_c, page, desc, predicate)
            finally:
                vcpu._leave_run()
        finally:
            rl.last_reason = -1
            if self._uart is not None:
                self._uart.leave()  # drains what C queued
            self._collect_counters()

    def _loop(self, rl, run_c: Any, page: memoryview, desc: RunLoop, predicate) -> RunResult:
        while True:
            status = lib.pykvm_runloop_run(rl)
            if status == lib.PYKVM_RL_EXIT:
                ex = exits.decode(run_c, page)
                self.drain_uart()  # bytes C queued come out before anything this exit sends
                if desc.dispatch(ex):
                    return RunResult(Status.EXIT, ex)
                if rl.exits_left == 0:
                    return RunResult(Status.MAX_EXITS, ex)
                if rl.deadline_ns and time.monotonic_ns() >= rl.deadline_ns:
                    return RunResult(Status.DEADLINE, ex)
            elif status == lib.PYKVM_RL_UART_FLUSH:
                self.drain_uart()
                if rl.exits_left == 0:
                    return RunResult(Status.MAX_EXITS)
            elif status == lib.PYKVM_RL_INTERRUPTED:
                return RunResult(Status.INTERRUPTED, exits.InterruptedExit(lib.KVM_EXIT_INTR))
            elif status == lib.PYKVM_RL_STOPPED:
                return RunResult(Status.STOPPED)
            elif status == lib.PYKVM_RL_BUDGET:
                return RunResult(Status.MAX_EXITS)
            elif status == lib.PYKVM_RL_DEADLINE:
                return RunResult(Status.DEADLINE)
            else:
                return RunResult(Status.ERROR, error=ioctl_error(KvmError, rl.last_errno, "KVM_RUN"))
            if predicate is not None and predicate():
                return RunResult(Status.PREDICATE)

    @property
    def stats(self) -> RunStats:
        rl, k = self._rl, ns_per_tick()
        return self._make_stats(list(rl.exits), list(rl.c_handled), [t * k for t in rl.run_ticks],
                                [t * k for t in rl.handle_ticks])
