"""The vPMU event filter's actions (KVM_SET_PMU_EVENT_FILTER, ``Vm.set_pmu_event_filter``).
Loaded on first use (``pykvm run`` does not need it)."""
from __future__ import annotations

import enum

from pykvm._native import lib

__all__ = ["PmuEventAction"]


class PmuEventAction(enum.IntEnum):
    """KVM_PMU_EVENT_*: whether a PMU event filter lists the events allowed or those denied."""

    ALLOW = lib.KVM_PMU_EVENT_ALLOW
    DENY = lib.KVM_PMU_EVENT_DENY
