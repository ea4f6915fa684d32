"""Register and state structs as Python objects over the kernel's own layout.

Each wrapper owns a ``struct kvm_*`` allocated by cffi; attribute access reads
and writes the C fields directly (``regs.rip = 0x1000``), nested structs and
arrays are live views (``sregs.cs.base = 0``) that keep their owner alive, and
``ptr`` is what the ioctl receives.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Iterator, List

from pykvm._native import ffi, lib
from pykvm._record import record_eq, record_repr


class Struct:
    """A cffi-allocated kernel struct with attribute access to its fields."""

    ctype = ""

    def __init__(self, **fields: Any):
        object.__setattr__(self, "ptr", self._allocate())
        for name, value in fields.items():
            setattr(self, name, value)

    def _allocate(self) -> Any:
        """The zeroed ``ctype *`` this object wraps."""
        return ffi.new(self.ctype + " *")

    def _allocate_bytes(self, nbytes: int) -> Any:
        """A zeroed ``ctype *`` at the start of ``nbytes`` owned bytes: for structs whose
        flexible tail the kernel fills beyond ``sizeof(ctype)``."""
        buf = ffi.new("char[]", nbytes)
        object.__setattr__(self, "_buf", buf)  # owns the memory ``ptr`` points into
        return ffi.cast(self.ctype + " *", buf)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return _view(self, getattr(self.ptr, name))

    def __setattr__(self, name: str, value: Any) -> None:
        if not hasattr(self.ptr, name):
            raise AttributeError(f"{self.ctype} has no field {name!r}")
        setattr(self.ptr, name, _cdata(value))

    def field_names(self) -> List[str]:
        return [name for name, _ in ffi.typeof(self.ptr[0]).fields]

    def as_dict(self) -> Dict[str, Any]:
        return {name: _pythonize(getattr(self.ptr, name)) for name in self.field_names()}

    def nbytes(self) -> int:
        """Bytes this object owns: ``sizeof(ctype)``, or the whole buffer of a struct with a tail."""
        buf = self.__dict__.get("_buf")
        return len(buf) if buf is not None else ffi.sizeof(self.ptr[0])

    def to_bytes(self) -> bytes:
        return bytes(ffi.buffer(self.ptr, self.nbytes()))

    def copy(self):
        """An independent copy of all :meth:`nbytes` bytes (a tail included)."""
        other = object.__new__(type(self))
        other.__dict__.update((k, v) for k, v in self.__dict__.items() if k not in ("ptr", "_buf"))
        object.__setattr__(other, "ptr", other._allocate())
        ffi.memmove(other.ptr, self.ptr, self.nbytes())
        return other

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and self.to_bytes() == other.to_bytes()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.as_dict()})"


class FieldView:
    """A nested struct, union or array of a :class:`Struct`: reads and writes go to the
    owner's memory, and the view holds the owner. (A bare cffi view of a field does not
    keep the allocation alive, so ``cpu.get_xsave().region[6]`` would read freed memory.)
    ``bytes(view)`` copies the field out; ``view.cdata`` is the raw cffi view for ffi calls,
    valid while the view is."""

    __slots__ = ("_owner", "cdata")

    def __init__(self, owner: Any, cdata: Any):
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "cdata", cdata)

    def __getattr__(self, name: str) -> Any:
        return _view(self._owner, getattr(self.cdata, name))

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.cdata, name, _cdata(value))

    def __getitem__(self, index: Any) -> Any:
        return _view(self._owner, self.cdata[index])

    def __setitem__(self, index: Any, value: Any) -> None:
        self.cdata[index] = _cdata(value)

    def __len__(self) -> int:
        return len(self.cdata)

    def __iter__(self) -> Iterator[Any]:
        return (self[i] for i in range(len(self.cdata)))

    def __bytes__(self) -> bytes:
        c = self.cdata
        return bytes(ffi.buffer(c if ffi.typeof(c).kind == "array" else ffi.addressof(c)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FieldView):
            return ffi.typeof(self.cdata) is ffi.typeof(other.cdata) and bytes(self) == bytes(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, like the struct it views

    def __repr__(self) -> str:
        return f"FieldView({_pythonize(self.cdata)!r})"


def _view(owner: Any, value: Any) -> Any:
    """``value`` read from ``owner``'s memory: scalars as they are, nested fields as views."""
    if isinstance(value, ffi.CData) and ffi.typeof(value).kind in ("struct", "union", "array"):
        return FieldView(owner, value)
    return value


