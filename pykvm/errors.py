"""Exceptions: ``OSError`` subclasses that carry the errno and the ioctl's name.

``KvmError(errno.EACCES, ...)`` is an instance of ``PermissionError``, so
``except PermissionError`` works as Python users expect.  The subclass is picked
from the errno the same way ``OSError(errno, msg)`` picks its own.
"""
from __future__ import annotations

import errno as _errno
import os
from typing import Optional

__all__ = ["PykvmError", "KvmError", "VfioError", "ioctl_error", "ClosedError", "FixableError"]

_OSERROR_FOR_ERRNO = {
    _errno.EACCES: PermissionError,
    _errno.EPERM: PermissionError,
    _errno.ENOENT: FileNotFoundError,
    _errno.EEXIST: FileExistsError,
    _errno.EINTR: InterruptedError,
    _errno.EAGAIN: BlockingIOError,
    _errno.EISDIR: IsADirectoryError,
    _errno.ENOTDIR: NotADirectoryError,
    _errno.ETIMEDOUT: TimeoutError,
    _errno.EBUSY: OSError,
}


class PykvmError(OSError):
    """Base of pykvm's errors. ``ioctl`` names the failing call (or operation)."""

    ioctl: Optional[str] = None

    def __init__(self, err: int, message: str, ioctl: Optional[str] = None):
        super().__init__(err, message)
        self.ioctl = ioctl

    def __str__(self) -> str:
        name = f"{self.ioctl}: " if self.ioctl else ""
        code = _errno.errorcode.get(self.errno, str(self.errno)) if self.errno else ""
        return f"{name}{self.strerror}" + (f" [{code}]" if code else "")

    def __reduce__(self):
        return (ioctl_error, (type(self)._family, self.errno, self.ioctl, self.strerror))


_CLASSES: dict = {}


def _subclass(family: type, base: type) -> type:
    key = (family, base)
    if key not in _CLASSES:
        if base is OSError:
            _CLASSES[key] = family
        else:
            _CLASSES[key] = type(f"{family.__name__}_{base.__name__}", (family, base), {})
    return _CLASSES[key]


class KvmError(PykvmError):
    """An ioctl on a /dev/kvm, VM, vCPU or device fd failed."""


class VfioError(PykvmError):
    """An ioctl on a /dev/vfio container, group or device fd failed."""


KvmError._family = KvmError
VfioError._family = VfioError
PykvmError._family = PykvmError


def ioctl_error(family: type, err: int, ioctl: Optional[str], message: Optional[str] = None) -> PykvmError:
    """Build the right ``family`` exception for ``err``: a ``PermissionError``
    subclass for EACCES/EPERM, ``FileNotFoundError`` for ENOENT, and so on."""
    cls = _subclass(family, _OSERROR_FOR_ERRNO.get(err, OSError))
    return cls(err, message or os.strerror(err), ioctl)


class ClosedError(PykvmError):
    """An operation on an object whose fd was already closed."""

    def __init__(self, what: str):
        super().__init__(_errno.EBADF, f"{what} is closed", None)


class FixableError(Exception):
    """A check that failed before anything was changed; ``fix`` tells the user what to do."""

    def __init__(self, message: str, fix: str = ""):
        super().__init__(message)
        self.fix = fix

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  fix: {self.fix}" if self.fix else text
