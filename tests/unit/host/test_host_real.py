"""The real CLI on this machine's real /sys, /proc and /dev (read-only: nothing is changed).

The development and CI machines have KVM but no IOMMU and no VFIO: ``check``
must say so item by item, with fixes, and exit non-zero, without a traceback. On a
machine with an IOMMU those tests skip, also in CI: a fake sysfs tree checks the same
answers (the test each skip names) and the lab checks the real IOMMU case.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm.host.bind import bind
from pykvm.host.sysfs import HostError, Root
from tests.conftest import require_or_skip, skip_covered_by

REPO = Path(__file__).resolve().parents[3]
HAS_IOMMU = bool(os.listdir("/sys/kernel/iommu_groups")) if os.path.isdir("/sys/kernel/iommu_groups") else False
NO_IOMMU_ON_A_FAKE_TREE = "tests/unit/host/test_host_check.py::test_machine_without_iommu_fails_with_fixes"
NO_GROUP_ON_A_FAKE_TREE = "tests/unit/host/test_host_bind.py::test_bind_bad_input_is_refused_with_nothing_changed"


def no_iommu_only(covering: str) -> None:
    __tracebackhide__ = True  # a skip shows the test's line
    if HAS_IOMMU:
        skip_covered_by(covering, "this host has an IOMMU; tests/lab/test_host_lab.py covers that case")


def pci_devices() -> list:
    """This machine's PCI addresses, sorted (skips, or fails under PYKVM_REQUIRE_KVM=1, without any)."""
    __tracebackhide__ = True  # a skip shows the test's line
    devices = sorted(os.listdir("/sys/bus/pci/devices"))
    if not devices:
        require_or_skip("PYKVM_REQUIRE_KVM", "no PCI devices on this machine")
    return devices


def pykvm(*args):
    proc = subprocess.run([sys.executable, "-m", "pykvm", "host", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_check_reports_missing_iommu_and_vfio_with_fixes():
    no_iommu_only(NO_IOMMU_ON_A_FAKE_TREE)
    proc = pykvm("check")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    fails = {line.split()[1] for line in lines if line.startswith("FAIL")}
    assert {"IOMMU", "/dev/vfio/vfio"} <= fails  # "IOMMU groups", "/dev/vfio/vfio"
    groups_line = next(i for i, line in enumerate(lines) if line.startswith("FAIL  IOMMU groups"))
    assert "fix: enable VT-d / AMD-Vi" in lines[groups_line + 1]
    assert "NOT ready for passthrough" in proc.stdout


def test_check_json_on_this_host():
    no_iommu_only(NO_IOMMU_ON_A_FAKE_TREE)
    proc = pykvm("check", "--json", "--memory", "64M")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    items = {i["name"]: i for i in data["items"]}
    assert data["ok"] is False and data["memory"] == 64 << 20
    assert items["IOMMU groups"]["status"] == "FAIL" and items["IOMMU groups"]["fix"]
    assert items["/dev/vfio/vfio"]["status"] == "FAIL" and "modprobe vfio-pci" in items["/dev/vfio/vfio"]["fix"]
    if os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert items["/dev/kvm"]["status"] == "PASS"
        assert items["KVM capabilities"]["status"] in ("PASS", "FAIL")  # asked of the real kernel, not skipped


def test_groups_and_show_on_this_host():
    proc = pykvm("groups", "--json")
    assert proc.returncode == 0 and isinstance(json.loads(proc.stdout), list)
    device = pci_devices()[0]
    proc = pykvm("show", device)
    assert proc.returncode == 0 and proc.stdout.startswith(device) and "Kernel driver in use:" in proc.stdout


def test_bind_without_iommu_is_refused_before_any_write():
    no_iommu_only(NO_GROUP_ON_A_FAKE_TREE)
    devices = pci_devices()
    root = Root("/", dry_run=True)  # belt and braces: even a wrong decision could not write
    with pytest.raises(HostError, match="in no IOMMU group"):
        bind(root, devices[-1])
    assert root.writes == []
