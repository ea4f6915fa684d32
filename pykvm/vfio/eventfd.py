"""An eventfd: the kernel's 64-bit counter that VFIO signals on a device interrupt
(and that KVM's irqfd/ioeventfd consume).

A write adds to the counter; a read returns it and resets it to zero (or takes 1
in semaphore mode). The fd is readable while the counter is non-zero, so
``wait(timeout)`` is a poll followed by a read.
"""
from __future__ import annotations

import os
import select
from typing import Optional

from pykvm._fdobject import FdObject
from pykvm._native import ffi, lib
from pykvm.errors import PykvmError

__all__ = ["EventFd"]


def _create(initval: int, flags: int) -> int:
    if hasattr(os, "eventfd"):  # Python >= 3.10
        return os.eventfd(initval, flags)
    fd = lib.eventfd(initval, flags)
    if fd < 0:
        raise OSError(ffi.errno, os.strerror(ffi.errno))
    return fd


class EventFd(FdObject):
    """``EventFd()`` creates a close-on-exec eventfd; ``semaphore=True`` makes each read take 1."""

    _error_family = PykvmError
    _what = "eventfd"

    def __init__(self, initval: int = 0, semaphore: bool = False):
        flags = lib.EFD_CLOEXEC | (lib.EFD_SEMAPHORE if semaphore else 0)
        super().__init__(_create(initval, flags))

    def write(self, value: int = 1) -> None:
        """Add ``value`` to the counter (wakes waiters)."""
        os.write(self.fileno(), value.to_bytes(8, "little"))

    def read(self) -> int:
        """Take the counter; blocks while it is zero."""
        return int.from_bytes(os.read(self.fileno(), 8), "little")

    def wait(self, timeout: Optional[float]) -> Optional[int]:
        """Wait up to ``timeout`` seconds (None: forever) for a signal; the counter, or None on timeout."""
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not poller.poll(ms):
            return None
        return self.read()

    def drain(self) -> int:
        """Take whatever is pending without blocking (0 when nothing is)."""
        return self.wait(0) or 0
