"""A bzImage's compressed kernel (pykvm.vmm.boot.payload): synthetic bzImages whose payload is
a tiny ELF compressed as Linux's build does it (the stream, then the decompressed size as four
bytes little-endian, except for gzip, whose ISIZE trailer is that already), damaged payloads,
missing decompressors, and Debian's real kernel."""
from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from pykvm.vmm.boot import payload as payload_module
from pykvm.vmm.boot.bzimage import BzImage, parse_bzimage
from pykvm.vmm.boot.elf import PT_LOAD, elf_file_size, parse_elf
from pykvm.vmm.boot.errors import BootImageError
from pykvm.vmm.boot.payload import extract_vmlinux
from tests.unit.kernel_images import make_bzimage, make_elf, real_bzimage

PAGE = 4096
STDLIB_FORMATS = ("gzip", "xz", "lzma", "bzip2")
CHECKED_FORMATS = ("gzip", "xz", "bzip2")  # with a CRC over the data (LZMA-alone has none)
PAYLOAD_OFFSET = 0x100  # in the protected-mode part, after the 'decompressor'
# Commands Linux's build uses for the formats the standard library lacks (legacy lz4 frames: -l).
COMMANDS = {"zstd": ("zstd", "-19", "-q", "-c"), "lz4": ("lz4", "-l", "-9", "-q", "-c")}

# -- building synthetic bzImages -----------------------------------------------------------------
def compress(fmt: str, data: bytes) -> bytes:
    """``data`` compressed as ``fmt`` and followed by its size, as arch/x86/boot/compressed does."""
    if fmt == "gzip":
        return gzip.compress(data, mtime=0)  # its own trailer ends with ISIZE: nothing appended
    if fmt == "xz":
        stream = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif fmt == "lzma":
        stream = lzma.compress(data, format=lzma.FORMAT_ALONE)
    elif fmt == "bzip2":
        stream = bz2.compress(data)
    elif fmt in COMMANDS:
        stream = subprocess.run(COMMANDS[fmt], input=data, capture_output=True, check=True).stdout
    else:
        raise ValueError(fmt)
    return stream + struct.pack("<I", len(data))


def bzimage_with_payload(payload: bytes, **header) -> bytes:
    """A bzImage (tests.unit.kernel_images.make_bzimage) whose protected-mode part holds
    ``payload`` at PAYLOAD_OFFSET, with payload_offset/payload_length (0x248/0x24C) saying so."""
    kernel_size = (PAYLOAD_OFFSET + len(payload) + 0x40 + 15) // 16 * 16
    header.setdefault("init_size", max(0x40_0000, kernel_size))
    image = bytearray(make_bzimage(kernel_size=kernel_size, **header))
    setup = ((image[0x1F1] or 4) + 1) * 512
    image[setup + PAYLOAD_OFFSET:setup + PAYLOAD_OFFSET + len(payload)] = payload
    struct.pack_into("<II", image, 0x248, PAYLOAD_OFFSET, len(payload))
    return bytes(image)


def tiny_elf(code: bytes = b"\x90" * 0x40 + b"\xeb\xfe", bss: int = 0x1000) -> bytes:
    return make_elf(((0x100_0000, code, len(code) + bss), (0x120_0000, b"data" * 16, 0x40)), entry=0x100_0000)


def with_relocs(elf: bytes) -> bytes:
    """vmlinux.bin as Linux compresses it: the stripped ELF, then the relocation table."""
    return elf + struct.pack("<3I", 0, 0x0100_0010, 0x0100_0020) + b"\x00" * 4


def bzimage_of(elf: bytes, fmt: str = "xz", **header) -> BzImage:
    return parse_bzimage(bzimage_with_payload(compress(fmt, elf), **header))


def extract_payload(payload: bytes) -> payload_module.Vmlinux:
    return extract_vmlinux(parse_bzimage(bzimage_with_payload(payload)))


# -- round trips ------------------------------------------------------------------------------------
segment_bytes = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda head, zeros, tail: head + bytes(zeros) + tail,
              st.binary(max_size=40), st.integers(0, 3 * PAGE), st.binary(max_size=40)),
)
segments = st.lists(st.tuples(segment_bytes, st.integers(0, 0x3000)), min_size=1, max_size=3).map(
    lambda segs: tuple((0x100_0000 + i * 0x10_0000, data, max(1, len(data) + extra))
                       for i, (data, extra) in enumerate(segs)))


