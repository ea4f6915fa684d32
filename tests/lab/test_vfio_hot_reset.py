"""VFIO_DEVICE_PCI_HOT_RESET inside L1: a bus reset behind the bridge, none on the root bus.

Behind the conventional PCI bridge 00:07.0 the second edu (01:01.0) and NVMe (01:02.0) share
bus 01 and one IOMMU group; vfio-pci resets both at once through the bridge's secondary bus
reset, saving and restoring their config space around it. QEMU's NVMe puts its controller
registers back to their defaults (CC = 0); QEMU's edu has no reset handler, its registers
survive. The edu on q35's root bus (00:04.0) has no bridge above it to reset it.
"""
from __future__ import annotations

import errno

import pytest

from pykvm.host.bind import bind, restore
from pykvm.host.sysfs import Root
from pykvm.lab.devices import GROUP_EDU_BDF, GROUP_NVME_BDF
from pykvm.lab.l2 import await_group_node
from pykvm.vfio import Container, Group, HotResetDependent, VfioError, lib
from tests.conftest import open_fds
from tests.lab.edu import LIVENESS, edu, edu_bound  # noqa: F401 (edu and edu_bound are fixtures)

pytestmark = pytest.mark.lab

BAR0 = lib.VFIO_PCI_BAR0_REGION_INDEX
NVME_CC = 0x14
CC_QUEUE_ENTRY_SIZES = (6 << 16) | (4 << 20)  # IOSQES 64 B, IOCQES 16 B; EN stays 0


@pytest.fixture(scope="module")
def bridged_group(tmp_path_factory):
    """The bridged group's edu and NVMe on vfio-pci (the NVMe leaves L1's nvme driver), then back."""
    root, state = Root(), str(tmp_path_factory.mktemp("bind"))
    bind(root, GROUP_EDU_BDF, whole_group=True, state_dir=state)
    try:
        await_group_node(GROUP_EDU_BDF)
        yield
    finally:
        restore(root, GROUP_EDU_BDF, whole_group=True, state_dir=state)


@pytest.fixture
def bridged(bridged_group):
    """(group, edu, nvme) of the bridged group, opened in one container, memory decoding on."""
    before = open_fds()
    with Container() as container:
        group = Group.for_device(GROUP_EDU_BDF)
        group.set_container(container)
        container.set_iommu()
        edu2, nvme2 = group.get_device(GROUP_EDU_BDF), group.get_device(GROUP_NVME_BDF)
        for device in (edu2, nvme2):
            device.config.enable(memory=True, bus_master=False)
        yield group, edu2, nvme2
    assert open_fds() == before


def test_hot_reset_info_lists_both_devices_of_the_bus(bridged):
    group, edu2, nvme2 = bridged
    both = [HotResetDependent(group.number, GROUP_EDU_BDF), HotResetDependent(group.number, GROUP_NVME_BDF)]
    assert edu2.hot_reset_info() == both and nvme2.hot_reset_info() == both
    assert not edu2.info.can_reset and nvme2.info.can_reset  # edu has no FLR: the bus reset is its only one


def test_hot_reset_of_the_edu_resets_the_nvme_on_its_bus(bridged):
    group, edu2, nvme2 = bridged
    with nvme2.region(BAR0).mmap() as nvme_bar, edu2.region(BAR0).mmap() as edu_bar:
        nvme_bar.write32(NVME_CC, CC_QUEUE_ENTRY_SIZES)
        edu_bar.write32(LIVENESS, 0x0F0F0F0F)
        assert nvme_bar.read32(NVME_CC) == CC_QUEUE_ENTRY_SIZES
        command = nvme2.config.command
        edu2.hot_reset([group])
        assert nvme_bar.read32(NVME_CC) == 0  # the controller was reset
        assert nvme2.config.command == command  # and vfio-pci restored its config space
        assert edu_bar.read32(LIVENESS) == 0xF0F0F0F0  # QEMU's edu keeps its registers over a reset


def test_hot_reset_needs_a_group_of_every_device_it_resets(bridged, edu_bound):
    group, edu2, nvme2 = bridged
    with Group.for_device(edu_bound) as unrelated:  # the root-bus edu's group
        for groups in ([], [unrelated], [group, group, group]):  # none, the wrong one, more than 2 devices
            with pytest.raises(VfioError) as exc:
                edu2.hot_reset(groups)
            assert exc.value.errno == errno.EINVAL and exc.value.ioctl == "VFIO_DEVICE_PCI_HOT_RESET"
            assert f"2 device(s) of group(s) [{group.number}]" in str(exc.value), str(exc.value)
        nvme2.hot_reset([unrelated, group])  # an extra group does no harm


def test_root_bus_device_has_no_hot_reset(edu):
    with pytest.raises(VfioError) as exc:
        edu.device.hot_reset_info()
    assert exc.value.errno == errno.ENODEV and exc.value.ioctl == "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"
    with pytest.raises(VfioError) as exc:
        edu.device.hot_reset([edu.group])
    assert exc.value.errno == errno.ENODEV and exc.value.ioctl == "VFIO_DEVICE_PCI_HOT_RESET"
    assert "root bus" in str(exc.value)
    assert edu.alive()
