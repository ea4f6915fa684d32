"""Boot planning: where kernel, initrd, zero page and tables land, the entry state, and refusals."""
from __future__ import annotations

import mmap
import re
import struct

import pytest
from hypothesis import given, strategies as st

from pykvm.vmm import layout as L
from pykvm.vmm.boot import BootError, BootImageError, plan_boot
from pykvm.vmm.cpu_tables import CR0_PG, EFER_LMA, GDT_CODE32, GDT_CODE64, GDT_DATA
from tests.unit.kernel_images import make_bzimage, make_elf, real_bzimage, real_vmlinux


def _written(plan, gpa: int, size: int) -> bytes:
    for addr, data in plan.writes:
        if addr <= gpa and gpa + size <= addr + len(data):
            return bytes(data[gpa - addr:gpa - addr + size])
    raise AssertionError(f"nothing written at {gpa:#x}")


def _check_writes(plan, lay) -> None:
    spans = sorted((a, a + len(d)) for a, d in plan.writes)
    for (a, end), (b, _) in zip(spans, spans[1:]):
        assert end <= b, f"writes overlap at {a:#x}-{end:#x} and {b:#x}"
    for a, end in spans:
        assert lay.is_ram(a, end - a), f"write {a:#x}-{end:#x} outside RAM"
    assert _written(plan, L.CMDLINE_ADDR, len(plan.cmdline) + 1) == plan.cmdline + b"\0"
    if plan.initrd:
        addr, size = plan.initrd
        assert addr % L.PAGE_SIZE == 0 and plan.kernel[0] + plan.kernel[1] <= addr and lay.is_ram(addr, size)


def test_bzimage_plan_enters_64_bit_at_load_plus_0x200():
    image, lay = make_bzimage(), L.memory_layout("256M")
    plan = plan_boot(image, lay, "console=ttyS0", initrd=b"\x42" * 10000)
    _check_writes(plan, lay)
    assert plan.kind == "bzimage" and plan.long_mode
    assert plan.entry == plan.regs.rip == 0x100_0000 + 0x200
    assert plan.regs.rsi == plan.boot_params == L.ZERO_PAGE_ADDR and plan.regs.rsp == L.BOOT_STACK_TOP
    assert plan.regs.rflags == 2
    s = plan.sregs
    assert s.cs.selector == GDT_CODE64 and s.cs.l == 1 and s.ds.selector == s.ss.selector == GDT_DATA
    assert s.cr0 & CR0_PG and s.efer & EFER_LMA and s.cr3 == L.PAGE_TABLES_ADDR
    assert _written(plan, 0x100_0000, 0x4000) == image[5 * 512:]
    zp = _written(plan, L.ZERO_PAGE_ADDR, 4096)
    assert struct.unpack_from("<I", zp, 0x228)[0] == L.CMDLINE_ADDR
    assert struct.unpack_from("<II", zp, 0x218) == plan.initrd
    # As high as allowed: the initrd ends within a page of the top of low RAM.
    assert lay.low_ram_end - L.PAGE_SIZE < plan.initrd[0] + 10000 <= lay.low_ram_end
    assert _written(plan, plan.initrd[0], 10000) == b"\x42" * 10000


def test_initrd_respects_initrd_addr_max():
    plan = plan_boot(make_bzimage(initrd_addr_max=0x3FFF_FFFF), L.memory_layout("8G"), initrd=b"x" * 5000)
    assert plan.initrd[0] + 5000 <= 0x4000_0000 and plan.initrd[0] == 0x4000_0000 - 0x2000


def test_cmdline_limit_is_the_kernels():
    image, lay = make_bzimage(cmdline_size=100), L.memory_layout("64M")
    assert plan_boot(image, lay, "a" * 100).cmdline == b"a" * 100
    with pytest.raises(BootError, match="101 bytes; this kernel accepts at most 100"):
        plan_boot(image, lay, "a" * 101)
    with pytest.raises(BootError, match="NUL"):
        plan_boot(image, lay, "a\0b")


