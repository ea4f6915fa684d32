"""``pykvm host check`` on synthetic machines: the expected report for each setup."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from pykvm.cli import main
from pykvm.host.check import format_report, run_checks
from tests.unit.host.sysfs_tree import SysTree


def statuses(tree, memory=1 << 30):
    report = run_checks(tree.root, memory)
    return {i.name: i for i in report.items}, report


def test_lab_like_machine_passes_everything_but_the_fake_kvm(tree):
    items, report = statuses(tree.lab_like())
    not_pass = {n: i.status for n, i in items.items() if i.status != "PASS"}
    # /dev/kvm in a synthetic tree is a plain file: KVM refuses the ioctl, and says so.
    assert not_pass == {"KVM capabilities": "FAIL"}
    assert "cannot query" in items["KVM capabilities"].detail
    for name in ("CONFIG_VFIO", "CONFIG_VFIO_PCI", "CONFIG_VFIO_IOMMU_TYPE1", "CONFIG_VFIO_VIRQFD", "CONFIG_INTEL_IOMMU",
                 "IOMMU groups", "IOMMU in kernel log", "interrupt remapping", "module vfio_pci", "/dev/vfio/vfio"):
        assert items[name].status == "PASS", name
    assert items["IOMMU groups"].detail == "3 groups in /sys/kernel/iommu_groups"
    assert items["interrupt remapping"].detail == "DMAR-IR: Enabled IRQ remapping in x2apic mode"


def test_lab_like_machine_with_the_real_kvm_is_ready(tree, kvm):
    tree.lab_like()
    tree.path("/dev/kvm").unlink()
    tree.link("/dev/kvm", "/dev/kvm")  # the real device: capabilities are asked of the running kernel
    items, report = statuses(tree)
    assert items["KVM capabilities"].status == "PASS", items["KVM capabilities"]
    assert report.ok
    assert "ready for passthrough: 0 FAIL" in format_report(report)


def test_machine_without_iommu_fails_with_fixes(tree):
    items, report = statuses(tree.no_iommu())
    assert not report.ok
    assert items["cpu virtualization"].status == "WARN" and "PVM" in items["cpu virtualization"].detail
    for name in ("CONFIG_VFIO", "CONFIG_AMD_IOMMU", "IOMMU groups", "interrupt remapping", "module vfio",
                 "module vfio_pci", "/dev/vfio/vfio", "IOMMU in kernel log"):
        assert items[name].status == "FAIL", name
        assert items[name].fix, name
    assert "firmware" in items["IOMMU groups"].fix and "amd_iommu" in items["IOMMU groups"].fix


def test_no_cpu_virtualization_and_no_kvm(tree):
    tree.no_iommu()
    tree.path("/dev/kvm").unlink()
    items, _ = statuses(tree)
    assert items["cpu virtualization"].status == "FAIL" and "AMD-V" in items["cpu virtualization"].fix
    assert items["/dev/kvm"].status == "FAIL" and "modprobe kvm_amd" in items["/dev/kvm"].fix
    assert items["KVM capabilities"].status == "FAIL"


def test_missing_kernel_config_is_a_warning_and_boot_config_is_found(tree):
    tree.lab_like()
    tree.path("/proc/config.gz").unlink()
    items, report = statuses(tree)
    assert items["kernel config"].status == "WARN" and "modprobe configs" in items["kernel config"].fix
    assert "CONFIG_VFIO" not in items
    tree.kconfig({"CONFIG_VFIO": "m", "CONFIG_VFIO_PCI": "n"}, where="boot")
    items, _ = statuses(tree)
    assert items["CONFIG_VFIO"].detail.startswith("module")
    assert items["CONFIG_VFIO_PCI"].status == "FAIL" and f"/boot/config-{tree.release}" in items["CONFIG_VFIO_PCI"].detail


@pytest.mark.parametrize("cmdline, config, status, words", [
    ("quiet intel_iommu=on iommu=pt", {}, "PASS", "intel_iommu=on"),
    ('quiet "intel_iommu=on,sm_on"', {}, "PASS", "intel_iommu=on,sm_on"),
    ("quiet intel_iommu=off", {}, "FAIL", "intel_iommu=off"),
    ("quiet iommu=off", {}, "FAIL", "iommu=off"),
    ("quiet", {"CONFIG_INTEL_IOMMU_DEFAULT_ON": "y"}, "PASS", "on by default"),
    ("quiet", {}, "WARN", "intel_iommu=on not given"),
    ("quiet -- intel_iommu=on", {}, "WARN", "intel_iommu=on not given"),  # after --: init's, not the kernel's
])
def test_iommu_command_line_variants_intel(tree, cmdline, config, status, words):
    tree.lab_like()
    tree.kconfig({**tree.READY_CONFIG, **config})
    tree.file("/proc/cmdline", cmdline + "\n")
    item = statuses(tree)[0]["IOMMU on the command line"]
    assert (item.status, words in item.detail) == (status, True), item


def test_amd_cpu_with_an_intel_iommu_is_judged_by_the_iommu(tree):
    """The lab's L1: TCG's CPU says AuthenticAMD/svm, the emulated IOMMU is Intel VT-d."""
    tree.lab_like()
    tree.cpu("AuthenticAMD", "fpu svm lm")
    tree.kconfig({**tree.READY_CONFIG, "CONFIG_AMD_IOMMU": "n"})
    items, report = statuses(tree)
    assert items["IOMMU on the command line"].detail == "intel_iommu=on"
    assert items["CONFIG_INTEL_IOMMU"].status == "PASS" and "CONFIG_AMD_IOMMU" not in items
    tree.file("/proc/cmdline", "quiet intel_iommu=off\n")
    assert statuses(tree)[0]["IOMMU on the command line"].status == "FAIL"


def test_iommu_command_line_amd(tree):
    tree.lab_like()
    tree.cpu("AuthenticAMD", "fpu svm lm")
    tree.kmsg("AMD-Vi: Found IOMMU cap 0x40", "AMD-Vi: Interrupt remapping enabled")
    tree.file("/proc/cmdline", "quiet\n")
    assert statuses(tree)[0]["IOMMU on the command line"].status == "PASS"
    tree.file("/proc/cmdline", "amd_iommu=off\n")
    item = statuses(tree)[0]["IOMMU on the command line"]
    assert item.status == "FAIL" and "remove amd_iommu=off" in item.fix


def test_acs_override_is_reported_with_what_it_gives_up(tree):
    tree.lab_like()
    tree.file("/proc/cmdline", "intel_iommu=on pcie_acs_override=x pci_acs_override=downstream,multifunction\n")
    items, report = statuses(tree)
    item = items["pci_acs_override"]
    assert item.status == "WARN" and "downstream,multifunction" in item.detail
    assert "peer-to-peer" in item.fix and "not isolated" in item.fix


def test_interrupt_remapping_missing_or_unsafe(tree):
    tree.lab_like()
    tree.kmsg("DMAR: IOMMU enabled")
    item = statuses(tree)[0]["interrupt remapping"]
    assert item.status == "FAIL" and "allow_unsafe_interrupts" in item.fix
    tree.file("/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts", "Y\n")
    assert statuses(tree)[0]["interrupt remapping"].status == "WARN"


def test_log_without_dmar_lines_but_with_groups_is_a_warning(tree):
    tree.lab_like()
    tree.kmsg("Linux version 6.1.0", "clocksource: tsc")
    item = statuses(tree)[0]["IOMMU in kernel log"]
    assert item.status == "WARN" and "wrapped" in item.fix


def test_modules_available_but_not_loaded(tree):
    tree.lab_like()
    tree.file("/proc/modules", "vfio 45056 0 - Live 0x0\n")
    items, report = statuses(tree)
    assert items["module vfio"].status == "PASS"
    assert items["module vfio_pci"].status == "WARN" and items["module vfio_pci"].fix == "modprobe vfio_pci"
    assert "does not load it" in items["module vfio_iommu_type1"].detail


def test_builtin_modules_from_modules_builtin(tree):
    tree.lab_like()
    tree.file("/proc/modules", "")
    tree.kconfig({})  # config says nothing: modules.builtin decides
    tree.file(f"/lib/modules/{tree.release}/modules.builtin",
              "kernel/drivers/vfio/vfio.ko\nkernel/drivers/vfio/vfio_iommu_type1.ko\nkernel/drivers/vfio/pci/vfio-pci.ko\n")
    items, _ = statuses(tree)
    assert [items[f"module {m}"].detail for m in ("vfio", "vfio_iommu_type1", "vfio_pci")] == ["built into the kernel"] * 3


def test_memlock_against_the_requested_guest_size(tree):
    tree.lab_like()
    tree.file("/proc/self/status", "CapEff:\t0000000000000000\n")
    items, report = statuses(tree, memory=2 << 30)
    item = items["locked memory"]
    assert item.status == "FAIL" and "8 MiB < guest RAM 2 GiB" in item.detail and "ulimit -l 2097152" in item.fix
    assert not report.ok
    tree.file("/proc/self/limits", "Max locked memory         unlimited            unlimited            bytes\n")
    assert statuses(tree)[0]["locked memory"].status == "PASS"
    tree.file("/proc/self/limits", "Max locked memory         8388608              8388608              bytes\n")
    assert statuses(tree, memory=8 << 20)[0]["locked memory"].status == "PASS"


def test_hugepages_cover_or_not(tree):
    tree.lab_like()
    assert statuses(tree, memory=2 << 30)[0]["hugepages"].status == "PASS"  # 1024 x 2 MiB
    item = statuses(tree, memory=4 << 30)[0]["hugepages"]
    assert item.status == "WARN" and "echo 2048 > /proc/sys/vm/nr_hugepages" in item.fix


def test_unreadable_kernel_log_is_a_warning(tree):
    tree.lab_like()
    tree.path("/dev/kmsg").unlink()
    items, _ = statuses(tree)
    assert items["IOMMU in kernel log"].status == "WARN"
    assert items["interrupt remapping"].status == "WARN"


def test_cli_check_json_and_exit_status(tree, capsys):
    tree.no_iommu()
    assert main(["host", "check", "--root", str(tree.base), "--json", "--memory", "512M"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["memory"] == 512 << 20
    assert {i["name"]: i["status"] for i in data["items"]}["IOMMU groups"] == "FAIL"
    tree.lab_like()
    tree.path("/dev/kvm").unlink()
    assert main(["host", "check", "--root", str(tree.base)]) == 1  # no /dev/kvm now: FAIL
    out = capsys.readouterr().out
    assert "FAIL  /dev/kvm" in out and "fix: load the KVM module" in out


def bridge_group(tree, edu="vfio-pci", nvme="nvme", group=7):
    """The lab's bridge group: a PCI bridge (no driver), an edu and an NVMe behind it."""
    tree.device("0000:00:07.0", 0x1B36, 0x0001, 0x060400, group=group)
    tree.device("0000:01:01.0", 0x1234, 0x11E8, 0x00FF00, driver=edu, group=group)
    tree.device("0000:01:02.0", 0x1B36, 0x0010, 0x010802, driver=nvme, group=group)
    return tree


