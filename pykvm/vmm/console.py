"""The guest's console: where the 16550's output goes and where its input comes from.

A :class:`Console` is an output sink (``write``) plus an input queue that an
input thread feeds into the UART as its receive FIFO has room: the UART
takes what fits (``feed`` returns the count) and calls ``rx_space`` when the
guest has read, which wakes the input thread. Implementations:

- :class:`StdioConsole`: this terminal. On a tty, stdin goes to raw mode (so
  Ctrl-C reaches the guest) and ``Ctrl-A x`` quits, as in QEMU; ``Ctrl-A a``
  sends a literal Ctrl-A. The terminal is restored by ``close()``, which the
  machine calls on every way out, and by an ``atexit`` hook as a last resort.
  While it is raw, what the VMM writes to ``sys.stderr`` on that terminal (its
  log messages, a traceback) has each newline turned into CR LF, so it does not
  come out as a staircase over the guest's output.
- :class:`FileConsole`: output appended to a file, no input (``file:PATH``). A
  file it created is removed again if the machine never connected it (the run
  failed before any vCPU ran).
- :class:`BufferConsole`: output kept in memory, input given with ``send()``:
  for tests and for programs driving a guest.

:class:`ConsoleUart` is the 16550 model with the hooks the C run loop's
transmit fast path asks for (see pykvm.vmm.runloop), so console output does
not cost a trip through Python per byte.
"""
from __future__ import annotations

import atexit
import errno
import os
import select
import sys
import termios
import threading
import tty
from typing import Any, Callable, NamedTuple, Optional, Tuple

from pykvm.vmm.devices.serial import (
    FCR_ENABLE, IER_THRE, IIR_FIFO_ENABLED, LCR_DLAB, LSR_BI, LSR_OE, MCR_LOOP, MCR_OUT2, Serial16550,
)

ESCAPE = 0x01  # Ctrl-A
ESCAPE_QUIT = ord("x")
ESCAPE_LITERAL = ord("a")
_READ_POLL = 0.5  # seconds the stdin reader waits before checking whether the console closed

Feed = Callable[[bytes], int]


