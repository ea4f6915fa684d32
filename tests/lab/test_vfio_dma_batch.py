"""Container.map_dma_batch against a real IOMMU (inside L1), checked by the edu device's DMA.

A batch maps many 4 KiB pieces of one buffer; edu DMA to and from some of its IOVAs must
move the right bytes, and after ``unmap()`` the IOMMU must refuse them. A batch the kernel
refuses part-way must leave nothing mapped: mapping the same IOVAs again then succeeds.
"""
from __future__ import annotations

import errno
import mmap
import os
import time

import numpy as np
import pytest

from pykvm.vfio import DmaBatch, VfioError
from tests.conftest import open_fds
from tests.lab.edu import EDU_BUFFER, Edu, edu, edu_bound, kmsg_new, kmsg_reader  # noqa: F401 (fixtures)

pytestmark = pytest.mark.lab

PAGE = 4096
N = 256
BASE = 0x1000000  # below edu's 28-bit DMA mask


def scattered_iovas(n: int = N) -> np.ndarray:
    """Page i at BASE + 2 * (n - 1 - i) pages: reversed, with holes, so order and gaps matter."""
    return BASE + 2 * PAGE * (n - 1 - np.arange(n, dtype=np.uint64))


def device_writes_fault(edu: Edu, iova: int) -> str:
    """Start a device-to-RAM DMA at ``iova`` and return the kernel log lines it produced."""
    kmsg = kmsg_reader()
    try:
        edu.dma(EDU_BUFFER, iova, 64, to_ram=True)
        deadline, log = time.monotonic() + 5, ""
        while f"fault addr {iova:#x}" not in log and time.monotonic() < deadline:
            time.sleep(0.05)
            log += kmsg_new(kmsg)
    finally:
        os.close(kmsg)
    return log


def test_batch_pages_carry_the_device_dma(edu):
    c = edu.container
    buf = mmap.mmap(-1, N * PAGE)
    iovas = scattered_iovas()
    with c.map_dma_batch(buf, iovas, PAGE) as batch:
        assert isinstance(batch, DmaBatch) and len(batch) == N and batch.mapped and c.mappings == [batch]
        assert batch.iovas.tolist() == iovas.tolist() and set(batch.sizes.tolist()) == {PAGE}
        assert batch.offsets.tolist() == [i * PAGE for i in range(N)] and batch.live.all()
        with pytest.raises(BufferError):
            buf.close()  # pinned while the device can reach it
        for src, dst in ((0, N - 1), (17, 200), (N - 1, 3)):
            payload = os.urandom(2000)
            buf[src * PAGE: src * PAGE + len(payload)] = payload
            edu.dma(int(iovas[src]), EDU_BUFFER, len(payload), to_ram=False)
            edu.dma(EDU_BUFFER, int(iovas[dst]), len(payload), to_ram=True)
            assert buf[dst * PAGE: dst * PAGE + len(payload)] == payload, (src, dst)
    assert not batch.mapped and c.mappings == [] and batch.vaddrs is None
    buf.close()  # released with the batch


def test_after_unmap_the_iommu_refuses_every_entry(edu):
    c = edu.container
    buf = mmap.mmap(-1, N * PAGE)
    iovas = scattered_iovas()
    batch = c.map_dma_batch(buf, iovas, PAGE)
    buf[5 * PAGE: 6 * PAGE] = b"\xee" * PAGE
    edu.dma(int(iovas[5]), EDU_BUFFER, 64, to_ram=False)  # reachable while mapped
    batch.unmap()
    batch.unmap()  # idempotent
    assert not batch.mapped and not batch.live.any() and c.mappings == []
    log = device_writes_fault(edu, int(iovas[5]))
    assert "DMAR" in log and f"fault addr {int(iovas[5]):#x}" in log, log
    assert buf[5 * PAGE: 6 * PAGE] == b"\xee" * PAGE, "the device wrote through an unmapped IOVA"
    assert edu.alive()
    again = c.map_dma_batch(buf, iovas, PAGE)  # the kernel really let go of every IOVA
    again.unmap()
    buf.close()


def test_refused_entry_leaves_nothing_mapped(edu):
    c = edu.container
    buf = mmap.mmap(-1, 64 * PAGE)
    iovas = BASE + PAGE * np.arange(64, dtype=np.uint64)
    taken = c.map_dma(mmap.mmap(-1, PAGE), int(iovas[40]))
    with pytest.raises(FileExistsError) as exc:
        c.map_dma_batch(buf, iovas, PAGE)
    text = str(exc.value)
    assert exc.value.errno == errno.EEXIST and exc.value.ioctl == "VFIO_IOMMU_MAP_DMA" and exc.value.entry == 40
    taken_range = f"[{int(iovas[40]):#x}, {int(iovas[41]):#x})"
    assert f"batch entry 40 of 64: IOVA {taken_range} overlaps {taken_range}" in text
    assert "entries 0..39, mapped before it, were unmapped again" in text
    assert c.mappings == [taken]
    keep = np.delete(iovas, 40)  # the same IOVAs but the taken one: all free again
    offsets = np.delete(np.arange(64, dtype=np.uint64) * PAGE, 40)
    batch = c.map_dma_batch(buf, keep, PAGE, offsets)
    with pytest.raises(FileExistsError, match=rf"batch entry 0 of 1: .* overlaps \[{BASE:#x}, {BASE + PAGE:#x}\)"):
        c.map_dma_batch(mmap.mmap(-1, PAGE), [BASE], PAGE)  # explained from the batch's own entries
    batch.unmap()
    taken.unmap()
    assert c.mappings == []
    buf.close()


