"""pykvm.vfio with QEMU's NVMe controller (0000:00:05.0, serial pykvm-lab-nvme), inside L1.

The ``nvme_bound`` fixture takes the disk from the kernel's nvme driver to vfio-pci
and gives it back afterwards, so later tests find /dev/nvme0n1 again.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm.lab import NVME_BDF, NVME_SERIAL
from pykvm.lab.l2 import vfio_bound
from pykvm.vfio import Container, EventFd, Group, VfioError, lib

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
CC = 0x14
CC_IOSQES_64B, CC_IOCQES_16B = 6 << 16, 4 << 20


@pytest.fixture(scope="module")
def nvme_bound(tmp_path_factory):
    with vfio_bound([NVME_BDF], str(tmp_path_factory.mktemp("bind"))):
        yield NVME_BDF


@pytest.fixture
def nvme(nvme_bound):
    before = len(os.listdir("/proc/self/fd"))
    with Container() as c:
        g = Group.for_device(nvme_bound)
        g.set_container(c)
        c.set_iommu()
        yield g.get_device(nvme_bound)
    assert len(os.listdir("/proc/self/fd")) == before


def test_regions_and_msix_as_the_kernel_reports(nvme):
    assert nvme.info.is_pci and nvme.info.can_reset
    assert nvme.info.num_regions >= lib.VFIO_PCI_NUM_REGIONS and nvme.info.num_irqs >= lib.VFIO_PCI_NUM_IRQS
    bar0 = nvme.region(lib.VFIO_PCI_BAR0_REGION_INDEX)
    assert bar0.size == 16 << 10 and bar0.info.readable and bar0.info.writable and bar0.info.mmappable
    msix = nvme.config.msix()
    assert msix is not None and msix.table_bar == 0 and msix.pba_bar == 0
    assert msix.table_offset + 16 * msix.table_size <= bar0.size
    # vfio-pci 6.1 lets the MSI-X table's BAR be mapped whole on x86 with interrupt remapping:
    # it reports MSIX_MAPPABLE and no sparse areas.
    assert bar0.info.caps.msix_mappable and bar0.info.caps.sparse_areas is None
    assert bar0.info.mmap_areas() == ((bar0.info.mmap_areas()[0]),) and bar0.info.mmap_areas()[0].size == bar0.size
    irq = nvme.irq_info(lib.VFIO_PCI_MSIX_IRQ_INDEX)
    assert irq.count == msix.table_size and irq.eventfd
    assert nvme.irq_info(lib.VFIO_PCI_INTX_IRQ_INDEX).count == 1
    config = nvme.region(lib.VFIO_PCI_CONFIG_REGION_INDEX)
    assert config.info.readable and config.info.writable and not config.info.mmappable
    assert (nvme.config.vendor_id, nvme.config.device_id) == (0x1B36, 0x0010)
    cap_ids = [cid for cid, _ in nvme.config.capabilities()]
    assert lib.PCI_CAP_ID_MSIX in cap_ids and lib.PCI_CAP_ID_EXP in cap_ids
    unimplemented = nvme.region(lib.VFIO_PCI_BAR1_REGION_INDEX)
    assert unimplemented.size == 0 and unimplemented.info.mmap_areas() == ()
    with pytest.raises(VfioError, match="not inside an mmap area"):
        config.mmap(0, 4096)


def test_msix_vectors_sub_range_and_loopback(nvme):
    with EventFd() as a, EventFd() as b:
        nvme.set_irqs(lib.VFIO_PCI_MSIX_IRQ_INDEX, [a, None, b])  # vectors 0..2, 1 left unassigned
        try:
            nvme.trigger(lib.VFIO_PCI_MSIX_IRQ_INDEX, start=2)
            assert b.wait(5.0) == 1 and a.wait(0.1) is None
            nvme.set_irqs(lib.VFIO_PCI_MSIX_IRQ_INDEX, [a], start=1)  # the unassigned vector gets an eventfd
            nvme.trigger(lib.VFIO_PCI_MSIX_IRQ_INDEX, start=1)
            assert a.wait(5.0) == 1
            assert nvme.config.msix().enabled
            if nvme.irq_info(lib.VFIO_PCI_MSIX_IRQ_INDEX).noresize:  # before Linux 6.5: no growing the set
                with pytest.raises(VfioError, match="NORESIZE"):
                    nvme.set_irqs(lib.VFIO_PCI_MSIX_IRQ_INDEX, [a], start=3)
        finally:
            nvme.disable_irqs(lib.VFIO_PCI_MSIX_IRQ_INDEX)
        assert not nvme.config.msix().enabled
        with pytest.raises(VfioError, match="MSI-X vectors"):
            nvme.set_irqs(lib.VFIO_PCI_MSIX_IRQ_INDEX, [a], start=10_000)


def test_reset_clears_controller_registers(nvme):
    """A function-level reset puts the controller's CC register back to 0 (QEMU's nvme has FLR)."""
    nvme.config.enable(memory=True, bus_master=False)
    with nvme.region(lib.VFIO_PCI_BAR0_REGION_INDEX).mmap() as bar0:
        bar0.write32(CC, CC_IOSQES_64B | CC_IOCQES_16B)  # queue entry sizes, not enabled
        assert bar0.read32(CC) == CC_IOSQES_64B | CC_IOCQES_16B
        nvme.reset()
        nvme.config.enable(memory=True, bus_master=False)  # the reset cleared the command register too
        assert bar0.read32(CC) == 0


def test_hot_reset_info(nvme):
    """On q35's root bus there is no bridge to reset: the kernel answers ENODEV; elsewhere it
    lists the devices (this one included) that a bus reset would take along."""
    try:
        deps = nvme.hot_reset_info()
    except VfioError as exc:
        assert exc.errno == errno.ENODEV and exc.ioctl == "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"
    else:
        assert NVME_BDF in [d.bdf for d in deps]


def test_identify_example_returns_the_lab_serial(nvme_bound):
    proc = subprocess.run([sys.executable, str(ROOT / "examples/21_vfio_nvme_identify.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"serial {NVME_SERIAL!r}" in proc.stdout and "vendor 0x1b36" in proc.stdout
