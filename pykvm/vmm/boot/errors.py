"""Errors raised while planning a boot, before any vCPU runs."""
from __future__ import annotations


class BootError(ValueError):
    """The kernel, initrd, command line and memory do not make a bootable machine."""


class BootImageError(BootError):
    """The kernel image is truncated, corrupt or of a kind this VMM cannot boot."""