@given(segs=segments, fmt=st.sampled_from(STDLIB_FORMATS), relocs=st.booleans())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_the_payload_decompresses_back_to_exactly_the_elf(segs, fmt, relocs):
    elf = make_elf(segs, entry=segs[0][0])
    v = extract_vmlinux(bzimage_of(with_relocs(elf) if relocs else elf, fmt))
    assert v.image == elf  # the relocation table Linux appends is dropped
    assert v.compression == fmt
    assert v.elf == parse_elf(elf)
    assert [(s.paddr, s.filesz, s.memsz) for s in v.elf.segments] == [(p, len(d), m) for p, d, m in segs]


@pytest.mark.parametrize("fmt", STDLIB_FORMATS)
def test_each_standard_library_format_is_recognised_by_its_magic(fmt):
    v = extract_vmlinux(bzimage_of(tiny_elf(), fmt))
    assert v.compression == fmt and v.image == tiny_elf() and v.elf.entry == 0x100_0000


# -- damaged payloads --------------------------------------------------------------------------------
def xz_stream(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)


def corrupt_middle(data: bytes) -> bytes:
    out = bytearray(data)
    out[len(out) // 2] ^= 0xFF
    return bytes(out)


ELF = tiny_elf()


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)  # the same bytes on every run


@pytest.mark.parametrize("payload,match", [
    # trailers that do not match the stream
    pytest.param(xz_stream(ELF) + struct.pack("<I", len(ELF) + 1),
                 rf"xz payload decompressed to {len(ELF)} bytes, not the {len(ELF) + 1} its trailer records: "
                 "corrupt image", id="xz-size-one-more"),
    pytest.param(xz_stream(ELF) + struct.pack("<I", len(ELF) - 16),
                 rf"decompressed to more than {len(ELF) - 16} bytes, not the {len(ELF) - 16}", id="xz-size-less"),
    pytest.param(lzma.compress(ELF, format=lzma.FORMAT_ALONE) + struct.pack("<I", len(ELF) * 2),
                 "lzma payload decompressed to", id="lzma-size-double"),
    pytest.param(bz2.compress(ELF) + struct.pack("<I", len(ELF) + 4096), "bzip2 payload decompressed to",
                 id="bzip2-size-more"),
    pytest.param(xz_stream(ELF) + struct.pack("<I", 10), "payload says it decompresses to 10 bytes: corrupt image",
                 id="size-too-small"),
    pytest.param(xz_stream(ELF) + struct.pack("<I", 0xFFFF_FFFF), "says it decompresses to 4294967295 bytes",
                 id="size-too-large"),
    # gzip's trailer is its own: a wrong ISIZE is a stream zlib refuses
    pytest.param(gz(ELF)[:-4] + struct.pack("<I", len(ELF) + 1), "gzip payload does not decompress",
                 id="gzip-isize-wrong"),
    # truncated streams (the size still appended)
    pytest.param(xz_stream(ELF)[:40] + struct.pack("<I", len(ELF)),
                 r"xz payload does not decompress \(the xz stream ends early\)", id="xz-truncated"),
    pytest.param(bz2.compress(ELF)[:-10] + struct.pack("<I", len(ELF)), "bzip2 payload does not decompress",
                 id="bzip2-truncated"),
    pytest.param(gz(ELF)[:-12] + struct.pack("<I", len(ELF)), "gzip payload does not decompress", id="gzip-truncated"),
    pytest.param(lzma.compress(ELF, format=lzma.FORMAT_ALONE)[:-20] + struct.pack("<I", len(ELF)),
                 "lzma payload decompressed to", id="lzma-truncated"),
    # corrupt streams
    pytest.param(corrupt_middle(xz_stream(ELF)) + struct.pack("<I", len(ELF)),
                 "xz payload does not decompress .*: corrupt image", id="xz-corrupt"),
    pytest.param(corrupt_middle(bz2.compress(ELF)) + struct.pack("<I", len(ELF)), "bzip2 payload does not decompress",
                 id="bzip2-corrupt"),
    pytest.param(corrupt_middle(gz(ELF)), "gzip payload does not decompress",
                 id="gzip-corrupt"),
    # no compression Linux uses
    pytest.param(b"\x00\x01\x02\x03\x04\x05" + bytes(100) + struct.pack("<I", 200),
                 "payload starts with 000102030405, which is no compression Linux uses .*: corrupt image",
                 id="unknown-magic"),
    pytest.param(b"PK\x03\x04" + bytes(100), "which is no compression Linux uses", id="zip"),
    # decompresses fine, to something that is not the kernel
    pytest.param(gz(b"not an elf " * 20),
                 r"payload \(gzip\) is not an ELF kernel \(starts 6e6f7420\): boot it without --direct", id="not-elf"),
    pytest.param(compress("xz", make_elf(machine=183)), "ELF is for machine 183 .*not x86-64", id="aarch64-elf"),
    pytest.param(compress("bzip2", ELF[:200]), "runs past the end", id="truncated-elf"),
])
def test_a_damaged_payload_is_a_boot_image_error_saying_what(payload, match):
    with pytest.raises(BootImageError, match=match):
        extract_payload(payload)


