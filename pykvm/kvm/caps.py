"""KVM capabilities (``KVM_CAP_*``) as an enum built from the compiled header.

``Cap`` (about 220 members) is built on first use: creating it costs more at start-up than
everything else in this package's enums, and the VMM passes the compiled ints instead."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Union

from pykvm._native import lib
from pykvm.kvm.macros import macro_enum

if TYPE_CHECKING:
    Cap: type[enum.IntEnum]

CapLike = Union[int, str]  # an int covers Cap members (an IntEnum)

PREFIX = "KVM_CAP_"


def __getattr__(name: str):
    if name == "Cap":
        cap = macro_enum("Cap", PREFIX)
        cap.__doc__ = "KVM_CAP_* values as <linux/kvm.h> defines them (``Cap.IRQCHIP`` is KVM_CAP_IRQCHIP)."
        globals()["Cap"] = cap
        return cap
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cap_number(cap: CapLike) -> int:
    """Accept ``Cap.IRQCHIP``, ``"IRQCHIP"``, ``"KVM_CAP_IRQCHIP"`` or a raw int."""
    if isinstance(cap, str):
        name = cap.upper()
        name = name if name.startswith(PREFIX) else PREFIX + name
        value = getattr(lib, name, None)
        if not isinstance(value, int):
            raise ValueError(f"unknown capability {cap!r}")
        return value
    return int(cap)
