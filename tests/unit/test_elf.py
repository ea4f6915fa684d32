"""ELF vmlinux parsing: PT_LOAD segments, entry, the PVH note; wrong and damaged files."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, strategies as st

from pykvm.vmm.boot.elf import parse_elf
from pykvm.vmm.boot.errors import BootImageError
from tests.unit.kernel_images import make_elf, real_vmlinux


def test_real_vmlinux_has_segments_at_16m_and_a_pvh_entry():
    k = parse_elf(real_vmlinux())
    assert k.entry == 0x100_0000 == k.start  # startup_64 at CONFIG_PHYSICAL_START
    assert all(s.filesz <= s.memsz for s in k.segments) and len(k.segments) >= 2
    assert k.pvh_entry is not None  # Debian builds CONFIG_PVH=y
    text = k.segments[0]
    assert text.paddr <= k.pvh_entry < text.end


@pytest.mark.parametrize("desc_size", [4, 8])
def test_synthetic_segments_and_pvh_note(desc_size):
    data = bytes(range(256)) * 4
    image = make_elf([(0x100_0000, data, 0x2000), (0x200_0000, b"xy", 2)], entry=0x100_0010,
                     pvh_entry=0x100_0040, pvh_desc_size=desc_size)
    k = parse_elf(image)
    assert k.entry == 0x100_0010 and k.pvh_entry == 0x100_0040
    assert [(s.paddr, s.filesz, s.memsz) for s in k.segments] == [(0x100_0000, 1024, 0x2000), (0x200_0000, 2, 2)]
    assert image[k.segments[0].offset:k.segments[0].offset + 1024] == data
    assert (k.start, k.end) == (0x100_0000, 0x200_0002)


def test_no_pvh_note_means_none():
    assert parse_elf(make_elf()).pvh_entry is None


@pytest.mark.parametrize("image,match", [
    (make_elf(machine=183), r"AArch64.*x86-64"),
    (make_elf(machine=3), r"i386"),
    (make_elf(elf_class=1), "ELFCLASS64"),
    (make_elf(segments=()), "no program headers"),
    (make_elf()[:40], "truncated header"),
    (make_elf()[:100], "program headers .* truncated"),
    (make_elf()[:200], "segment 0 .* truncated"),
    (b"MZ\x90\x00" + bytes(100), "not an ELF"),
    (make_elf(pvh_entry=1 << 33, pvh_desc_size=8), "not a 32-bit"),
])
def test_wrong_or_damaged_elf_is_refused_clearly(image, match):
    with pytest.raises(BootImageError, match=match):
        parse_elf(image)


def test_bss_larger_than_file_is_fine_but_filesz_over_memsz_is_corrupt():
    image = bytearray(make_elf([(0x100_0000, b"a" * 16, 16)]))
    struct.pack_into("<Q", image, 64 + 40, 8)  # p_memsz < p_filesz
    with pytest.raises(BootImageError, match="filesz"):
        parse_elf(bytes(image))


def _parse_or_boot_image_error(data: bytes) -> None:
    try:
        parse_elf(data)
    except BootImageError as exc:
        assert str(exc)


_SAMPLE = make_elf([(0x100_0000, b"\xcc" * 64, 0x1000)], pvh_entry=0x100_0000)


@given(st.integers(0, len(_SAMPLE)))
def test_any_truncation_only_raises_boot_image_error(n):
    _parse_or_boot_image_error(_SAMPLE[:n])


@given(st.lists(st.integers(0, len(_SAMPLE) * 8 - 1), min_size=1, max_size=8))
def test_bit_flips_only_raise_boot_image_error(bits):
    image = bytearray(_SAMPLE)
    for bit in bits:
        image[bit // 8] ^= 1 << (bit % 8)
    _parse_or_boot_image_error(bytes(image))


@given(st.binary(max_size=400))
def test_random_bytes_after_the_magic_only_raise_boot_image_error(tail):
    _parse_or_boot_image_error(b"\x7fELF" + tail)