def test_initrd_too_large_for_memory():
    with pytest.raises(BootError, match=r"initrd of 64.0 MiB does not fit.*--memory"):
        plan_boot(make_bzimage(), L.memory_layout("64M"), initrd=bytes(64 << 20))


def test_memory_too_small_for_the_kernel():
    with pytest.raises(BootError, match=r"kernel needs .* --memory"):
        plan_boot(make_bzimage(init_size=64 << 20), L.memory_layout("64M"))


def test_unknown_format():
    with pytest.raises(BootImageError, match="neither a bzImage"):
        plan_boot(b"#!/bin/sh\n" + bytes(1000), L.memory_layout("64M"))


def test_pvh_plan_enters_32_bit_without_paging():
    image, lay = make_elf(pvh_entry=0x100_0040), L.memory_layout("64M")
    plan = plan_boot(image, lay, "quiet", initrd=b"I" * 3000)
    _check_writes(plan, lay)
    assert plan.kind == "pvh" and not plan.long_mode
    assert plan.entry == plan.regs.rip == 0x100_0040 and plan.regs.rbx == plan.boot_params == L.PVH_START_INFO_ADDR
    s = plan.sregs
    assert s.cs.selector == GDT_CODE32 and s.cs.db == 1 and s.cs.l == 0
    assert not s.cr0 & CR0_PG and s.cr0 & 1 and s.efer == 0 and s.tr.type == 0xB
    info = _written(plan, L.PVH_START_INFO_ADDR, 56)
    assert struct.unpack_from("<IIII", info)[::3] == (0x336EC578, 1)
    assert _written(plan, 0x100_0000, 0x100) == b"\x90" * 0x100
    # .bss is left to fresh RAM's zeros: no write touches it
    assert not [a for a, d in plan.writes if a < 0x100_2000 and a + len(d) > 0x100_0100]


def test_elf_without_pvh_note_uses_the_64_bit_entry():
    image, lay = make_elf(entry=0x100_0000, pvh_entry=0x100_0040), L.memory_layout("64M")
    plan = plan_boot(image, lay, pvh=False)
    assert plan.kind == "elf64" and plan.long_mode and plan.entry == 0x100_0000 and plan.regs.rsi == L.ZERO_PAGE_ADDR
    zp = _written(plan, L.ZERO_PAGE_ADDR, 4096)
    assert zp[0x202:0x206] == b"HdrS" and zp[0x210] == 0xFF
    assert plan_boot(make_elf(), lay).kind == "elf64"


def test_elf_segment_outside_ram():
    with pytest.raises(BootError, match="outside RAM"):
        plan_boot(make_elf([(0x800_0000, b"x", 0x10)]), L.memory_layout("64M"))
    with pytest.raises(BootError, match="outside RAM"):
        plan_boot(make_elf([(0x8000, b"x", 0x10)]), L.memory_layout("64M"))


def test_real_bzimage_plan():
    image, lay = real_bzimage(), L.memory_layout("512M")
    plan = plan_boot(image, lay, "console=ttyS0 panic=-1", initrd=b"\x07" * (3 << 20))
    _check_writes(plan, lay)
    setup = (image[0x1F1] + 1) * 512
    assert plan.entry == plan.kernel[0] + 0x200 == 0x100_0200
    assert _written(plan, plan.kernel[0], 4096) == image[setup:setup + 4096]
    with pytest.raises(BootError, match="2047"):
        plan_boot(image, lay, "x" * 2048)
    with pytest.raises(BootError, match="kernel needs"):
        plan_boot(image, L.memory_layout("64M"))


def test_real_vmlinux_plans_pvh():
    plan = plan_boot(real_vmlinux(), L.memory_layout("512M"), "console=ttyS0")
    assert plan.kind == "pvh" and not plan.long_mode and plan.kernel[0] == 0x100_0000


