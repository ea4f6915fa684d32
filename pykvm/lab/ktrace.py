"""Where a nested guest's time goes, seen from L1's kernel: its ``kvm_exit``/``kvm_entry`` trace.

L1's KVM logs every VM exit (reason, guest RIP) and every re-entry in the kernel's trace
buffer (tracefs, ``events/kvm``). From those two events alone, for any VMM (pykvm, QEMU)
and the same way for both: between an entry and the next exit the guest runs; between an
exit and the next entry L1 handles the exit (in its kernel, or in the VMM's user space, or
it runs something else meanwhile). ``kvm_exit`` arrives at least at every L1 timer tick
while the guest runs, so its RIPs are also a sampling profile of the guest.

:class:`ExitTrace` records (root in L1: tracefs is mounted if it is not), and
:func:`summarize` cuts the record into :class:`Window` s: named by the markers written
with :meth:`ExitTrace.mark`, or, for a boot, by what the guest was running
(:func:`boot_phase`: firmware below 1 MiB, the bzImage decompressor at other physical
addresses, the kernel in the upper half). Parsing is pure and unit-tested; the lab tests
check it against a guest whose exits are known.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("kvm/kvm_exit", "kvm/kvm_entry")
START = "pykvm-trace-start"
KERNEL_HALF = 0xFFFF_8000_0000_0000
LOW_MEMORY = 0x10_0000

# "<comm>-<pid> [cpu] flags <seconds>: <event>: <text>", the trace file's line format.
_LINE = re.compile(r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+\[\d+\]\s+\S+\s+(?P<ts>\d+\.\d+):\s+(?P<event>\w+):\s?(?P<text>.*)$")
_EXIT = re.compile(r"reason (?P<reason>\S+) rip 0x(?P<rip>[0-9a-f]+)")


class TraceError(RuntimeError):
    """Tracing is not available here (not root, no tracefs, no kvm events)."""


class Event(NamedTuple):
    """One line of the trace: ``kind`` is ``exit``, ``entry`` or ``mark``."""

    ts: float
    kind: str
    pid: int
    reason: str = ""
    rip: int = 0
    text: str = ""


def parse(lines: Iterable[str]) -> Iterator[Event]:
    """The kvm_exit, kvm_entry and marker events in trace text, in order; other lines skipped."""
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        ts, pid, event, text = float(m["ts"]), int(m["pid"]), m["event"], m["text"]
        if event == "kvm_exit":
            e = _EXIT.search(text)
            if e is not None:
                yield Event(ts, "exit", pid, e["reason"], int(e["rip"], 16))
        elif event == "kvm_entry":
            yield Event(ts, "entry", pid)
        elif event in ("tracing_mark_write", "print"):
            yield Event(ts, "mark", pid, text=text.strip())


def boot_phase(rip: int) -> str:
    """What a booting guest runs at ``rip``: ``firmware``, ``decompressor`` or ``kernel``."""
    if rip >= KERNEL_HALF:
        return "kernel"
    return "firmware" if rip < LOW_MEMORY else "decompressor"


class Window:
    """One stretch of the trace: wall time, the guest's running time, L1's handling time, and
    the exits by reason (count, handling seconds)."""

    def __init__(self, name: str, start: float) -> None:
        self.name = name
        self.start = self.end = start
        self.running = 0.0
        self.handling = 0.0
        self.exits: Dict[str, List[float]] = {}  # reason -> [count, handling seconds]

    @property
    def wall(self) -> float:
        return self.end - self.start

    @property
    def exit_count(self) -> int:
        return int(sum(c for c, _ in self.exits.values()))

    def top(self, n: int = 6) -> List[Tuple[str, int, float]]:
        """The ``n`` reasons that cost L1 the most handling time: (reason, count, seconds)."""
        ranked = sorted(self.exits.items(), key=lambda kv: -kv[1][1])
        return [(reason, int(count), secs) for reason, (count, secs) in ranked[:n]]

    def __repr__(self) -> str:
        return (f"Window({self.name!r}, wall={self.wall:.3f}, running={self.running:.3f}, "
                f"handling={self.handling:.3f}, exits={self.exit_count})")


class Summary(NamedTuple):
    """A trace cut into windows. ``first_exit``: seconds from the start mark to the guest's
    first exit (for a boot: the VMM's start-up, and firmware set-up, until the guest runs)."""

    windows: List[Window]
    first_exit: Optional[float]
    marks: List[Tuple[float, str]]

    def by_name(self) -> Dict[str, Window]:
        """One window per name: the stretches that share a name added together (a boot can
        go back to firmware-class RIPs, e.g. a secondary CPU's real-mode trampoline)."""
        out: Dict[str, Window] = {}
        for w in self.windows:
            total = out.get(w.name)
            if total is None:
                total = out[w.name] = Window(w.name, 0.0)
            total.end += w.wall
            total.running += w.running
            total.handling += w.handling
            for reason, (count, secs) in w.exits.items():
                acc = total.exits.setdefault(reason, [0, 0.0])
                acc[0] += count
                acc[1] += secs
        return out


def summarize(events: Iterable[Event], classify: Optional[Callable[[int], str]] = None,
              pids: Optional[Iterable[int]] = None, until: Optional[str] = None) -> Summary:
    """Cut ``events`` (after the start mark, if there is one) into windows.

    With ``classify`` (e.g. :func:`boot_phase`) a window is a run of exits whose RIPs classify
    alike; without it, windows run from one mark to the next and take the mark's text as name
    (the stretch before the first mark is ``""``). Time between an entry and the next exit is
    the guest running, between an exit and the next entry L1 handling it; both are charged to
    the window of the exit that ends (or starts) them. ``pids`` keeps only those threads'
    exits and entries (one VMM of several); the summary stops at the first mark ``until``."""
    events = list(events)
    starts = [i for i, e in enumerate(events) if e.kind == "mark" and e.text == START]
    if starts:
        events = events[starts[-1]:]
    origin = events[0].ts if events else 0.0
    keep = set(pids) if pids is not None else None
    windows: List[Window] = []
    marks: List[Tuple[float, str]] = []
    current: Optional[Window] = None
    first_exit: Optional[float] = None
    open_exit: Dict[int, Tuple[float, str, Window]] = {}  # per thread: the exit being handled
    last_entry: Dict[int, float] = {}

    def switch(name: str, ts: float) -> Window:
        nonlocal current
        if current is None or current.name != name:
            current = Window(name, ts - origin)
            windows.append(current)
        return current

    for e in events:
        rel = e.ts - origin
        if e.kind == "mark":
            if e.text != START:
                marks.append((rel, e.text))
                if e.text == until:
                    break
                if classify is None:
                    switch(e.text, e.ts)
            continue
        if keep is not None and e.pid not in keep:
            continue
        if e.kind == "exit":
            if first_exit is None:
                first_exit = rel
            w = switch(classify(e.rip), e.ts) if classify is not None else (current or switch("", e.ts))
            entered = last_entry.pop(e.pid, None)
            if entered is not None:
                w.running += e.ts - entered
            counts = w.exits.setdefault(e.reason, [0, 0.0])
            counts[0] += 1
            open_exit[e.pid] = (e.ts, e.reason, w)
            w.end = rel
        elif e.kind == "entry":
            pending = open_exit.pop(e.pid, None)
            if pending is not None:
                ts, reason, w = pending
                w.handling += e.ts - ts
                w.exits[reason][1] += e.ts - ts
                w.end = max(w.end, rel)
            last_entry[e.pid] = e.ts
    return Summary(windows, first_exit, marks)


class ExitTrace:
    """Records L1's kvm_exit/kvm_entry events between ``__enter__`` and ``__exit__``.

    Needs root and tracefs (mounted here if it is not). ``mark(text)`` writes a marker
    into the record (a window boundary for :func:`summarize`); ``events()`` parses the record.
    """

    def __init__(self, buffer_kb: int = 32768, tracefs: Path = TRACEFS, extra_events: Iterable[str] = ()) -> None:
        self.tracefs = Path(tracefs)
        self.buffer_kb = buffer_kb
        self.events_enabled = (*EVENTS, *extra_events)  # "system/event" names; extras are kept in text()
        self._text: Optional[str] = None

    def _write(self, name: str, value: str) -> None:
        (self.tracefs / name).write_text(value)

    def __enter__(self) -> "ExitTrace":
        if os.geteuid() != 0:
            raise TraceError("tracing L1's KVM exits needs root (run inside the lab)")
        if not (self.tracefs / "trace").exists():
            done = subprocess.run(["mount", "-t", "tracefs", "nodev", str(self.tracefs)], capture_output=True, text=True)
            if done.returncode != 0:
                raise TraceError(f"cannot mount tracefs on {self.tracefs}: {done.stderr.strip()}")
        for event in self.events_enabled:
            if not (self.tracefs / "events" / event).exists():
                raise TraceError(f"no {event} trace event here (is kvm loaded?)")
        self._write("tracing_on", "0")
        self._write("buffer_size_kb", str(self.buffer_kb))
        self._write("trace", "")
        for event in self.events_enabled:
            self._write(f"events/{event}/enable", "1")
        self._write("tracing_on", "1")
        self.mark(START)
        return self

    def mark(self, text: str) -> None:
        """A marker line at this moment (``trace_marker``)."""
        self._write("trace_marker", text)

    def __exit__(self, *exc) -> None:
        self._write("tracing_on", "0")
        self._text = (self.tracefs / "trace").read_text(errors="replace")
        for event in self.events_enabled:
            self._write(f"events/{event}/enable", "0")
        self._write("trace", "")

    @property
    def overflowed(self) -> bool:
        """Whether the buffer lost events (the trace file says so in its header)."""
        if self._text is None:
            return False
        m = re.search(r"entries-in-buffer/entries-written: (\d+)/(\d+)", self._text)
        return m is not None and int(m.group(1)) < int(m.group(2))

    def text(self) -> str:
        """The whole record as the trace file gave it (every enabled event)."""
        if self._text is None:
            raise TraceError("the trace is read when the `with` block ends")
        return self._text

    def events(self) -> List[Event]:
        return list(parse(self.text().splitlines()))

