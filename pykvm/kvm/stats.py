"""KVM's binary statistics (KVM_GET_STATS_FD): counters of a VM or vCPU, read with pread.

KVM_GET_STATS_FD on a VM or vCPU fd returns a read-only fd whose "file" the kernel
lays out as: a ``struct kvm_stats_header`` at offset 0; an id string (``name_size``
bytes, e.g. ``kvm-1234/vcpu-0``) at ``id_offset``; ``num_desc`` descriptors at
``desc_offset``, each a ``struct kvm_stats_desc`` followed by ``name_size`` bytes of
its name (so the array's stride is ``sizeof(struct kvm_stats_desc) + name_size``);
and at ``data_offset`` the data block: each stat is ``size`` u64 values at byte
``offset`` of the block. Header, id and descriptors never change for the fd's life,
so they are read once; each ``read()`` is one pread of the data block. Reading
costs no ioctl and no vCPU exit; the kernel copies its counters as they are.

The parsing (``StatsLayout``) takes a pread-like callable, so it runs on synthetic
bytes as well as on the kernel's fd. Layouts come from cffi (the compiled header).
"""
from __future__ import annotations

import enum
import errno
import math
import os
import struct
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple, Type, TypeVar, Union

from pykvm._fdobject import FdObject
from pykvm._native import ffi, lib
from pykvm.errors import KvmError, ioctl_error
from pykvm.kvm.macros import macro_enum

__all__ = ["StatType", "StatUnit", "StatBase", "StatDesc", "StatsHeader", "StatsLayout", "KvmStats",
           "StatValue", "Pread"]

#: ``pread(size, offset) -> bytes``, like ``os.pread(fd, size, offset)``.
Pread = Callable[[int, int], bytes]
#: One stat's value: an int when its descriptor's ``size`` is 1, else a tuple (histograms).
StatValue = Union[int, Tuple[int, ...]]

_T = TypeVar("_T")
_U64 = ffi.sizeof("__u64")
_HEADER = "struct kvm_stats_header"
_DESC = "struct kvm_stats_desc"
_HEADER_SIZE = ffi.sizeof(_HEADER)
_DESC_SIZE = ffi.sizeof(_DESC)
_NAME_AT = ffi.offsetof(_DESC, "name")


# This header's KVM_STATS_{TYPE,UNIT,BASE}_* values (their SHIFT, MASK and MAX left out).
_NOT_VALUES = ("SHIFT", "MASK", "MAX")
StatType = macro_enum("StatType", "KVM_STATS_TYPE_", _NOT_VALUES)  # CUMULATIVE, INSTANT, PEAK, LINEAR_HIST, LOG_HIST
StatUnit = macro_enum("StatUnit", "KVM_STATS_UNIT_", _NOT_VALUES)  # NONE, BYTES, SECONDS, CYCLES, BOOLEAN
StatBase = macro_enum("StatBase", "KVM_STATS_BASE_", _NOT_VALUES)  # POW10, POW2

_HISTOGRAMS = frozenset(int(StatType[n]) for n in ("LINEAR_HIST", "LOG_HIST") if n in StatType.__members__)
_UNIT_WORDS = {"NONE": "", "BYTES": "B", "SECONDS": "s", "CYCLES": "cycles", "BOOLEAN": ""}
_SI = {-9: "n", -6: "u", -3: "m", 0: "", 3: "k", 6: "M", 9: "G"}
_IEC = {0: "", 10: "Ki", 20: "Mi", 30: "Gi", 40: "Ti"}


def _known(enum_type: Type[enum.IntEnum], value: int) -> Union[enum.IntEnum, int]:
    """The enum member for ``value``, or the raw number when this header does not know it."""
    try:
        return enum_type(value)
    except ValueError:
        return value


