"""``NestedState``: what KVM holds for a vCPU whose guest is itself a hypervisor.

A guest (L1) that uses VMX or SVM has state no register or MSR ioctl shows: whether it is
in VMX operation and where its VMXON region and current VMCS12 are, whether its own guest
(L2) runs and from which VMCS12/VMCB12, whether a VMLAUNCH/VMRUN is half done, SVM's
global interrupt flag (GIF). KVM_GET_NESTED_STATE hands it out as ``struct
kvm_nested_state``: a 128-byte header (flags, format, size and a vendor header), then, while
L2 runs or a VMCS12 is current, the vendor data (vmcs12 and shadow vmcs12, or vmcb12). A
VMM saves it with the vCPU's other state and gives it back with KVM_SET_NESTED_STATE after
the registers, MSRs (EFER.SVME, VMX feature control) and CPUID it depends on.
"""
from __future__ import annotations

import enum
from typing import Any

from pykvm._native import ffi, lib
from pykvm.kvm.regs import Struct


class NestedFormat(enum.IntEnum):
    """KVM_STATE_NESTED_FORMAT_*: which vendor's header and data the state holds."""

    VMX = lib.KVM_STATE_NESTED_FORMAT_VMX
    SVM = lib.KVM_STATE_NESTED_FORMAT_SVM


class NestedFlag(enum.IntFlag):
    """KVM_STATE_NESTED_*: the state's ``flags``."""

    GUEST_MODE = lib.KVM_STATE_NESTED_GUEST_MODE  # L2 runs: the data holds its VMCS12/VMCB12
    RUN_PENDING = lib.KVM_STATE_NESTED_RUN_PENDING  # VMLAUNCH/VMRESUME/VMRUN emulated, L2 not yet entered
    EVMCS = lib.KVM_STATE_NESTED_EVMCS  # L1 uses Hyper-V's enlightened VMCS
    MTF_PENDING = lib.KVM_STATE_NESTED_MTF_PENDING  # a VMX monitor-trap-flag exit is due
    GIF_SET = lib.KVM_STATE_NESTED_GIF_SET  # SVM's GIF is set (the guest's CLGI clears it)


class VmxSmmFlag(enum.IntFlag):
    """KVM_STATE_NESTED_SMM_*: the VMX header's ``smm.flags``, where an SMI found L1."""

    GUEST_MODE = lib.KVM_STATE_NESTED_SMM_GUEST_MODE  # running L2
    VMXON = lib.KVM_STATE_NESTED_SMM_VMXON  # in VMX operation


class NestedState(Struct):
    """``struct kvm_nested_state`` in a buffer of ``capacity`` bytes (KVM_GET/SET_NESTED_STATE).

    ``flags``, ``format`` and ``size`` (the bytes KVM wrote: the header alone, or header and
    vendor data) are the C fields; ``hdr.vmx`` / ``hdr.svm`` are live views of the vendor
    header, read with the typed accessors below. ``to_bytes()`` (and so ``==``) covers
    ``size`` bytes and ``from_bytes`` rebuilds a state from them, e.g. one saved to a file.
    """

    ctype = "struct kvm_nested_state"
    HEADER_SIZE = ffi.sizeof(ctype)  # where the vendor data starts (the flexible ``data``)

    def __init__(self, capacity: int = 0, **fields: Any):
        object.__setattr__(self, "capacity", max(capacity, self.HEADER_SIZE))
        super().__init__(**fields)

    def _allocate(self) -> Any:
        return self._allocate_bytes(self.capacity)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "NestedState":
        state = cls(len(blob))
        ffi.memmove(state.ptr, blob, len(blob))
        return state

    def to_bytes(self) -> bytes:
        """The ``size`` bytes KVM wrote (``copy()`` keeps the whole ``capacity``)."""
        return bytes(ffi.buffer(self.ptr, min(self.ptr.size, self.capacity)))

    @property
    def data(self) -> bytes:
        """The vendor data after the header (empty unless L2 runs or, on VMX, a VMCS12 is current)."""
        return self.to_bytes()[self.HEADER_SIZE:]

    def __repr__(self) -> str:
        return (f"NestedState(format={self.ptr.format}, flags={self.ptr.flags:#x}, size={self.ptr.size}, "
                f"capacity={self.capacity})")

    def _hdr(self, fmt: NestedFormat) -> Any:
        if self.ptr.format != fmt:
            raise ValueError(f"the {fmt.name} header asked of a state in format {self.ptr.format}")
        return getattr(self.ptr.hdr, fmt.name.lower())

    @property
    def vmcb_pa(self) -> int:
        """SVM: the guest-physical address of L1's VMCB12 for the running L2 (0 outside guest mode)."""
        return self._hdr(NestedFormat.SVM).vmcb_pa

    @property
    def vmxon_pa(self) -> int:
        """VMX: L1's VMXON region; all ones outside VMX operation."""
        return self._hdr(NestedFormat.VMX).vmxon_pa

    @property
    def vmcs12_pa(self) -> int:
        """VMX: L1's current VMCS12 (VMPTRLD); all ones when none is."""
        return self._hdr(NestedFormat.VMX).vmcs12_pa

    @property
    def smm_flags(self) -> VmxSmmFlag:
        """VMX: what an SMI interrupted (KVM leaves VMX operation for SMM and returns on RSM)."""
        return VmxSmmFlag(self._hdr(NestedFormat.VMX).smm.flags)
