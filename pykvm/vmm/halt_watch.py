"""Which vCPUs may have stopped for good, found without disturbing the running ones.

Linux without ACPI powers off by halting every CPU with interrupts disabled. With KVM's
in-kernel local APIC such a vCPU sleeps inside ``KVM_RUN`` and never comes back to the
VMM, so the VMM has to interrupt the call (a kick) and look at the vCPU's state. Kicking
every vCPU a few times a second costs a VM exit, a signal and Python work each time, and
it also lands while the guest is busy (in the nested lab: a forced L2 exit and L1 CPU time
four times a second during passthrough DMA).

KVM's own statistics (``KVM_GET_STATS_FD``) tell, without stopping the vCPU, whether it
sleeps in the kernel now (``blocking``) and how many exits it has taken (``exits``).
:class:`HaltWatch` samples them every ``interval`` and asks for a check (``check(i)``, a
kick) only for a vCPU that slept through a whole interval without a single exit: a running
guest exits at least at every host timer tick, and one halted with interrupts enabled
wakes for its own timer. The check's own exits are not held against the vCPU: after a
check the next sample only sets a new baseline. Where the kernel has no such statistics,
:meth:`HaltWatch.open` returns None and the machine checks on a timer instead.

A check only gives a verdict. The machine (pykvm.vmm.machine) ends the run as a power-off
only after a round in which every vCPU, all out of KVM_RUN at once, is found halted again:
a verdict from long ago (an AP that waited for its SIPI at boot and is busy since, so never
checked again) cannot end a guest that runs.
"""
from __future__ import annotations

import threading
from typing import Callable, List, Optional, Sequence

from pykvm.errors import PykvmError

# The two per-vCPU statistics used (both present on the lab's 6.1 and this machine's 6.18 kernels).
EXITS, BLOCKING = "exits", "blocking"


class HaltWatch:
    """A thread that samples each vCPU's ``exits`` and ``blocking`` statistics every
    ``interval`` seconds and calls ``check(index)`` for a vCPU that slept through it."""

    def __init__(self, stats: Sequence, check: Callable[[int], None], interval: float) -> None:
        self.stats = list(stats)
        self.check = check
        self.interval = interval
        self.checks = 0  # how many checks were asked for (the tests read it)
        self._baseline: List[Optional[int]] = [None] * len(self.stats)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def open(cls, vcpus: Sequence, check: Callable[[int], None], interval: float) -> Optional["HaltWatch"]:
        """A watch over ``vcpus`` (their ``stats()`` fds, closed with each vCPU), or None if
        this kernel cannot give both statistics (the caller then checks on a timer).

        Call it before any of the vCPUs runs: KVM_GET_STATS_FD is a vCPU ioctl and takes the
        vCPU's mutex, which a thread inside KVM_RUN holds (an AP waiting for its SIPI holds
        it until something kicks it). ``start()`` the sampling once the vCPUs run."""
        stats = []
        try:
            for vcpu in vcpus:
                s = vcpu.stats()
                stats.append(s)
                if EXITS not in s or BLOCKING not in s:
                    raise LookupError(f"no {EXITS!r}/{BLOCKING!r} statistics")
        except (PykvmError, LookupError):
            for s in stats:
                s.close()
            return None
        return cls(stats, check, interval)

    def sample(self) -> List[int]:
        """One round: read every vCPU's statistics, ask for checks; the indexes checked."""
        checked = []
        for i, stats in enumerate(self.stats):
            exits, blocking = stats[EXITS], stats[BLOCKING]
            if blocking and exits == self._baseline[i]:
                self._baseline[i] = None  # the check's own exits set the next baseline
                self.checks += 1
                checked.append(i)
                self.check(i)
            else:
                self._baseline[i] = exits
        return checked

    def snapshot(self) -> List[dict]:
        """Every statistic of every vCPU now (for ``--stats``); {} for a vCPU that is gone."""
        out = []
        for s in self.stats:
            try:
                out.append(s.read())
            except PykvmError:
                out.append({})
        return out

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pykvm-halt-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except PykvmError:  # a vCPU closed under us (ClosedError): the machine is ending
                return

    def close(self) -> None:
        """Stop the thread and close the statistics fds (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for s in self.stats:
            s.close()
