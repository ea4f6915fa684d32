"""VFIO INFO capability chains: walking them and reading the structs they hold.

VFIO's INFO ioctls (region info, IOMMU info) can append capabilities after the
fixed struct: each starts with ``struct vfio_info_cap_header {id, version,
next}`` where ``next`` is the offset of the following capability from the
start of the INFO buffer (0 ends the chain). The kernel tells how large a
buffer it needs through ``argsz``; :func:`query_info` asks twice when needed.

Parsing works on plain ``bytes`` so it is testable without a device; every
read is bounds-checked and a malformed chain raises :class:`CapabilityChainError`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Tuple

from pykvm._native import ffi

__all__ = ["CapabilityChainError", "walk_chain", "read_struct", "read_array", "query_info"]

_HEADER = "struct vfio_info_cap_header"
MAX_CAPS = 64  # more than any kernel emits; bounds a walk over garbage


class CapabilityChainError(ValueError):
    """An INFO buffer whose capability chain points outside the buffer, loops or is truncated."""


def read_struct(buf: bytes, offset: int, ctype: str, extra: int = 0) -> Any:
    """A copy of ``struct ctype`` found at ``offset`` in ``buf`` (plus ``extra`` trailing bytes).

    Copying gives an aligned struct whatever the offset; the pointer owns its copy.
    """
    size = ffi.sizeof(ctype) + extra
    if offset < 0 or offset + size > len(buf):
        raise CapabilityChainError(f"{ctype} at offset {offset} (+{size} bytes) overruns the {len(buf)}-byte buffer")
    return ffi.from_buffer(ctype + " *", bytearray(buf[offset : offset + size]))


def read_array(buf: bytes, offset: int, ctype: str, field: str, count: int, item: str) -> Any:
    """``struct ctype`` at ``offset`` with ``count`` elements of its flexible array ``field``."""
    head = read_struct(buf, offset, ctype)
    need = ffi.offsetof(ctype, field) + count * ffi.sizeof(item) - ffi.sizeof(ctype)
    return read_struct(buf, offset, ctype, max(need, 0)) if count else head


def walk_chain(buf: bytes, first: int, base_size: int) -> Iterator[Tuple[int, int, int]]:
    """Yield ``(id, version, offset)`` for each capability, starting at offset ``first``.

    Capabilities live after the fixed INFO struct (``base_size`` bytes): an offset
    inside it, past the buffer, or seen before is an error.
    """
    seen = set()
    offset = first
    while offset:
        if offset < base_size or offset in seen or len(seen) >= MAX_CAPS:
            raise CapabilityChainError(f"capability chain has a bad link to offset {offset}")
        seen.add(offset)
        header = read_struct(buf, offset, _HEADER)
        yield header.id, header.version, offset
        offset = header.next


def query_info(fdobj: Any, ioctl: str, ctype: str, setup: Callable[[Any], None]) -> Tuple[Any, bytes]:
    """Issue an INFO ioctl, growing the buffer to the ``argsz`` the kernel asks for.

    Returns the filled struct (a pointer into the final buffer) and the buffer's bytes.
    """
    argsz = ffi.sizeof(ctype)
    while True:
        raw = bytearray(argsz)
        info = ffi.from_buffer(ctype + " *", raw)
        info.argsz = argsz
        setup(info)
        fdobj._ioctl(ioctl, info)
        if info.argsz <= argsz:
            return info, bytes(raw)
        argsz = info.argsz