@pytest.mark.parametrize("version,length", [(0x0207, 0x1000), (0x0200, 0x1000), (0x020F, 0), (0x020F, 4)])
def test_a_bzimage_that_does_not_locate_its_payload_is_refused(version, length):
    """payload_offset/payload_length exist from boot protocol 2.08. parse_bzimage itself refuses
    protocols below 2.12 (the 64-bit entry), so the header is edited after parsing."""
    bz = bzimage_of(ELF)
    header = bz.header._replace(version=version, payload_length=length)
    with pytest.raises(BootImageError, match=rf"boot protocol {version >> 8}\.{version & 0xFF}\) does not say where its "
                                             r"compressed kernel is .*protocol 2\.08\): boot it without --direct"):
        extract_vmlinux(bz._replace(header=header))


def test_the_payload_is_found_where_the_header_says():
    """The bytes before payload_offset are the decompressor's: an image whose payload_offset is
    one byte off is not decompressed from the wrong place."""
    image = bytearray(bzimage_with_payload(compress("xz", ELF)))
    assert extract_vmlinux(parse_bzimage(bytes(image))).image == ELF
    struct.pack_into("<I", image, 0x248, PAYLOAD_OFFSET - 1)
    with pytest.raises(BootImageError, match="no compression Linux uses"):
        extract_vmlinux(parse_bzimage(bytes(image)))


@given(fmt=st.sampled_from(STDLIB_FORMATS),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), max_size=4),
       cut=st.none() | st.integers(0, 10_000))
@example(fmt="xz", flips=[], cut=5)
@example(fmt="gzip", flips=[(0, 0x40)], cut=None)
@example(fmt="lzma", flips=[(13, 0xFF)], cut=None)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_a_damaged_payload_never_raises_anything_but_boot_image_error(fmt, flips, cut):
    """Byte flips anywhere in the payload (its trailer too) and truncation (a shorter
    payload_length): a BootImageError, or the ELF itself. LZMA-alone carries no checksum, so
    for it a flip may also give another well-formed ELF."""
    base = tiny_elf(code=bytes(range(256)) * 4, bss=0x3000)
    payload = bytearray(compress(fmt, with_relocs(base)))
    for at, mask in flips:
        payload[at % len(payload)] ^= mask
    if cut is not None:
        del payload[cut % len(payload):]
    assume(len(payload) >= 5)
    try:
        v = extract_payload(bytes(payload))
    except BootImageError:
        return
    if fmt in CHECKED_FORMATS:
        assert v.image == base
    else:
        assert v.elf == parse_elf(v.image) and v.image == bytes(v.image)[:elf_file_size(v.image)]