class Console:
    """Output sink and input queue. Subclasses implement ``write`` and may start a reader."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._feed: Optional[Feed] = None
        self._pump: Optional[threading.Thread] = None
        self.on_quit: Callable[[], None] = lambda: None  # the user asked to leave (escape key)

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def connect(self, feed: Feed) -> None:
        """Start delivering input through ``feed`` (the UART's ``feed``)."""
        self._feed = feed
        self._pump = threading.Thread(target=self._pump_input, name="pykvm-console-input", daemon=True)
        self._pump.start()

    def rx_space(self) -> None:
        """The guest read from the receive FIFO: there may be room for more input."""
        self._wake.set()

    def send(self, data: bytes) -> None:
        """Queue bytes for the guest to read from the UART."""
        with self._lock:
            self._pending += data
        self._wake.set()

    def _pump_input(self) -> None:
        while not self._closed.is_set():
            self._wake.wait()  # send(), rx_space() and close() set it: no polling
            self._wake.clear()
            with self._lock:
                data = bytes(self._pending)
            if data and self._feed is not None:
                taken = self._feed(data)
                with self._lock:
                    del self._pending[:taken]

    def close(self) -> None:
        """Stop the input thread (idempotent)."""
        self._closed.set()
        self._wake.set()
        if self._pump is not None and self._pump is not threading.current_thread():
            self._pump.join(1.0)


class BufferConsole(Console):
    """Output collected in memory (``output``), input from ``send()``."""

    def __init__(self, echo: Optional[Callable[[bytes], None]] = None) -> None:
        super().__init__()
        self._out = bytearray()
        self._cond = threading.Condition()
        self._echo = echo

    def write(self, data: bytes) -> None:
        with self._cond:
            self._out += data
            self._cond.notify_all()
        if self._echo is not None:
            self._echo(data)

    @property
    def output(self) -> bytes:
        with self._cond:
            return bytes(self._out)

    def wait_for(self, needle: bytes, timeout: float) -> bool:
        """Wait until ``needle`` appeared in the output; False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: needle in self._out, timeout)


class FileConsole(Console):
    """Output appended to ``path``; the guest gets no input. A file this console created
    is removed by ``close()`` if it was never connected (the machine did not run)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.created = False
        try:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
                self.created = True
            except FileExistsError:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError as exc:
            raise ValueError(f"cannot open console file {path!r}: {exc.strerror}") from None
        self._file = open(fd, "ab", buffering=0)

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def close(self) -> None:
        super().close()
        if self._file.closed:
            return
        self._file.close()
        if self.created and self._pump is None:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class StdioConsole(Console):
    """This process's stdout and stdin; raw mode and the Ctrl-A escape on a terminal."""

    def __init__(self, stdin: int = 0, stdout: int = 1) -> None:
        super().__init__()
        self._in, self._out = stdin, stdout
        self._saved: Optional[list] = None
        self._escape = False
        self._reader: Optional[threading.Thread] = None
        self._stderr: Any = None  # sys.stderr as it was, while ours translates newlines
        self._gone = False  # stdout went away (a closed pipe, a terminal that hung up)

    def write(self, data: bytes) -> None:
        if self._gone:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._out, view):]
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.EIO):
                raise
            self._gone = True  # nobody reads the guest's output any more: drop it

    def connect(self, feed: Feed) -> None:
        super().connect(feed)
        if os.isatty(self._in):
            self._saved = termios.tcgetattr(self._in)
            atexit.register(self._restore)
            tty.setraw(self._in)
            if _same_terminal(sys.stderr, self._in):
                self._stderr, sys.stderr = sys.stderr, RawTerminalText(sys.stderr)
        self._reader = threading.Thread(target=self._read_input, name="pykvm-stdin", daemon=True)
        self._reader.start()

    def _read_input(self) -> None:
        while not self._closed.is_set():
            try:
                ready, _, _ = select.select([self._in], [], [], _READ_POLL)
                if not ready:
                    continue
                data = os.read(self._in, 1024)
            except OSError:
                return
            if not data:
                return  # EOF: no more input (e.g. stdin is /dev/null)
            self.send(self._unescape(data) if self._saved is not None else data)

    def _unescape(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._escape:
                self._escape = False
                if b == ESCAPE_QUIT:
                    self.on_quit()
                elif b in (ESCAPE_LITERAL, ESCAPE):
                    out.append(ESCAPE)
            elif b == ESCAPE:
                self._escape = True
            else:
                out.append(b)
        return bytes(out)

    def _restore(self) -> None:
        if self._stderr is not None:
            if isinstance(sys.stderr, RawTerminalText) and sys.stderr.stream is self._stderr:
                sys.stderr = self._stderr
            self._stderr = None
        if self._saved is not None:
            try:
                termios.tcsetattr(self._in, termios.TCSADRAIN, self._saved)
            except termios.error:
                pass
            self._saved = None

    def close(self) -> None:
        super().close()
        self._restore()
        atexit.unregister(self._restore)


def open_console(spec: str) -> Console:
    """``stdio``, ``file:PATH`` or ``none`` (output discarded) -> a Console."""
    if spec == "stdio":
        return StdioConsole()
    if spec == "none":
        return FileConsole(os.devnull)
    if spec.startswith("file:") and len(spec) > 5:
        return FileConsole(spec[5:])
    raise ValueError(f"unknown console {spec!r}: use stdio, file:PATH or none")


class FastPathState(NamedTuple):
    """What the C run loop may answer on its own (see csrc/runloop.h struct pykvm_rl_uart)."""

    tx_ok: bool          # a THR write only transmits (polled mode)
    lsr: int             # LSR value if reading it has no side effect, else -1
    msr: int             # MSR value if reading it has no side effect (no deltas to clear), else -1
    irq_mode: bool       # C answers THR (latching THRE), IIR, IER reads and writes, and drives the line
    iir_fifo: int        # IIR bits 6-7
    other_sources: int   # IER bits RLS, RDA, MSI whose condition holds (C gates them with its IER)
    line_enable: bool    # OUT2 set, loopback off


class ConsoleUart(Serial16550):
    """The 16550 with the C run loop's fast-path hooks (duck-typed by pykvm.vmm.runloop).

    ``irq_line=(vm, gsi)`` wires the interrupt to KVM_IRQ_LINE on the VM, which
    C can drive too. Once a fast path attaches (``fast_path``), every register
    access and ``feed`` first takes over what C did (THRE latched by THR
    writes and IER writes enabling THRI, acknowledged by IIR reads; IER; the
    line level), then publishes the new state, under the model's lock; if C
    can drive the line, the publish drives it, so the level has one owner.
    THRE and IER are published only if the model changed them: C may have
    changed them meanwhile for another vCPU, and a value the model merely
    took over must not overwrite a newer one (``feed`` never changes them).
    """

    def __init__(self, output: Callable[[bytes], None], irq: Optional[Callable[[bool], None]] = None,
                 on_rx_space: Optional[Callable[[], None]] = None, irq_line: Optional[Tuple[Any, int]] = None):
        if irq_line is not None and irq is None:
            vm, gsi = irq_line
            irq = lambda level: vm.irq_line(gsi, int(level))  # noqa: E731
        super().__init__(output, irq, on_rx_space)
        self.irq_line = irq_line
        self._fast_path: Any = None
        self._taken: Optional[Tuple[bool, int]] = None  # (THRE, IER) as taken over; None: publish both

    @property
    def fast_path(self) -> Any:
        return self._fast_path

    @fast_path.setter
    def fast_path(self, fast_path: Any) -> None:
        with self._lock:
            self._fast_path = fast_path
            self._publish()

    @property
    def irq_level(self) -> bool:
        """The interrupt line's level: as C last drove it, once C owns the line."""
        with self._lock:
            return self._fast_path.c_state()[2] if self._c_owns_line() else self._level

    def _c_owns_line(self) -> bool:
        return self._fast_path is not None and (self._irq is None or self.irq_line is not None)

    def fast_path_state(self) -> FastPathState:
        with self._lock:
            tx = not (self._lcr & LCR_DLAB or self._ier & IER_THRE or self._mcr & MCR_LOOP)
            irq_mode = not self._lcr & LCR_DLAB and not self._mcr & MCR_LOOP and self._c_owns_line()
            return FastPathState(tx, -1 if self._lsr & (LSR_OE | LSR_BI) else self._lsr,
                                 -1 if self._msr_deltas else self._modem_status(), irq_mode,
                                 IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0,
                                 self._other_sources(),
                                 bool(self._mcr & MCR_OUT2) and not self._mcr & MCR_LOOP)

    def emit(self, data: bytes) -> None:
        """Bytes the guest wrote to THR through the C fast path."""
        self._output(data)

    def _take_over(self) -> None:
        """Adopt what C changed since the last publish (in interrupt mode C owns THRE, IER and the line)."""
        if self._c_owns_line():
            self._thr_pending, self._ier, self._level = self._fast_path.c_state()
        self._taken = (self._thr_pending, self._ier)

    def _update_irq(self) -> None:
        if not self._c_owns_line():
            super()._update_irq()

    def _publish(self) -> None:
        """Tell C the new state: THRE and IER only if changed since ``_take_over``."""
        taken, self._taken = self._taken, None
        if self._fast_path is not None:
            thre = None if taken is not None and taken[0] == self._thr_pending else self._thr_pending
            ier = None if taken is not None and taken[1] == self._ier else self._ier
            level = self._fast_path.publish(self.fast_path_state(), thre, ier)
            if self._c_owns_line():
                self._level = level

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            self._take_over()
            out = super().read(offset, size)
            self._publish()
        return out

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._take_over()
            super().write(offset, data)
            self._publish()

    def feed(self, data: bytes) -> int:
        with self._lock:
            self._take_over()
            taken = super().feed(data)
            self._publish()
        return taken


def _same_terminal(stream: Any, tty_fd: int) -> bool:
    """Whether ``stream`` (sys.stderr) writes to the terminal open as ``tty_fd``."""
    try:
        fd = stream.fileno()
        return os.isatty(fd) and os.fstat(fd).st_rdev == os.fstat(tty_fd).st_rdev
    except (AttributeError, OSError, ValueError):
        return False


class RawTerminalText:
    """A text stream (sys.stderr) for a terminal in raw mode, where output processing is off
    and LF only moves down a line: each newline written goes out as CR LF. Python's logging
    (its last-resort handler looks up sys.stderr for every message), warnings and tracebacks
    all write through it."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text.replace("\r\n", "\n").replace("\n", "\r\n"))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, ...
        return getattr(self.stream, name)
