"""Type1 dirty-page tracking (VFIO_IOMMU_DIRTY_PAGES) with the lab's edu, inside L1.

vfio-pci devices cannot say which pages they wrote, so vfio_iommu_type1 (6.1) reports
every page of every mapping in the range as dirty, on every GET_BITMAP, written or not.
Unmapped IOVA reads clean in the first answer only: 6.1 keeps bits of a mapping shifted
into an earlier answer (at an offset not a multiple of 64 pages) and writes them past the
mapping's end in later ones, so these tests ask again only for whole single mappings.
"""
from __future__ import annotations

import errno
import mmap

import pytest

from pykvm.vfio import VfioError, lib
from tests.lab.edu import EDU_BUFFER, PAGE, edu, edu_bound  # noqa: F401 (edu and edu_bound are fixtures)

pytestmark = pytest.mark.lab

A, B = 0x100000, 0x108000  # 4 pages at A, a 4-page gap, 2 pages at B


def test_every_mapped_page_is_dirty_and_the_gap_is_clean(edu):
    c = edu.container
    a, b = mmap.mmap(-1, 4 * PAGE), mmap.mmap(-1, 2 * PAGE)
    c.map_dma(a, A)
    with pytest.raises(VfioError) as exc:
        c.dirty_bitmap(A, 4 * PAGE)
    assert exc.value.errno == errno.EINVAL and exc.value.ioctl == "VFIO_IOMMU_DIRTY_PAGES"
    assert "start_dirty_tracking" in str(exc.value)
    c.start_dirty_tracking()
    assert c.dirty_tracking
    c.map_dma(b, B)  # mapped after START: tracked too
    a[2 * PAGE : 2 * PAGE + 16] = b"written by edu.."
    edu.dma(A + 2 * PAGE, EDU_BUFFER, 16, to_ram=False)
    edu.dma(EDU_BUFFER, B + 0x10, 16, to_ram=True)  # edu writes into B's first page only
    assert b[0x10:0x20] == b"written by edu.."
    bitmap = c.dirty_bitmap(A, B + 2 * PAGE - A)
    assert (bitmap.iova, bitmap.pgsize, bitmap.npages) == (A, PAGE, 10)
    assert bitmap.pages == [A, A + PAGE, A + 2 * PAGE, A + 3 * PAGE, B, B + PAGE]
    assert bitmap.bitmap == (0b11_0000_1111).to_bytes(8, "little")  # the 4-page gap is clean
    assert c.dirty_bitmap(B, 2 * PAGE).pages == [B, B + PAGE]  # dirty again: the pages stay pinned
    assert c.dirty_bitmap(A, 4 * PAGE).pages == bitmap.pages[:4]
    c.stop_dirty_tracking()
    assert not c.dirty_tracking
    with pytest.raises(VfioError) as exc:
        c.dirty_bitmap(A, 4 * PAGE)
    assert exc.value.errno == errno.EINVAL and exc.value.ioctl == "VFIO_IOMMU_DIRTY_PAGES"


def test_ranges_the_kernel_refuses(edu):
    c = edu.container
    c.map_dma(mmap.mmap(-1, 4 * PAGE), A)
    c.start_dirty_tracking()
    c.start_dirty_tracking()  # the kernel takes a second START as a no-op
    for iova, size in [(A + PAGE, 2 * PAGE), (A, 2 * PAGE), (A + 0x800, 4 * PAGE), (A, 0)]:
        with pytest.raises(VfioError) as exc:  # cuts the mapping in two, misaligned, empty
            c.dirty_bitmap(iova, size)
        assert exc.value.errno == errno.EINVAL and "cuts no mapping in two" in str(exc.value), (iova, size)
    assert c.dirty_bitmap(A, 4 * PAGE).npages == 4


def test_closing_the_container_stops_tracking_before_the_group_leaves(edu):
    c, group = edu.container, edu.group
    c.map_dma(mmap.mmap(-1, PAGE), A)
    c.start_dirty_tracking()
    seen = []
    ioctl = c._ioctl

    def spy(name, arg=None):
        if name == "VFIO_IOMMU_DIRTY_PAGES":
            seen.append((arg.flags, group.closed))
        return ioctl(name, arg)

    c._ioctl = spy
    c.close()
    assert seen == [(lib.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, False)] and not c.dirty_tracking