def test_split_groups_pass_when_no_group_mixes_vfio_pci_and_a_host_driver(tree):
    tree.lab_like()
    bridge_group(tree, edu=None)  # not ready (nvme drives one), but nothing is on vfio-pci: not split
    tree.device("0000:00:08.0", 0x8086, 0x10D3, 0x020000, driver="vfio-pci", group=8)
    tree.device("0000:00:09.0", 0x8086, 0x1901, 0x060400, driver="pcieport", group=8)  # a bridge: no DMA
    tree.device("0000:00:0a.0", 0x8086, 0x10D3, 0x020000, driver="pci-stub", group=8)
    items, report = statuses(tree)
    item = items["VFIO groups viable"]
    assert (item.status, item.fix) == ("PASS", ""), item
    assert item.detail == "no IOMMU group has devices on vfio-pci and on host drivers at once"
    bridge_group(tree, edu="vfio-pci", nvme="vfio-pci")  # the whole group bound: viable
    assert statuses(tree)[0]["VFIO groups viable"].status == "PASS"


def test_a_split_group_warns_with_the_group_both_devices_and_the_fixes(tree, capsys):
    bridge_group(tree.lab_like())
    items, report = statuses(tree)
    item = items["VFIO groups viable"]
    assert item.status == "WARN", item
    assert item.detail == ("not viable, VFIO cannot open them: "
                           "group 7: 0000:01:01.0 on vfio-pci, 0000:01:02.0 on nvme")
    assert item.fix == ("`pykvm host bind --group 0000:01:01.0` (all of a group to vfio-pci), or "
                        "`pykvm host restore --group 0000:01:01.0` (all back to the host)")
    assert "0000:00:07.0" not in item.detail  # the bridge blocks nothing
    # a warning, not a failure: the other groups can still be passed through (the only FAIL
    # is the synthetic tree's /dev/kvm, a plain file)
    assert [i.name for i in report.items if i.status == "FAIL"] == ["KVM capabilities"]
    text = format_report(report)
    assert "WARN  VFIO groups viable" in text and "fix: `pykvm host bind --group 0000:01:01.0`" in text
    main(["host", "check", "--root", str(tree.base), "--json"])
    data = {i["name"]: i for i in json.loads(capsys.readouterr().out)["items"]}["VFIO groups viable"]
    assert (data["status"], data["detail"], data["fix"]) == ("WARN", item.detail, item.fix)


