"""bzImage setup header parsing: Debian's real kernel, synthetic images and damaged ones."""
from __future__ import annotations

import pytest
from hypothesis import event, example, given, strategies as st

from pykvm.vmm.boot.bzimage import ENTRY_64_OFFSET, XLF_KERNEL_64, is_bzimage, parse_bzimage
from pykvm.vmm.boot.errors import BootImageError
from tests.unit.kernel_images import make_bzimage, real_bzimage


def test_real_debian_kernel():
    image = real_bzimage()
    bz = parse_bzimage(image)
    h = bz.header
    assert h.version >= 0x020C and h.version_string.startswith("2.")
    assert h.xloadflags & XLF_KERNEL_64
    assert h.relocatable and h.kernel_alignment == 2 * 1024 * 1024
    assert h.pref_address == 0x100_0000  # CONFIG_PHYSICAL_START
    assert h.cmdline_size == 2047
    assert h.initrd_addr_max == 0x7FFF_FFFF
    assert h.init_size >= len(bz.kernel) > ENTRY_64_OFFSET
    assert bytes(bz.kernel) == image[h.setup_size:]
    assert h.raw[:1] == image[0x1F1:0x1F2] and h.raw[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"
    # The compressed payload sits inside the protected-mode kernel, as the header says.
    payload = bytes(bz.kernel[h.payload_offset:h.payload_offset + 4])
    compressors = (b"\x1f\x8b", b"\xfd7zX", b"\x28\xb5\x2f\xfd", b"\x02\x21\x4c\x18", b"BZh", b"\x5d\x00", b"\x89LZO")
    assert payload.startswith(compressors), payload.hex()


def test_synthetic_image_fields():
    h = parse_bzimage(make_bzimage(setup_sects=0, kernel_size=0x2000, cmdline_size=255)).header
    assert h.setup_sects == 4 and h.setup_size == 5 * 512  # 0 means 4 (boot.rst)
    assert h.cmdline_size == 255 and h.syssize == 0x200 and h.version_string == "2.15"


@pytest.mark.parametrize("image,match", [
    (b"", "too short"),
    (b"\x7fELF" + bytes(1000), "not a bzImage"),
    (bytes(0x400), "not a bzImage"),
    (make_bzimage(version=0x020A), "2.10 is too old"),
    (make_bzimage(loadflags=0), "zImage"),
    (make_bzimage(xloadflags=0x7E), "no 64-bit entry"),
    (make_bzimage(header_jump=0x20), "corrupt"),
    (make_bzimage(init_size=0x100), "init_size"),
    (make_bzimage(cmdline_size=0), "cmdline_size"),
    (make_bzimage(kernel_alignment=0x30_0000), "power of two"),
    (make_bzimage()[:0x260], "truncated"),
    (make_bzimage()[:5 * 512 + 0x100], "truncated"),
    (make_bzimage(setup_sects=200)[:0x1000], "truncated"),
])
def test_bad_images_are_refused_clearly(image, match):
    with pytest.raises(BootImageError, match=match):
        parse_bzimage(image)


def test_boot_image_error_is_a_value_error():
    assert issubclass(BootImageError, ValueError)
    assert not is_bzimage(b"") and is_bzimage(make_bzimage())


# Words that tell parse_bzimage's checks apart by their messages, in the order the checks run.
CHECKS = ("too short", "no 0xAA55", "too old", "bad jump", "but its setup header ends", "zImage", "64-bit entry",
          "setup sectors need", "protected-mode kernel is", "compressed payload", "init_size", "cmdline_size",
          "kernel_alignment", "non-relocatable")
SETUP_HEADER = (0x1F1, 0x268)  # setup_sects .. init_size


def _parse_or_boot_image_error(data: bytes) -> str:
    """Parse ``data``, which must either succeed or raise BootImageError with a message; which
    check refused it, or "parsed" (for hypothesis's event())."""
    try:
        parse_bzimage(data)
    except BootImageError as exc:
        assert str(exc)
        return next((f"refused: {c}" for c in CHECKS if c in str(exc)), f"refused: {exc}")
    return "parsed"


_byte = st.one_of(st.just(0), st.integers(0, 0xFF))  # zeros often: a zero field is a check of its own
_header_bytes = st.dictionaries(st.integers(*SETUP_HEADER), _byte, min_size=1, max_size=8)
_magic = range(0x1FE, 0x206)  # boot flag, the jump to the header's end, "HdrS"


@given(st.one_of(
    _header_bytes,  # a few bytes of the header replaced
    _header_bytes.map(lambda d: {o: v for o, v in d.items() if o not in _magic}),  # ... not the magic or the jump
    st.binary(min_size=SETUP_HEADER[1] - SETUP_HEADER[0], max_size=SETUP_HEADER[1] - SETUP_HEADER[0]).map(
        lambda b: {SETUP_HEADER[0] + i: v for i, v in enumerate(b) if SETUP_HEADER[0] + i not in _magic}),
))
@example({0x238: 0, 0x239: 0})  # cmdline_size 0 (too rare at random: two bytes of one field)
@example({0x234: 0, 0x25A: 0x10})  # not relocatable, and pref_address 0x1100000 off the 2 MiB alignment
def test_random_header_bytes_only_raise_boot_image_error(replacements):
    """Whole bytes of a valid image's setup header replaced (or all of it but the magic and
    the jump): the header's checks are reached, and each refuses with BootImageError or it parses."""
    image = bytearray(make_bzimage())
    for offset, value in replacements.items():
        image[offset] = value
    event(_parse_or_boot_image_error(bytes(image)))


@given(st.integers(0, 5 * 512 + 0x4000))
def test_any_truncation_only_raises_boot_image_error(n):
    _parse_or_boot_image_error(make_bzimage()[:n])


@given(st.lists(st.integers(0x1F1 * 8, 0x270 * 8 - 1), min_size=1, max_size=8))
def test_bit_flips_in_the_header_only_raise_boot_image_error(bits):
    image = bytearray(make_bzimage())
    for bit in bits:
        image[bit // 8] ^= 1 << (bit % 8)
    _parse_or_boot_image_error(bytes(image))


@given(st.lists(st.integers(0x1F1 * 8, 0x270 * 8 - 1), min_size=1, max_size=4), st.integers(0x1F1, 0x300))
def test_damaged_real_header_only_raises_boot_image_error(bits, cut):
    image = bytearray(real_bzimage()[:0x4000])  # the setup code and header, truncated kernel
    for bit in bits:
        image[bit // 8] ^= 1 << (bit % 8)
    _parse_or_boot_image_error(bytes(image[:cut]))
    _parse_or_boot_image_error(bytes(image))
