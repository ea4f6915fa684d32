"""What the running kernel says about itself: command line, build config, log, modules."""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

from pykvm.host.sysfs import Root

__all__ = [
    "Cmdline", "parse_cmdline", "parse_kconfig", "KernelConfig", "read_kernel_config",
    "kernel_log", "parse_kmsg", "Modules",
]


def parse_cmdline(text: str) -> List[Tuple[str, Optional[str]]]:
    """Split a kernel command line the way the kernel's ``next_arg()`` does.

    Parameters are separated by whitespace; double quotes protect spaces
    (``a="x y"`` or ``"a=x y"``) and are dropped from the value; ``--`` ends the
    kernel's parameters (the rest belongs to init).  Returns ``(name, value)``
    pairs, value None for a bare flag.
    """
    out: List[Tuple[str, Optional[str]]] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            return out
        quoted = text[i] == '"'
        start = i + 1 if quoted else i
        in_quote, equals, j = quoted, None, start
        while j < n and (in_quote or not text[j].isspace()):
            if equals is None and text[j] == "=" and j > start:
                equals = j
            if text[j] == '"':
                in_quote = not in_quote
            j += 1
        arg = text[start:j]
        if quoted and arg.endswith('"'):
            arg = arg[:-1]
        if equals is None:
            if arg == "--":
                return out
            out.append((arg, None))
        else:
            name, value = arg[: equals - start], arg[equals - start + 1 :]
            if value.startswith('"'):
                value = value[1:]
                if value.endswith('"'):
                    value = value[:-1]
            out.append((name, value))
        i = j


@dataclass
class Cmdline:
    """The kernel command line; names match with ``-`` and ``_`` interchangeable, as the kernel does."""

    params: List[Tuple[str, Optional[str]]]

    @classmethod
    def read(cls, root: Root) -> Optional["Cmdline"]:
        text = root.read_text("/proc/cmdline")
        return None if text is None else cls(parse_cmdline(text))

    def get(self, name: str) -> Optional[str]:
        """The value of the last ``name=value`` (the one the kernel applies), ``""`` for a bare flag, None if absent."""
        key = name.replace("-", "_")
        found = None
        for param, value in self.params:
            if param.replace("-", "_") == key:
                found = "" if value is None else value
        return found

    def options(self, name: str) -> List[str]:
        """Comma-separated options of ``name`` (``intel_iommu=on,sm_on`` -> ``["on", "sm_on"]``)."""
        value = self.get(name)
        return [] if not value else [v.strip() for v in value.split(",")]


def parse_kconfig(text: str) -> Dict[str, str]:
    """``CONFIG_X=value`` lines -> ``{"CONFIG_X": value}``; ``# CONFIG_X is not set`` -> ``"n"``.

    String values keep their text without the enclosing quotes.
    """
    config: Dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# CONFIG_") and line.endswith(" is not set"):
            config[line[2:-len(" is not set")]] = "n"
        elif line.startswith("CONFIG_") and "=" in line:
            name, value = line.split("=", 1)
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            config[name] = value
    return config


@dataclass
class KernelConfig:
    source: str
    options: Dict[str, str]

    def value(self, name: str) -> str:
        """``y``, ``m``, another value, or ``n`` when unset or absent (Kconfig treats both alike)."""
        return self.options.get(name, "n")


def kernel_release(root: Root) -> Optional[str]:
    text = root.read_text("/proc/sys/kernel/osrelease")
    return text.strip() if text else None


def read_kernel_config(root: Root) -> Optional[KernelConfig]:
    """The build config from ``/proc/config.gz`` (CONFIG_IKCONFIG_PROC) or ``/boot/config-RELEASE``."""
    data = root.read_bytes("/proc/config.gz")
    if data is not None:
        try:
            return KernelConfig("/proc/config.gz", parse_kconfig(gzip.decompress(data).decode(errors="replace")))
        except (OSError, EOFError):
            pass
    release = kernel_release(root)
    if release:
        rel = f"/boot/config-{release}"
        text = root.read_text(rel)
        if text is not None:
            return KernelConfig(rel, parse_kconfig(text))
    return None


def parse_kmsg(text: str) -> List[str]:
    """Messages from ``/dev/kmsg`` records (``prio,seq,usec,flags;message``, continuation
    lines start with a space).  A line without the header is taken as a plain message."""
    messages = []
    for line in text.splitlines():
        if not line or line[0] == " ":
            continue
        head, sep, message = line.partition(";")
        messages.append(message if sep and head.count(",") >= 3 else line)
    return messages


def kernel_log(root: Root, max_records: int = 1 << 20) -> Optional[List[str]]:
    """The kernel ring buffer's messages, or None when ``/dev/kmsg`` cannot be read
    (``kernel.dmesg_restrict`` needs CAP_SYSLOG).

    ``/dev/kmsg`` returns one record per ``read()`` and EAGAIN at the end (opened
    non-blocking); EPIPE means the record was overwritten while we read, and the
    next read continues.  A regular file (a synthetic tree) reads to EOF.
    """
    try:
        fd = os.open(root("/dev/kmsg"), os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    chunks = []
    try:
        for _ in range(max_records):
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            except BrokenPipeError:
                continue
            except OSError:
                return None
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(fd)
    return parse_kmsg(b"".join(chunks).decode(errors="replace"))


@dataclass
class Modules:
    """Which kernel modules are loaded (``/proc/modules``) or built in (``modules.builtin``)."""

    loaded: Set[str]
    builtin: Set[str]

    @staticmethod
    def _name(name: str) -> str:
        return name.replace("-", "_")

    @classmethod
    def read(cls, root: Root) -> "Modules":
        loaded = {cls._name(line.split()[0]) for line in (root.read_text("/proc/modules") or "").splitlines() if line.strip()}
        builtin: Set[str] = set()
        release = kernel_release(root)
        if release:
            for line in (root.read_text(f"/lib/modules/{release}/modules.builtin") or "").splitlines():
                base = os.path.basename(line.strip())
                if base.endswith(".ko"):
                    builtin.add(cls._name(base[:-3]))
        return cls(loaded, builtin)

    def state(self, name: str, config: Optional[KernelConfig], symbol: str) -> str:
        """``loaded``, ``builtin``, ``module`` (built as a module, not loaded), or ``missing``."""
        name = self._name(name)
        if name in self.loaded:
            return "loaded"
        value = config.value(symbol) if config else None
        if name in self.builtin or value == "y":
            return "builtin"
        if value == "m":
            return "module"
        return "missing"
