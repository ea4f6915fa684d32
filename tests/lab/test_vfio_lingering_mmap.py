"""A group closed while a view of its device's BAR is still held (inside L1, edu).

The view keeps the BAR mapped; the kernel keeps the device open until munmap, the device
keeps the group file, so the group stays in its container, and the container keeps its
IOMMU and every DMA mapping, even after the group's (or the container's) fd is closed.
pykvm used to forget the mappings and the IOMMU type at the close; it now mirrors the
kernel and lets the group leave at munmap. Each test checks pykvm's records and the
kernel's state (edu DMA through the held view, VFIO_IOMMU_GET_INFO, the group node busy).
"""
from __future__ import annotations

import errno
import gc
import mmap
import os
import time

import pytest

from pykvm._native import ffi
from pykvm.errors import ClosedError
from pykvm.vfio import Group, VfioError, lib
from tests.conftest import open_fds
from tests.lab.edu import (  # noqa: F401 (edu_bound is a fixture)
    DMA_CMD, DMA_COUNT, DMA_DST, DMA_SRC, DMA_START, DMA_TO_RAM, EDU_BUFFER, ID, PAGE, Edu, edu_bound)

pytestmark = pytest.mark.lab

IOVA = 0x200000
TYPE1v2 = lib.VFIO_TYPE1v2_IOMMU


def kernel_iommu_errno(container) -> int:
    """VFIO_IOMMU_GET_INFO issued straight to the kernel (not through pykvm's records): 0 when
    the container still has an IOMMU, else the errno (EINVAL once the last group left)."""
    arg = ffi.new("struct vfio_iommu_type1_info *")
    arg.argsz = ffi.sizeof(arg[0])
    try:
        container._ioctl("VFIO_IOMMU_GET_INFO", arg)
    except VfioError as exc:
        return exc.errno
    return 0


def group_busy(bdf: str) -> bool:
    """The kernel refuses to open the group again while a device of it is still open."""
    try:
        Group.for_device(bdf).close()
    except OSError as exc:
        assert exc.errno == errno.EBUSY, exc
        return True
    return False