class StatDesc(NamedTuple):
    """One statistic as its ``struct kvm_stats_desc`` describes it.

    ``flags`` packs type, unit and base (KVM_STATS_{TYPE,UNIT,BASE}_MASK); a value
    times ``scale`` is in the unit (``halt_wait_ns``: SECONDS, POW10, exponent -9).
    ``size`` is the number of u64 values, ``offset`` their byte offset in the data
    block; ``bucket_size`` is the bucket width of a linear histogram.
    """

    name: str
    flags: int
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def type(self) -> Union[enum.IntEnum, int]:
        """A StatType, or the raw masked number for a type newer than this header."""
        return _known(StatType, self.flags & lib.KVM_STATS_TYPE_MASK)

    @property
    def unit(self) -> Union[enum.IntEnum, int]:
        """A StatUnit, or the raw masked number."""
        return _known(StatUnit, self.flags & lib.KVM_STATS_UNIT_MASK)

    @property
    def base(self) -> Union[enum.IntEnum, int]:
        """A StatBase (of the exponent: 10 or 2), or the raw masked number."""
        return _known(StatBase, self.flags & lib.KVM_STATS_BASE_MASK)

    @property
    def is_histogram(self) -> bool:
        return (self.flags & lib.KVM_STATS_TYPE_MASK) in _HISTOGRAMS

    def _radix(self) -> Optional[int]:
        base = self.base
        return {"POW10": 10, "POW2": 2}.get(base.name) if isinstance(base, StatBase) else None

    @property
    def scale(self) -> Optional[float]:
        """What one count is worth in the unit (1e-9 for nanoseconds); None for an unknown base."""
        radix = self._radix()
        if radix is None:
            return None
        try:
            return float(radix) ** self.exponent
        except OverflowError:  # exponent is an __s16: 10**309 and up are past a float
            return math.inf

    @property
    def unit_label(self) -> str:
        """A short human unit: ``ns``, ``KiB``, ``cycles``, ``""`` for plain counts,
        ``10^-7 s`` when no prefix fits, ``unit 0x50`` for a unit this header does not know."""
        unit = self.unit
        if not isinstance(unit, StatUnit):
            return f"unit {unit:#x}"
        word = _UNIT_WORDS.get(unit.name, unit.name.lower())
        if self.exponent == 0:
            return word
        radix = self._radix()
        prefix = {10: _SI, 2: _IEC}.get(radix, {}).get(self.exponent) if word in ("B", "s") else None
        if prefix is not None:
            return prefix + word
        return f"{radix or '?'}^{self.exponent}" + (f" {word}" if word else "")

    def in_unit(self, value: int) -> Optional[float]:
        """``value`` converted to the plain unit (seconds, bytes, ...); None for an unknown base."""
        scale = self.scale
        return None if scale is None else value * scale


class StatsHeader(NamedTuple):
    """``struct kvm_stats_header``: where the id, descriptors and data sit in the stats fd."""

    flags: int
    name_size: int
    num_desc: int
    id_offset: int
    desc_offset: int
    data_offset: int

    @classmethod
    def from_bytes(cls, data: bytes) -> "StatsHeader":
        if len(data) < _HEADER_SIZE:
            raise ValueError(f"stats header needs {_HEADER_SIZE} bytes, got {len(data)}")
        h = ffi.new(_HEADER + " *")
        ffi.memmove(h, data, _HEADER_SIZE)
        return cls(h.flags, h.name_size, h.num_desc, h.id_offset, h.desc_offset, h.data_offset)


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_descriptors(data: bytes, num_desc: int, name_size: int) -> Tuple[StatDesc, ...]:
    """``num_desc`` descriptors from ``data``, each ``sizeof(struct kvm_stats_desc) + name_size`` bytes."""
    stride = _DESC_SIZE + name_size
    if len(data) < stride * num_desc:
        raise ValueError(f"{num_desc} stats descriptors need {stride * num_desc} bytes, got {len(data)}")
    d = ffi.new(_DESC + " *")
    out = []
    for i in range(num_desc):
        at = i * stride
        ffi.memmove(d, data[at:at + _DESC_SIZE], _DESC_SIZE)
        name = _name(data[at + _NAME_AT:at + _NAME_AT + name_size])
        out.append(StatDesc(name, d.flags, d.exponent, d.size, d.offset, d.bucket_size))
    return tuple(out)


