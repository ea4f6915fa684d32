"""Shared test plumbing: the ``kvm`` fixture family and require-or-skip policy.

A test that needs something this machine lacks skips with the reason; with
PYKVM_REQUIRE_KVM=1 (set by .ci/run) a missing /dev/kvm is a failure instead.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60)
settings.register_profile("dev", deadline=None, max_examples=30)
settings.register_profile("deep", deadline=None, suppress_health_check=list(HealthCheck), max_examples=1500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def require_or_skip(env: str, reason: str) -> None:
    """Skip with ``reason``, or fail when ``env`` is set to 1 (CI)."""
    if os.environ.get(env) == "1":
        pytest.fail(f"{reason} (and {env}=1 requires it)", pytrace=False)
    pytest.skip(reason)


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