def edu_id(bar: memoryview) -> int:
    """edu's ID register through ``bar`` (edu answers only 4-byte accesses below 0x80)."""
    with bar.cast("I") as words:
        return words[ID // 4]


def dma_round_trip(bar: memoryview, buf: mmap.mmap) -> bool:
    """edu copies page 0 of ``buf`` (at IOVA) to its buffer and back to page 1, programmed
    through ``bar`` (the start of BAR0): True when the data arrived through the IOMMU."""
    payload = os.urandom(256)
    buf[:PAGE] = payload + bytes(PAGE - len(payload))
    buf[PAGE:] = bytes(PAGE)
    with bar.cast("Q") as regs:
        for src, dst, to_ram in ((IOVA, EDU_BUFFER, False), (EDU_BUFFER, IOVA + PAGE, True)):
            regs[DMA_SRC // 8], regs[DMA_DST // 8], regs[DMA_COUNT // 8] = src, dst, len(payload)
            regs[DMA_CMD // 8] = DMA_START | (DMA_TO_RAM if to_ram else 0)
            deadline = time.monotonic() + 20
            while regs[DMA_CMD // 8] & DMA_START:
                assert time.monotonic() < deadline, "edu DMA did not complete"
                time.sleep(0.01)
    return buf[PAGE:PAGE + len(payload)] == payload


def assert_given_back(bdf: str, group, c, m, buf: mmap.mmap, before) -> None:
    """After the last view went: pykvm has dropped the group, IOMMU and mapping, the kernel lets
    the group open again and ``buf`` be closed (unpinned), no fd is left and edu works anew."""
    assert group.container is None and c.iommu_type is None and c.mappings == [] and not m.mapped
    assert not group_busy(bdf)
    buf.close()  # no longer pinned
    assert open_fds() == before
    again = Edu(bdf)
    try:
        assert again.alive()
    finally:
        again.close()


def test_closed_group_stays_in_its_container_while_a_bar_view_is_held(edu_bound):
    before = open_fds()
    e = Edu(edu_bound)
    c, group = e.container, e.group
    buf = mmap.mmap(-1, 2 * PAGE)
    m = c.map_dma(buf, IOVA, 2 * PAGE)
    bar = e.bar0.view[:0x100]  # the caller's view; the Mmio itself goes
    e.bar0 = None
    gc.collect()
    try:
        group.close()
        assert group.closed and e.device.closed
        # pykvm keeps the group, the IOMMU and the mapping...
        assert group.container is c and c.iommu_type == TYPE1v2 and c.mappings == [m] and m.mapped
        # ... as the kernel does: the IOMMU answers, edu (still open) DMAs through the mapping
        assert kernel_iommu_errno(c) == 0
        c._forget_info()
        assert c.iommu_info().page_sizes & PAGE
        assert edu_id(bar) == 0x010000ED
        assert dma_round_trip(bar, buf)
        assert group_busy(edu_bound)
        # no fd shows the holder: the error says what holds the group, and who
        with pytest.raises(VfioError, match=r"in use \(held by a device region still mapped until it is unmapped; "
                                            r"processes with a VFIO device mapped: ") as info:
            Group.for_device(edu_bound)
        assert f"{os.getpid()} (" in str(info.value)
    finally:
        # The last export: the mmap goes, munmap releases the device and the group. Done on a
        # failure too, or the traceback keeps the device open and unbinding it hangs.
        bar.release()
        gc.collect()
    assert kernel_iommu_errno(c) == errno.EINVAL
    with pytest.raises(VfioError, match="no IOMMU set"):
        c.iommu_info()
    c.close()
    assert_given_back(edu_bound, group, c, m, buf, before)


def test_closed_container_keeps_its_mappings_while_a_bar_view_is_held(edu_bound):
    """Closing the container fd only drops a reference in the kernel: the group still in it
    (through the device the view keeps open) keeps the container, its IOMMU and mappings
    alive until munmap. Here the caller keeps the Mmio and closes it by hand."""
    before = open_fds()
    e = Edu(edu_bound)
    c, group = e.container, e.group
    buf = mmap.mmap(-1, 2 * PAGE)
    m = c.map_dma(buf, IOVA, 2 * PAGE)
    bar = e.bar0.view[:0x100]
    try:
        c.close()
        assert c.closed and group.closed and e.device.closed and not e.bar0.closed
        assert group.container is c and c.iommu_type == TYPE1v2 and c.mappings == [m] and m.mapped
        with pytest.raises(BufferError):
            buf.close()  # still pinned for the device, in the kernel as in pykvm
        with pytest.raises(ClosedError):
            m.unmap()  # the fd is gone, not the mapping: it stays recorded
        with pytest.raises(ClosedError):
            c.map_dma(buf, IOVA + 2 * PAGE, PAGE)
        assert c.mappings == [m] and m.mapped
        assert edu_id(bar) == 0x010000ED and dma_round_trip(bar, buf)
        assert group_busy(edu_bound)
    finally:
        bar.release()
        e.bar0.close()  # munmap: the group leaves, the last one, so the IOMMU and mappings go
    assert e.bar0.closed
    assert_given_back(edu_bound, group, c, m, buf, before)


def test_unset_container_while_a_bar_view_is_held_says_why(edu_bound):
    """The kernel refuses VFIO_GROUP_UNSET_CONTAINER (EBUSY) while the device is open, which a
    mapping keeps it: the error says which mapping, and the group stays where the kernel has it."""
    before = open_fds()
    e = Edu(edu_bound)
    c, group = e.container, e.group
    bar = e.bar0.view[:0x100]
    try:
        with pytest.raises(VfioError, match=r"cannot leave its container while a region of its device is still "
                                            r"mapped \(1 mapping") as info:
            group.unset_container()
        assert info.value.errno == errno.EBUSY
        assert e.device.closed and not e.bar0.closed  # the BAR could not be unmapped under the view
        assert group.container is c and c.iommu_type == TYPE1v2 and kernel_iommu_errno(c) == 0
        assert edu_id(bar) == 0x010000ED
    finally:
        bar.release()
    e.bar0.close()
    group.unset_container()  # nothing maps the device now
    assert group.container is None and c.iommu_type is None
    group.close()  # no longer the container's child: closed on its own
    c.close()
    assert open_fds() == before
