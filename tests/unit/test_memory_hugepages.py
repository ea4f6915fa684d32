"""MemoryRegion.huge_page_bytes: how much of guest RAM huge pages back (smaps parsing, real THP).

The real-THP and hugetlb tests skip on a machine that cannot give huge pages, and fail
instead under PYKVM_REQUIRE_KVM=1: guest RAM is what KVM runs on."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.memory import HUGE_PAGE_SIZE, PAGE_SIZE, GuestMemoryError, MemoryRegion
from tests.conftest import require_or_skip

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The bracketed choice of THP's 'enabled' knob ('never' when the kernel has no THP)."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return "never"
    return text[text.index("[") + 1:text.index("]")]


@pytest.fixture(scope="module")
def region():
    r = MemoryRegion(0, 8 * HUGE_PAGE_SIZE, name="ram")
    yield r
    r.close()


def test_untouched_anonymous_memory_has_no_huge_pages_and_touched_memory_has_them():
    r = MemoryRegion(0, 8 * HUGE_PAGE_SIZE, name="ram")
    try:
        assert r.huge_page_bytes() == 0  # nothing faulted in yet
        if thp_mode() == "never":
            require_or_skip("PYKVM_REQUIRE_KVM", "transparent huge pages are off on this host (never)")
        for offset in range(0, r.size, PAGE_SIZE):
            r.buffer[offset] = 1
        huge = r.huge_page_bytes()
        # 2 MiB-aligned and MADV_HUGEPAGE: every 2 MiB page is huge unless memory is fragmented
        assert huge % HUGE_PAGE_SIZE == 0 and 0 < huge <= r.size
    finally:
        r.close()


def test_a_closed_region_refuses():
    r = MemoryRegion(0, HUGE_PAGE_SIZE)
    r.close()
    with pytest.raises(GuestMemoryError, match="closed"):
        r.huge_page_bytes()


def _vma(lo: int, hi: int, anon_kb: int, shmem_kb: int) -> str:
    return (f"{lo:x}-{hi:x} rw-p 00000000 00:00 0 \nSize:  {(hi - lo) >> 10} kB\n"
            f"AnonHugePages:  {anon_kb} kB\nShmemPmdMapped:  {shmem_kb} kB\nTHPeligible:    1\nVmFlags: rd wr mr\n")


@settings(max_examples=60)
@given(vmas=st.lists(st.tuples(st.integers(-12, 12), st.integers(1, 6), st.integers(0, 4), st.integers(0, 2)),
                     max_size=6))
def test_only_mappings_that_overlap_the_region_count(region, tmp_path_factory, vmas):
    """A fake smaps of mappings around the region (offsets in 2 MiB units): the sum of their
    huge pages counts only for those that overlap it, capped at the region's size."""
    base, text, expected = region.host_address, "", 0
    for start, length, anon, shmem in sorted(vmas):
        lo, hi = base + start * HUGE_PAGE_SIZE, base + (start + length) * HUGE_PAGE_SIZE
        text += _vma(lo, hi, anon * 2048, shmem * 2048)
        if lo < base + region.size and base < hi:
            expected += (anon + shmem) * HUGE_PAGE_SIZE
    smaps = tmp_path_factory.mktemp("smaps") / "smaps"
    smaps.write_text(text)
    assert region.huge_page_bytes(str(smaps)) == min(expected, region.size)


NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@pytest.fixture
def reserved_huge_page():
    """One free hugetlb page: reserved for the test (and given back) when none is and we may."""
    free = int(Path("/proc/meminfo").read_text().split("HugePages_Free:")[1].split()[0])
    if free:
        yield
        return
    before = NR_HUGEPAGES.read_text()
    try:
        NR_HUGEPAGES.write_text(str(int(before) + 1))
    except OSError as exc:
        require_or_skip("PYKVM_REQUIRE_KVM", f"no free huge page and cannot reserve one ({exc}): run as root or "
                        "reserve one (echo 1 > /proc/sys/vm/nr_hugepages)")
    try:
        yield
    finally:
        NR_HUGEPAGES.write_text(before)


def test_hugetlb_memory_is_all_huge(reserved_huge_page):
    try:
        r = MemoryRegion(0, HUGE_PAGE_SIZE, backing="hugetlb")
    except GuestMemoryError as exc:
        require_or_skip("PYKVM_REQUIRE_KVM", f"the kernel could not give a huge page (memory too fragmented?): {exc}")
    try:
        assert r.huge_page_bytes() == r.size
    finally:
        r.close()


def test_passthrough_warns_with_the_fix_when_guest_ram_is_not_on_huge_pages(caplog):
    from pykvm.memory import GuestMemory
    from pykvm.vmm.pci.passthrough import warn_small_pages

    with GuestMemory.flat(4 * HUGE_PAGE_SIZE) as memory:  # nothing touched: no huge page yet
        with caplog.at_level("WARNING", logger="pykvm.vmm.pci.passthrough"):
            warn_small_pages(memory)
    assert "0 of 8 MiB on huge pages" in caplog.text and "transparent_hugepage" in caplog.text


def test_no_warning_when_guest_ram_is_all_on_huge_pages(caplog):
    from pykvm.memory import GuestMemory
    from pykvm.vmm.pci.passthrough import warn_small_pages

    if thp_mode() == "never":
        require_or_skip("PYKVM_REQUIRE_KVM", "transparent huge pages are off on this host (never)")
    with GuestMemory.flat(4 * HUGE_PAGE_SIZE) as memory:
        region = memory.regions[0]
        for offset in range(0, region.size, PAGE_SIZE):
            region.buffer[offset] = 1
        if region.huge_page_bytes() < region.size:
            require_or_skip("PYKVM_REQUIRE_KVM", "the kernel found no free huge pages just now (fragmented memory)")
        with caplog.at_level("WARNING", logger="pykvm.vmm.pci.passthrough"):
            warn_small_pages(memory)
    assert caplog.text == ""