def pread_exact(pread: Pread, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset``, continuing after short reads; ValueError at end of file."""
    chunks = []
    got = 0
    while got < size:
        chunk = pread(size - got, offset + got)
        if not chunk:
            raise ValueError(f"stats file ends at {offset + got:#x}, wanted {size} bytes at {offset:#x}")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class StatsLayout:
    """The fixed part of a stats file (header, id, descriptors) and the decoding of its data block."""

    def __init__(self, header: StatsHeader, id: str, descriptors: Tuple[StatDesc, ...]):
        self.header = header
        self.id = id
        self.descriptors = descriptors
        self.by_name: Dict[str, StatDesc] = {d.name: d for d in descriptors}
        # the data block only needs to reach the end of the last stat
        self.data_size = max((d.offset + d.size * _U64 for d in descriptors), default=0)
        self._unpackers = [(d.name, struct.Struct(f"={d.size}Q"), d.offset, d.size == 1) for d in descriptors]

    @classmethod
    def read(cls, pread: Pread) -> "StatsLayout":
        """Read header, id and descriptors through ``pread(size, offset)``."""
        header = StatsHeader.from_bytes(pread_exact(pread, _HEADER_SIZE, 0))
        ident = _name(pread_exact(pread, header.name_size, header.id_offset)) if header.name_size else ""
        raw = pread_exact(pread, header.num_desc * (_DESC_SIZE + header.name_size), header.desc_offset)
        return cls(header, ident, parse_descriptors(raw, header.num_desc, header.name_size))

    def decode(self, data: bytes) -> Dict[str, StatValue]:
        """Every stat of a data block (``data_size`` bytes from ``data_offset``), by name."""
        if len(data) < self.data_size:
            raise ValueError(f"stats data block needs {self.data_size} bytes, got {len(data)}")
        out: Dict[str, StatValue] = {}
        for name, unpacker, offset, scalar in self._unpackers:
            values = unpacker.unpack_from(data, offset)
            out[name] = values[0] if scalar else values
        return out

    def decode_one(self, desc: StatDesc, data: bytes) -> StatValue:
        """One stat from its own ``desc.size`` u64 values."""
        values = struct.unpack_from(f"={desc.size}Q", data, 0)
        return values[0] if desc.size == 1 else values

    def read_data(self, pread: Pread) -> Dict[str, StatValue]:
        """One pread of the data block, decoded."""
        return self.decode(pread_exact(pread, self.data_size, self.header.data_offset))


class KvmStats(FdObject):
    """A stats fd from ``Vm.stats()`` / ``Vcpu.stats()`` (KVM_GET_STATS_FD).

    ``read()`` returns every stat by name; ``stats["io_exits"]`` reads one. The
    fd belongs to its VM or vCPU object, which closes it before closing itself.
    """

    _error_family = KvmError
    _what = "KvmStats"

    def __init__(self, fd: int, owner: FdObject):
        super().__init__(fd, owner)
        try:
            self.layout = self._checked(lambda: StatsLayout.read(self._pread))
        except BaseException:
            self.close()
            raise

    def _pread(self, size: int, offset: int) -> bytes:
        """pread(2) on the stats fd; the kernel's kvm_stats_read copies header, descriptors or data."""
        fd = self.fileno()  # ClosedError once closed
        try:
            return os.pread(fd, size, offset)
        except OSError as exc:
            raise ioctl_error(KvmError, exc.errno or errno.EIO, "pread(KVM_GET_STATS_FD)") from None

    def _checked(self, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except ValueError as exc:  # a short file: the kernel disagrees with its own header
            raise ioctl_error(KvmError, errno.EIO, "pread(KVM_GET_STATS_FD)", str(exc)) from None

    @property
    def id(self) -> str:
        """The kernel's name for the owner: ``kvm-<pid>`` or ``kvm-<pid>/vcpu-<n>``."""
        return self.layout.id

    @property
    def header(self) -> StatsHeader:
        return self.layout.header

    @property
    def descriptors(self) -> Tuple[StatDesc, ...]:
        """The descriptors in the kernel's order (``len == header.num_desc``)."""
        return self.layout.descriptors

    def descriptor(self, name: str) -> StatDesc:
        return self.layout.by_name[name]

    def read(self) -> Dict[str, StatValue]:
        """Every stat now: one pread of the data block. Histograms are tuples of their buckets."""
        return self._checked(lambda: self.layout.read_data(self._pread))

    def __getitem__(self, name: str) -> StatValue:
        """One stat now: a pread of just its ``size`` u64 values."""
        desc = self.layout.by_name[name]
        return self._checked(lambda: self.layout.decode_one(
            desc, pread_exact(self._pread, desc.size * _U64, self.layout.header.data_offset + desc.offset)))

    def __contains__(self, name: object) -> bool:
        return name in self.layout.by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.by_name)

    def __len__(self) -> int:
        return len(self.layout.descriptors)
