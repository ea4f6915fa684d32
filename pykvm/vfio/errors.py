"""VFIO's errors: :class:`~pykvm.errors.VfioError` subclasses picked by errno, with messages
that say what to do."""
from __future__ import annotations

import errno
from typing import Optional

from pykvm.errors import VfioError, ioctl_error

__all__ = ["VfioError", "VfioUnavailableError", "vfio_error"]


class VfioUnavailableError(VfioError, FileNotFoundError):
    """/dev/vfio/vfio does not exist: the kernel has no VFIO or its modules are not loaded."""

    def __init__(self, path: str):
        super().__init__(
            errno.ENOENT,
            f"VFIO is not available: {path} does not exist (no CONFIG_VFIO, or vfio/vfio_pci/"
            "vfio_iommu_type1 not loaded). Run `pykvm host check` to see what this host lacks.",
            "open",
        )


def vfio_error(err: int, message: str, op: Optional[str] = None) -> VfioError:
    """A VfioError of the OSError subclass that matches ``err`` (FileExistsError for EEXIST, ...)."""
    return ioctl_error(VfioError, err, op, message)
