"""Loading a Linux kernel: image parsers, boot_params / PVH start info, and the boot plan."""
from .errors import BootError, BootImageError
from .loader import BootPlan, EntryRegs, plan_boot

__all__ = ["BootError", "BootImageError", "BootPlan", "EntryRegs", "plan_boot"]
