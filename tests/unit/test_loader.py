"""Boot planning: where kernel, initrd, zero page and tables land, the entry state, and refusals."""
from __future__ import annotations

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
        assert addr % L.PAGE_SIZE == 0 and plan.kernel[0] + plan.kernel[1] <= addr and addr + size <= lay.low_ram_end


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
    assert _written(plan, 0x100_0100, 0x2000 - 0x100) == bytes(0x1F00)  # bss zeroed


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
