"""KVM tests that this host's PVM cannot run, run against L1's kvm_amd instead.

PVM drops CR0.PG outside long mode, so 32-bit paging (example 03 and its API
test) skips on the host, SREGS2's PDPTRs (PAE paging) take the PVM branch of
their test, PVM has no SMM (KVM_SMI skips), and it keeps no nested state and emulates no
Hyper-V (KVM_GET/SET_NESTED_STATE and KVM_GET_SUPPORTED_HV_CPUID skip), and its instruction
emulator has no XGETBV (the guest's view of XCR0 skips); here they must pass on the hardware path.

``RERUN_IN_LAB`` is the one list of host skips that are covered elsewhere: tests/conftest.py
lets exactly these skip on the host under PYKVM_REQUIRE_KVM=1 (their reason then names
``COVERING_TEST``), and inside L1 none of them may skip.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COVERING_TEST = "tests/lab/test_kvm_in_lab.py::test_what_pvm_lacks_runs_on_a_hardware_kvm"
RERUN_IN_LAB = (
    "tests/kvm/test_modes.py::test_32_bit_paging_translates_and_sets_accessed_dirty",
    "tests/examples/test_examples.py::test_03_paging32_maps_higher_half_and_sets_dirty_bit",
    "tests/kvm/test_vcpu_state_extra.py::test_sregs2_pdptrs_under_pae_paging",
    "tests/kvm/test_vcpu_state_extra.py::test_smi_becomes_pending",
    "tests/kvm/test_nested_and_hv.py::test_nested_state_outside_guest_mode_round_trips",
    "tests/kvm/test_nested_and_hv.py::test_set_nested_state_refuses_invalid_states",
    "tests/kvm/test_nested_and_hv.py::test_guest_clgi_and_stgi_show_in_the_svm_gif_flag",
    "tests/kvm/test_nested_and_hv.py::test_supported_hv_cpuid_reports_the_kvm_hyperv_leaves",
    "tests/kvm/test_state_roundtrip.py::test_xcr0_set_from_user_space_is_what_the_guests_xgetbv_reads",
)


def _pytest_inside(*node_ids: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYKVM_REQUIRE_KVM="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *node_ids],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.lab
def test_what_pvm_lacks_runs_on_a_hardware_kvm():
    proc = _pytest_inside(*RERUN_IN_LAB)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(RERUN_IN_LAB)} passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout


def test_the_rerun_list_names_tests_in_this_tree():
    """On the host: every test the list lets skip exists, and so does the test covering them."""
    from tests.conftest import names_a_test

    assert [n for n in (*RERUN_IN_LAB, COVERING_TEST) if not names_a_test(n)] == []
    assert len(set(RERUN_IN_LAB)) == len(RERUN_IN_LAB)
