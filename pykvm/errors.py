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
        # the (family, OSError subclass) classes are made at run time and have no importable
        # name: pickle how to make the class again, and the instance's own attributes
        cls = type(self)
        return (_rebuild, (_MADE.get(cls, cls), self.errno, self.strerror, self.ioctl), self.__dict__)


_CLASSES: dict = {}
_MADE: dict = {}  # class made by _subclass -> (family, base)


def _subclass(family: type, base: type) -> type:
    key = (family, base)
    if key not in _CLASSES:
        if base is OSError:
            _CLASSES[key] = family
        else:
            cls = type(f"{family.__name__}_{base.__name__}", (family, base), {})
            _CLASSES[key] = cls
            _MADE[cls] = key
    return _CLASSES[key]


def _rebuild(spec, err: int, message: str, ioctl: Optional[str]) -> "PykvmError":
    cls = _subclass(*spec) if isinstance(spec, tuple) else spec
    exc = cls.__new__(cls)
    PykvmError.__init__(exc, err, message, ioctl)  # whatever cls.__init__ takes
    return exc


class KvmError(PykvmError):
    """An ioctl on a /dev/kvm, VM, vCPU or device fd failed."""


class VfioError(PykvmError):
    """An ioctl on a /dev/vfio container, group or device fd failed."""


KvmError._family = KvmError
VfioError._family = VfioError
PykvmError._family = PykvmError


def ioctl_error(family: type, err: int, ioctl: Optional[str], message: Optional[str] = None) -> PykvmError:
    """Build the right ``family`` exception for ``err``: a subclass of the OSError subclass
    ``OSError(err, ...)`` itself picks (``PermissionError`` for EACCES/EPERM,
    ``FileNotFoundError`` for ENOENT, ``BrokenPipeError`` for EPIPE, ...)."""
    cls = _subclass(family, type(OSError(err, "")))
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
