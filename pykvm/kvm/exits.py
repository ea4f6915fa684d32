"""Typed vCPU exits, decoded from the shared ``struct kvm_run`` page.

``KVM_RUN`` returns to userspace with ``exit_reason`` set and the matching
member of kvm_run's union filled in. ``decode()`` turns that into one object
per reason. Every object keeps the raw ``reason``; a reason pykvm does not
model becomes an ``UnknownExit`` rather than an error.

For an IN or an MMIO read, ``data`` is a writable view into the kvm_run
page: writing it (or setting ``value``) answers the guest, and it is valid
until the next ``run()``. For an OUT or an MMIO write, ``data`` is a copy of
what the guest wrote, so collected exits keep their values.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional, Tuple, Type

from pykvm._native import ffi, lib


def _enum(name: str, prefix: str, exclude: Tuple[str, ...] = ()) -> Type[enum.IntEnum]:
    """An IntEnum of the compiled ``prefix*`` macros (sub-families excluded)."""
    members = {n[len(prefix):]: getattr(lib, n) for n in sorted(dir(lib))
               if n.startswith(prefix) and not n[len(prefix):].startswith(exclude)}
    return enum.IntEnum(name, members)


# KVM_EXIT_IO_IN, KVM_EXIT_HYPERV_HCALL, ... are values of sub-fields, not exit reasons.
ExitReason = _enum("ExitReason", "KVM_EXIT_", ("IO_", "HYPERV_", "XEN_", "HYPERCALL_", "NOTIFY_"))
SystemEventType = _enum("SystemEventType", "KVM_SYSTEM_EVENT_")
InternalErrorSuberror = _enum("InternalErrorSuberror", "KVM_INTERNAL_ERROR_", ("EMULATION_FLAG",))


def reason_name(reason: int) -> str:
    try:
        return ExitReason(reason).name
    except ValueError:
        return f"UNKNOWN({reason})"


@dataclass
class Exit:
    """Base of all exits. ``reason`` is the raw KVM_EXIT_* value."""

    reason: int

    REASON: ClassVar[Optional[int]] = None

    @property
    def name(self) -> str:
        return reason_name(self.reason)


@dataclass
class IoExit(Exit):
    """KVM_EXIT_IO: a port IN/OUT (or a string instruction, ``count`` > 1)."""

    port: int = 0
    size: int = 0
    count: int = 0
    direction: int = 0
    data: Any = field(default=None, repr=False)  # writable buffer of size*count bytes

    REASON = lib.KVM_EXIT_IO

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


@dataclass
class MmioExit(Exit):
    """KVM_EXIT_MMIO: an access to guest-physical memory no memslot backs."""

    address: int = 0
    length: int = 0
    is_write: bool = False
    data: Any = field(default=None, repr=False)  # writable buffer of ``length`` bytes

    REASON = lib.KVM_EXIT_MMIO

    @property
    def value(self) -> int:
        return int.from_bytes(self.data[: self.length], "little")

    @value.setter
    def value(self, v: int) -> None:
        """Answer a read: the bytes the guest's load will see."""
        self.data[: self.length] = (v & ((1 << (8 * self.length)) - 1)).to_bytes(self.length, "little")


@dataclass
class HltExit(Exit):
    """KVM_EXIT_HLT: the guest executed HLT (only without an in-kernel LAPIC)."""

    REASON = lib.KVM_EXIT_HLT


@dataclass
class ShutdownExit(Exit):
    """KVM_EXIT_SHUTDOWN: triple fault (or a shutdown the CPU signalled)."""

    REASON = lib.KVM_EXIT_SHUTDOWN


@dataclass
class FailEntryExit(Exit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    hardware_entry_failure_reason: int = 0
    cpu: int = 0

    REASON = lib.KVM_EXIT_FAIL_ENTRY


@dataclass
class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not handle something (e.g. emulation failed)."""

    suberror: int = 0
    data: List[int] = field(default_factory=list)

    REASON = lib.KVM_EXIT_INTERNAL_ERROR

    @property
    def suberror_name(self) -> str:
        try:
            return InternalErrorSuberror(self.suberror).name
        except ValueError:
            return f"UNKNOWN({self.suberror})"


@dataclass
class SystemEventExit(Exit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset or crash requested (e.g. PSCI, Hyper-V)."""

    type: int = 0
    data: List[int] = field(default_factory=list)

    REASON = lib.KVM_EXIT_SYSTEM_EVENT

    @property
    def type_name(self) -> str:
        try:
            return SystemEventType(self.type).name
        except ValueError:
            return f"UNKNOWN({self.type})"


@dataclass
class DebugExit(Exit):
    """KVM_EXIT_DEBUG: single-step or breakpoint under KVM_SET_GUEST_DEBUG."""

    exception: int = 0
    pc: int = 0
    dr6: int = 0
    dr7: int = 0

    REASON = lib.KVM_EXIT_DEBUG


@dataclass
class IrqWindowOpenExit(Exit):
    """KVM_EXIT_IRQ_WINDOW_OPEN: the guest can take an interrupt now."""

    REASON = lib.KVM_EXIT_IRQ_WINDOW_OPEN


@dataclass
class MsrExit(Exit):
    """KVM_EXIT_X86_RDMSR / WRMSR (after KVM_CAP_X86_USER_SPACE_MSR).

    For RDMSR set ``data`` (or ``error = True`` to inject #GP) before the next run.
    """

    index: int = 0
    msr_reason: int = 0
    _run: Any = field(default=None, repr=False, compare=False)

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


@dataclass
class HypercallExit(Exit):
    """KVM_EXIT_HYPERCALL: a hypercall KVM forwards to userspace; set ``ret``."""

    nr: int = 0
    args: List[int] = field(default_factory=list)
    _run: Any = field(default=None, repr=False, compare=False)

    REASON = lib.KVM_EXIT_HYPERCALL

    @property
    def ret(self) -> int:
        return self._run.hypercall.ret

    @ret.setter
    def ret(self, v: int) -> None:
        self._run.hypercall.ret = v


@dataclass
class InterruptedExit(Exit):
    """KVM_RUN returned EINTR: a signal or ``Vcpu.kick()`` (reason is KVM_EXIT_INTR)."""

    REASON = lib.KVM_EXIT_INTR


@dataclass
class UnknownExit(Exit):
    """A reason pykvm does not decode; ``hardware_exit_reason`` from kvm_run.hw."""

    hardware_exit_reason: int = 0


def decode(run: Any, page: Any) -> Exit:
    """Decode the exit in ``run`` (a ``struct kvm_run *``); ``page`` is a
    writable buffer over the whole kvm_run mapping (for IO data)."""
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
        data = ffi.buffer(m.data, length)
        return MmioExit(reason, m.phys_addr, length, bool(m.is_write), data[:] if m.is_write else data)
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
    if reason == lib.KVM_EXIT_INTR:
        return InterruptedExit(reason)
    return UnknownExit(reason, run.hw.hardware_exit_reason)
