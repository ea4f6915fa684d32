"""One thread that enforces run deadlines for every vCPU.

``Vcpu.run(timeout=...)`` arms a deadline here instead of starting a timer
thread per call (~120 us each): arming is a heap push under a lock, and the
thread is woken only when the new deadline is the earliest. When a deadline
passes while its run is still armed, the callback (a kick) fires; disarming
first makes a late kick impossible, so a deadline never spills into a later run.
"""
from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from typing import Callable, Dict, List, Tuple

from pykvm._log import get_logger

log = get_logger(__name__)


class Watchdog:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        """Fresh state. Also run in a forked child: the parent's thread does not exist
        there (and its lock may have been held at the fork), so the child starts its own."""
        self._cond = threading.Condition()
        self._heap: List[Tuple[float, int]] = []
        self._armed: Dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, timeout: float, callback: Callable[[], None]) -> int:
        """Call ``callback`` in ``timeout`` seconds unless ``disarm``ed first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            token = next(self._ids)
            self._armed[token] = callback
            heapq.heappush(self._heap, (deadline, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pykvm-watchdog", daemon=True)
                self._thread.start()
            if self._heap[0][1] == token:
                self._cond.notify()
        return token

    def disarm(self, token: int) -> bool:
        """Cancel a deadline; returns False if it already fired."""
        with self._cond:
            return self._armed.pop(token, None) is not None

    def _loop(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._armed:
                    heapq.heappop(self._heap)  # disarmed: drop lazily
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, token = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                callback = self._armed.pop(token, None)
                if callback is not None:
                    try:
                        callback()  # kicks are short and never block
                    except Exception:  # one bad callback must not end every later deadline
                        log.exception("watchdog callback failed")


WATCHDOG = Watchdog()
os.register_at_fork(after_in_child=WATCHDOG._reset)
