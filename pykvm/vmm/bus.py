"""Address buses: where a guest's port or MMIO access is routed to a device.

A device is any object with ``read(offset, size) -> bytes`` and
``write(offset, data: bytes) -> None``; the bus hands it the offset inside
its range. Guest-controlled values are checked here, at the edge: an access
nobody claims reads as all-ones and a write to it is dropped, like a PCI
master abort; a device that raises is answered the same way, so a guest can
never take down the vCPU thread. Such faults are counted in ``Bus.faults``;
the first FAULT_LOG_LIMIT of a bus are logged with their traceback, later ones
only counted (a guest can cause them thousands of times a second).
"""
from __future__ import annotations

import bisect
import threading
from typing import List, Optional, Protocol, Tuple

from pykvm._log import get_logger
from pykvm._record import record_eq, record_hash, record_repr

log = get_logger(__name__)

FAULT_LOG_LIMIT = 10  # device faults per bus logged with a traceback; the rest are only counted


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class Range:
    """``length`` ports or bytes from ``base``, owned by ``device``.

    Immutable once made, equal when all four fields are, hashable. Not a tuple:
    ``addr in r`` asks whether ``r`` covers ``addr``."""

    __slots__ = ("base", "length", "device", "name")
    base: int
    length: int
    device: BusDevice
    name: str

    _repr_fields = _eq_fields = __slots__

    def __init__(self, base: int, length: int, device: BusDevice, name: str) -> None:
        self.base = base
        self.length = length
        self.device = device
        self.name = name

    __repr__ = record_repr
    __eq__ = record_eq
    __hash__ = record_hash

    @property
    def end(self) -> int:
        return self.base + self.length

    def __contains__(self, addr: int) -> bool:
        return self.base <= addr < self.end


class Bus:
    """Non-overlapping ranges, looked up by binary search."""

    def __init__(self, name: str, limit: int):
        self.name = name
        self.limit = limit  # exclusive upper bound of addresses (1<<16 for PIO)
        self._bases: List[int] = []
        self._ranges: List[Range] = []
        self.unclaimed = 0  # accesses no device claimed
        self.faults = 0  # device handlers that raised
        self._fault_lock = threading.Lock()

    def register(self, base: int, length: int, device: BusDevice, name: str = "") -> Range:
        if length <= 0 or base < 0 or base + length > self.limit:
            raise ValueError(f"{self.name}: bad range {base:#x}+{length:#x}")
        r = Range(base, length, device, name or type(device).__name__)
        i = bisect.bisect_right(self._bases, base)
        if (i > 0 and self._ranges[i - 1].end > base) or (i < len(self._ranges) and self._ranges[i].base < r.end):
            other = self._ranges[i - 1] if i > 0 and self._ranges[i - 1].end > base else self._ranges[i]
            raise ValueError(f"{self.name}: {r.name} at {base:#x}+{length:#x} overlaps {other.name} at {other.base:#x}+{other.length:#x}")
        self._bases.insert(i, base)
        self._ranges.insert(i, r)
        return r

    def unregister(self, r: Range) -> None:
        i = self._ranges.index(r)
        del self._ranges[i]
        del self._bases[i]

    def find(self, addr: int) -> Optional[Range]:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0 and addr in self._ranges[i]:
            return self._ranges[i]
        return None

    def ranges(self) -> Tuple[Range, ...]:
        return tuple(self._ranges)

    def read(self, addr: int, size: int) -> bytes:
        r = self.find(addr)
        if r is None or addr + size > r.end:
            self.unclaimed += 1
            log.debug("%s: unclaimed read %#x/%d", self.name, addr, size)
            return b"\xff" * size
        try:
            data = bytes(r.device.read(addr - r.base, size))
        except Exception:
            self._fault("%s: %s failed reading %#x/%d", self.name, r.name, addr, size)
            return b"\xff" * size
        if len(data) != size:
            data = (data + b"\xff" * size)[:size]
        return data

    def write(self, addr: int, data: bytes) -> None:
        r = self.find(addr)
        if r is None or addr + len(data) > r.end:
            self.unclaimed += 1
            log.debug("%s: unclaimed write %#x <- %s", self.name, addr, bytes(data).hex())
            return
        try:
            r.device.write(addr - r.base, bytes(data))
        except Exception:
            self._fault("%s: %s failed writing %#x", self.name, r.name, addr)

    def _fault(self, message: str, *args: object) -> None:
        """Count a device that raised (called from its except block); log the first few."""
        with self._fault_lock:
            self.faults += 1
            n = self.faults
        if n <= FAULT_LOG_LIMIT:
            log.exception(message, *args)
            if n == FAULT_LOG_LIMIT:
                log.warning("%s: %d device faults; further ones are only counted (Bus.faults)", self.name, n)
