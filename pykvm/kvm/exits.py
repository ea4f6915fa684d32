"""Typed vCPU exits, decoded from the shared ``struct kvm_run`` page.

``KVM_RUN`` returns to userspace with ``exit_reason`` set and the matching
member of kvm_run's union filled in. ``decode()`` turns that into one object
per reason. Every object keeps the raw ``reason``; a reason pykvm does not
model becomes an ``UnknownExit`` rather than an error.

For an IN or an MMIO read, ``data`` is a writable view into the kvm_run
page: writing it (or setting ``value``) answers the guest at the next
``run()``. It keeps the page mapped while it lives, so using it after the
vCPU closed touches a page KVM no longer reads, never unmapped memory. For
an OUT or an MMIO write, ``data`` is a copy of what the guest wrote, so
collected exits keep their values.
"""
from __future__ import annotations

from typing import Any, ClassVar, List, Optional, Tuple

from pykvm._native import ffi, lib
from pykvm._record import record_eq, record_repr
from pykvm.kvm.macros import macro_enum


# KVM_EXIT_IO_IN, KVM_EXIT_HYPERV_HCALL, ... are values of sub-fields, not exit reasons.
ExitReason = macro_enum("ExitReason", "KVM_EXIT_", ("IO_", "HYPERV_", "XEN_", "HYPERCALL_", "NOTIFY_"))
SystemEventType = macro_enum("SystemEventType", "KVM_SYSTEM_EVENT_")
InternalErrorSuberror = macro_enum("InternalErrorSuberror", "KVM_INTERNAL_ERROR_", ("EMULATION_FLAG",))


def reason_name(reason: int) -> str:
    try:
        return ExitReason(reason).name
    except ValueError:
        return f"UNKNOWN({reason})"


class Exit:
    """Base of all exits. ``reason`` is the raw KVM_EXIT_* value.

    Exits are plain classes with ``__slots__`` and a hand-written ``__init__`` (one is
    built for every exit that reaches Python); ``repr`` and ``==`` work as a dataclass's
    did (pykvm._record), and an exit is not hashable."""

    __slots__ = ("reason",)
    reason: int

    REASON: ClassVar[Optional[int]] = None
    _repr_fields: ClassVar[Tuple[str, ...]] = ("reason",)
    _eq_fields: ClassVar[Tuple[str, ...]] = ("reason",)

    def __init__(self, reason: int) -> None:
        self.reason = reason

    __repr__ = record_repr
    __eq__ = record_eq

    @property
    def name(self) -> str:
        return reason_name(self.reason)


class IoExit(Exit):
    """KVM_EXIT_IO: a port IN/OUT (or a string instruction, ``count`` > 1)."""

    __slots__ = ("port", "size", "count", "direction", "data")
    port: int
    size: int
    count: int
    direction: int
    data: Any  # writable buffer of size*count bytes (not in repr)

    REASON = lib.KVM_EXIT_IO
    _repr_fields = ("reason", "port", "size", "count", "direction")
    _eq_fields = _repr_fields + ("data",)

    def __init__(self, reason: int, port: int = 0, size: int = 0, count: int = 0, direction: int = 0,
                 data: Any = None) -> None:
        self.reason = reason
        self.port = port
        self.size = size
        self.count = count
        self.direction = direction
        self.data = data

    @property
    def is_in(self) -> bool:
        return self.direction == lib.KVM_EXIT_IO_IN

    @property
    def is_out(self) -> bool:
        return self.direction == lib.KVM_EXIT_IO_OUT

    @property
    def value(self) -> int:
        """The first element as an integer (OUT: what the guest wrote)."""
        return int.from_bytes(self.data[: self.size], "little")

    @value.setter
    def value(self, v: int) -> None:
        """Answer an IN: the value the guest's register will receive."""
        if len(self.data) < self.size:
            return
        self.data[: self.size] = (v & ((1 << (8 * self.size)) - 1)).to_bytes(self.size, "little")


class MmioExit(Exit):
    """KVM_EXIT_MMIO: an access to guest-physical memory no memslot backs."""

    __slots__ = ("address", "length", "is_write", "data")
    address: int
    length: int
    is_write: bool
    data: Any  # writable buffer of ``length`` bytes (not in repr)

    REASON = lib.KVM_EXIT_MMIO
    _repr_fields = ("reason", "address", "length", "is_write")
    _eq_fields = _repr_fields + ("data",)

    def __init__(self, reason: int, address: int = 0, length: int = 0, is_write: bool = False,
                 data: Any = None) -> None:
        self.reason = reason
        self.address = address
        self.length = length
        self.is_write = is_write
        self.data = data

    @property
    def value(self) -> int:
        return int.from_bytes(self.data[: self.length], "little")

    @value.setter
    def value(self, v: int) -> None:
        """Answer a read: the bytes the guest's load will see."""
        self.data[: self.length] = (v & ((1 << (8 * self.length)) - 1)).to_bytes(self.length, "little")


