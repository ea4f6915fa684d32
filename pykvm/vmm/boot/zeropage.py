"""Build what the kernel reads at entry: ``struct boot_params`` or PVH's ``hvm_start_info``.

boot_params (the "zero page", arch/x86/include/uapi/asm/bootparam.h) is 4 KiB:
the setup header copied from the image at 0x1F1, with the fields a boot
loader must fill (type_of_loader, cmd_line_ptr, ramdisk_image/size), and the
e820 table at 0x2D0. Fields not set here stay zero, as boot.rst requires
(in particular ``sentinel`` at 0x1EF).

hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h) is the PVH
equivalent: magic, command line and module (initrd) pointers and, from
version 1, a pointer to an e820-style memory map.
"""
from __future__ import annotations

import struct
from typing import Optional, Sequence, Tuple

from ..layout import E820Entry
from .bzimage import BOOT_FLAG, HEADER_MAGIC, LOADED_HIGH, SETUP_HEADER_OFFSET

ZERO_PAGE_SIZE = 4096
E820_MAX_ENTRIES = 128  # E820_MAX_ENTRIES_ZEROPAGE

# Offsets inside struct boot_params.
EXT_RAMDISK_IMAGE = 0x0C0
EXT_RAMDISK_SIZE = 0x0C4
EXT_CMD_LINE_PTR = 0x0C8
E820_ENTRIES = 0x1E8
TYPE_OF_LOADER = 0x210
LOADFLAGS = 0x211
CODE32_START = 0x214
RAMDISK_IMAGE = 0x218
RAMDISK_SIZE = 0x21C
CMD_LINE_PTR = 0x228
E820_TABLE = 0x2D0

LOADER_UNDEFINED = 0xFF  # type_of_loader: "no assigned id", as boot.rst asks of unlisted loaders

HVM_START_MAGIC = 0x336EC578
HVM_START_INFO_SIZE = 56
HVM_MODLIST_ENTRY_SIZE = 32
HVM_MEMMAP_ENTRY_SIZE = 24


def _split(value: int) -> Tuple[int, int]:
    return value & 0xFFFFFFFF, value >> 32


def build_zero_page(
    setup_header: bytes,
    e820: Sequence[E820Entry],
    cmdline_addr: int,
    kernel_addr: int,
    initrd: Optional[Tuple[int, int]] = None,
) -> bytes:
    """boot_params for the 64-bit entry: ``setup_header`` is the image's bytes from 0x1F1.

    ``initrd`` is (address, size); ``kernel_addr`` is where the protected-mode
    kernel was loaded (reported in code32_start, as a 32-bit loader would).
    """
    if len(e820) > E820_MAX_ENTRIES:
        raise ValueError(f"{len(e820)} e820 entries do not fit the zero page's {E820_MAX_ENTRIES}")
    if SETUP_HEADER_OFFSET + len(setup_header) > E820_TABLE:
        raise ValueError(f"setup header of {len(setup_header)} bytes overruns the e820 table")
    zp = bytearray(ZERO_PAGE_SIZE)
    zp[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + len(setup_header)] = setup_header
    zp[TYPE_OF_LOADER] = LOADER_UNDEFINED
    zp[LOADFLAGS] |= LOADED_HIGH
    struct.pack_into("<I", zp, CODE32_START, kernel_addr & 0xFFFFFFFF)
    cmd_lo, cmd_hi = _split(cmdline_addr)
    struct.pack_into("<I", zp, CMD_LINE_PTR, cmd_lo)
    struct.pack_into("<I", zp, EXT_CMD_LINE_PTR, cmd_hi)
    if initrd is not None:
        (img_lo, img_hi), (size_lo, size_hi) = _split(initrd[0]), _split(initrd[1])
        struct.pack_into("<II", zp, RAMDISK_IMAGE, img_lo, size_lo)
        struct.pack_into("<I", zp, EXT_RAMDISK_IMAGE, img_hi)
        struct.pack_into("<I", zp, EXT_RAMDISK_SIZE, size_hi)
    zp[E820_ENTRIES] = len(e820)
    for i, e in enumerate(e820):
        struct.pack_into("<QQI", zp, E820_TABLE + 20 * i, e.addr, e.size, e.type)
    return bytes(zp)


def synthetic_setup_header(cmdline_size: int = 2047) -> bytes:
    """A minimal setup header for a vmlinux entered at startup_64 without a bzImage.

    The kernel checks the boot flag and the 'HdrS' magic; the rest it needs is
    filled in by :func:`build_zero_page`.
    """
    hdr = bytearray(0x26C - SETUP_HEADER_OFFSET)

    def put(fmt: str, offset: int, value: int | bytes) -> None:
        struct.pack_into(fmt, hdr, offset - SETUP_HEADER_OFFSET, value)

    put("<H", 0x1FE, BOOT_FLAG)
    put("<4s", 0x202, HEADER_MAGIC)
    put("<H", 0x206, 0x020F)
    put("<B", 0x211, LOADED_HIGH)
    put("<I", 0x230, 1 << 21)  # kernel_alignment
    put("<I", 0x238, cmdline_size)
    return bytes(hdr)


def build_pvh_start_info(
    base: int,
    e820: Sequence[E820Entry],
    cmdline_addr: int,
    initrd: Optional[Tuple[int, int]] = None,
    rsdp_addr: int = 0,
) -> bytes:
    """hvm_start_info (version 1) at ``base``, followed by its module list and memory map.

    Returns one blob to write at ``base``; the pointers inside are absolute.
    """
    modules = [initrd] if initrd is not None else []
    modlist_addr = base + HVM_START_INFO_SIZE
    memmap_addr = modlist_addr + HVM_MODLIST_ENTRY_SIZE * len(modules)
    info = struct.pack(
        "<IIIIQQQQII", HVM_START_MAGIC, 1, 0, len(modules), modlist_addr if modules else 0,
        cmdline_addr, rsdp_addr, memmap_addr, len(e820), 0,
    )
    mods = b"".join(struct.pack("<QQQQ", addr, size, 0, 0) for addr, size in modules)
    memmap = b"".join(struct.pack("<QQII", e.addr, e.size, e.type, 0) for e in e820)
    return info + mods + memmap
