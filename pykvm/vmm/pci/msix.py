"""MSI-X emulation: the capability's control word, the vector table and the PBA.

MSI-X keeps its per-vector state in memory, not in config space: a table of
16-byte entries (address low, address high, data, vector control whose bit 0
masks the vector) and a Pending Bit Array, each in one of the function's BARs
at an offset the capability names (PCI 3.0, 6.8.2). The capability itself only
holds the table size and two control bits: Enable and Function Mask (which
masks every vector at once).

This model holds the guest's table; the BAR pages that contain it must trap to
the VMM (everything else in the BAR can be mapped straight to the device).
``on_change()`` fires after each write that may change a vector; ``vectors()``
then tells which vectors are live and their messages, and the owner routes
them (a passthrough device: KVM GSI routes and irqfds, enabled lazily).
"""
from __future__ import annotations

from typing import Callable

from pykvm.vmm.pci.config import ConfigSpace
from pykvm.vmm.pci.msi import DISABLED, MsiMessage, Vectors

CONTROL = 2
TABLE = 4
PBA = 8
FLAGS_QSIZE = 0x07FF  # table size - 1
FLAGS_MASKALL = 0x4000
FLAGS_ENABLE = 0x8000
BIR_MASK = 0x7
ENTRY_SIZE = 16
ENTRY_VECTOR_CTRL = 12
VECTOR_MASKED = 0x1
# Writable bits of one entry, byte by byte: address (DWORD aligned), upper address, data, mask bit.
_ENTRY_WMASK = bytes([0xFC, 0xFF, 0xFF, 0xFF] + [0xFF] * 8 + [VECTOR_MASKED, 0, 0, 0])


class Msix:
    """The MSI-X capability at ``offset`` of ``config`` plus the table and PBA it describes."""

    def __init__(self, config: ConfigSpace, offset: int, on_change: Callable[[], None] = lambda: None):
        self.config = config
        self.offset = offset
        self.on_change = on_change
        control = config.get(offset + CONTROL, 2)
        self.size = (control & FLAGS_QSIZE) + 1
        table = config.get(offset + TABLE, 4)
        pba = config.get(offset + PBA, 4)
        self.table_bar, self.table_offset = table & BIR_MASK, table & ~BIR_MASK
        self.pba_bar, self.pba_offset = pba & BIR_MASK, pba & ~BIR_MASK
        self.table_size = self.size * ENTRY_SIZE
        self.pba_size = (self.size + 63) // 64 * 8
        # Reset: MSI-X off, every vector masked (PCI 3.0: vector control resets to masked).
        self.entries = bytearray(self.table_size)
        for v in range(self.size):
            self.entries[v * ENTRY_SIZE + ENTRY_VECTOR_CTRL] = VECTOR_MASKED
        config.set(offset + CONTROL, 2, control & FLAGS_QSIZE)
        config.set_mask(offset + CONTROL, 2, FLAGS_ENABLE | FLAGS_MASKALL)
        config.on_write(offset + CONTROL, offset + CONTROL + 2, lambda _off, _size: self.on_change())

    @property
    def enabled(self) -> bool:
        return bool(self.config.get(self.offset + CONTROL, 2) & FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.config.get(self.offset + CONTROL, 2) & FLAGS_MASKALL)

    def _entry(self, vector: int, field: int, size: int) -> int:
        at = vector * ENTRY_SIZE + field
        return int.from_bytes(self.entries[at:at + size], "little")

    def message(self, vector: int) -> MsiMessage:
        return MsiMessage(self._entry(vector, 0, 8), self._entry(vector, 8, 4))

    def masked(self, vector: int) -> bool:
        return bool(self._entry(vector, ENTRY_VECTOR_CTRL, 4) & VECTOR_MASKED)

    def vectors(self) -> Vectors:
        """All table entries while MSI-X is on (None for masked ones, or all None under Function Mask)."""
        if not self.enabled:
            return DISABLED
        allmask = self.function_masked
        return Vectors(True, tuple(None if allmask or self.masked(v) else self.message(v) for v in range(self.size)))

    # -- the table and PBA as the guest sees them in the BAR --------------------------
    def table_read(self, offset: int, size: int) -> bytes:
        """Guest read of the table at ``offset`` (relative to the table); all-ones outside it."""
        if offset < 0 or size <= 0 or offset + size > self.table_size:
            return b"\xff" * max(size, 0)
        return bytes(self.entries[offset:offset + size])

    def table_write(self, offset: int, data: bytes) -> None:
        """Guest write of the table; only the writable bits of each entry change."""
        if offset < 0 or not data or offset + len(data) > self.table_size:
            return
        for i, byte in enumerate(data):
            at = offset + i
            m = _ENTRY_WMASK[at % ENTRY_SIZE]
            self.entries[at] = (self.entries[at] & ~m) | (byte & m)
        self.on_change()

    def pba_read(self, offset: int, size: int) -> bytes:
        """Pending bits read as zero: an interrupt that arrives while its vector is masked
        stays in its eventfd and is delivered when the vector is unmasked."""
        if offset < 0 or size <= 0 or offset + size > self.pba_size:
            return b"\xff" * max(size, 0)
        return bytes(size)