def _cdata(value: Any) -> Any:
    return value.cdata if isinstance(value, FieldView) else value


def _pythonize(value: Any) -> Any:
    if isinstance(value, ffi.CData):
        kind = ffi.typeof(value).kind
        if kind == "struct" or kind == "union":
            return {name: _pythonize(getattr(value, name)) for name, _ in ffi.typeof(value).fields if name}
        if kind == "array":
            return [_pythonize(v) for v in value]
    return value


class Regs(Struct):
    """General-purpose registers (KVM_GET_REGS / KVM_SET_REGS)."""

    ctype = "struct kvm_regs"


class Sregs(Struct):
    """Segment, descriptor-table and control registers (KVM_GET_SREGS / KVM_SET_SREGS)."""

    ctype = "struct kvm_sregs"


class Sregs2(Struct):
    """``Sregs`` plus the PAE PDPTRs (KVM_GET_SREGS2 / KVM_SET_SREGS2).

    ``flags & PDPTRS_VALID`` says ``pdptrs`` hold the four page-directory pointers the
    CPU loaded under PAE paging (KVM_GET_SREGS2 sets it only then); on KVM_SET_SREGS2
    it makes KVM take them as given instead of re-reading them from guest memory at
    CR3, which is how a migrated PAE guest keeps PDPTRs its memory no longer holds.
    Unlike ``Sregs`` there is no interrupt bitmap: pending interrupts travel in
    ``VcpuEvents``.
    """

    ctype = "struct kvm_sregs2"
    PDPTRS_VALID = lib.KVM_SREGS2_FLAGS_PDPTRS_VALID


class Fpu(Struct):
    """x87/SSE state (KVM_GET_FPU / KVM_SET_FPU)."""

    ctype = "struct kvm_fpu"


class Xsave(Struct):
    """The XSAVE area (KVM_GET_XSAVE / KVM_GET_XSAVE2 / KVM_SET_XSAVE).

    ``region`` is the 4 KiB ``struct kvm_xsave`` (legacy area, XSAVE header and the
    fixed-size components). Dynamically enabled features (AMX tile data) make the
    guest's area larger than that: KVM_GET_XSAVE2 then writes ``size`` bytes, the
    size KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) reports on the VM, and KVM_SET_XSAVE
    reads as many back. ``to_bytes()``, ``copy()`` and ``==`` cover all ``size`` bytes.
    """

    ctype = "struct kvm_xsave"

    def __init__(self, size: int = 0, **fields: Any):
        object.__setattr__(self, "size", max(size, ffi.sizeof(self.ctype)))
        super().__init__(**fields)

    def _allocate(self) -> Any:
        return self._allocate_bytes(self.size)


class Xcrs(Struct):
    """Extended control registers, XCR0 (KVM_GET_XCRS / KVM_SET_XCRS)."""

    ctype = "struct kvm_xcrs"


