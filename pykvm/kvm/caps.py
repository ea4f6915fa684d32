"""KVM capabilities (``KVM_CAP_*``) as an enum built from the compiled header."""
from __future__ import annotations

import enum
from typing import Union

from pykvm._native import lib

Cap = enum.IntEnum("Cap", {n[len("KVM_CAP_"):]: getattr(lib, n) for n in sorted(dir(lib)) if n.startswith("KVM_CAP_")})
Cap.__doc__ = "KVM_CAP_* values as <linux/kvm.h> defines them (``Cap.IRQCHIP`` is KVM_CAP_IRQCHIP)."

CapLike = Union[Cap, int, str]


def cap_number(cap: CapLike) -> int:
    """Accept ``Cap.IRQCHIP``, ``"IRQCHIP"``, ``"KVM_CAP_IRQCHIP"`` or a raw int."""
    if isinstance(cap, str):
        name = cap.upper()
        name = name[len("KVM_CAP_"):] if name.startswith("KVM_CAP_") else name
        try:
            return int(Cap[name])
        except KeyError:
            raise ValueError(f"unknown capability {cap!r}") from None
    return int(cap)
