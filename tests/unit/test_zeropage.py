"""boot_params (zero page) and PVH hvm_start_info bytes, decoded field by field."""
from __future__ import annotations

import struct

import pytest

from pykvm.vmm.boot.bzimage import parse_bzimage
from pykvm.vmm.boot.zeropage import (
    E820_MAX_ENTRIES, HVM_START_MAGIC, build_pvh_start_info, build_zero_page, synthetic_setup_header,
)
from pykvm.vmm.layout import E820_RAM, E820Entry, memory_layout
from tests.unit.kernel_images import make_bzimage, real_bzimage


def _u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def _e820(zp: bytes):
    return [E820Entry(*struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i)) for i in range(zp[0x1E8])]


def _check(zp: bytes, header: bytes, lay, cmdline: int, kernel: int, initrd) -> None:
    assert len(zp) == 4096
    assert zp[0x1EF] == 0  # sentinel: the kernel would wipe fields if a loader left it set
    assert zp[0x210] == 0xFF  # type_of_loader: undefined
    assert zp[0x211] & 0x01  # LOADED_HIGH
    assert _u32(zp, 0x228) == cmdline & 0xFFFFFFFF and _u32(zp, 0xC8) == cmdline >> 32
    assert _u32(zp, 0x214) == kernel
    addr, size = initrd or (0, 0)
    assert (_u32(zp, 0x218), _u32(zp, 0x21C)) == (addr & 0xFFFFFFFF, size & 0xFFFFFFFF)
    assert (_u32(zp, 0xC0), _u32(zp, 0xC4)) == (addr >> 32, size >> 32)
    assert _e820(zp) == list(lay.e820)
    changed = {0x210, 0x211} | set(range(0x214, 0x220)) | set(range(0x228, 0x22C))
    for i, byte in enumerate(header):  # everything else of the image's header is copied verbatim
        if 0x1F1 + i not in changed:
            assert zp[0x1F1 + i] == byte, hex(0x1F1 + i)
    assert zp[0x1F1 + len(header):0x2D0] == bytes(0x2D0 - 0x1F1 - len(header))


def test_zero_page_from_a_synthetic_image():
    header = parse_bzimage(make_bzimage()).header.raw
    lay = memory_layout("6G")
    zp = build_zero_page(header, lay.e820, 0x20000, 0x100_0000, (0x7F00_0000, 0x12345))
    _check(zp, header, lay, 0x20000, 0x100_0000, (0x7F00_0000, 0x12345))
    assert len(_e820(zp)) == 4 and _e820(zp)[-1] == E820Entry(1 << 32, 3 << 30, E820_RAM)


def test_zero_page_from_the_real_kernel_with_pointers_above_4g():
    header = parse_bzimage(real_bzimage()).header.raw
    lay = memory_layout("512M")
    zp = build_zero_page(header, lay.e820, 0x1_2000_0000, 0x100_0000, (0x1_4000_0000, 0x1_0000_1000))
    _check(zp, header, lay, 0x1_2000_0000, 0x100_0000, (0x1_4000_0000, 0x1_0000_1000))
    assert zp[0x202:0x206] == b"HdrS" and struct.unpack_from("<H", zp, 0x1FE)[0] == 0xAA55


def test_no_initrd_leaves_ramdisk_fields_zero():
    zp = build_zero_page(synthetic_setup_header(), memory_layout("64M").e820, 0x20000, 0x100_0000)
    assert zp[0x218:0x220] == bytes(8) and zp[0xC0:0xC8] == bytes(8)


def test_synthetic_header_has_the_magic_the_kernel_checks():
    zp = build_zero_page(synthetic_setup_header(1023), memory_layout("64M").e820, 0x20000, 0x100_0000)
    assert struct.unpack_from("<H", zp, 0x1FE)[0] == 0xAA55 and zp[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", zp, 0x206)[0] >= 0x020C and _u32(zp, 0x238) == 1023


def test_too_many_e820_entries():
    with pytest.raises(ValueError, match="e820"):
        build_zero_page(synthetic_setup_header(), [E820Entry(i << 20, 1 << 20, 1) for i in range(E820_MAX_ENTRIES + 1)], 0, 0)


@pytest.mark.parametrize("initrd", [None, (0x3000_0000, 0x80_0000)])
def test_pvh_start_info(initrd):
    base, lay = 0x6000, memory_layout("5G")
    blob = build_pvh_start_info(base, lay.e820, 0x20000, initrd)
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, nr_memmap, _ = struct.unpack_from("<IIIIQQQQII", blob)
    assert (magic, version, flags, cmdline, rsdp) == (HVM_START_MAGIC, 1, 0, 0x20000, 0)
    assert nr_modules == (1 if initrd else 0)
    if initrd:
        assert modlist == base + 56
        assert struct.unpack_from("<QQQQ", blob, modlist - base) == (initrd[0], initrd[1], 0, 0)
    assert nr_memmap == len(lay.e820)
    entries = [struct.unpack_from("<QQII", blob, memmap - base + 24 * i) for i in range(nr_memmap)]
    assert [(a, s, t) for a, s, t, _ in entries] == [(e.addr, e.size, e.type) for e in lay.e820]
    assert len(blob) == memmap - base + 24 * nr_memmap <= 4096
