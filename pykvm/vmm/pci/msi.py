"""MSI capability emulation: the guest programs address/data/mask in config space.

An MSI is a DWORD memory write by the device: the guest puts the target (an
address in the LAPIC range, 0xFEExxxxx, naming the destination CPU) and the
payload (the vector) into the capability. With Multiple Message Enable = n,
the device may send 2**n messages, varying the low n bits of the data. A
per-vector mask bit (when the function offers it) holds a vector back.

Layout after the 2-byte id/next header (PCI 3.0, 6.8.1):
``+2 control``, ``+4 address``, then for a 64-bit capable function
``+8 upper address, +0xC data, +0x10 mask, +0x14 pending``, else
``+8 data, +0xC mask, +0x10 pending``.

The model only tracks what the guest asked for; whoever owns the function
(a passthrough device) turns :meth:`MsiCap.vectors` into real interrupt
routes when ``on_change`` fires.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from pykvm.vmm.pci.config import CAP_ID_MSI, ConfigSpace

CONTROL = 2
ADDRESS_LO = 4
FLAGS_ENABLE = 0x1
FLAGS_QMASK = 0x0E  # Multiple Message Capable (read-only): log2 of vectors the function has
FLAGS_QSIZE = 0x70  # Multiple Message Enable: log2 of vectors the guest allows
FLAGS_64BIT = 0x80
FLAGS_MASKBIT = 0x100


@dataclass(frozen=True)
class MsiMessage:
    """What the device writes to raise an interrupt: ``data`` at ``address``."""

    address: int
    data: int


@dataclass(frozen=True)
class Vectors:
    """The guest's view of a function's message interrupts: ``messages[i]`` is None while vector i is masked."""

    enabled: bool
    messages: Tuple[Optional[MsiMessage], ...]

    @property
    def count(self) -> int:
        return len(self.messages)


DISABLED = Vectors(False, ())


class MsiCap:
    """The MSI capability at ``offset`` of ``config`` (its control word already set up).

    Declares the writable bits (enable, multiple message enable, address, data,
    mask) and calls ``on_change()`` after each guest write to the capability.
    """

    def __init__(self, config: ConfigSpace, offset: int, on_change: Callable[[], None] = lambda: None):
        self.config = config
        self.offset = offset
        self.on_change = on_change
        control = config.get(offset + CONTROL, 2)
        self.is64 = bool(control & FLAGS_64BIT)
        self.maskable = bool(control & FLAGS_MASKBIT)
        self.max_vectors = 1 << min((control & FLAGS_QMASK) >> 1, 5)
        data_off = 0xC if self.is64 else 0x8
        self._data = offset + data_off
        self._mask = offset + data_off + 4 if self.maskable else None
        self.length = data_off + (12 if self.maskable else 4)
        # Reset state: disabled, no address/data, vectors unmasked, nothing pending.
        config.set(offset + CONTROL, 2, control & ~(FLAGS_ENABLE | FLAGS_QSIZE))
        config.set(offset + ADDRESS_LO, data_off - ADDRESS_LO, 0)
        config.set(self._data, 2, 0)
        config.set_mask(offset + CONTROL, 2, FLAGS_ENABLE | FLAGS_QSIZE)
        config.set_mask(offset + ADDRESS_LO, 4, 0xFFFFFFFC)
        if self.is64:
            config.set_mask(offset + 8, 4, 0xFFFFFFFF)
        config.set_mask(self._data, 2, 0xFFFF)
        if self._mask is not None:
            config.set(self._mask, 8, 0)
            config.set_mask(self._mask, 4, (1 << self.max_vectors) - 1)
        config.on_write(offset, offset + self.length, lambda _off, _size: self.on_change())

    @classmethod
    def add(cls, config: ConfigSpace, vectors: int = 1, is64: bool = True, maskable: bool = False,
            on_change: Callable[[], None] = lambda: None) -> "MsiCap":
        """Append an MSI capability for ``vectors`` (a power of two up to 32) to ``config``."""
        if vectors < 1 or vectors > 32 or vectors & (vectors - 1):
            raise ValueError(f"MSI vectors {vectors} must be a power of two from 1 to 32")
        control = ((vectors.bit_length() - 1) << 1) | (FLAGS_64BIT if is64 else 0) | (FLAGS_MASKBIT if maskable else 0)
        length = (0xC if is64 else 0x8) + (12 if maskable else 4)
        offset = config.add_capability(CAP_ID_MSI, control.to_bytes(2, "little") + bytes(length - 4))
        return cls(config, offset, on_change)

    @property
    def enabled(self) -> bool:
        return bool(self.config.get(self.offset + CONTROL, 2) & FLAGS_ENABLE)

    @property
    def enabled_vectors(self) -> int:
        """2**MME, clamped to what the function has (a guest may write more)."""
        mme = (self.config.get(self.offset + CONTROL, 2) & FLAGS_QSIZE) >> 4
        return min(1 << min(mme, 5), self.max_vectors)

    def message(self, vector: int) -> MsiMessage:
        address = self.config.get(self.offset + ADDRESS_LO, 4)
        if self.is64:
            address |= self.config.get(self.offset + 8, 4) << 32
        data = self.config.get(self._data, 2)
        n = self.enabled_vectors
        return MsiMessage(address, (data & ~(n - 1)) | vector)

    def masked(self, vector: int) -> bool:
        return self._mask is not None and bool(self.config.get(self._mask, 4) >> vector & 1)

    def vectors(self) -> Vectors:
        """What the guest enabled, one entry per enabled vector (None when masked)."""
        if not self.enabled:
            return DISABLED
        return Vectors(True, tuple(None if self.masked(v) else self.message(v) for v in range(self.enabled_vectors)))
