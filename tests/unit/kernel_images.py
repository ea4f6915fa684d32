"""Kernel images for the boot tests: Debian's real one from the lab cache, and synthetic ones.

The real bzImage is the one ``pykvm lab prepare`` fetches; its vmlinux is
recovered as ``pykvm run --direct`` does (pykvm.vmm.boot.payload.extract_vmlinux).
Tests that need them skip with the reason when the lab cache is empty, and fail under
PYKVM_REQUIRE_LAB=1 (.ci/lab-deps runs ``lab prepare`` before the tests).
Synthetic images carry just the fields the parsers read, with overrides for
building wrong ones.
"""
from __future__ import annotations

import functools
import struct
from typing import Optional, Sequence, Tuple

from pykvm.lab.image import cache_root
from pykvm.vmm.boot.bzimage import parse_bzimage
from pykvm.vmm.boot.payload import extract_vmlinux
from tests.conftest import require_or_skip

NO_KERNEL = "no Debian kernel in the lab cache: run `python3 -m pykvm lab prepare`"


@functools.lru_cache(maxsize=1)
def _real_bzimage() -> Optional[bytes]:
    found = sorted(cache_root().glob("*/kernel/boot/vmlinuz-*"))
    return found[-1].read_bytes() if found else None


def real_bzimage() -> bytes:
    __tracebackhide__ = True  # a skip shows the test's line
    image = _real_bzimage()
    if image is None:
        require_or_skip("PYKVM_REQUIRE_LAB", NO_KERNEL)
    return image


@functools.lru_cache(maxsize=1)
def _real_vmlinux() -> Optional[bytes]:
    image = _real_bzimage()
    return None if image is None else extract_vmlinux(parse_bzimage(image)).image


def real_vmlinux() -> bytes:
    __tracebackhide__ = True  # a skip shows the test's line
    vmlinux = _real_vmlinux()
    if vmlinux is None:
        require_or_skip("PYKVM_REQUIRE_LAB", NO_KERNEL)
    return vmlinux


def make_bzimage(
    *,
    version: int = 0x020F,
    loadflags: int = 0x01,
    xloadflags: int = 0x7F,
    setup_sects: int = 4,
    kernel_size: int = 0x4000,
    init_size: int = 0x40_0000,
    pref_address: int = 0x100_0000,
    kernel_alignment: int = 0x20_0000,
    relocatable: int = 1,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFF_FFFF,
    header_jump: int = 0x6A,
) -> bytes:
    """A bzImage with a valid setup header and ``kernel_size`` bytes of protected-mode 'code'."""
    setup = ((setup_sects or 4) + 1) * 512  # 0 means 4 (boot.rst)
    img = bytearray(setup + kernel_size)
    struct.pack_into("<BHI", img, 0x1F1, setup_sects, 0, kernel_size // 16)
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    struct.pack_into("<BB4sH", img, 0x200, 0xEB, header_jump, b"HdrS", version)
    img[0x211] = loadflags
    struct.pack_into("<IIBBHI", img, 0x22C, initrd_addr_max, kernel_alignment, relocatable, 21, xloadflags, cmdline_size)
    struct.pack_into("<II", img, 0x248, 0x100, kernel_size // 2)
    struct.pack_into("<QI", img, 0x258, pref_address, init_size)
    for i in range(setup, len(img), 4):  # recognisable kernel bytes
        struct.pack_into("<I", img, i, i)
    return bytes(img)


Segment = Tuple[int, bytes, int]  # (paddr, file bytes, memsz)


def make_elf(
    segments: Sequence[Segment] = ((0x100_0000, b"\x90" * 0x100, 0x2000),),
    *,
    entry: int = 0x100_0000,
    machine: int = 62,
    elf_class: int = 2,
    pvh_entry: Optional[int] = None,
    pvh_desc_size: int = 4,
) -> bytes:
    """An ELF64 executable with PT_LOAD segments and, if ``pvh_entry``, Xen's PHYS32_ENTRY note."""
    notes = b""
    if pvh_entry is not None:
        desc = pvh_entry.to_bytes(pvh_desc_size, "little")
        other = struct.pack("<III", 4, 4, 6) + b"Xen\0" + b"lnx\0"  # another Xen note first
        notes = other + struct.pack("<III", 4, len(desc), 18) + b"Xen\0" + desc.ljust((len(desc) + 3) // 4 * 4, b"\0")
    nph = len(segments) + (1 if notes else 0)
    off = 64 + 56 * nph
    body, table = b"", b""
    for paddr, data, memsz in segments:
        table += struct.pack("<IIQQQQQQ", 1, 5, off + len(body), 0xFFFF_FFFF_8000_0000 + paddr, paddr, len(data), memsz, 0x1000)
        body += data
    if notes:
        table += struct.pack("<IIQQQQQQ", 4, 4, off + len(body), 0, 0, len(notes), len(notes), 4)
        body += notes
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, machine, 1, entry, 64, 0, 0, 64, 56, nph, 64, 0, 0)
    return ehdr + table + body
