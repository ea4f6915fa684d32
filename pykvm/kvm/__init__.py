"""The /dev/kvm API: ``Kvm`` -> ``Vm`` -> ``Vcpu`` / ``DeviceFd``, one class per kernel object."""
from pykvm.kvm.device import DeviceFd
from pykvm.kvm.exits import (DebugExit, Exit, ExitReason, FailEntryExit, HltExit, HypercallExit,
                             InternalErrorExit, InterruptedExit, IoExit, IrqWindowOpenExit, MmioExit,
                             MsrExit, ShutdownExit, SystemEventExit, UnknownExit)
from pykvm.kvm.regs import CpuidEntry, Regs, Sregs
from pykvm.kvm.system import Kvm
from pykvm.kvm.vcpu import GuestDebug, MpState, Vcpu
from pykvm.kvm.vm import IrqchipRoute, MemFlag, MsiRoute, Vm

__all__ = [
    "Kvm", "Vm", "Vcpu", "DeviceFd", "Cap", "CpuidEntry", "Regs", "Sregs", "MemFlag", "IrqchipRoute",
    "MsiRoute", "MpState", "GuestDebug", "Exit", "ExitReason", "IoExit", "MmioExit", "HltExit",
    "ShutdownExit", "FailEntryExit", "InternalErrorExit", "SystemEventExit", "DebugExit",
    "IrqWindowOpenExit", "MsrExit", "HypercallExit", "InterruptedExit", "UnknownExit",
    "KvmStats", "StatDesc", "StatType", "StatUnit", "StatBase",
]

_STATS_NAMES = ("KvmStats", "StatDesc", "StatType", "StatUnit", "StatBase")


def __getattr__(name: str):
    """The stats names on first use (``Vm.stats()`` imports them too): `import pykvm.kvm`,
    and so `pykvm run`, does not load pykvm.kvm.stats."""
    if name == "Cap":  # built on first use (pykvm.kvm.caps)
        from pykvm.kvm import caps

        return caps.Cap
    if name in _STATS_NAMES:
        from pykvm.kvm import stats

        return getattr(stats, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
