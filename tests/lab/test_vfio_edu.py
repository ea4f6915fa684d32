"""pykvm.vfio against a real IOMMU and vfio-pci (inside L1): the edu device.

edu (0000:00:04.0) starts with no driver; the ``edu`` fixture binds it to vfio-pci
through pykvm.host.bind and gives it back afterwards. Each edu DMA takes ~100 ms of
virtual time; transfer counts stay below 4096 (QEMU 7.2's edu aborts at 0x41000).
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pykvm.errors import ClosedError
from pykvm.lab import EDU_BDF, NVME_BDF
from pykvm.vfio import Container, DmaAllocator, EventFd, Group, VfioError, lib
from tests.conftest import open_fds
from tests.lab.edu import (  # noqa: F401 (edu and edu_bound are fixtures)
    EDU_BUFFER, EDU_DMA_LIMIT, ID, IRQ_ACK, IRQ_RAISE, IRQ_STATUS, LIVENESS, PAGE, Edu, edu, edu_bound, kmsg_new,
    kmsg_reader)

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]


def test_identity_and_liveness_through_mmapped_bar(edu):
    region = edu.device.region(lib.VFIO_PCI_BAR0_REGION_INDEX)
    assert region.size == 1 << 20 and region.info.mmappable and region.info.caps.sparse_areas is None
    assert edu.bar0.read32(ID) == 0x010000ED
    for value in (0, 0xFFFFFFFF, 0x12345678):
        edu.bar0.write32(LIVENESS, value)
        assert edu.bar0.read32(LIVENESS) == value ^ 0xFFFFFFFF
    assert region.read32(ID) == 0x010000ED  # the same register through pread on the device fd
    assert edu.device.config.vendor_id == 0x1234 and edu.device.config.device_id == 0x11E8
    assert edu.device.config.command & (lib.PCI_COMMAND_MEMORY | lib.PCI_COMMAND_MASTER) == (
        lib.PCI_COMMAND_MEMORY | lib.PCI_COMMAND_MASTER)


def test_iommu_info_reports_ranges_around_the_msi_window(edu):
    info = edu.container.iommu_info()
    assert info.page_sizes & PAGE
    assert info.iova_ranges and all(not (s <= 0xFEE00000 <= e) for s, e in info.iova_ranges)
    assert info.dma_avail and info.dma_avail > 1000
    assert info.migration is not None and info.migration.pgsize_bitmap & PAGE  # type1 dirty tracking
    assert edu.container.check_extension(lib.VFIO_TYPE1v2_IOMMU) == 1


def test_dma_round_trip_through_the_iommu(edu):
    with DmaAllocator(edu.container, limit=EDU_DMA_LIMIT) as dmas:
        src, src_iova = dmas.alloc(PAGE)
        dst, dst_iova = dmas.alloc(PAGE)
        payload = os.urandom(4000)
        src[: len(payload)] = payload
        edu.dma(src_iova, EDU_BUFFER, len(payload), to_ram=False)
        edu.dma(EDU_BUFFER, dst_iova, len(payload), to_ram=True)
        assert bytes(dst[: len(payload)]) == payload
        assert src_iova != dst_iova and src_iova < EDU_DMA_LIMIT and dst_iova < EDU_DMA_LIMIT


def test_after_unmap_the_iommu_refuses_the_device(edu):
    with DmaAllocator(edu.container, limit=EDU_DMA_LIMIT) as dmas:
        src, src_iova = dmas.alloc(PAGE)
        dst, dst_iova = dmas.alloc(PAGE)
        src[:64] = b"S" * 64
        edu.dma(src_iova, EDU_BUFFER, 64, to_ram=False)
        dst[:PAGE] = b"\xee" * PAGE
        assert edu.container.unmap_dma(dst_iova, PAGE) == PAGE
        kmsg = kmsg_reader()
        try:
            edu.dma(EDU_BUFFER, dst_iova, 64, to_ram=True)
            deadline = time.monotonic() + 5
            log = ""
            while f"fault addr {dst_iova:#x}" not in log and time.monotonic() < deadline:
                time.sleep(0.05)
                log += kmsg_new(kmsg)
        finally:
            os.close(kmsg)
        assert bytes(dst[:PAGE]) == b"\xee" * PAGE, "the device wrote through an unmapped IOVA"
        assert "DMAR" in log and f"fault addr {dst_iova:#x}" in log, log
        assert edu.alive()
        edu.dma(src_iova, EDU_BUFFER, 64, to_ram=False)  # the still-mapped buffer keeps working


def test_msi_arrives_on_an_eventfd(edu):
    info = edu.device.irq_info(lib.VFIO_PCI_MSI_IRQ_INDEX)
    assert info.count == 1 and info.eventfd
    with EventFd() as ev:
        edu.device.set_irqs(lib.VFIO_PCI_MSI_IRQ_INDEX, [ev])
        try:
            assert ev.wait(0.2) is None  # nothing raised yet
            edu.bar0.write32(IRQ_RAISE, 0x24)
            assert ev.wait(5.0) == 1
            assert edu.bar0.read32(IRQ_STATUS) == 0x24
            edu.bar0.write32(IRQ_ACK, 0x24)
            assert edu.bar0.read32(IRQ_STATUS) == 0
            with DmaAllocator(edu.container, limit=EDU_DMA_LIMIT) as dmas:  # DMA completion raises 0x100
                buf, iova = dmas.alloc(PAGE)
                edu.dma(iova, EDU_BUFFER, 16, to_ram=False, irq=True)
                assert ev.wait(5.0) == 1 and edu.bar0.read32(IRQ_STATUS) & 0x100
                edu.bar0.write32(IRQ_ACK, 0x100)
            edu.device.trigger(lib.VFIO_PCI_MSI_IRQ_INDEX)  # kernel-side loopback
            assert ev.wait(5.0) == 1
        finally:
            edu.device.disable_irqs(lib.VFIO_PCI_MSI_IRQ_INDEX)
        edu.bar0.write32(IRQ_RAISE, 0x1)
        assert ev.wait(0.3) is None  # disabled: no more signals
        edu.bar0.write32(IRQ_ACK, 0x1)


def test_intx_is_automasked_and_unmask_redelivers(edu):
    """INTx is level-triggered: the kernel masks it on delivery; unmasking while the
    device still asserts it signals again; an explicit mask holds a new one back."""
    info = edu.device.irq_info(lib.VFIO_PCI_INTX_IRQ_INDEX)
    assert info.count == 1 and info.automasked and info.maskable
    with EventFd() as ev:
        edu.device.set_irqs(lib.VFIO_PCI_INTX_IRQ_INDEX, [ev])
        try:
            edu.bar0.write32(IRQ_RAISE, 0x1)
            assert ev.wait(5.0) == 1
            assert ev.wait(0.3) is None  # masked by the kernel until we unmask
            edu.device.unmask(lib.VFIO_PCI_INTX_IRQ_INDEX)  # still asserted: delivered again
            assert ev.wait(5.0) == 1
            edu.bar0.write32(IRQ_ACK, 0x1)  # the device lowers the line
            edu.device.unmask(lib.VFIO_PCI_INTX_IRQ_INDEX)
            assert ev.wait(0.3) is None
            edu.device.mask(lib.VFIO_PCI_INTX_IRQ_INDEX)
            edu.bar0.write32(IRQ_RAISE, 0x2)
            assert ev.wait(0.3) is None  # held back by our mask
            edu.device.unmask(lib.VFIO_PCI_INTX_IRQ_INDEX)
            assert ev.wait(5.0) == 1
            edu.bar0.write32(IRQ_ACK, 0x2)
            with EventFd() as resample:  # unmask through an eventfd, as KVM's irqfd resampler does
                edu.device.set_unmask_eventfds(lib.VFIO_PCI_INTX_IRQ_INDEX, [resample])
                edu.device.unmask(lib.VFIO_PCI_INTX_IRQ_INDEX)
                edu.bar0.write32(IRQ_RAISE, 0x4)
                assert ev.wait(5.0) == 1 and ev.wait(0.3) is None  # automasked again
                edu.bar0.write32(IRQ_ACK, 0x4)
                edu.bar0.write32(IRQ_RAISE, 0x8)
                resample.write()
                assert ev.wait(5.0) == 1
                edu.bar0.write32(IRQ_ACK, 0x8)
                edu.device.set_unmask_eventfds(lib.VFIO_PCI_INTX_IRQ_INDEX, [None])
        finally:
            edu.device.disable_irqs(lib.VFIO_PCI_INTX_IRQ_INDEX)


def test_errors_are_clear_and_leave_the_device_usable(edu):
    c = edu.container
    a = c.map_dma(_page_buffer(2 * PAGE), 0x100000)
    with pytest.raises(FileExistsError, match=r"overlaps \[0x100000, 0x102000\)"):
        c.map_dma(_page_buffer(PAGE), 0x101000)
    with pytest.raises(FileNotFoundError, match="nothing is mapped"):
        c.unmap_dma(0x800000, PAGE)
    with pytest.raises(VfioError, match="outside the container's usable IOVA ranges") as exc:
        c.map_dma(_page_buffer(PAGE), 0xFEE00000)  # the x86 MSI window
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(VfioError, match="page-aligned"):
        c.map_dma(bytearray(100), 0x200000)
    with pytest.raises(VfioError) as exc:  # cutting a mapping in two
        c.unmap_dma(0x100000, PAGE)
    assert exc.value.errno == errno.EINVAL and "cuts a mapping" in str(exc.value)
    with pytest.raises(OSError) as exc:
        Group.for_device(EDU_BDF)  # the group is already open (here)
    assert exc.value.errno == errno.EBUSY and f"{os.getpid()} (" in str(exc.value)
    assert a.mapped and c.unmap_dma(0x100000, 2 * PAGE) == 2 * PAGE and not a.mapped
    assert edu.alive()
    with DmaAllocator(c, limit=EDU_DMA_LIMIT) as dmas:  # DMA still works after all that
        src, src_iova = dmas.alloc(PAGE)
        dst, dst_iova = dmas.alloc(PAGE)
        src[:8] = b"12345678"
        edu.dma(src_iova, EDU_BUFFER, 8, to_ram=False)
        edu.dma(EDU_BUFFER, dst_iova, 8, to_ram=True)
        assert bytes(dst[:8]) == b"12345678"


def _page_buffer(size: int):
    import mmap

    return mmap.mmap(-1, size)


def test_closed_container_and_teardown(edu_bound):
    before = open_fds()
    e = Edu(edu_bound)
    buf = _page_buffer(PAGE)
    m = e.container.map_dma(buf, 0x300000)
    with pytest.raises(BufferError):
        buf.close()  # the mapping pins the buffer: it cannot be unmapped under the device
    e.container.close()
    assert e.device.closed and e.group.closed and not m.mapped and e.group.container is None
    buf.close()  # released with the mapping
    with pytest.raises(ClosedError, match="VFIO container is closed"):
        e.container.map_dma(_page_buffer(PAGE), 0x300000)
    with pytest.raises(ClosedError):
        e.device.region(0)
    assert open_fds() == before
    again = Edu(edu_bound)  # and the device opens again
    try:
        assert again.alive()
    finally:
        again.close()


def test_group_not_bound_to_vfio_names_the_driver():
    before = open_fds()
    with pytest.raises(FileNotFoundError) as exc:
        Group.for_device(NVME_BDF)  # still on the kernel's nvme driver
    text = str(exc.value)
    assert "not bound to vfio-pci" in text and "driver: nvme" in text and f"pykvm host bind {NVME_BDF}" in text
    assert open_fds() == before


def test_set_iommu_needs_a_group_and_get_device_needs_an_iommu(edu_bound):
    with Container() as c:
        assert c.api_version == lib.VFIO_API_VERSION
        with pytest.raises(VfioError, match="no group"):
            c.set_iommu()
        with Group.for_device(edu_bound) as g:
            assert g.status.viable and not g.status.container_set
            g.set_container(c)
            assert g.status.container_set
            with pytest.raises(VfioError, match="needs a container with an IOMMU"):
                g.get_device(edu_bound)
            c.set_iommu()
            with g.get_device(edu_bound) as d:
                assert d.info.is_pci and d.info.num_regions >= lib.VFIO_PCI_NUM_REGIONS
            g.unset_container()
            assert not g.status.container_set and c.iommu_type is None


def test_example_walkthrough_runs(edu_bound):
    proc = subprocess.run([sys.executable, str(ROOT / "examples/20_vfio_edu_dma.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "edu ID register: 0x010000ed" in proc.stdout
    assert "b'hello from host memory, via the IOMMU'" in proc.stdout
    assert "refused by the IOMMU" in proc.stdout
