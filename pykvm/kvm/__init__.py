"""The /dev/kvm API: ``Kvm`` -> ``Vm`` -> ``Vcpu`` / ``DeviceFd``, one class per kernel object."""
from pykvm.kvm.device import DeviceFd
from pykvm.kvm.exits import (DebugExit, DirtyRingFullExit, Exit, ExitReason, FailEntryExit, HltExit,
                             HypercallExit, InternalErrorExit, InterruptedExit, IoExit, IrqWindowOpenExit,
                             MmioExit, MsrExit, ShutdownExit, SystemEventExit, UnknownExit)
from pykvm.kvm.regs import CpuidEntry, FieldView, Regs, Sregs, Sregs2, Xsave
from pykvm.kvm.system import Kvm
from pykvm.kvm.vcpu import GuestDebug, MpState, Vcpu
from pykvm.kvm.vm import IrqchipRoute, MemFlag, MsiRoute, Vm

__all__ = [
    "Kvm", "Vm", "Vcpu", "DeviceFd", "Cap", "CpuidEntry", "Regs", "Sregs", "Sregs2", "Xsave", "FieldView",
    "McgStatus", "MciStatus", "MemFlag", "IrqchipRoute",
    "MsiRoute", "PmuEventAction", "MpState", "GuestDebug", "Exit", "ExitReason", "IoExit", "MmioExit",
    "HltExit", "ShutdownExit", "FailEntryExit", "InternalErrorExit", "SystemEventExit", "DebugExit",
    "IrqWindowOpenExit", "MsrExit", "HypercallExit", "DirtyRingFullExit", "InterruptedExit", "UnknownExit",
    "KvmStats", "StatDesc", "StatType", "StatUnit", "StatBase", "MsrAccess", "MsrFilterRange", "MsrExitReason",
    "DirtyRing", "DirtyPage", "NestedState", "NestedFormat", "NestedFlag", "VmxSmmFlag",
]

# Names whose modules load on first use (``Vm.stats()`` & co. import them too): `import pykvm.kvm`,
# and so `pykvm run`, loads none of them; pykvm.kvm.caps builds ``Cap`` on first use as well.
_LAZY = {"Cap": "caps", "MsrAccess": "msr_filter", "MsrFilterRange": "msr_filter", "MsrExitReason": "msr_filter",
         "DirtyRing": "dirty_ring", "DirtyPage": "dirty_ring", "McgStatus": "mce", "MciStatus": "mce",
         "PmuEventAction": "pmu",
         **{name: "nested" for name in ("NestedState", "NestedFormat", "NestedFlag", "VmxSmmFlag")},
         **{name: "stats" for name in ("KvmStats", "StatDesc", "StatType", "StatUnit", "StatBase")}}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"pykvm.kvm.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
