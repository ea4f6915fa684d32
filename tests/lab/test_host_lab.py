"""``pykvm host`` against a real kernel with a real IOMMU and VFIO (inside L1 of the lab).

L1 is q35 with an emulated Intel IOMMU (interrupt remapping on), Debian's kernel with
vfio_pci and vfio_iommu_type1 loaded, edu at 0000:00:04.0 (no driver) and an NVMe at
0000:00:05.0 on ``nvme``.  The checkout is read-only there, so the bind state goes to
a tmp directory.  The NVMe is always given back to ``nvme`` for the tests after.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pykvm.lab import EDU_BDF, EDU_ID, NVME_BDF, NVME_ID
from pykvm.lab.l2 import driver_of
from tests.lab.support import host, wait_for

pytestmark = pytest.mark.lab

PCI = Path("/sys/bus/pci/devices")


def test_check_passes_the_iommu_and_vfio_items():
    proc = host("check", "--json")
    items = {i["name"]: i for i in json.loads(proc.stdout)["items"]}
    for name in ("cpu virtualization", "/dev/kvm", "KVM capabilities", "IOMMU on the command line",
                 "IOMMU in kernel log", "IOMMU groups", "interrupt remapping", "module vfio",
                 "module vfio_iommu_type1", "module vfio_pci", "/dev/vfio/vfio", "pci_acs_override", "locked memory"):
        assert items[name]["status"] == "PASS", items[name]
    # the lab shows its kernel's config at /boot/config-RELEASE: every option is there
    for name in ("CONFIG_IOMMU_IOVA", "CONFIG_INTEL_IOMMU", "CONFIG_VFIO", "CONFIG_VFIO_PCI",
                 "CONFIG_VFIO_IOMMU_TYPE1", "CONFIG_VFIO_VIRQFD"):
        assert items[name]["status"] == "PASS", items.get(name) or items.get("kernel config")
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"] is True  # only WARNs (hugepages) remain
    assert "DMAR" in items["IOMMU in kernel log"]["detail"]
    assert items["IOMMU on the command line"]["detail"] == "intel_iommu=on"  # VT-d, although the CPU is AMD
    assert "IRQ remapping" in items["interrupt remapping"]["detail"]
    text = host("check")
    assert "PASS  IOMMU groups" in text.stdout


def test_groups_list_edu_and_nvme_with_their_real_drivers():
    proc = host("groups", "--json")
    assert proc.returncode == 0
    by_bdf = {d["bdf"]: (g, d) for g in json.loads(proc.stdout) for d in g["devices"]}
    edu_group, edu = by_bdf[EDU_BDF]
    nvme_group, nvme = by_bdf[NVME_BDF]
    assert (edu["vendor"], edu["device"], edu["driver"]) == (*EDU_ID, None)
    assert (nvme["vendor"], nvme["device"], nvme["driver"]) == (*NVME_ID, "nvme")
    assert nvme["class_name"] == "Non-Volatile memory controller"
    assert edu_group["ready"] is True  # alone in its group, no driver
    assert nvme_group["ready"] is False  # nvme still drives it
    assert [d["bdf"] for d in nvme_group["devices"]] == [NVME_BDF]
    assert f"{NVME_BDF} [0108] Non-Volatile memory controller" in host("groups").stdout


def test_show_parses_the_real_config_space():
    nvme = host("show", NVME_BDF).stdout
    assert "MSI-X: Enable+" in nvme and "Express" in nvme and "Kernel driver in use: nvme" in nvme
    assert "Region 0: Memory at" in nvme and "(64-bit, non-prefetchable)" in nvme
    edu = host("show", EDU_BDF).stdout
    assert "Capabilities: [" in edu and "MSI:" in edu and "Kernel driver in use: (none)" in edu


def test_bind_moves_nvme_to_vfio_and_restore_gives_it_back(tmp_path):
    assert driver_of(NVME_BDF) == "nvme" and wait_for(lambda: Path("/dev/nvme0n1").exists())
    group = os.path.basename(os.readlink(PCI / NVME_BDF / "iommu_group"))
    state = tmp_path / "state"
    proc = host("bind", NVME_BDF, "--state-dir", str(state))
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{NVME_BDF}: nvme -> vfio-pci" in proc.stdout
        assert driver_of(NVME_BDF) == "vfio-pci"
        assert wait_for(lambda: Path(f"/dev/vfio/{group}").exists()), f"/dev/vfio/{group} did not appear"
        assert json.loads((state / f"{NVME_BDF}.json").read_text())["driver"] == "nvme"
        assert not Path("/dev/nvme0n1").exists()
        again = host("bind", NVME_BDF, "--state-dir", str(state))
        assert again.returncode == 0 and "already on vfio-pci" in again.stdout
        shown = host("show", NVME_BDF).stdout
        assert "Kernel driver in use: vfio-pci" in shown and "Driver override: vfio-pci" in shown
        assert "VFIO section skipped" not in shown, shown
        vfio = json.loads(host("show", NVME_BDF, "--json").stdout)
        regions = {r["name"]: r for r in vfio["vfio_regions"]}
        assert regions["BAR0"]["size"] == 16 << 10 and "mmap" in regions["BAR0"]["flags"]
        assert regions["config"]["flags"] == ["read", "write"]
        irqs = {i["name"]: i for i in vfio["vfio_irqs"]}
        assert irqs["MSI-X"]["count"] > 1 and "eventfd" in irqs["MSI-X"]["flags"]
        print(shown)
    finally:
        restored = host("restore", NVME_BDF, "--state-dir", str(state))
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"{NVME_BDF}: vfio-pci -> nvme" in restored.stdout
    assert driver_of(NVME_BDF) == "nvme"
    assert (PCI / NVME_BDF / "driver_override").read_text().strip() == "(null)"
    assert wait_for(lambda: Path("/dev/nvme0n1").exists()), "/dev/nvme0n1 did not come back"
    assert not (state / f"{NVME_BDF}.json").exists()


def test_bind_refusals_change_nothing():
    before = driver_of(NVME_BDF)
    try:
        for args, message in [((NVME_BDF + "x",), "not a PCI address"), (("0000:00:1f.7",), "no PCI device"),
                              ((NVME_BDF, "--state-dir", "/dev/null/state"), "cannot create the state directory")]:
            proc = host("bind", *args)
            assert proc.returncode == 1 and message in proc.stderr, proc.stdout + proc.stderr
            assert driver_of(NVME_BDF) == before
    finally:
        if driver_of(NVME_BDF) != before:  # a wrong decision must not leak into the tests after this one
            host("restore", NVME_BDF)
    assert (PCI / NVME_BDF / "driver_override").read_text().strip() == "(null)"
    proc = host("restore", NVME_BDF, "--state-dir", "/tmp/pykvm-none")
    assert proc.returncode == 1 and "bound to nvme, not to vfio-pci" in proc.stderr