@given(mem_mib=st.integers(4, 4200), initrd_kib=st.integers(0, 100_000), cmd=st.integers(0, 3000))
def test_plans_either_fit_or_fail_clearly(mem_mib, initrd_kib, cmd):
    lay = L.memory_layout(f"{mem_mib}M")
    try:
        plan = plan_boot(make_bzimage(init_size=8 << 20), lay, "c" * cmd, initrd=b"i" * (initrd_kib * 1024))
    except BootError as exc:
        assert "--memory" in str(exc) or "accepts at most 2047" in str(exc)
        return
    _check_writes(plan, lay)
    assert cmd <= 2047
    if initrd_kib:
        assert plan.initrd[1] == initrd_kib * 1024 and plan.initrd[0] + plan.initrd[1] <= 0x8000_0000


# -- sizes that do not fit: where the initrd can go, and advice that works (review finding 6) ---------
XLF_KERNEL_64, XLF_ABOVE_4G = 1, 2
MAP_NORESERVE = 0x4000


def big(size: int):
    """``size`` bytes that take no memory (an untouched anonymous mapping): the planner only
    measures the initrd and hands it on."""
    if size == 0:
        return b""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)


def _zero_page_initrd(plan) -> tuple:
    zp = _written(plan, L.ZERO_PAGE_ADDR, 4096)
    image, size = struct.unpack_from("<II", zp, 0x218)
    ext_image, ext_size = struct.unpack_from("<II", zp, 0x0C0)
    return image | ext_image << 32, size | ext_size << 32


def test_an_initrd_too_big_for_low_ram_goes_above_4g_when_the_kernel_allows_it():
    """XLF_CAN_BE_LOADED_ABOVE_4G: the reviewer's 2100 MiB initrd with 8G of RAM no longer fails
    with 'give the guest more memory'; it goes to the top of RAM above 4 GiB, and the zero page
    carries the high half of its address in ext_ramdisk_image."""
    lay = L.memory_layout("8G")
    plan = plan_boot(make_bzimage(xloadflags=XLF_KERNEL_64 | XLF_ABOVE_4G), lay, initrd=big(2100 << 20))
    addr, size = plan.initrd
    assert addr >= 1 << 32 and addr + size <= lay.ram_end and addr % L.PAGE_SIZE == 0 and size == 2100 << 20
    assert lay.ram_end - L.PAGE_SIZE < addr + size
    assert _zero_page_initrd(plan) == (addr, size)
    _check_writes(plan, lay)


def test_a_small_initrd_stays_below_initrd_addr_max_even_when_the_kernel_could_take_it_high():
    plan = plan_boot(make_bzimage(xloadflags=XLF_KERNEL_64 | XLF_ABOVE_4G), L.memory_layout("8G"), initrd=b"x" * 5000)
    assert plan.initrd[0] + 5000 <= 0x8000_0000


def test_with_no_high_ram_the_flag_lets_the_initrd_pass_initrd_addr_max():
    """The reviewer's loop: --memory 2240M was suggested and failed again. With the flag the
    initrd may go above initrd_addr_max (the kernel's own EFI stub ignores it then)."""
    lay = L.memory_layout("2240M")
    plan = plan_boot(make_bzimage(xloadflags=XLF_KERNEL_64 | XLF_ABOVE_4G), lay, initrd=big(2100 << 20))
    assert 0x8000_0000 > plan.initrd[0] >= plan.kernel[0] + plan.kernel[1] and plan.initrd[0] + plan.initrd[1] > 0x8000_0000
    _check_writes(plan, lay)


def test_without_the_flag_initrd_addr_max_binds_and_more_memory_is_not_suggested():
    image = make_bzimage(xloadflags=XLF_KERNEL_64, initrd_addr_max=0x7FFF_FFFF)
    for mem in ("2240M", "8G"):
        with pytest.raises(BootError, match=r"only below 0x80000000 \(its initrd_addr_max\)") as e:
            plan_boot(image, L.memory_layout(mem), initrd=big(2100 << 20))
        assert "--memory" not in str(e.value) and "use an initrd of at most 2028.0 MiB" in str(e.value)


def test_elf_initrds_stay_below_the_pci_hole_and_the_advice_says_so():
    with pytest.raises(BootError, match="32-bit PCI hole") as e:
        plan_boot(make_elf(), L.memory_layout("8G"), initrd=big(3 << 30))
    assert "--memory" not in str(e.value)


