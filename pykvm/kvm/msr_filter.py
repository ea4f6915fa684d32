"""MSR filters (KVM_X86_SET_MSR_FILTER): which guest RDMSR/WRMSR KVM may handle itself.

A filter is a list of ranges, each a bitmap over ``[base, base + nmsrs)`` for reads, writes or
both: a set bit lets KVM handle the access, a clear bit denies it. An access no range covers
follows the filter's default. A denied access raises #GP in the guest or, after
``enable_cap(X86_USER_SPACE_MSR, MsrExitReason.FILTER)``, comes to user space as an
``MsrExit`` whose ``msr_reason`` is FILTER, to be answered there.
"""
from __future__ import annotations

import enum
from typing import AbstractSet, Any, List, NamedTuple, Sequence, Tuple

from pykvm._bitmap import bitmap_bytes
from pykvm._native import ffi, lib

MAX_RANGES = lib.KVM_MSR_FILTER_MAX_RANGES
MAX_MSRS_PER_RANGE = lib.KVM_MSR_FILTER_MAX_BITMAP_SIZE * 8


class MsrAccess(enum.IntFlag):
    """KVM_MSR_FILTER_READ / WRITE: the accesses a range applies to."""

    READ = lib.KVM_MSR_FILTER_READ
    WRITE = lib.KVM_MSR_FILTER_WRITE


class MsrExitReason(enum.IntFlag):
    """KVM_MSR_EXIT_REASON_*: which failed MSR accesses ``enable_cap(X86_USER_SPACE_MSR, ...)``
    sends to user space (``MsrExit.msr_reason`` says which one it was): INVAL (KVM knows the MSR
    but the access #GPs), UNKNOWN (KVM does not know the MSR), FILTER (an MSR filter denied it)."""

    INVAL = lib.KVM_MSR_EXIT_REASON_INVAL
    UNKNOWN = lib.KVM_MSR_EXIT_REASON_UNKNOWN
    FILTER = lib.KVM_MSR_EXIT_REASON_FILTER


class MsrFilterRange(NamedTuple):
    """MSRs ``base`` .. ``base + nmsrs - 1`` for the accesses in ``access``: the ones in
    ``allowed`` go to KVM as usual, the others are denied."""

    base: int
    nmsrs: int
    access: MsrAccess
    allowed: AbstractSet[int] = frozenset()

    def bitmap(self) -> bytes:
        """Bit i allows MSR ``base + i``; whole 64-bit words, as the kernel copies them."""
        bits = 0
        for msr in self.allowed:
            bits |= 1 << (msr - self.base)
        return bits.to_bytes(bitmap_bytes(self.nmsrs), "little")

    def check(self) -> None:
        """ValueError for what KVM would refuse (or silently ignore) whatever the guest."""
        if not 0 < self.nmsrs <= MAX_MSRS_PER_RANGE:
            raise ValueError(f"MSR filter range at {self.base:#x} covers {self.nmsrs} MSRs: "
                             f"KVM takes 1 to {MAX_MSRS_PER_RANGE}")
        if not self.access or self.access & ~(MsrAccess.READ | MsrAccess.WRITE):
            raise ValueError(f"MSR filter range at {self.base:#x}: access must be READ, WRITE or both")
        outside = sorted(m for m in self.allowed if not self.base <= m < self.base + self.nmsrs)
        if outside:
            raise ValueError(f"MSR filter range {self.base:#x}+{self.nmsrs:#x} cannot allow "
                             f"{', '.join(hex(m) for m in outside)}")


def msr_filter_struct(ranges: Sequence[MsrFilterRange], default_allow: bool) -> Tuple[Any, List[Any]]:
    """The ``struct kvm_msr_filter *`` for KVM_X86_SET_MSR_FILTER and the bitmaps its ranges
    point to (keep them alive until the ioctl returns)."""
    if len(ranges) > MAX_RANGES:
        raise ValueError(f"{len(ranges)} MSR filter ranges: KVM takes at most {MAX_RANGES}")
    if not ranges and not default_allow:
        raise ValueError("a deny-by-default MSR filter needs at least one range (KVM refuses to deny every MSR)")
    flags = lib.KVM_MSR_FILTER_DEFAULT_ALLOW if default_allow else lib.KVM_MSR_FILTER_DEFAULT_DENY
    c = ffi.new("struct kvm_msr_filter *", {"flags": flags})
    bitmaps = []
    for i, r in enumerate(ranges):
        r.check()
        bitmaps.append(ffi.new("__u8[]", r.bitmap()))
        c.ranges[i] = {"flags": int(r.access), "nmsrs": r.nmsrs, "base": r.base, "bitmap": bitmaps[-1]}
    return c, bitmaps