# -- formats that need a command (zstd, lz4, lzo) --------------------------------------------------------
@pytest.mark.parametrize("fmt,magic,command,package", [
    ("zstd", b"\x28\xb5\x2f\xfd", "zstd", "zstd"),
    ("lz4", b"\x02\x21\x4c\x18", "lz4", "lz4"),
    ("lzo", b"\x89LZO\x00\r\n\x1a\n", "lzop", "lzop"),
], ids=["zstd", "lz4", "lzo"])
def test_a_format_without_a_decompressor_says_what_to_install(fmt, magic, command, package, tmp_path, monkeypatch):
    """Neither compression.zstd (Python 3.14) nor the command on PATH."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(payload_module, "_zstd_library", lambda: None)
    with pytest.raises(BootImageError) as info:
        extract_payload(magic + bytes(200) + struct.pack("<I", 4096))
    message = str(info.value)
    assert f"payload is {fmt}-compressed and this host has no `{command}`" in message
    assert f"apt-get install {package}" in message and "boot without --direct" in message


@pytest.mark.parametrize("fmt", sorted(COMMANDS))
def test_a_payload_in_a_command_format_round_trips_through_the_command(fmt, monkeypatch):
    """A real zstd (``zstd -19``) or legacy-lz4 (``lz4 -l``, as Linux's build) payload; on a
    host without the command, the clear error instead."""
    monkeypatch.setattr(payload_module, "_zstd_library", lambda: None)  # the command, also on Python 3.14
    if shutil.which(fmt) is None:
        with pytest.raises(BootImageError, match=rf"apt-get install {fmt}"):
            extract_payload(dict(zstd=b"\x28\xb5\x2f\xfd", lz4=b"\x02\x21\x4c\x18")[fmt] + bytes(100))
        return
    elf = with_relocs(tiny_elf())
    v = extract_payload(compress(fmt, elf))
    assert v.compression == fmt and v.image == tiny_elf()
    damaged = bytearray(compress(fmt, elf))
    del damaged[len(damaged) // 2:-4]  # the stream cut, the size still appended
    with pytest.raises(BootImageError, match=rf"the bzImage's {fmt} payload does not decompress \(.+\): corrupt image"):
        extract_payload(bytes(damaged))


# -- elf_file_size ---------------------------------------------------------------------------------------
def test_elf_file_size_drops_what_follows_the_elf():
    elf = tiny_elf()
    assert elf_file_size(elf) == len(elf)
    assert elf_file_size(with_relocs(elf)) == len(elf)
    assert elf_file_size(elf + bytes(PAGE)) == len(elf)


def test_elf_file_size_keeps_a_section_header_table_after_the_segments():
    """vmlinux.bin keeps its section headers (objcopy -S strips symbols, not sections) at the end."""
    elf = bytearray(tiny_elf())
    shoff, shnum = len(elf), 5
    struct.pack_into("<Q", elf, 0x28, shoff)
    struct.pack_into("<HH", elf, 0x3A, 64, shnum)  # e_shentsize, e_shnum
    elf += bytes(range(64)) * shnum
    assert elf_file_size(bytes(elf) + b"relocs" * 10) == shoff + 64 * shnum == len(elf)
    assert extract_payload(compress("xz", bytes(elf) + b"relocs" * 10)).image == bytes(elf)


def test_elf_file_size_takes_the_furthest_segment_not_the_last_header():
    """Program headers need not be in file order: the end is the furthest segment's."""
    elf = bytearray(make_elf(((0x100_0000, b"A" * 100, 100), (0x120_0000, b"B" * 300, 300))))
    first, second = bytes(elf[64:120]), bytes(elf[120:176])
    elf[64:120], elf[120:176] = second, first
    assert elf_file_size(bytes(elf) + b"tail") == len(elf)


# -- Debian's kernel ---------------------------------------------------------------------------------------
def test_the_real_debian_kernel_decompresses_to_its_vmlinux():
    bz = parse_bzimage(real_bzimage())
    v = extract_vmlinux(bz)
    assert v.compression == "xz" and v.elf.entry == 0x100_0000
    assert v.elf.segments and v.elf.start == 0x100_0000
    image = v.image
    phoff, = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    loads = [struct.unpack_from("<IIQQQQ", image, phoff + i * phentsize) for i in range(phnum)]
    assert [(paddr, filesz) for p_type, _, _, _, paddr, filesz in loads if p_type == PT_LOAD] == \
        [(s.paddr, s.filesz) for s in v.elf.segments]
    # the ELF ends with its section header table; the relocation table after it is gone
    shoff, = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", image, 0x3A)
    assert len(image) == shoff + shentsize * shnum
    size_trailer, = struct.unpack_from("<I", bz.kernel, bz.header.payload_offset + bz.header.payload_length - 4)
    assert len(image) < size_trailer  # vmlinux.relocs was part of what was compressed


@pytest.mark.parametrize("fmt", ["gzip", "xz", "bzip2", *sorted(COMMANDS)])
def test_a_payload_that_inflates_past_its_trailer_stops_there(fmt, monkeypatch):
    """A stream of 64 MiB of zeros whose trailer says 4096 bytes: refused, and decompression
    stopped at the trailer's size instead of filling memory (tracemalloc's peak: the 64 MiB
    would count, the decoders' own buffers do not). zstd and lz4 through their commands,
    whose output is read only up to that size."""
    import tracemalloc

    if fmt in COMMANDS:
        if shutil.which(fmt) is None:
            pytest.skip(f"no `{fmt}` command here to make the stream with")
        monkeypatch.setattr(payload_module, "_zstd_library", lambda: None)
    bomb = compress(fmt, bytes(64 << 20))
    if fmt != "gzip":
        bomb = bomb[:-4]
    payload = bomb + struct.pack("<I", 4096) if fmt != "gzip" else bomb[:-4] + struct.pack("<I", 4096)
    bz = parse_bzimage(bzimage_with_payload(payload))
    tracemalloc.start()
    try:
        # the library decoders may see the stream's end mark missing first; a command is cut at the limit
        said = "decompressed to more than 4096 bytes" + ("" if fmt in COMMANDS else "|does not decompress")
        with pytest.raises(BootImageError, match=said):
            extract_vmlinux(bz)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
