"""The host's kernel interfaces as files under a root directory.

Everything in ``pykvm.host`` reads ``/sys``, ``/proc``, ``/dev``, ``/boot`` and
``/lib/modules`` through a :class:`Root`, so the same code runs on the real
machine (``Root("/")``) and on a synthetic tree built by a test.  Writes go
through :meth:`Root.write`, which records each one (path and bytes): on the
real ``/sys`` a write *is* the action (``driver_override``, ``unbind``,
``drivers_probe`` make the kernel rebind a device), on a synthetic tree it is
just a file, and the journal is what a test checks.  ``dry_run=True`` records
without writing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

from pykvm.errors import FixableError

__all__ = ["HostError", "Root"]


class HostError(FixableError):
    """A host-preparation step cannot go on. ``fix`` says what the user can do."""


@dataclass
class Root:
    """A directory that plays ``/`` for sysfs, procfs, devtmpfs and friends."""

    path: Path = field(default_factory=lambda: Path("/"))
    dry_run: bool = False
    writes: List[Tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def is_real(self) -> bool:
        """True when this is the running system's ``/`` (devices can be opened)."""
        return self.path.resolve() == Path("/")

    def __call__(self, rel: Union[str, os.PathLike]) -> Path:
        """The path of ``rel`` (written as if absolute, e.g. ``"/sys/bus/pci"``) under the root."""
        return self.path / str(rel).lstrip("/")

    def exists(self, rel: str) -> bool:
        return self(rel).exists()

    def read_text(self, rel: str) -> Optional[str]:
        """The file's text, or None when it is missing or unreadable."""
        try:
            return self(rel).read_text(errors="replace")
        except OSError:
            return None

    def read_bytes(self, rel: str) -> Optional[bytes]:
        try:
            return self(rel).read_bytes()
        except OSError:
            return None

    def listdir(self, rel: str) -> List[str]:
        """Sorted entries of a directory; empty when it is missing."""
        try:
            return sorted(os.listdir(self(rel)))
        except OSError:
            return []

    def link_name(self, rel: str) -> Optional[str]:
        """The last component of a symlink's target (``driver`` -> ``"nvme"``), or None."""
        try:
            return os.path.basename(os.readlink(self(rel)))
        except OSError:
            return None

    def writable(self, rel: str) -> bool:
        return os.access(self(rel), os.W_OK)

    def write(self, rel: str, text: str) -> None:
        """Write ``text`` in one ``write()`` (sysfs attributes take one write each) and record it.

        Errors from the kernel (for example ``EINVAL`` from ``drivers_probe``)
        come back as ``OSError`` with the path in the message.
        """
        self.writes.append((str(rel), text))
        if self.dry_run:
            return
        fd = os.open(self(rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # as `echo x > file`
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
