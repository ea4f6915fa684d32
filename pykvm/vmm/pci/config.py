"""A PCI type-0 configuration space: bytes, write masks, RW1C bits, BARs and capabilities.

Every function on a PCI bus has a 256-byte configuration space (4 KiB on PCI
Express, reached through ECAM). Software finds what a function needs by
reading it and programs it by writing it; which bits a write may change is a
property of the hardware, modelled here as three per-byte masks:

- ``wmask``: bits a write replaces (all other bits are read-only);
- ``w1cmask``: bits a write of 1 clears (status error bits, "RW1C");
- neither: read-only (IDs, class, capability pointers, BAR type bits).

BAR sizing falls out of the write mask: a BAR of size S has its address bits
below S read-only zero, so after the guest writes all-ones it reads back
``~(S-1)`` plus the type bits, from which it computes S. The command
register's IO/memory bits say whether the function decodes its BARs at all;
:meth:`ConfigSpace.decoded_bars` gives what is decoded now, which the bus uses
to (re)map BARs. Register names follow linux/include/uapi/linux/pci_regs.h.
"""
from __future__ import annotations

import enum
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from pykvm._record import record_eq, record_hash, record_repr

# Header registers (type 0), offsets in bytes.
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09  # programming interface; class code is 0x09-0x0B
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BASE_ADDRESS_0 = 0x10
NUM_BARS = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITY_LIST = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
HEADER_SIZE = 0x40
CONFIG_SIZE = 0x100
CONFIG_EXP_SIZE = 0x1000

COMMAND_IO = 0x1
COMMAND_MEMORY = 0x2
COMMAND_MASTER = 0x4
COMMAND_PARITY = 0x40
COMMAND_SERR = 0x100
COMMAND_INTX_DISABLE = 0x400

STATUS_INTERRUPT = 0x08
STATUS_CAP_LIST = 0x10
STATUS_RW1C = 0xF900  # parity, signalled/received target abort, master abort, SERR, detected parity

BAR_SPACE_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8
BAR_MEM_MASK = ~0xF & 0xFFFFFFFF
BAR_IO_MASK = ~0x3 & 0xFFFFFFFF
ROM_ENABLE = 0x1
ROM_ADDRESS_MASK = ~0x7FF & 0xFFFFFFFF

CAP_ID_PM = 0x01
CAP_ID_MSI = 0x05
CAP_ID_VNDR = 0x09
CAP_ID_EXP = 0x10
CAP_ID_MSIX = 0x11

ALL_ONES = 0xFFFFFFFF


class BarKind(enum.Enum):
    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"

    @property
    def is_memory(self) -> bool:
        return self is not BarKind.IO


class BarSpec:
    """What a BAR asks for: ``size`` bytes (a power of two) of one kind. Checked when made; hashable."""

    __slots__ = ("size", "kind", "prefetchable")
    size: int
    kind: BarKind
    prefetchable: bool

    _repr_fields = _eq_fields = __slots__

    def __init__(self, size: int, kind: BarKind, prefetchable: bool = False) -> None:
        self.size = size
        self.kind = kind
        self.prefetchable = prefetchable
        low = 4 if kind is BarKind.IO else 16
        if size < low or size & (size - 1):
            raise ValueError(f"BAR size {size:#x} must be a power of two >= {low}")
        if kind is BarKind.IO and size > 0x10000:
            raise ValueError(f"I/O BAR size {size:#x} exceeds the 64 KiB port space")
        if kind is BarKind.MEM32 and size > 1 << 31:
            raise ValueError(f"32-bit memory BAR size {size:#x} exceeds 2 GiB")
        if kind is BarKind.IO and prefetchable:
            raise ValueError("an I/O BAR cannot be prefetchable")

    __repr__ = record_repr
    __eq__ = record_eq
    __hash__ = record_hash

    @property
    def type_bits(self) -> int:
        """The read-only low bits of the BAR register."""
        if self.kind is BarKind.IO:
            return BAR_SPACE_IO
        return (BAR_MEM_TYPE_64 if self.kind is BarKind.MEM64 else 0) | (BAR_MEM_PREFETCH if self.prefetchable else 0)


class BarWindow:
    """A BAR the function decodes now: guest ``address`` .. ``address + size``. Hashable.

    (Not a NamedTuple: its ``index`` field would hide ``tuple.index``.)"""

    __slots__ = ("index", "kind", "address", "size")
    index: int
    kind: BarKind
    address: int
    size: int

    _repr_fields = _eq_fields = __slots__

    def __init__(self, index: int, kind: BarKind, address: int, size: int) -> None:
        self.index = index
        self.kind = kind
        self.address = address
        self.size = size

    __repr__ = record_repr
    __eq__ = record_eq
    __hash__ = record_hash

    @property
    def end(self) -> int:
        return self.address + self.size


WriteHook = Callable[[int, int], None]  # (offset, size) of the write that touched the range


