"""The decompressed-kernel cache (pykvm.vmm.boot.vmlinux_cache) on real files in tmp_path, and
the direct boot plan it feeds (plan_boot with the bzImage's setup header and the file's data
extents)."""
from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path
from typing import List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pykvm.vmm import layout as L
from pykvm.vmm.boot import BootError, plan_boot
from pykvm.vmm.boot.bzimage import parse_bzimage
from pykvm.vmm.boot.elf import parse_elf
from pykvm.vmm.boot.vmlinux_cache import MAX_ENTRIES, PAGE, cache_dir, direct_kernel, entry_name
from tests.conftest import require_or_skip
from tests.unit.kernel_images import make_bzimage, make_elf
from tests.unit.test_payload import bzimage_with_payload, compress

KERNEL = 0x100_0000


def sparse_elf(marker: bytes = b"K") -> bytes:
    """An ELF whose first segment is mostly zero pages: code, 40 zero pages, a marker, more
    zeros, then a second segment of data; file size not a multiple of a page."""
    first = b"\xeb\xfe" + b"\x90" * 0x100 + bytes(40 * PAGE) + marker * 0x20 + bytes(10 * PAGE) + b"end"
    return make_elf(((KERNEL, first, len(first) + 0x4000), (0x140_0000, b"\xaa" * 0x123 + bytes(3 * PAGE), 0x8000)),
                    entry=KERNEL)


def write_bzimage(path: Path, elf: bytes, fmt: str = "xz") -> bytes:
    image = bzimage_with_payload(compress(fmt, elf))
    path.write_bytes(image)
    return image


def kernel_for(path: Path, directory: Path):
    return direct_kernel(str(path), parse_bzimage(path.read_bytes()), directory)


def entries(directory: Path) -> List[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def reports_holes(directory: Path) -> bool:
    """Whether SEEK_DATA finds data after a leading hole in a file in ``directory`` (file systems
    without hole support fail with EINVAL or report the whole file as data)."""
    probe = directory / "hole-probe"
    with open(probe, "wb") as f:
        f.seek(1 << 20)
        f.write(b"x")
    try:
        fd = os.open(probe, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_DATA) > 0
        except OSError:
            return False
        finally:
            os.close(fd)
    finally:
        probe.unlink()


def nonzero_pages(image: bytes) -> List[Tuple[int, int]]:
    """Maximal runs of pages holding a non-zero byte, as (offset, length), the last one cut at the end."""
    runs: List[Tuple[int, int]] = []
    for off in range(0, len(image), PAGE):
        if any(image[off:off + PAGE]):
            end = min(off + PAGE, len(image))
            if runs and runs[-1][0] + runs[-1][1] == off:
                runs[-1] = (runs[-1][0], end - runs[-1][0])
            else:
                runs.append((off, end - off))
    return runs


# -- hit and miss -----------------------------------------------------------------------------------------
def test_the_first_call_decompresses_and_stores_the_second_loads_the_same_bytes(tmp_path):
    elf = sparse_elf()
    bz = tmp_path / "vmlinuz"
    write_bzimage(bz, elf)
    cache = tmp_path / "cache"
    first = kernel_for(bz, cache)
    assert first.extracted and first.path is not None and Path(first.path).parent == cache
    assert Path(first.path).name == entry_name(str(bz))[1] and entries(cache) == [Path(first.path).name]
    assert bytes(first.image) == elf and Path(first.path).read_bytes() == elf
    second = kernel_for(bz, cache)
    assert not second.extracted and second.path == first.path
    assert bytes(second.image) == elf and second.elf == first.elf == parse_elf(elf)
    assert second.extents == first.extents
    assert entries(cache) == [Path(first.path).name]


def test_a_cache_hit_does_not_decompress(tmp_path):
    """Once cached, the bzImage's payload is not read again: a bzImage object whose payload is
    garbage still gives the cached kernel."""
    bz = tmp_path / "vmlinuz"
    image = write_bzimage(bz, sparse_elf())
    cache = tmp_path / "cache"
    kernel_for(bz, cache)
    garbage = bytearray(image)
    setup = ((garbage[0x1F1] or 4) + 1) * 512
    garbage[setup + 0x100:setup + 0x110] = bytes(16)  # the payload's magic gone
    hit = direct_kernel(str(bz), parse_bzimage(bytes(garbage)), cache)
    assert not hit.extracted and bytes(hit.image) == sparse_elf()


def test_the_entry_is_sparse_and_its_extents_are_the_non_zero_pages(tmp_path):
    elf = sparse_elf()
    bz = tmp_path / "vmlinuz"
    write_bzimage(bz, elf)
    k = kernel_for(bz, tmp_path / "cache")
    if not reports_holes(tmp_path):
        require_or_skip("PYKVM_REQUIRE_KVM", f"the file system of {tmp_path} does not report holes (SEEK_DATA)")
    assert k.extents is not None
    st_ = os.stat(k.path)
    assert st_.st_size == len(elf)
    assert st_.st_blocks * 512 < len(elf) // 4, (st_.st_blocks, len(elf))  # 50 of 56 pages are holes
    covered = bytearray(len(elf))
    for off, length in k.extents:
        assert 0 <= off and length > 0 and off + length <= len(elf)
        covered[off:off + length] = b"\x01" * length
    assert all(b == 0 for b, c in zip(elf, covered) if not c), "a non-zero byte outside the extents"
    for off, length in nonzero_pages(elf):
        assert all(covered[off:off + length]), f"non-zero page at {off:#x} not in an extent"
    if os.statvfs(k.path).f_bsize == PAGE:  # blocks are pages: the holes are exactly the zero pages
        assert k.extents == nonzero_pages(elf)
    # the cache hit reports the same extents
    assert kernel_for(bz, tmp_path / "cache").extents == k.extents


# -- a new bzImage at the same path --------------------------------------------------------------------------
def test_a_touched_bzimage_gets_a_new_entry_and_the_old_one_goes(tmp_path):
    bz, cache = tmp_path / "vmlinuz", tmp_path / "cache"
    write_bzimage(bz, sparse_elf())
    old = kernel_for(bz, cache).path
    st_ = os.stat(bz)
    os.utime(bz, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))
    new = kernel_for(bz, cache)
    assert new.extracted and new.path != old
    assert entries(cache) == [Path(new.path).name]


