"""Machine-check registers: the bits ``Vcpu.set_mce`` (KVM_X86_SET_MCE) reports an error with.

``Vcpu.setup_mce`` gives a vCPU emulated banks; ``set_mce`` fills one bank's MCi_STATUS /
ADDR / MISC and IA32_MCG_STATUS as the hardware would and, for an uncorrected error, raises
#MC in the guest. Loaded on first use (``pykvm run`` does not need it).
"""
from __future__ import annotations

import enum

__all__ = ["McgStatus", "MciStatus"]


class McgStatus(enum.IntFlag):
    """IA32_MCG_STATUS bits, the ``mcg_status`` of ``Vcpu.set_mce``."""

    RIPV = 1 << 0  # the guest can resume at the saved RIP
    EIPV = 1 << 1  # the saved RIP points at the instruction that caused the error
    MCIP = 1 << 2  # machine check in progress (a second #MC meanwhile is a shutdown)


class MciStatus(enum.IntFlag):
    """IA32_MCi_STATUS bits, the ``status`` of ``Vcpu.set_mce``."""

    PCC = 1 << 57  # processor context corrupt
    ADDRV = 1 << 58  # MCi_ADDR holds the address
    MISCV = 1 << 59  # MCi_MISC holds more information
    EN = 1 << 60  # reporting enabled for this error
    UC = 1 << 61  # uncorrected: KVM raises #MC in the guest
    OVER = 1 << 62  # an earlier error in the bank was overwritten
    VAL = 1 << 63  # the register holds an error
