"""What ``pykvm run --stats`` reports: boot timing and exits by reason.

Boot timing is measured from the start of this process (the kernel's record
of it in /proc/self/stat, so interpreter start-up counts) to milestones the
machine marks: its creation (interpreter start-up and imports done), the
kernel and initrd read and planned, the VM built, the first vCPU entry, the
guest marker (a line of console output containing the text the user names,
or a byte written to the marker port), and the end of the run. Exit statistics are the run loops'
per-reason counters summed over all vCPUs, laid out like ``perf kvm stat``.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from pykvm.vmm.runloop import RunStats


def process_start() -> float:
    """``time.monotonic()`` at which this process started (10 ms resolution)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, ticks after boot
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    return time.monotonic() - max(age, 0.0)


class BootTimes:
    """Milestones in seconds since process start; each is recorded once (the first time)."""

    def __init__(self, start: Optional[float] = None) -> None:
        self.start = process_start() if start is None else start
        self._marks: Dict[str, float] = {}
        self._lock = threading.Lock()

    def mark(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._marks.setdefault(name, now - self.start)

    def get(self, name: str) -> Optional[float]:
        with self._lock:
            return self._marks.get(name)

    def items(self) -> List[Tuple[str, float]]:
        with self._lock:
            return sorted(self._marks.items(), key=lambda kv: kv[1])

    def table(self) -> str:
        lines = ["boot timing (since process start):"]
        lines += [f"  {name:<24}{seconds * 1e3:>12.1f} ms" for name, seconds in self.items()]
        return "\n".join(lines)


class TextWatch:
    """Calls ``found()`` once when ``needle`` appears in a byte stream fed in chunks."""

    def __init__(self, needle: bytes, found: Callable[[], None]) -> None:
        if not needle:
            raise ValueError("the text to watch for is empty")
        self.needle = needle
        self._found = found
        self._tail = b""
        self.seen = False

    def feed(self, data: bytes) -> None:
        if self.seen:
            return
        window = self._tail + data
        if self.needle in window:
            self.seen = True
            self._found()
        else:
            self._tail = window[-(len(self.needle) - 1):] if len(self.needle) > 1 else b""


def combine(stats: Iterable[RunStats]) -> RunStats:
    """Per-reason sums of several vCPUs' run loop statistics."""
    total = RunStats(Counter(), Counter(), Counter(), Counter(), Counter())
    for s in stats:
        total.exits.update(s.exits)
        total.c_handled.update(s.c_handled)
        total.python_handled.update(s.python_handled)
        total.run_ns.update(s.run_ns)
        total.handle_ns.update(s.handle_ns)
    return total


def exit_report(per_vcpu: List[RunStats]) -> str:
    """The ``--stats`` exit table: all vCPUs together, then a total per vCPU."""
    total = combine(per_vcpu)
    lines = [f"exits by reason ({len(per_vcpu)} vCPU{'s' if len(per_vcpu) != 1 else ''}):", total.table()]
    for i, s in enumerate(per_vcpu):
        n = sum(s.exits.values())
        lines.append(f"  vcpu{i}: {n} exits, {sum(s.c_handled.values())} answered in C")
    return "\n".join(lines)


# KVM's per-vCPU counters worth a line in --stats (x86 names; those this kernel lacks are left out).
KERNEL_COUNTERS = (
    ("exits", "VM exits"), ("io_exits", "port I/O"), ("mmio_exits", "MMIO"), ("halt_exits", "HLT"),
    ("irq_exits", "host interrupts"), ("signal_exits", "signals (kicks)"), ("irq_window_exits", "interrupt windows"),
    ("insn_emulation", "emulated instructions"), ("pf_fixed", "page faults fixed"),
    ("irq_injections", "interrupts injected"), ("halt_successful_poll", "halts ended by polling"),
    ("hypercalls", "hypercalls"),
)


def kernel_report(per_vcpu: List[dict]) -> str:
    """The ``--stats`` lines from KVM's own statistics (KVM_GET_STATS_FD), all vCPUs summed:
    every exit the kernel saw, most of which it handled without the VMM."""
    if not any(per_vcpu):
        return ""
    total: Counter = Counter()
    for stats in per_vcpu:
        total.update({k: v for k, v in stats.items() if isinstance(v, int)})
    shown = [f"{label} {total[name]}" for name, label in KERNEL_COUNTERS if total.get(name)]
    return "in KVM (its statistics, all vCPUs): " + ", ".join(shown)
