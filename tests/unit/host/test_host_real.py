"""The real CLI on this machine's real /sys, /proc and /dev (read-only: nothing is changed).

The development and CI machines have KVM but no IOMMU and no VFIO: ``check``
must say so item by item, with fixes, and exit non-zero, without a traceback.
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

REPO = Path(__file__).resolve().parents[3]
HAS_IOMMU = bool(os.listdir("/sys/kernel/iommu_groups")) if os.path.isdir("/sys/kernel/iommu_groups") else False
no_iommu_only = pytest.mark.skipif(HAS_IOMMU, reason="this host has an IOMMU; the lab tests cover that case")


def pykvm(*args):
    proc = subprocess.run([sys.executable, "-m", "pykvm", "host", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@no_iommu_only
def test_check_reports_missing_iommu_and_vfio_with_fixes():
    proc = pykvm("check")
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    fails = {line.split()[1] for line in lines if line.startswith("FAIL")}
    assert {"IOMMU", "/dev/vfio/vfio"} <= fails  # "IOMMU groups", "/dev/vfio/vfio"
    groups_line = next(i for i, line in enumerate(lines) if line.startswith("FAIL  IOMMU groups"))
    assert "fix: enable VT-d / AMD-Vi" in lines[groups_line + 1]
    assert "NOT ready for passthrough" in proc.stdout


@no_iommu_only
def test_check_json_on_this_host():
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
    devices = sorted(os.listdir("/sys/bus/pci/devices"))
    if not devices:
        pytest.skip("no PCI devices on this machine")
    proc = pykvm("show", devices[0])
    assert proc.returncode == 0 and proc.stdout.startswith(devices[0]) and "Kernel driver in use:" in proc.stdout


@no_iommu_only
def test_bind_without_iommu_is_refused_before_any_write():
    devices = sorted(os.listdir("/sys/bus/pci/devices"))
    if not devices:
        pytest.skip("no PCI devices on this machine")
    root = Root("/", dry_run=True)  # belt and braces: even a wrong decision could not write
    with pytest.raises(HostError, match="in no IOMMU group"):
        bind(root, devices[-1])
    assert root.writes == []