class ConfigSpace:
    """A function's configuration space with hardware write semantics.

    ``read``/``write`` take any offset and a size of 1, 2 or 4 bytes that stays in
    the space (the bus checks this); other accesses read all-ones and are ignored.
    The ``set_*`` methods initialise the space as the hardware would be at reset
    and ignore the masks.
    """

    def __init__(self, size: int = CONFIG_SIZE, data: Optional[bytes] = None):
        if size not in (CONFIG_SIZE, CONFIG_EXP_SIZE):
            raise ValueError(f"config space size must be {CONFIG_SIZE} or {CONFIG_EXP_SIZE}")
        self.size = size
        self.data = bytearray(size)
        if data is not None:
            self.data[: min(size, len(data))] = data[:size]
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self.bars: Dict[int, BarSpec] = {}
        self.rom_size = 0
        self._hooks: List[Tuple[int, int, WriteHook]] = []
        self._cap_len: Dict[int, int] = {}  # lengths of capabilities added here
        # Writable in every function: command (IO, memory, master, parity, SERR, INTx disable),
        # cache line size, latency timer and the interrupt line (scratch for the OS).
        self.set_mask(COMMAND, 2, COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY
                      | COMMAND_SERR | COMMAND_INTX_DISABLE)
        self.set_mask(STATUS, 2, 0, w1c=STATUS_RW1C)
        self.set_mask(CACHE_LINE_SIZE, 1, 0xFF)
        self.set_mask(LATENCY_TIMER, 1, 0xFF)
        self.set_mask(INTERRUPT_LINE, 1, 0xFF)

    @classmethod
    def for_function(cls, vendor: int, device: int, class_code: int, revision: int = 0,
                     subsystem_vendor: int = 0, subsystem: int = 0, interrupt_pin: int = 0,
                     size: int = CONFIG_SIZE) -> "ConfigSpace":
        """A fresh type-0 header: IDs, 24-bit class code, INTx pin (0 none, 1 INTA .. 4 INTD)."""
        c = cls(size)
        c.set(VENDOR_ID, 2, vendor)
        c.set(DEVICE_ID, 2, device)
        c.set(REVISION_ID, 1, revision)
        c.set(CLASS_PROG, 3, class_code)
        c.set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        c.set(SUBSYSTEM_ID, 2, subsystem)
        c.set(INTERRUPT_PIN, 1, interrupt_pin)
        return c

    # -- raw access ------------------------------------------------------------
    def _get(self, offset: int, size: int, buf: bytearray) -> int:
        return int.from_bytes(buf[offset:offset + size], "little")

    def _put(self, offset: int, size: int, value: int, buf: bytearray) -> None:
        buf[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    def get(self, offset: int, size: int) -> int:
        """The current value, with no access checks (for the owner's own use)."""
        return self._get(offset, size, self.data)

    def set(self, offset: int, size: int, value: int) -> None:
        """Store ``value`` ignoring the masks (reset values, hardware-side state)."""
        self._put(offset, size, value, self.data)

    def set_mask(self, offset: int, size: int, wmask: int, w1c: int = 0) -> None:
        """Declare which bits of ``[offset, offset+size)`` a guest may write (and clear by writing 1)."""
        self._put(offset, size, wmask, self.wmask)
        self._put(offset, size, w1c, self.w1cmask)

    def valid(self, offset: int, size: int) -> bool:
        return size in (1, 2, 4) and 0 <= offset and offset + size <= self.size

    def read(self, offset: int, size: int) -> int:
        """A guest read; all-ones for an access outside the space or of a bad size."""
        if not self.valid(offset, size):
            return (1 << 8 * size) - 1 if 0 < size <= 8 else ALL_ONES
        return self.get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write: only ``wmask`` bits change, ``w1cmask`` bits set in ``value`` clear."""
        if not self.valid(offset, size):
            return
        value &= (1 << 8 * size) - 1
        old = self.get(offset, size)
        wmask = self._get(offset, size, self.wmask)
        w1c = self._get(offset, size, self.w1cmask)
        new = (old & ~wmask) | (value & wmask)
        new &= ~(value & w1c)
        self.set(offset, size, new)
        for start, end, hook in self._hooks:
            if offset < end and start < offset + size:
                hook(offset, size)

    def on_write(self, start: int, end: int, hook: WriteHook) -> None:
        """Call ``hook(offset, size)`` after every guest write that overlaps ``[start, end)``."""
        self._hooks.append((start, end, hook))

    # -- BARs --------------------------------------------------------------------
    def set_bar(self, index: int, spec: BarSpec) -> None:
        """Declare BAR ``index``; a 64-bit BAR takes ``index`` and ``index + 1``."""
        if not 0 <= index < NUM_BARS or (spec.kind is BarKind.MEM64 and index == NUM_BARS - 1):
            raise ValueError(f"BAR {index} cannot hold a {spec.kind.value} BAR")
        taken = {i for i, s in self.bars.items()} | {i + 1 for i, s in self.bars.items() if s.kind is BarKind.MEM64}
        if index in taken or (spec.kind is BarKind.MEM64 and index + 1 in taken):
            raise ValueError(f"BAR {index} overlaps a BAR already declared")
        off = BASE_ADDRESS_0 + 4 * index
        addr_mask = ~(spec.size - 1) & ALL_ONES
        self.set(off, 4, spec.type_bits)
        self.set_mask(off, 4, addr_mask & (BAR_IO_MASK if spec.kind is BarKind.IO else BAR_MEM_MASK))
        if spec.kind is BarKind.MEM64:
            self.set(off + 4, 4, 0)
            self.set_mask(off + 4, 4, (~(spec.size - 1) >> 32) & ALL_ONES)
        self.bars[index] = spec

    def bar_address(self, index: int) -> int:
        """The address programmed in BAR ``index`` (type bits stripped; 64-bit BARs joined)."""
        spec = self.bars[index]
        off = BASE_ADDRESS_0 + 4 * index
        low = self.get(off, 4)
        if spec.kind is BarKind.IO:
            return low & BAR_IO_MASK
        addr = low & BAR_MEM_MASK
        if spec.kind is BarKind.MEM64:
            addr |= self.get(off + 4, 4) << 32
        return addr

    def decoded_bars(self) -> Iterator[BarWindow]:
        """The BARs the function answers to now: decode enabled in COMMAND, address not 0.

        An I/O BAR above the 64 KiB port space, or one still holding the all-ones
        sizing pattern, is not decoded (a guest sizes BARs with decode off, but
        nothing stops it from doing so with decode on).
        """
        command = self.get(COMMAND, 2)
        for index, spec in sorted(self.bars.items()):
            if not command & (COMMAND_IO if spec.kind is BarKind.IO else COMMAND_MEMORY):
                continue
            addr = self.bar_address(index)
            limit = 0x10000 if spec.kind is BarKind.IO else (1 << (64 if spec.kind is BarKind.MEM64 else 32))
            if addr == 0 or addr + spec.size > limit or addr == (~(spec.size - 1) & (limit - 1)):
                continue
            yield BarWindow(index, spec.kind, addr, spec.size)

    # -- expansion ROM -------------------------------------------------------------
    def set_rom(self, size: int) -> None:
        """Declare an expansion ROM of ``size`` bytes (0: none, the register reads 0)."""
        if size and (size < 0x800 or size & (size - 1)):
            raise ValueError(f"ROM size {size:#x} must be a power of two >= 2 KiB")
        self.rom_size = size
        self.set(ROM_ADDRESS, 4, 0)
        self.set_mask(ROM_ADDRESS, 4, ((~(size - 1) & ROM_ADDRESS_MASK) | ROM_ENABLE) if size else 0)

    # -- capabilities --------------------------------------------------------------
    def capabilities(self) -> Iterator[Tuple[int, int]]:
        """``(id, offset)`` along the capability list, guarded against loops and bad pointers."""
        if not self.get(STATUS, 2) & STATUS_CAP_LIST:
            return
        seen = set()
        ptr = self.get(CAPABILITY_LIST, 1) & 0xFC
        while ptr and HEADER_SIZE <= ptr <= CONFIG_SIZE - 2 and ptr not in seen:
            seen.add(ptr)
            yield self.get(ptr, 1), ptr
            ptr = self.get(ptr + 1, 1) & 0xFC

    def find_capability(self, cap_id: int) -> Optional[int]:
        return next((off for cid, off in self.capabilities() if cid == cap_id), None)

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes = b"", offset: Optional[int] = None) -> int:
        """Append a capability (``body`` follows the 2-byte id/next header) and return its offset.

        It goes at ``offset`` or after the last capability, dword aligned; ``wmask``
        gives the writable bits of ``body`` byte by byte.
        """
        caps = list(self.capabilities())
        if offset is None:
            offset = HEADER_SIZE
            for _cid, off in caps:
                offset = max(offset, off + self._cap_len.get(off, 2))
            offset = (offset + 3) & ~3
        length = 2 + len(body)
        if offset < HEADER_SIZE or offset % 4 or offset + length > CONFIG_SIZE:
            raise ValueError(f"capability {cap_id:#x} of {length} bytes does not fit at {offset:#x}")
        if any(off < offset + length and offset < off + self._cap_len.get(off, 2) for _c, off in caps):
            raise ValueError(f"capability {cap_id:#x} at {offset:#x} overlaps another capability")
        self.data[offset:offset + length] = bytes([cap_id, 0]) + body
        self.wmask[offset + 2:offset + 2 + len(wmask)] = wmask
        if caps:
            self.set(caps[-1][1] + 1, 1, offset)
        else:
            self.set(CAPABILITY_LIST, 1, offset)
            self.set(STATUS, 2, self.get(STATUS, 2) | STATUS_CAP_LIST)
        self._cap_len[offset] = length
        return offset
