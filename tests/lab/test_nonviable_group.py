"""A real non-viable IOMMU group (inside L1 of the lab).

Behind L1's conventional PCI bridge (00:07.0) sit a second edu (01:01.0, no driver) and a
second NVMe (01:02.0, on L1's ``nvme``, its 1 MiB disk /dev/nvme1n1). Conventional PCI has
no ACS, so Linux puts all three in one IOMMU group. With only the edu on vfio-pci the
group is not viable: the kernel reports it so (VFIO_GROUP_GET_STATUS) and refuses to
attach it to a container (EPERM). These tests check that every layer of pykvm says so
before anything is opened, mapped or booted, and that binding the whole group makes it
usable and restoring gives both devices back to their drivers.
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from pykvm.lab.devices import (
    GROUP_BRIDGE_BDF, GROUP_EDU_BDF, GROUP_NVME_BDF, GROUP_NVME_DISK_MAGIC, GROUP_NVME_SERIAL, NVME_BDF, nvme_sector,
)
from pykvm.lab.image import LabUnavailable
from pykvm.lab.l2 import build_guest_initramfs, driver_of, guest_kernel, run_guest
from tests.conftest import require_or_skip
from tests.lab.support import host, wait_for

pytestmark = pytest.mark.lab

PCI = Path("/sys/bus/pci/devices")
GROUP_DISK = "/dev/nvme1n1"


def group_number() -> int:
    return int(os.path.basename(os.readlink(PCI / GROUP_EDU_BDF / "iommu_group")))


def vfio_holders(number: int) -> list:
    from pykvm.vfio.group import holders

    return holders(f"/dev/vfio/{number}")


def group_disk_reads_its_pattern() -> bool:
    """/dev/nvme1n1 is the second NVMe's disk (not the main one) and reads back its pattern."""
    if not wait_for(lambda: Path(GROUP_DISK).exists()):
        return False
    with open(GROUP_DISK, "rb") as disk:
        return disk.read(512) == nvme_sector(0, GROUP_NVME_DISK_MAGIC)


def drivers() -> tuple:
    return driver_of(GROUP_BRIDGE_BDF), driver_of(GROUP_EDU_BDF), driver_of(GROUP_NVME_BDF)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("bind-state"))


@pytest.fixture(scope="module")
def split(state_dir):
    """Only the group's edu on vfio-pci (the NVMe stays on nvme); afterwards the whole group
    goes back to the drivers it had, whatever a test left."""
    proc = host("bind", GROUP_EDU_BDF, "--allow-split", "--state-dir", state_dir)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"IOMMU group {group_number()} is split" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        assert wait_for(lambda: Path(f"/dev/vfio/{group_number()}").exists())
        yield group_number()
    finally:
        if "vfio-pci" in drivers():
            host("restore", "--group", GROUP_EDU_BDF, "--state-dir", state_dir)


def test_bridge_edu_and_nvme_share_one_group_and_the_main_disk_keeps_its_name():
    from pykvm.vfio.group import group_members

    assert drivers() == (None, None, "nvme")
    assert group_members(group_number()) == [(GROUP_BRIDGE_BDF, None), (GROUP_EDU_BDF, None), (GROUP_NVME_BDF, "nvme")]
    assert (PCI / GROUP_BRIDGE_BDF / "class").read_text().startswith("0x0604")  # a PCI-to-PCI bridge
    nvme = {Path(os.readlink(p / "device")).name: p.name for p in Path("/sys/class/nvme").iterdir()}
    assert (nvme[NVME_BDF], nvme[GROUP_NVME_BDF]) == ("nvme0", "nvme1")  # /dev/nvme0n1 stays the main disk
    assert Path("/sys/class/nvme/nvme1/serial").read_text().strip() == GROUP_NVME_SERIAL
    assert group_disk_reads_its_pattern()
    items = {i["name"]: i for i in json.loads(host("check", "--json").stdout)["items"]}
    assert items["VFIO groups viable"]["status"] == "PASS", items["VFIO groups viable"]


def test_binding_one_device_of_the_group_is_refused_and_changes_nothing():
    proc = host("bind", GROUP_EDU_BDF, "--state-dir", "/tmp/pykvm-unused-state")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{GROUP_EDU_BDF} shares IOMMU group {group_number()} with {GROUP_NVME_BDF}" in proc.stderr, proc.stderr
    assert "driver nvme" in proc.stderr and "--group" in proc.stderr and "--allow-split" in proc.stderr
    assert drivers() == (None, None, "nvme")


def test_vfio_group_is_not_viable_and_refuses_a_container(split):
    from pykvm._native import ffi
    from pykvm.errors import VfioError
    from pykvm.vfio import Container, Group

    with Group.for_device(GROUP_EDU_BDF) as group, Container() as container:
        assert group.number == split
        assert group.status.viable is False and group.status.container_set is False
        with pytest.raises(VfioError) as caught:
            group.set_container(container)
        err = caught.value
        assert err.errno == errno.EPERM and "VFIO_GROUP_SET_CONTAINER" in str(err)
        for text in (f"group {split} is not viable", f"{GROUP_NVME_BDF} (driver: nvme)",
                     f"{GROUP_BRIDGE_BDF} (driver: none)", f"{GROUP_EDU_BDF} (driver: vfio-pci)",
                     f"`pykvm host bind {GROUP_NVME_BDF}`"):
            assert text in str(err), str(err)
        with pytest.raises(VfioError) as caught:
            group.get_device(GROUP_EDU_BDF)
        assert caught.value.errno == errno.EPERM and "not viable" in str(caught.value)
        # The early check mirrors the kernel: the raw ioctl is refused the same way.
        with pytest.raises(VfioError) as caught:
            group._ioctl("VFIO_GROUP_SET_CONTAINER", ffi.new("int *", container.fileno()))
        assert caught.value.errno == errno.EPERM
        assert group.container is None and group.status.container_set is False
    assert vfio_holders(split) == []
    assert drivers() == (None, "vfio-pci", "nvme")