def test_several_split_groups_are_each_named_with_their_fixes(tree):
    bridge_group(tree.lab_like())
    tree.device("0000:00:08.0", 0x8086, 0x10D3, 0x020000, driver="e1000e", group=9)
    tree.device("0000:00:09.0", 0x8086, 0x10D3, 0x020000, driver="igb", group=9)
    tree.device("0000:00:0a.0", 0x8086, 0x10D3, 0x020000, driver="vfio-pci", group=9)
    item = statuses(tree)[0]["VFIO groups viable"]
    assert item.status == "WARN"
    assert item.detail.endswith("group 7: 0000:01:01.0 on vfio-pci, 0000:01:02.0 on nvme; "
                                "group 9: 0000:00:0a.0 on vfio-pci, 0000:00:08.0 on e1000e, 0000:00:09.0 on igb")
    assert item.fix == ("`pykvm host bind --group 0000:01:01.0` or `pykvm host bind --group 0000:00:0a.0` (all of a "
                        "group to vfio-pci), or `pykvm host restore --group 0000:01:01.0` and "
                        "`pykvm host restore --group 0000:00:0a.0` (all back to the host)")


DRIVERS = (None, "vfio-pci", "pci-stub", "nvme", "e1000e")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from(DRIVERS), min_size=1, max_size=3), min_size=1, max_size=3))
def test_split_groups_warn_exactly_when_a_group_mixes_vfio_pci_and_a_dma_driver(groups):
    with tempfile.TemporaryDirectory() as base:
        tree = SysTree(Path(base) / "root")
        for number, drivers in enumerate(groups, start=10):
            for fn, driver in enumerate(drivers):
                tree.device(f"0000:{number:02x}:00.{fn}", 0x8086, 0x10D3, 0x020000, driver=driver, group=number)
        item = statuses(tree)[0]["VFIO groups viable"]
    split = [n for n, d in enumerate(groups, start=10) if "vfio-pci" in d and {"nvme", "e1000e"} & set(d)]
    assert item.status == ("WARN" if split else "PASS"), (groups, item)
    for number, drivers in enumerate(groups, start=10):
        named = f"group {number}:" in item.detail
        assert named == (number in split), (groups, item)
        for fn, driver in enumerate(drivers):
            bdf = f"0000:{number:02x}:00.{fn}"
            if number in split and driver in ("nvme", "e1000e"):
                assert f"{bdf} on {driver}" in item.detail
    for number in split:
        first = f"0000:{number:02x}:00.{groups[number - 10].index('vfio-pci')}"
        assert f"`pykvm host bind --group {first}`" in item.fix and f"`pykvm host restore --group {first}`" in item.fix