@pytest.mark.parametrize("header,match", [
    (dict(init_size=0xC100_0000), "past the 32-bit PCI hole"),
    (dict(pref_address=0xFFFF_FFFF_FFFF_0000), "corrupt pref_address"),
    (dict(pref_address=0xC000_0000), "corrupt pref_address"),
    (dict(pref_address=0x8_0000, relocatable=1), "below 1 MiB"),
])
def test_a_kernel_no_memory_size_can_hold_is_not_told_to_add_memory(header, match):
    """The reviewer's cases: init_size above 3 GiB, a corrupt pref_address: the old advice
    (--memory 4160M, --memory 17592186044544M) could not work."""
    with pytest.raises(BootError, match=match) as e:
        plan_boot(make_bzimage(**header), L.memory_layout("8G"))
    assert "--memory" not in str(e.value)


def test_an_elf_segment_beyond_the_hole_is_not_told_to_add_memory():
    with pytest.raises(BootError, match="outside RAM.*no memory size can help") as e:
        plan_boot(make_elf([(0x7000_0000, b"x", 0x6000_0000)], entry=0x7000_0000), L.memory_layout("8G"))
    assert "--memory" not in str(e.value)


@given(mem_mib=st.integers(4, 6000), initrd_mib=st.integers(0, 5000), init_mib=st.integers(1, 3300),
       pref=st.sampled_from([0x10_0000, 0x100_0000, 0x8000_0000, 0xBF00_0000, 0xC000_0000, 1 << 63]),
       addr_max=st.sampled_from([0x3FFF_FFFF, 0x7FFF_FFFF, 0xFFFF_FFFF]), above_4g=st.booleans())
def test_size_advice_is_advice_that_works(mem_mib, initrd_mib, init_mib, pref, addr_max, above_4g):
    """For any memory size, kernel footprint, load address, initrd_addr_max, flag and initrd
    size: a plan either works; or its error suggests --memory N and N works; or it suggests no
    memory size, and indeed none (not even the largest this VMM maps) would work."""
    image = make_bzimage(init_size=init_mib << 20, pref_address=pref, initrd_addr_max=addr_max,
                         xloadflags=XLF_KERNEL_64 | (XLF_ABOVE_4G if above_4g else 0))
    initrd = big(initrd_mib << 20)
    try:
        lay = L.memory_layout(f"{mem_mib}M")
        _check_writes(plan_boot(image, lay, initrd=initrd), lay)
        return
    except BootError as exc:
        message = str(exc)
    suggested = re.search(r"--memory (\d+)M", message)
    if suggested:
        lay = L.memory_layout(f"{suggested.group(1)}M")
        _check_writes(plan_boot(image, lay, initrd=initrd), lay)
    else:
        with pytest.raises(BootError):
            plan_boot(image, L.memory_layout(L.MAX_MEMORY), initrd=initrd)


# -- the command line's bytes (review finding 12) -------------------------------------------------
def test_a_command_line_that_is_not_utf8_passes_its_bytes_through():
    """sys.argv holds undecodable bytes as surrogates (surrogateescape): they go to the guest as
    the bytes they were, instead of "'utf-8' codec can't encode character '\\udcff'"."""
    arg = b"root=/dev/vda a\xffb".decode("utf-8", "surrogateescape")
    plan = plan_boot(make_bzimage(), L.memory_layout("64M"), arg)
    assert plan.cmdline == b"root=/dev/vda a\xffb"
    assert _written(plan, L.CMDLINE_ADDR, len(plan.cmdline) + 1) == b"root=/dev/vda a\xffb\0"
    assert plan_boot(make_bzimage(), L.memory_layout("64M"), "caf\u00e9").cmdline == "caf\u00e9".encode()


def test_a_command_line_with_a_lone_surrogate_is_refused_clearly():
    with pytest.raises(BootError, match="not text"):
        plan_boot(make_bzimage(), L.memory_layout("64M"), "a\ud800")