def test_a_rewritten_bzimage_boots_its_new_kernel(tmp_path):
    """Rewritten in place (same inode, new size and mtime): the new kernel, not the cached one."""
    bz, cache = tmp_path / "vmlinuz", tmp_path / "cache"
    write_bzimage(bz, sparse_elf(b"A"))
    old = kernel_for(bz, cache)
    inode = os.stat(bz).st_ino
    rebuilt = make_elf(((KERNEL, b"\x90" * 0x3000 + b"B", 0x5000),), entry=KERNEL)
    write_bzimage(bz, rebuilt, fmt="gzip")
    assert os.stat(bz).st_ino == inode
    new = kernel_for(bz, cache)
    assert new.extracted and new.path != old.path and bytes(new.image) == rebuilt
    assert entries(cache) == [Path(new.path).name]


def test_a_replaced_bzimage_of_the_same_size_and_mtime_gets_a_new_entry(tmp_path):
    """`mv new vmlinuz` with the old mtime kept (cp -p, rsync -t): the inode differs."""
    bz, cache = tmp_path / "vmlinuz", tmp_path / "cache"
    write_bzimage(bz, sparse_elf(b"A"))
    st_ = os.stat(bz)
    kernel_for(bz, cache)
    other = tmp_path / "incoming"
    write_bzimage(other, sparse_elf(b"B"))
    assert os.stat(other).st_size == st_.st_size
    os.utime(other, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    os.replace(other, bz)
    new = kernel_for(bz, cache)
    assert new.extracted and bytes(new.image) == sparse_elf(b"B")
    assert entries(cache) == [Path(new.path).name]


def test_a_bzimage_overwritten_in_place_with_its_old_mtime_gets_a_new_entry(tmp_path):
    """`cp -p new vmlinuz` onto the existing file: same inode, size and mtime, new bytes; only
    the change time (which no one can set) tells, and it does."""
    bz, cache = tmp_path / "vmlinuz", tmp_path / "cache"
    write_bzimage(bz, sparse_elf(b"A"))
    st_ = os.stat(bz)
    kernel_for(bz, cache)
    image = bzimage_with_payload(compress("xz", sparse_elf(b"B")))
    assert len(image) == st_.st_size
    with open(bz, "r+b") as f:
        f.write(image)
    os.utime(bz, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    now = os.stat(bz)
    assert (now.st_ino, now.st_size, now.st_mtime_ns) == (st_.st_ino, st_.st_size, st_.st_mtime_ns)
    new = kernel_for(bz, cache)
    assert new.extracted and bytes(new.image) == sparse_elf(b"B")
    assert entries(cache) == [Path(new.path).name]


def test_two_paths_whose_crc32_collide_keep_their_own_entries(tmp_path):
    """The entry prefix names the path with 64 bits (CRC-32 and Adler-32): two paths with the same
    CRC-32 (found by a birthday search, ~2^16 tries) no longer evict each other's entry."""
    seen: dict = {}
    rng = random.Random(0)
    for _ in range(1 << 22):
        name = f"{rng.getrandbits(64):016x}"  # random names: CRC-32 is linear, and counted ones may never collide
        crc = zlib.crc32(os.fsencode(str(tmp_path / name)))
        if crc in seen:
            pair = [tmp_path / seen[crc], tmp_path / name]
            break
        seen[crc] = name
    cache = tmp_path / "cache"
    for path, mark in zip(pair, b"AB"):
        write_bzimage(path, sparse_elf(bytes([mark])))
    first = [kernel_for(path, cache) for path in pair]
    again = [kernel_for(path, cache) for path in pair]
    assert all(k.extracted for k in first) and not any(k.extracted for k in again)
    assert [bytes(k.image) for k in again] == [sparse_elf(b"A"), sparse_elf(b"B")]
    assert len(entries(cache)) == 2


def test_the_cache_keeps_the_most_recently_used_entries(tmp_path):
    """MAX_ENTRIES kernels fill the cache; the first is booted again (a hit: now the most recent);
    two more kernels then push out the two least recently used, the second and the third."""
    cache = tmp_path / "cache"
    paths = [tmp_path / f"vmlinuz-{i}" for i in range(MAX_ENTRIES + 2)]
    for i, path in enumerate(paths):
        write_bzimage(path, sparse_elf(bytes([0x41 + i])))
    names = []
    for i, path in enumerate(paths[:MAX_ENTRIES]):
        names.append(Path(kernel_for(path, cache).path).name)
        os.utime(cache / names[-1], ns=(i * 10**9, i * 10**9))  # used in this order, long ago
    assert entries(cache) == sorted(names)
    assert not kernel_for(paths[0], cache).extracted  # a hit: its entry is now the most recently used
    for path in paths[MAX_ENTRIES:]:
        names.append(Path(kernel_for(path, cache).path).name)
    assert entries(cache) == sorted([names[0], *names[3:]])


def test_another_bzimage_path_keeps_its_own_entry(tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a" / "vmlinuz", tmp_path / "b" / "vmlinuz"
    a.parent.mkdir()
    b.parent.mkdir()
    write_bzimage(a, sparse_elf(b"A"))
    write_bzimage(b, sparse_elf(b"B"))
    ka, kb = kernel_for(a, cache), kernel_for(b, cache)
    assert ka.path != kb.path and entries(cache) == sorted([Path(ka.path).name, Path(kb.path).name])
    st_ = os.stat(a)
    os.utime(a, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))  # a changes: only a's entry is replaced
    ka2 = kernel_for(a, cache)
    assert ka2.extracted and entries(cache) == sorted([Path(ka2.path).name, Path(kb.path).name])
    again = kernel_for(b, cache)
    assert not again.extracted and bytes(again.image) == sparse_elf(b"B")


def test_a_symlink_to_the_bzimage_shares_its_entry(tmp_path):
    """The entry is named after the real path: /vmlinuz -> boot/vmlinuz-6.1 is one kernel."""
    bz, cache = tmp_path / "vmlinuz-6.1", tmp_path / "cache"
    write_bzimage(bz, sparse_elf())
    link = tmp_path / "vmlinuz"
    link.symlink_to(bz.name)
    kernel_for(bz, cache)
    via_link = kernel_for(link, cache)
    assert not via_link.extracted and len(entries(cache)) == 1


# -- no cache to write ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_an_unwritable_cache_warns_and_boots_from_memory(tmp_path, caplog, where):
    elf = sparse_elf()
    bz = tmp_path / "vmlinuz"
    write_bzimage(bz, elf)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    directory = blocker / "kernels" if where == "under-a-file" else blocker
    k = kernel_for(bz, directory)
    assert k.path is None and k.extracted and k.extents is None
    assert bytes(k.image) == elf and k.elf == parse_elf(elf)
    err = caplog.text
    assert f"cannot cache the decompressed kernel in {directory}" in err
    assert "decompressed again on every boot" in err and "PYKVM_KERNEL_CACHE" in err
    assert blocker.read_text() == "a file, not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "vmlinuz"]


def test_pykvm_kernel_cache_names_the_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("PYKVM_KERNEL_CACHE", str(tmp_path / "elsewhere"))
    assert Path(cache_dir()) == tmp_path / "elsewhere"
    bz = tmp_path / "vmlinuz"
    write_bzimage(bz, sparse_elf())
    k = direct_kernel(str(bz), parse_bzimage(bz.read_bytes()))
    assert k.path is not None and Path(k.path).parent == tmp_path / "elsewhere"
    monkeypatch.delenv("PYKVM_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Path(cache_dir()) == tmp_path / "xdg" / "pykvm" / "kernels"


# -- damaged entries and failed stores ------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 100, 64 + 2 * 56 + 10, PAGE * 20])
def test_a_truncated_cache_entry_is_replaced_by_a_fresh_extraction(tmp_path, keep):
    elf = sparse_elf()
    bz, cache = tmp_path / "vmlinuz", tmp_path / "cache"
    write_bzimage(bz, elf)
    path = Path(kernel_for(bz, cache).path)
    os.truncate(path, keep)
    k = kernel_for(bz, cache)
    assert k.extracted and k.path == str(path) and bytes(k.image) == elf
    assert path.read_bytes() == elf
    again = kernel_for(bz, cache)
    assert not again.extracted and bytes(again.image) == elf


def test_a_cache_entry_that_is_not_an_elf_is_replaced(tmp_path):
    elf = sparse_elf()
    bz, cache = tmp_path / "vmlinuz", tmp_path / "cache"
    write_bzimage(bz, elf)
    path = Path(kernel_for(bz, cache).path)
    path.write_bytes(b"\x00" * len(elf))
    k = kernel_for(bz, cache)
    assert k.extracted and path.read_bytes() == elf


def test_no_temporary_file_is_left_after_a_store(tmp_path):
    bz, cache = tmp_path / "vmlinuz", tmp_path / "cache"
    write_bzimage(bz, sparse_elf())
    kernel_for(bz, cache)
    st_ = os.stat(bz)
    os.utime(bz, ns=(st_.st_atime_ns, st_.st_mtime_ns + 1_000_000_000))
    kernel_for(bz, cache)
    assert [n for n in os.listdir(cache) if n.endswith(".tmp")] == []
    assert len(os.listdir(cache)) == 1


def test_a_store_that_fails_leaves_no_temporary_file(tmp_path, caplog):
    """The entry's name is taken by a directory: the rename fails after the temporary file was
    written; it is removed, the warning says why, and the kernel boots from memory."""
    elf = sparse_elf()
    bz, cache = tmp_path / "vmlinuz", tmp_path / "cache"
    write_bzimage(bz, elf)
    blocker = cache / entry_name(str(bz))[1]
    (blocker / "occupied").mkdir(parents=True)
    k = kernel_for(bz, cache)
    assert k.path is None and bytes(k.image) == elf
    assert "cannot cache the decompressed kernel" in caplog.text
    assert sorted(os.listdir(cache)) == [blocker.name]
    assert os.listdir(blocker) == ["occupied"]


# -- the direct boot plan -----------------------------------------------------------------------------------------
HEADER = parse_bzimage(make_bzimage(cmdline_size=255, initrd_addr_max=0x1FF_FFFF, xloadflags=0x1)).header
LAYOUT = L.memory_layout("256M")


def kernel_writes(plan, elf) -> List[Tuple[int, bytes]]:
    """The plan's writes inside the kernel's memory, merged where adjacent."""
    out: List[Tuple[int, bytes]] = []
    for addr, data in sorted((a, bytes(d)) for a, d in plan.writes if elf.start <= a < elf.end):
        if out and out[-1][0] + len(out[-1][1]) == addr:
            out[-1] = (out[-1][0], out[-1][1] + data)
        else:
            out.append((addr, data))
    return out


def expected_writes(image: bytes, elf, extents) -> List[Tuple[int, bytes]]:
    """Each segment's file bytes [offset, offset + filesz) inside an extent, at its paddr."""
    covered = bytearray(len(image))
    for off, length in extents:
        covered[off:off + length] = b"\x01" * len(covered[off:off + length])
    out: List[Tuple[int, bytes]] = []
    for s in elf.segments:
        for i in range(s.filesz):
            if covered[s.offset + i]:
                addr = s.paddr + i
                if out and out[-1][0] + len(out[-1][1]) == addr:
                    out[-1] = (out[-1][0], out[-1][1] + image[s.offset + i:s.offset + i + 1])
                else:
                    out.append((addr, image[s.offset + i:s.offset + i + 1]))
    return out


PLAN_ELF = make_elf(((KERNEL, bytes(range(256)) * 24, 0x3000), (0x120_0000, b"\x11" * 0x900, 0x900),
                     (0x130_0000, b"", 0x1000)), entry=KERNEL + 0x10)


@st.composite
def extent_lists(draw):
    bounds = sorted(set(draw(st.lists(st.integers(0, len(PLAN_ELF) + 0x100), max_size=12))))
    return [(a, b - a) for a, b in zip(bounds[::2], bounds[1::2])]


@given(extents=extent_lists())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_a_direct_plan_writes_exactly_the_data_extents_of_each_segment(extents):
    elf = parse_elf(PLAN_ELF)
    plan = plan_boot(PLAN_ELF, LAYOUT, "console=ttyS0", setup_header=HEADER, extents=extents)
    assert plan.kind == "direct" and plan.entry == plan.regs.rip == KERNEL + 0x10 and plan.long_mode
    assert kernel_writes(plan, elf) == expected_writes(PLAN_ELF, elf, extents)


def test_a_direct_plan_without_extents_writes_each_segment_whole_and_no_bss():
    elf = parse_elf(PLAN_ELF)
    plan = plan_boot(PLAN_ELF, LAYOUT, "", setup_header=HEADER)
    assert kernel_writes(plan, elf) == expected_writes(PLAN_ELF, elf, [(0, len(PLAN_ELF))])
    bss = [(s.paddr + s.filesz, s.end) for s in elf.segments if s.memsz > s.filesz]
    for addr, data in plan.writes:
        assert not any(addr < end and start < addr + len(data) for start, end in bss), f"write at {addr:#x} in .bss"


def zero_page(plan) -> bytes:
    for addr, data in plan.writes:
        if addr == L.ZERO_PAGE_ADDR:
            return bytes(data)
    raise AssertionError("no zero page written")


def test_the_direct_zero_page_carries_the_bzimage_header():
    plan = plan_boot(PLAN_ELF, LAYOUT, "quiet", setup_header=HEADER)
    zp = zero_page(plan)
    assert plan.boot_params == plan.regs.rsi == L.ZERO_PAGE_ADDR
    assert struct.unpack_from("<I", zp, 0x238)[0] == 255  # the header's cmdline_size, not the synthetic 2047
    assert struct.unpack_from("<I", zp, 0x22C)[0] == 0x1FF_FFFF  # initrd_addr_max
    assert zp[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", zp, 0x206)[0] == HEADER.version
    assert struct.unpack_from("<I", zp, 0x228)[0] == L.CMDLINE_ADDR
    elf64 = zero_page(plan_boot(PLAN_ELF, LAYOUT, "quiet"))  # the same ELF without a header
    assert struct.unpack_from("<I", elf64, 0x238)[0] == 2047


def test_a_direct_plan_places_the_initrd_under_the_headers_initrd_addr_max():
    initrd = b"\x42" * 10000
    plan = plan_boot(PLAN_ELF, LAYOUT, "", initrd=initrd, setup_header=HEADER)
    addr, size = plan.initrd
    assert size == len(initrd) and addr + size <= 0x200_0000 and addr >= parse_elf(PLAN_ELF).end
    assert addr == 0x200_0000 - 0x3000  # as high as allowed, page aligned
    assert struct.unpack_from("<II", zero_page(plan), 0x218) == (addr, size)
    plain = plan_boot(PLAN_ELF, LAYOUT, "", initrd=initrd)  # without the header: the top of low RAM
    assert plain.initrd[0] > 0x200_0000


def test_a_direct_plan_puts_an_initrd_above_4g_when_the_header_allows_it():
    header = parse_bzimage(make_bzimage(initrd_addr_max=0x1FF_FFFF, xloadflags=0x3)).header
    initrd = b"\x42" * (24 << 20)  # does not fit between the kernel and 32 MiB
    plan = plan_boot(PLAN_ELF, L.memory_layout("3136M"), "", initrd=initrd, setup_header=header)
    assert plan.initrd[0] >= 1 << 32
    assert struct.unpack_from("<I", zero_page(plan), 0xC0)[0] == plan.initrd[0] >> 32  # ext_ramdisk_image
    with pytest.raises(BootError, match="initrd_addr_max"):
        plan_boot(PLAN_ELF, L.memory_layout("3136M"), "", initrd=initrd, setup_header=HEADER)


def test_a_direct_plan_refuses_a_command_line_longer_than_the_headers_cmdline_size():
    assert plan_boot(PLAN_ELF, LAYOUT, "x" * 255, setup_header=HEADER).cmdline == b"x" * 255
    with pytest.raises(BootError, match="kernel command line is 256 bytes; this kernel accepts at most 255"):
        plan_boot(PLAN_ELF, LAYOUT, "x" * 256, setup_header=HEADER)
    assert plan_boot(PLAN_ELF, LAYOUT, "x" * 256).kind == "elf64"  # no header: the ELF limit (2047)