class HltExit(Exit):
    """KVM_EXIT_HLT: the guest executed HLT (only without an in-kernel LAPIC)."""

    __slots__ = ()
    REASON = lib.KVM_EXIT_HLT


class ShutdownExit(Exit):
    """KVM_EXIT_SHUTDOWN: triple fault (or a shutdown the CPU signalled)."""

    __slots__ = ()
    REASON = lib.KVM_EXIT_SHUTDOWN


class FailEntryExit(Exit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    __slots__ = ("hardware_entry_failure_reason", "cpu")
    hardware_entry_failure_reason: int
    cpu: int

    REASON = lib.KVM_EXIT_FAIL_ENTRY
    _repr_fields = _eq_fields = ("reason", "hardware_entry_failure_reason", "cpu")

    def __init__(self, reason: int, hardware_entry_failure_reason: int = 0, cpu: int = 0) -> None:
        self.reason = reason
        self.hardware_entry_failure_reason = hardware_entry_failure_reason
        self.cpu = cpu


class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not handle something (e.g. emulation failed)."""

    __slots__ = ("suberror", "data")
    suberror: int
    data: List[int]

    REASON = lib.KVM_EXIT_INTERNAL_ERROR
    _repr_fields = _eq_fields = ("reason", "suberror", "data")

    def __init__(self, reason: int, suberror: int = 0, data: Optional[List[int]] = None) -> None:
        self.reason = reason
        self.suberror = suberror
        self.data = [] if data is None else data

    @property
    def suberror_name(self) -> str:
        try:
            return InternalErrorSuberror(self.suberror).name
        except ValueError:
            return f"UNKNOWN({self.suberror})"


class SystemEventExit(Exit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset or crash requested (e.g. PSCI, Hyper-V)."""

    __slots__ = ("type", "data")
    type: int
    data: List[int]

    REASON = lib.KVM_EXIT_SYSTEM_EVENT
    _repr_fields = _eq_fields = ("reason", "type", "data")

    def __init__(self, reason: int, type: int = 0, data: Optional[List[int]] = None) -> None:
        self.reason = reason
        self.type = type
        self.data = [] if data is None else data

    @property
    def type_name(self) -> str:
        try:
            return SystemEventType(self.type).name
        except ValueError:
            return f"UNKNOWN({self.type})"


class DebugExit(Exit):
    """KVM_EXIT_DEBUG: single-step or breakpoint under KVM_SET_GUEST_DEBUG."""

    __slots__ = ("exception", "pc", "dr6", "dr7")
    exception: int
    pc: int
    dr6: int
    dr7: int

    REASON = lib.KVM_EXIT_DEBUG
    _repr_fields = _eq_fields = ("reason", "exception", "pc", "dr6", "dr7")

    def __init__(self, reason: int, exception: int = 0, pc: int = 0, dr6: int = 0, dr7: int = 0) -> None:
        self.reason = reason
        self.exception = exception
        self.pc = pc
        self.dr6 = dr6
        self.dr7 = dr7


class IrqWindowOpenExit(Exit):
    """KVM_EXIT_IRQ_WINDOW_OPEN: the guest can take an interrupt now."""

    __slots__ = ()
    REASON = lib.KVM_EXIT_IRQ_WINDOW_OPEN


class MsrExit(Exit):
    """KVM_EXIT_X86_RDMSR / WRMSR (after KVM_CAP_X86_USER_SPACE_MSR).

    For RDMSR set ``data`` (or ``error = True`` to inject #GP) before the next run.
    """

    __slots__ = ("index", "msr_reason", "_run")
    index: int
    msr_reason: int
    _run: Any  # the kvm_run struct (not in repr or ==)

    _repr_fields = _eq_fields = ("reason", "index", "msr_reason")

    def __init__(self, reason: int, index: int = 0, msr_reason: int = 0, _run: Any = None) -> None:
        self.reason = reason
        self.index = index
        self.msr_reason = msr_reason
        self._run = _run

    @property
    def is_write(self) -> bool:
        return self.reason == lib.KVM_EXIT_X86_WRMSR

    @property
    def data(self) -> int:
        return self._run.msr.data

    @data.setter
    def data(self, v: int) -> None:
        self._run.msr.data = v

    @property
    def error(self) -> bool:
        return bool(self._run.msr.error)

    @error.setter
    def error(self, v: bool) -> None:
        self._run.msr.error = 1 if v else 0


class HypercallExit(Exit):
    """KVM_EXIT_HYPERCALL: a hypercall KVM forwards to userspace; set ``ret``."""

    __slots__ = ("nr", "args", "_run")
    nr: int
    args: List[int]
    _run: Any  # the kvm_run struct (not in repr or ==)

    REASON = lib.KVM_EXIT_HYPERCALL
    _repr_fields = _eq_fields = ("reason", "nr", "args")

    def __init__(self, reason: int, nr: int = 0, args: Optional[List[int]] = None, _run: Any = None) -> None:
        self.reason = reason
        self.nr = nr
        self.args = [] if args is None else args
        self._run = _run

    @property
    def ret(self) -> int:
        return self._run.hypercall.ret

    @ret.setter
    def ret(self, v: int) -> None:
        self._run.hypercall.ret = v


class DirtyRingFullExit(Exit):
    """KVM_EXIT_DIRTY_RING_FULL: this vCPU's dirty ring is nearly full; it runs again only
    after its entries are harvested and ``Vm.reset_dirty_rings()`` has taken them back."""

    __slots__ = ()
    REASON = lib.KVM_EXIT_DIRTY_RING_FULL


class InterruptedExit(Exit):
    """KVM_RUN returned EINTR: a signal or ``Vcpu.kick()`` (reason is KVM_EXIT_INTR)."""

    __slots__ = ()
    REASON = lib.KVM_EXIT_INTR


class UnknownExit(Exit):
    """A reason pykvm does not decode; ``hardware_exit_reason`` from kvm_run.hw for
    KVM_EXIT_UNKNOWN (0 for the other reasons, whose union member pykvm does not read)."""

    __slots__ = ("hardware_exit_reason",)
    hardware_exit_reason: int

    _repr_fields = _eq_fields = ("reason", "hardware_exit_reason")

    def __init__(self, reason: int, hardware_exit_reason: int = 0) -> None:
        self.reason = reason
        self.hardware_exit_reason = hardware_exit_reason


def _mmio_data_offset() -> int:
    probe = ffi.new("struct kvm_run *")
    return int(ffi.cast("uintptr_t", probe.mmio.data)) - int(ffi.cast("uintptr_t", probe))


_MMIO_DATA = _mmio_data_offset()  # where kvm_run.mmio.data sits in the page


def decode(run: Any, page: Any) -> Exit:
    """Decode the exit in ``run`` (a ``struct kvm_run *``); ``page`` is a writable
    memoryview over the whole kvm_run mapping: an IN's or MMIO read's ``data`` is a
    slice of it (which keeps the mapping alive while the exit lives)."""
    reason = run.exit_reason
    if reason == lib.KVM_EXIT_IO:
        io = run.io
        n = io.size * io.count
        off = io.data_offset
        # a data area outside the kvm_run mapping (never sent by a sane kernel) decodes as empty
        data = page[off:off + n] if 0 < n and off + n <= len(page) else bytearray(0)
        if io.direction == lib.KVM_EXIT_IO_OUT:
            data = bytes(data)  # what the guest wrote: a snapshot that outlives the next run
        return IoExit(reason, io.port, io.size, io.count, io.direction, data)
    if reason == lib.KVM_EXIT_MMIO:
        m = run.mmio
        length = min(m.len, 8)
        data = page[_MMIO_DATA:_MMIO_DATA + length]
        return MmioExit(reason, m.phys_addr, length, bool(m.is_write), bytes(data) if m.is_write else data)
    if reason == lib.KVM_EXIT_HLT:
        return HltExit(reason)
    if reason == lib.KVM_EXIT_SHUTDOWN:
        return ShutdownExit(reason)
    if reason == lib.KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(reason, run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        ndata = min(run.internal.ndata, 16)
        return InternalErrorExit(reason, run.internal.suberror, list(run.internal.data[0:ndata]))
    if reason == lib.KVM_EXIT_SYSTEM_EVENT:
        ndata = min(run.system_event.ndata, 16)
        return SystemEventExit(reason, run.system_event.type, list(run.system_event.data[0:ndata]))
    if reason == lib.KVM_EXIT_DEBUG:
        a = run.debug.arch
        return DebugExit(reason, a.exception, a.pc, a.dr6, a.dr7)
    if reason == lib.KVM_EXIT_IRQ_WINDOW_OPEN:
        return IrqWindowOpenExit(reason)
    if reason in (lib.KVM_EXIT_X86_RDMSR, lib.KVM_EXIT_X86_WRMSR):
        return MsrExit(reason, run.msr.index, run.msr.reason, run)
    if reason == lib.KVM_EXIT_HYPERCALL:
        return HypercallExit(reason, run.hypercall.nr, list(run.hypercall.args), run)
    if reason == lib.KVM_EXIT_DIRTY_RING_FULL:
        return DirtyRingFullExit(reason)
    if reason == lib.KVM_EXIT_INTR:
        return InterruptedExit(reason)
    # kvm_run.hw is filled only for KVM_EXIT_UNKNOWN; other reasons use the union otherwise
    return UnknownExit(reason, run.hw.hardware_exit_reason if reason == lib.KVM_EXIT_UNKNOWN else 0)
