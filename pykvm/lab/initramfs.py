"""Initramfs images: a gzip'd ``newc`` cpio archive written directly from Python.

Writing the archive ourselves (instead of staging a tree for ``cpio``) lets an unprivileged
build include device nodes such as ``/dev/console``, which the kernel opens for init's
stdio before any filesystem is mounted, and makes the output byte-for-byte reproducible.

:func:`build_initramfs` packs a static busybox, kernel modules with their dependencies
and a ``/init`` script. The modules are loaded in dependency order by
``/bin/pykvm-load-modules`` (plain ``insmod`` lines), which ``/init`` calls.
"""
from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Tuple, Union

from pykvm.lab.modules import load_order_for, module_name

FileContent = Union[str, bytes, Path]

LOAD_MODULES = "/bin/pykvm-load-modules"


class CpioWriter:
    """Collects entries of a ``newc`` (SVR4, no CRC) cpio archive."""

    def __init__(self) -> None:
        self._chunks: List[bytes] = []
        self._ino = 1
        self._dirs: set = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: Tuple[int, int] = (0, 0)) -> None:
        name_bytes = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                  0, 0, rdev[0], rdev[1], len(name_bytes), 0)
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._ino += 1
        self._chunks.append(header + name_bytes + _pad(len(header) + len(name_bytes)))
        self._chunks.append(data + _pad(len(data)))

    def directory(self, name: str) -> None:
        """Add ``name`` and its missing parents (mode 0755)."""
        name = name.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path and path not in self._dirs:
                self._dirs.add(path)
                self._entry(path, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self.directory(os.path.dirname(name))
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def getvalue(self) -> bytes:
        trailer = CpioWriter()
        trailer._ino = 0
        trailer._entry("TRAILER!!!", 0)
        return b"".join(self._chunks + trailer._chunks)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _content(value: FileContent) -> Tuple[bytes, int]:
    """Bytes and mode for an extra file: a Path keeps its mode, a script (#!) is executable."""
    if isinstance(value, Path):
        return value.read_bytes(), stat.S_IMODE(value.stat().st_mode)
    data = value.encode() if isinstance(value, str) else value
    return data, 0o755 if data.startswith(b"#!") else 0o644


def load_modules_script(module_paths: Iterable[str]) -> str:
    """Shell script that insmods each module (paths relative to /lib/modules) in order."""
    lines = ["#!/bin/sh", "failed=0"]
    for path in module_paths:
        lines.append(
            f"insmod /lib/modules/{path} || {{ echo 'pykvm: insmod {module_name(path)} failed' >&2; failed=1; }}"
        )
    lines.append("exit $failed")
    return "\n".join(lines) + "\n"


def build_initramfs(
    path: Path,
    init_script: str,
    modules: Iterable[str],
    extra_files: Optional[Mapping[str, FileContent]] = None,
    *,
    modules_dir: Path,
    busybox: Path,
) -> List[str]:
    """Write a gzip'd initramfs to ``path``; return the module paths it loads, in order.

    ``modules`` are module names; they and their dependencies are taken from
    ``modules_dir`` (a ``lib/modules/VERSION`` tree with ``modules.dep``). ``/init`` is
    ``init_script``; it should call ``/bin/pykvm-load-modules`` and may use any busybox
    applet after ``/bin/busybox --install -s /bin``. ``extra_files`` maps absolute paths
    in the image to content (str/bytes; ``#!`` makes it executable) or to a host file.
    """
    order = load_order_for(modules_dir, modules)
    cpio = CpioWriter()
    for name in ("bin", "dev", "etc", "proc", "sys", "tmp", "mnt", "root", "lib/modules"):
        cpio.directory(name)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for module in order:
        cpio.file(f"lib/modules/{module}", (modules_dir / module).read_bytes())
    cpio.file(LOAD_MODULES, load_modules_script(order).encode(), 0o755)
    cpio.file("init", init_script.encode(), 0o755)
    for name, value in (extra_files or {}).items():
        data, mode = _content(value)
        cpio.file(name, data, mode)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip.compress(cpio.getvalue(), compresslevel=6, mtime=0))
    tmp.replace(path)
    return order