def test_misaligned_entry_is_refused_in_c_and_rolled_back(edu):
    c = edu.container
    buf = mmap.mmap(-1, 8 * PAGE)
    offsets = [0, PAGE, 2 * PAGE + 512, 3 * PAGE]
    iovas = [BASE + i * PAGE for i in range(4)]
    with pytest.raises(VfioError, match=r"batch entry 2 of 4: map_dma needs page-aligned vaddr .*entries 0..1, "
                                        "mapped before it, were unmapped again") as exc:
        c.map_dma_batch(buf, iovas, PAGE, offsets)
    assert exc.value.errno == errno.EINVAL and exc.value.entry == 2 and c.mappings == []
    c.map_dma_batch(buf, iovas, PAGE).unmap()  # nothing was left behind
    buf.close()


def test_checks_before_any_ioctl(edu):
    c = edu.container
    buf = mmap.mmap(-1, 4 * PAGE)
    with pytest.raises(VfioError, match=r"batch entry 3: IOVA \[0xfee00000, 0xfee01000\) is outside"):
        c.map_dma_batch(buf, [BASE, BASE + PAGE, BASE + 2 * PAGE, 0xFEE00000], PAGE)  # the MSI window
    with pytest.raises(VfioError, match=r"batch entry 3: \[0x3000, 0x5000\) exceeds the buffer"):
        c.map_dma_batch(buf, [BASE, BASE + PAGE, BASE + 2 * PAGE, BASE + 3 * PAGE], [PAGE, PAGE, PAGE, 2 * PAGE])
    with pytest.raises(VfioError, match="batch entries 0 and 1 overlap"):
        c.map_dma_batch(buf, [BASE, BASE], PAGE, [0, PAGE])
    assert c.mappings == []
    c.map_dma_batch(buf, [BASE, BASE + PAGE, BASE + 2 * PAGE, BASE + 3 * PAGE], PAGE).unmap()
    buf.close()


def test_a_refused_map_lets_go_of_the_buffer(edu):
    c = edu.container
    buf = mmap.mmap(-1, 2 * PAGE)
    taken = c.map_dma(mmap.mmap(-1, PAGE), BASE)
    with pytest.raises(FileExistsError) as by_kernel:
        c.map_dma(buf, BASE)
    with pytest.raises(VfioError) as by_check:
        c.map_dma(buf, 0xFEE00000)
    with pytest.raises(FileExistsError) as batch:
        c.map_dma_batch(buf, [BASE + PAGE, BASE], PAGE)
    with pytest.raises(ValueError):
        c.map_dma_batch(buf, [BASE, -1], PAGE)
    buf.close()  # while the exceptions, whose tracebacks hold the calls' frames, are alive
    assert by_kernel.value.errno == batch.value.errno == errno.EEXIST and by_check.value.errno == errno.EINVAL
    assert c.mappings == [taken]
    taken.unmap()


def test_unmap_dma_over_some_entries_keeps_the_batch_coherent(edu):
    c = edu.container
    buf = mmap.mmap(-1, 16 * PAGE)
    batch = c.map_dma_batch(buf, BASE + PAGE * np.arange(16, dtype=np.uint64), PAGE)
    assert c.unmap_dma(BASE, 4 * PAGE) == 4 * PAGE  # entries 0..3, through the per-call API
    assert batch.live.tolist() == [False] * 4 + [True] * 12 and batch.mapped
    single = c.map_dma(mmap.mmap(-1, PAGE), BASE)  # that IOVA is free again
    assert c.mappings == [single, batch]
    batch.unmap()  # only the 12 still mapped: no ENOENT for the others
    assert not batch.mapped and c.mappings == [single]
    assert c.unmap_dma(BASE, 16 * PAGE) == PAGE
    buf.close()


def test_closing_the_container_drops_its_batches(edu_bound):  # noqa: F811
    before = open_fds()
    e = Edu(edu_bound)
    buf = mmap.mmap(-1, 8 * PAGE)
    batch = e.container.map_dma_batch(buf, BASE + PAGE * np.arange(8, dtype=np.uint64), PAGE)
    e.container.close()
    assert not batch.mapped and e.group.closed
    batch.unmap()  # a no-op now: the kernel dropped everything with the last group
    buf.close()
    assert open_fds() == before
