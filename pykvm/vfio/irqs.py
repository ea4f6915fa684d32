"""Device interrupts: VFIO_DEVICE_GET_IRQ_INFO and the VFIO_DEVICE_SET_IRQS argument.

vfio-pci numbers interrupt *indexes* (INTx, MSI, MSI-X, error, request); each
index has ``count`` vectors. SET_IRQS acts on ``[start, start+count)`` of one
index: TRIGGER with eventfds routes the vectors to them (and enables the index),
TRIGGER with no data and count 0 disables the index, MASK/UNMASK with no data
act immediately, TRIGGER with no data fires the eventfd from the kernel
(loopback test).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Union

from pykvm._native import ffi, lib

__all__ = ["IrqInfo", "irq_set", "IRQ_INDEX_NAMES", "EventFdLike"]

EventFdLike = Union[int, None, Any]  # an int fd, None (-1: leave/unassign), or an object with fileno()

IRQ_INDEX_NAMES = {
    lib.VFIO_PCI_INTX_IRQ_INDEX: "INTx",
    lib.VFIO_PCI_MSI_IRQ_INDEX: "MSI",
    lib.VFIO_PCI_MSIX_IRQ_INDEX: "MSI-X",
    lib.VFIO_PCI_ERR_IRQ_INDEX: "ERR",
    lib.VFIO_PCI_REQ_IRQ_INDEX: "REQ",
}


@dataclass(frozen=True)
class IrqInfo:
    """One interrupt index: how many vectors, and how they behave."""

    index: int
    flags: int
    count: int

    @property
    def name(self) -> str:
        return IRQ_INDEX_NAMES.get(self.index, f"index {self.index}")

    @property
    def eventfd(self) -> bool:
        return bool(self.flags & lib.VFIO_IRQ_INFO_EVENTFD)

    @property
    def maskable(self) -> bool:
        return bool(self.flags & lib.VFIO_IRQ_INFO_MASKABLE)

    @property
    def automasked(self) -> bool:
        """Level-triggered (INTx): the kernel masks it on delivery until it is unmasked."""
        return bool(self.flags & lib.VFIO_IRQ_INFO_AUTOMASKED)

    @property
    def noresize(self) -> bool:
        """The vectors are enabled as a set: to add one, disable the index and set them all again."""
        return bool(self.flags & lib.VFIO_IRQ_INFO_NORESIZE)


def _fd(obj: EventFdLike) -> int:
    if obj is None:
        return -1
    return obj if isinstance(obj, int) else obj.fileno()


def irq_set(index: int, start: int, count: int, action: int, eventfds: Optional[Iterable[EventFdLike]] = None,
            bools: Optional[Iterable[bool]] = None) -> Any:
    """Build ``struct vfio_irq_set`` for ``action`` (a VFIO_IRQ_SET_ACTION_* flag).

    Data is eventfds (DATA_EVENTFD), per-vector booleans (DATA_BOOL), or nothing (DATA_NONE).
    """
    if eventfds is not None:
        fds = [_fd(e) for e in eventfds]
        data, kind, count = ffi.buffer(ffi.new("__s32[]", fds))[:], lib.VFIO_IRQ_SET_DATA_EVENTFD, len(fds)
    elif bools is not None:
        flags = [1 if b else 0 for b in bools]
        data, kind, count = bytes(flags), lib.VFIO_IRQ_SET_DATA_BOOL, len(flags)
    else:
        data, kind = b"", lib.VFIO_IRQ_SET_DATA_NONE
    off = ffi.offsetof("struct vfio_irq_set", "data")
    raw = bytearray(max(ffi.sizeof("struct vfio_irq_set"), off + len(data)))
    arg = ffi.from_buffer("struct vfio_irq_set *", raw)
    arg.argsz = len(raw)
    arg.flags = kind | action
    arg.index, arg.start, arg.count = index, start, count
    raw[off : off + len(data)] = data
    return arg