def test_pykvm_run_refuses_before_the_guest_starts_and_leaves_nothing_behind(split, tmp_path):
    try:
        kernel, modules = guest_kernel()
    except LabUnavailable as exc:
        require_or_skip("PYKVM_REQUIRE_LAB", str(exc))
    initrd = build_guest_initramfs(tmp_path / "never-runs.img", "echo GUEST-RAN\npoweroff -f\n", modules_dir=modules)
    run = run_guest(kernel, initrd, vfio=[GROUP_EDU_BDF], timeout=60.0)
    assert run.returncode == 2, run.detail()  # a configuration error
    assert run.console == "" and "GUEST-RAN" not in run.console, run.detail()
    assert "Traceback" not in run.log and "pykvm run: guest" not in run.log, run.detail()
    for text in (f"IOMMU group {split} of {GROUP_EDU_BDF} is not viable", f"{GROUP_NVME_BDF} still has a host driver",
                 f"{GROUP_BRIDGE_BDF} (driver: none)", f"{GROUP_EDU_BDF} (driver: vfio-pci)",
                 f"{GROUP_NVME_BDF} (driver: nvme)", f"fix: `pykvm host bind --group {GROUP_EDU_BDF}`",
                 f"`pykvm host restore --group {GROUP_EDU_BDF}`"):
        assert text in run.log, run.detail()
    assert vfio_holders(split) == []
    assert drivers() == (None, "vfio-pci", "nvme")
    assert group_disk_reads_its_pattern()  # L1's nvme still drives the disk


def test_host_groups_and_check_report_the_group_not_viable(split):
    groups = {g["group"]: g for g in json.loads(host("groups", "--json").stdout)}
    group = groups[split]
    assert group["ready"] is False
    assert [(d["bdf"], d["driver"]) for d in group["devices"]] == [
        (GROUP_BRIDGE_BDF, None), (GROUP_EDU_BDF, "vfio-pci"), (GROUP_NVME_BDF, "nvme")]
    text = host("groups").stdout
    assert f"IOMMU group {split} (not ready: {GROUP_NVME_BDF} on nvme)" in text, text
    proc = host("check", "--json")
    report = json.loads(proc.stdout)
    item = {i["name"]: i for i in report["items"]}["VFIO groups viable"]
    assert item["status"] == "WARN", item
    assert f"group {split}: {GROUP_EDU_BDF} on vfio-pci, {GROUP_NVME_BDF} on nvme" in item["detail"], item
    assert f"`pykvm host bind --group {GROUP_EDU_BDF}`" in item["fix"]
    assert f"`pykvm host restore --group {GROUP_EDU_BDF}`" in item["fix"]
    assert proc.returncode == 0 and report["ok"] is True  # a warning: other groups still pass through
    assert "WARN  VFIO groups viable" in host("check").stdout


def test_binding_the_whole_group_makes_it_viable_and_restore_gives_both_back(split, state_dir):
    from pykvm.vfio import Container, Group

    proc = host("bind", "--group", GROUP_EDU_BDF, "--state-dir", state_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{GROUP_NVME_BDF}: nvme -> vfio-pci" in proc.stdout and "already on vfio-pci" in proc.stdout, proc.stdout
    assert drivers() == (None, "vfio-pci", "vfio-pci")  # the bridge needs no driver change
    assert not Path(GROUP_DISK).exists()
    with Group.for_device(GROUP_EDU_BDF) as group, Container() as container:
        assert group.status.viable is True
        group.set_container(container)
        container.set_iommu()
        assert group.status.container_set is True
        with group.get_device(GROUP_EDU_BDF) as edu:
            assert edu.info.is_pci
    items = {i["name"]: i for i in json.loads(host("check", "--json").stdout)["items"]}
    assert items["VFIO groups viable"]["status"] == "PASS", items["VFIO groups viable"]
    assert {g["group"]: g for g in json.loads(host("groups", "--json").stdout)}[split]["ready"] is True

    proc = host("restore", "--group", GROUP_EDU_BDF, "--state-dir", state_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{GROUP_NVME_BDF}: vfio-pci -> nvme" in proc.stdout, proc.stdout
    assert drivers() == (None, None, "nvme")
    for bdf in (GROUP_EDU_BDF, GROUP_NVME_BDF):
        assert (PCI / bdf / "driver_override").read_text().strip() == "(null)"
    assert not list(Path(state_dir).iterdir())
    assert group_disk_reads_its_pattern()  # /dev/nvme1n1 is back, the same disk
    assert wait_for(lambda: not Path(f"/dev/vfio/{split}").exists()), "the group's VFIO node stayed"
