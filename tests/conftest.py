"""Shared test plumbing: the ``kvm`` fixture family and the skip policy.

A test that needs something this machine lacks skips with the reason. ``.ci/run`` sets
PYKVM_REQUIRE_KVM=1 and PYKVM_REQUIRE_LAB=1, and then nothing may skip silently:

- A skip point calls :func:`require_or_skip` with the variable that governs it, and fails
  when that variable is 1. PYKVM_REQUIRE_KVM governs the host suite (tests/unit, tests/kvm,
  tests/examples): /dev/kvm and what it offers, and what scripts/install puts on the
  machine (binutils with gcc, the kernel headers) or the machine itself provides (huge
  pages, PCI devices). PYKVM_REQUIRE_LAB governs the lab: QEMU, its cache (the Debian
  kernel ``pykvm lab prepare`` fetches) and every skip inside L1.
- Any other skip (a plain ``pytest.skip``, a ``skipif`` mark) fails when either variable is
  1 (:func:`pytest_runtest_makereport`).
- Except a skip declared as covered elsewhere, which stays a skip and says by what:
  the tests ``RERUN_IN_LAB`` in tests/lab/test_kvm_in_lab.py lists (on the host only: that
  lab test runs exactly them in L1 under PYKVM_REQUIRE_KVM=1 and requires them all to
  pass), or a skip point calling :func:`skip_covered_by` with the node id of the test that
  covers the case (which must exist).
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Optional

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.register_profile("deep", deadline=None, suppress_health_check=list(HealthCheck), max_examples=1500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


ROOT = Path(__file__).resolve().parents[1]
REQUIRE_VARS = ("PYKVM_REQUIRE_KVM", "PYKVM_REQUIRE_LAB")
IN_LAB = os.environ.get("PYKVM_IN_LAB") == "1"
COVERED_BY = "pykvm_covered_by"  # the user property a covered skip's report carries (read back from L1)


def required(env: str) -> bool:
    return os.environ.get(env) == "1"


def _current_nodeid() -> Optional[str]:
    current = os.environ.get("PYTEST_CURRENT_TEST")  # "NODEID (setup|call|teardown)"
    return current.rsplit(" (", 1)[0] if current else None


@functools.lru_cache(maxsize=None)
def _rerun_in_lab() -> tuple:
    from tests.lab.test_kvm_in_lab import COVERING_TEST, RERUN_IN_LAB

    return COVERING_TEST, frozenset(RERUN_IN_LAB)


def covered_elsewhere(nodeid: Optional[str]) -> Optional[str]:
    """The test that covers ``nodeid`` when it skips on this host, or None. Inside L1
    nothing is: the lab is where the tests this host's KVM cannot run must pass."""
    if IN_LAB or not nodeid:
        return None
    covering, rerun = _rerun_in_lab()
    return covering if nodeid in rerun or nodeid.split("[", 1)[0] in rerun else None


def _governed_skip(reason: str, covering: Optional[str] = None) -> None:
    """Skip in a way the strict-mode hook leaves alone: the caller has applied the policy."""
    __tracebackhide__ = True
    exc = pytest.skip.Exception(f"{reason} [covered by {covering}]" if covering else reason)
    exc.pykvm_governed = True  # type: ignore[attr-defined]
    exc.pykvm_covered_by = covering  # type: ignore[attr-defined]
    raise exc


def require_or_skip(env: str, reason: str) -> None:
    """Skip with ``reason``, or fail when ``env`` is set to 1 (CI), unless the test is
    covered elsewhere (:func:`covered_elsewhere`)."""
    __tracebackhide__ = True
    covering = covered_elsewhere(_current_nodeid())
    if covering:
        _governed_skip(reason, covering)
    if required(env):
        pytest.fail(f"{reason} (and {env}=1 requires it)", pytrace=False)
    _governed_skip(reason)


def names_a_test(nodeid: str) -> bool:
    """Whether ``nodeid`` ("path::function", parameters ignored) names a test function in the tree."""
    path, _, name = nodeid.split("[", 1)[0].partition("::")
    file = ROOT / path
    return bool(name) and file.is_file() and re.search(rf"^def {re.escape(name)}\(", file.read_text(), re.M) is not None


def skip_covered_by(covering: str, reason: str) -> None:
    """Skip with ``reason`` even under PYKVM_REQUIRE_*: the test ``covering`` (a node id,
    which must exist) tests this case where this test cannot."""
    __tracebackhide__ = True
    if not names_a_test(covering):
        pytest.fail(f"skip_covered_by names {covering!r}, which is not a test in this tree", pytrace=False)
    _governed_skip(reason, covering)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under PYKVM_REQUIRE_KVM=1 or PYKVM_REQUIRE_LAB=1, a skip that went neither through
    :func:`require_or_skip` nor :func:`skip_covered_by` fails, unless the test is covered
    elsewhere (then its reason says by what). A covered skip's report carries the covering
    test as the user property ``COVERED_BY``, which the lab passes back from L1."""
    report = yield
    if not report.skipped or hasattr(report, "wasxfail"):
        return report
    exc = call.excinfo.value if call.excinfo is not None else None
    if getattr(exc, "pykvm_governed", False):
        covering = getattr(exc, "pykvm_covered_by", None)
    else:
        longrepr = report.longrepr
        path, line, reason = longrepr if isinstance(longrepr, tuple) else (None, None, str(longrepr))
        covering = covered_elsewhere(item.nodeid)
        strict = [env for env in REQUIRE_VARS if required(env)]
        if covering:
            report.longrepr = (path, line, f"{reason} [covered by {covering}]")
        elif strict:
            report.outcome = "failed"
            report.longrepr = (
                f"{path}:{line}: {reason.removeprefix('Skipped: ')}\n"
                f"under {' and '.join(f'{env}=1' for env in strict)} a test may skip only through "
                "tests.conftest.require_or_skip or when it is covered elsewhere (tests.conftest.skip_covered_by, "
                "RERUN_IN_LAB in tests/lab/test_kvm_in_lab.py)")
    if covering:
        report.user_properties.append((COVERED_BY, covering))
    return report


def kvm_unavailable_reason() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm on this machine"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission to open /dev/kvm"
    return None


@pytest.fixture
def kvm():
    """An open ``Kvm`` on the real /dev/kvm (skips, or fails under PYKVM_REQUIRE_KVM=1)."""
    reason = kvm_unavailable_reason()
    if reason:
        require_or_skip("PYKVM_REQUIRE_KVM", reason)
    from pykvm.kvm import Kvm

    with Kvm() as k:
        yield k


@pytest.fixture
def vm(kvm):
    with kvm.create_vm() as v:
        yield v


def open_fds() -> int:
    """Open fds of this process, after collecting garbage objects that still own some."""
    import gc

    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def fd_targets() -> list:
    """What each open fd of this process points at (its /proc/self/fd link)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the fd listdir itself used, already closed
    return out