class Lapic(Struct):
    """The in-kernel local APIC's register page (KVM_GET_LAPIC / KVM_SET_LAPIC)."""

    ctype = "struct kvm_lapic_state"

    def reg(self, offset: int) -> int:
        return int.from_bytes(ffi.buffer(self.ptr.regs)[offset:offset + 4], "little")

    def set_reg(self, offset: int, value: int) -> None:
        ffi.buffer(self.ptr.regs)[offset:offset + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")


class VcpuEvents(Struct):
    """Pending exceptions, interrupts, NMI and SMI (KVM_GET/SET_VCPU_EVENTS)."""

    ctype = "struct kvm_vcpu_events"


class DebugRegs(Struct):
    """DR0-3, DR6, DR7 (KVM_GET_DEBUGREGS / KVM_SET_DEBUGREGS)."""

    ctype = "struct kvm_debugregs"


class IrqChip(Struct):
    """A PIC or IOAPIC state (KVM_GET_IRQCHIP / KVM_SET_IRQCHIP); ``chip_id`` says which.

    IOAPIC: ``ioapic_irr`` (pins asserted), ``ioapic_redirection(pin)`` (the
    64-bit redirection entry: vector, delivery mode, mask bit 16, remote IRR
    bit 14, ...). PIC: ``pic_irr``, ``pic_imr``, ``pic_isr``, ``pic_irq_base``.
    """

    ctype = "struct kvm_irqchip"

    @property
    def ioapic_base(self) -> int:
        return lib.pykvm_ioapic_base(self.ptr)

    @property
    def ioapic_id(self) -> int:
        return lib.pykvm_ioapic_id(self.ptr)

    @property
    def ioapic_irr(self) -> int:
        return lib.pykvm_ioapic_irr(self.ptr)

    def ioapic_redirection(self, pin: int) -> int:
        if not 0 <= pin < lib.KVM_IOAPIC_NUM_PINS:
            raise IndexError(f"IOAPIC pin {pin} (0..{lib.KVM_IOAPIC_NUM_PINS - 1})")
        return lib.pykvm_ioapic_redirection(self.ptr, pin)

    def set_ioapic_redirection(self, pin: int, bits: int) -> None:
        if not 0 <= pin < lib.KVM_IOAPIC_NUM_PINS:
            raise IndexError(f"IOAPIC pin {pin} (0..{lib.KVM_IOAPIC_NUM_PINS - 1})")
        lib.pykvm_ioapic_set_redirection(self.ptr, pin, bits)

    @property
    def pic_irr(self) -> int:
        return lib.pykvm_pic_irr(self.ptr)

    @property
    def pic_imr(self) -> int:
        return lib.pykvm_pic_imr(self.ptr)

    @property
    def pic_isr(self) -> int:
        return lib.pykvm_pic_isr(self.ptr)

    @property
    def pic_irq_base(self) -> int:
        return lib.pykvm_pic_irq_base(self.ptr)


class PitState(Struct):
    """The in-kernel i8254's three channels (KVM_GET_PIT2 / KVM_SET_PIT2)."""

    ctype = "struct kvm_pit_state2"


class ClockData(Struct):
    """kvmclock's view of guest time (KVM_GET_CLOCK / KVM_SET_CLOCK)."""

    ctype = "struct kvm_clock_data"


class CpuidEntry:
    """One CPUID leaf/subleaf as KVM stores it (struct kvm_cpuid_entry2)."""

    __slots__ = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    _repr_fields = _eq_fields = __slots__

    def __init__(self, function: int, index: int = 0, flags: int = 0, eax: int = 0, ebx: int = 0, ecx: int = 0,
                 edx: int = 0) -> None:
        self.function = function
        self.index = index
        self.flags = flags
        self.eax = eax
        self.ebx = ebx
        self.ecx = ecx
        self.edx = edx

    __repr__ = record_repr
    __eq__ = record_eq


def cpuid_to_c(entries: Iterable[CpuidEntry]) -> Any:
    """Pack entries into a ``struct kvm_cpuid2`` with its flexible array."""
    entries = list(entries)
    c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for i, e in enumerate(entries):
        for f in CpuidEntry.__slots__:
            setattr(c.entries[i], f, getattr(e, f))
    return c


def cpuid_from_c(c: Any) -> List[CpuidEntry]:
    return [CpuidEntry(*(getattr(c.entries[i], f) for f in CpuidEntry.__slots__)) for i in range(c.nent)]
