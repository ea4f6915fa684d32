"""HaltWatch's rule (pykvm.vmm.halt_watch): ask for a check only for a vCPU that slept
through a whole interval without an exit. The statistics here are plain dicts (the rule is
pure); tests/kvm/test_machine.py runs it on KVM's real statistics."""
from __future__ import annotations

from typing import Dict, List

from hypothesis import given
from hypothesis import strategies as st

from pykvm.vmm.halt_watch import HaltWatch


def watch(n: int):
    stats: List[Dict[str, int]] = [{"exits": 0, "blocking": 0} for _ in range(n)]
    checked: List[int] = []
    return HaltWatch(stats, checked.append, 0.25), stats, checked


def test_a_working_or_waking_vcpu_is_never_checked():
    w, stats, checked = watch(1)
    for t in range(10):
        stats[0]["exits"] += 3  # timer ticks, I/O...
        stats[0]["blocking"] = t % 2  # sometimes asleep at the sample, but never a whole interval
        w.sample()
    assert checked == [] and w.checks == 0


def test_a_vcpu_asleep_for_a_whole_interval_is_checked_and_its_check_does_not_count_against_it():
    w, stats, checked = watch(2)
    stats[1].update(exits=50, blocking=1)
    w.sample()                      # baseline
    assert w.sample() == [1]        # asleep, not one exit since: check
    stats[1]["exits"] += 2          # the check's own kick and re-entry
    assert w.sample() == []         # only a new baseline
    assert w.sample() == [1]        # still asleep: the second check confirms
    assert checked == [1, 1] and w.checks == 2


@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=40))
def test_checks_only_follow_a_quiet_sleeping_interval(steps):
    """For any sequence of (new exits, blocking) per interval: a check happens exactly when the
    vCPU is blocking and took no exit since a sample that was not itself a check."""
    w, stats, checked = watch(1)
    baseline = None
    for new, blocking in steps:
        stats[0]["exits"] += new
        stats[0]["blocking"] = int(blocking)
        expect = blocking and baseline == stats[0]["exits"]
        assert w.sample() == ([0] if expect else [])
        baseline = None if expect else stats[0]["exits"]
