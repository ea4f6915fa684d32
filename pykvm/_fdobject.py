"""Shared plumbing for objects that own a kernel fd: ioctl calls and lifetime."""
from __future__ import annotations

import os
import threading
import weakref
from typing import Any, Callable, Optional

from pykvm._native import ffi, lib
from pykvm.errors import ClosedError, PykvmError, ioctl_error


def request_number(name: str) -> int:
    """The ioctl request number the compiler computed for ``name`` (e.g. ``"KVM_RUN"``)."""
    return getattr(lib, name)


class FdObject:
    """Owns one fd. ``close()`` is idempotent and closes dependents first.

    Subclasses set ``_error_family`` (KvmError or VfioError) and call
    ``self._ioctl("KVM_X", arg)``; failures raise that family's error with the
    ioctl's name and errno.
    """

    _error_family: type = PykvmError
    _what = "object"

    def __init__(self, fd: int, parent: Optional["FdObject"] = None):
        self._fd = fd
        self._parent = parent
        self._children: "weakref.WeakSet[FdObject]" = weakref.WeakSet()
        self._lock = threading.Lock()
        if parent is not None:
            parent._children.add(self)

    # -- lifetime ---------------------------------------------------------
    def fileno(self) -> int:
        """The fd this object owns."""
        if self._fd < 0:
            raise ClosedError(self._what)
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close dependents (vCPUs before their VM, ...) and then this fd."""
        with self._lock:
            if self._fd < 0:
                return
            failed = []  # a child or a release that fails must not keep the rest, or this fd, open
            for step in [child.close for child in list(self._children)] + [self._release]:
                try:
                    step()
                except Exception as exc:
                    failed.append(exc)
            fd, self._fd = self._fd, -1
            os.close(fd)
        if failed:
            raise failed[0]

    def _release(self) -> None:
        """Hook: undo mappings and other state before the fd is closed."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<{type(self).__name__} {state}>"

    # -- ioctls -----------------------------------------------------------
    def _ioctl(self, name: str, arg: Any = None) -> int:
        """Issue ioctl ``name`` with a cdata pointer, an int, or nothing."""
        fd = self.fileno()
        req = getattr(lib, name)
        if arg is None:
            ret = lib.pykvm_ioctl_int(fd, req, 0)
        elif isinstance(arg, int):
            if arg < 0:
                raise ValueError(f"{name}: argument {arg} is negative (the kernel takes it unsigned)")
            ret = lib.pykvm_ioctl_int(fd, req, arg)
        else:
            ret = lib.pykvm_ioctl_ptr(fd, req, arg)
        if ret < 0:
            raise ioctl_error(self._error_family, ffi.errno, name)
        return ret


def call_checked(family: type, name: str, fn: Callable[[], int]) -> int:
    """Run a raw C call that returns -1/errno and raise ``family`` on failure."""
    ret = fn()
    if ret < 0:
        raise ioctl_error(family, ffi.errno, name)
    return ret
