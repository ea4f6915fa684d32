"""Error paths and teardown of pykvm.vfio and ``pykvm host`` against the real kernel (inside L1).

Each test pins a bug found by reviewing the bindings against Linux 6.1's vfio-pci and
vfio_iommu_type1: a restore that handed the device straight back to vfio-pci, errors that
named the wrong ioctl or came out as bare OSErrors, and a misleading unmap hint.
The host tests run first, before the module's ``edu`` fixture binds edu to vfio-pci.
"""
from __future__ import annotations

import errno
import json
import mmap
from pathlib import Path

import pytest

from pykvm.host.bind import bind, restore
from pykvm.host.sysfs import HostError, Root
from pykvm.lab import EDU_BDF, NVME_BDF
from pykvm.lab.l2 import driver_of
from pykvm.vfio import VfioError, lib
from tests.lab.edu import PAGE, edu, edu_bound  # noqa: F401 (edu and edu_bound are fixtures)
from tests.lab.support import wait_for

pytestmark = pytest.mark.lab

PCI = Path("/sys/bus/pci/devices")


def _override(bdf: str) -> str:
    return (PCI / bdf / "driver_override").read_text().strip()


def _give_back(bdf: str, driver: str) -> None:
    """Whatever a test did, leave ``bdf`` on ``driver`` with no override for the tests after."""
    (PCI / bdf / "driver_override").write_text("\n")
    current = driver_of(bdf)
    if current not in (None, driver):
        (PCI / bdf / "driver" / "unbind").write_text(bdf)
    if driver_of(bdf) != driver:
        Path("/sys/bus/pci/drivers_probe").write_text(bdf)


def test_restore_after_a_bind_over_a_leftover_vfio_override_gives_the_device_back(tmp_path):
    """A device still on nvme but with driver_override already vfio-pci (an interrupted bind):
    bind records that override; restore used to write it back before probing, so vfio-pci
    took the device again and the advice to bind nvme by hand failed on the override too."""
    assert driver_of(NVME_BDF) == "nvme"
    try:
        (PCI / NVME_BDF / "driver_override").write_text("vfio-pci")
        assert driver_of(NVME_BDF) == "nvme"
        bind(Root(), NVME_BDF, state_dir=str(tmp_path))
        assert driver_of(NVME_BDF) == "vfio-pci"
        assert json.loads((tmp_path / f"{NVME_BDF}.json").read_text())["driver_override"] == "vfio-pci"
        result = restore(Root(), NVME_BDF, state_dir=str(tmp_path))
        assert driver_of(NVME_BDF) == "nvme", result
        assert _override(NVME_BDF) == "(null)" and not result.notes
        assert wait_for(lambda: Path("/dev/nvme0n1").exists()), "/dev/nvme0n1 did not come back"
    finally:
        _give_back(NVME_BDF, "nvme")
    assert driver_of(NVME_BDF) == "nvme"


def test_restore_leaves_a_driverless_device_claimed_by_someone_else_alone(tmp_path):
    """edu (no driver) claimed for pci-stub by someone else, never bound by pykvm: restore used
    to clear that override; it refuses, as it does for a device on another driver."""
    assert driver_of(EDU_BDF) is None
    try:
        (PCI / EDU_BDF / "driver_override").write_text("pci-stub")
        with pytest.raises(HostError, match="nothing of pykvm's to restore"):
            restore(Root(), EDU_BDF, state_dir=str(tmp_path))
        assert _override(EDU_BDF) == "pci-stub" and driver_of(EDU_BDF) is None
    finally:
        (PCI / EDU_BDF / "driver_override").write_text("\n")
    assert _override(EDU_BDF) == "(null)"


def test_set_irqs_on_an_index_the_device_lacks_names_set_irqs(edu):
    with pytest.raises(VfioError, match="no interrupt index 9") as exc:
        edu.device.set_irqs(9, [None])
    assert exc.value.errno == errno.EINVAL and exc.value.ioctl == "VFIO_DEVICE_SET_IRQS", str(exc.value)
    with pytest.raises(VfioError, match=r"MSI vectors \[0, 2\) refused"):  # a real index still explains itself
        edu.device.set_irqs(lib.VFIO_PCI_MSI_IRQ_INDEX, [None, None])


def test_unaligned_or_empty_unmap_is_not_called_a_cut_mapping(edu):
    c = edu.container
    m = c.map_dma(mmap.mmap(-1, 2 * PAGE), 0x100000)
    for iova, size in [(0x100001, PAGE), (0x100000, 0), (0x100000, 100)]:
        with pytest.raises(VfioError, match="page-aligned iova") as exc:
            c.unmap_dma(iova, size)
        assert exc.value.errno == errno.EINVAL and "cuts a mapping" not in str(exc.value)
    with pytest.raises(VfioError, match="cuts a mapping in two"):
        c.unmap_dma(0x100000, PAGE)
    assert m.mapped and c.unmap_dma(0x100000, 2 * PAGE) == 2 * PAGE and not m.mapped


def test_mmap_of_an_empty_range_is_a_vfio_error(edu):
    region = edu.device.region(lib.VFIO_PCI_BAR0_REGION_INDEX)
    before = len(edu.device._mmaps)
    for args in [(0, 0), (region.size,), (-PAGE, PAGE)]:
        with pytest.raises(VfioError) as exc:
            region.mmap(*args)
        assert exc.value.errno == errno.EINVAL and exc.value.ioctl == "mmap", str(exc.value)
    assert len(edu.device._mmaps) == before
    assert edu.alive()


def test_disabling_interrupts_that_are_not_enabled_is_a_no_op(edu):
    """vfio-pci answers EINVAL to disabling an index that is not enabled; a cleanup's
    disable_irqs after a failed set_irqs used to raise that (with NORESIZE advice) and hide
    the real error. A missing index still raises, naming SET_IRQS."""
    for index in (lib.VFIO_PCI_MSI_IRQ_INDEX, lib.VFIO_PCI_INTX_IRQ_INDEX):
        edu.device.disable_irqs(index)
        edu.device.disable_irqs(index)
    with pytest.raises(VfioError, match="could not disable interrupt index 9") as exc:
        edu.device.disable_irqs(9)
    assert exc.value.errno == errno.EINVAL and exc.value.ioctl == "VFIO_DEVICE_SET_IRQS"
    assert edu.alive()
