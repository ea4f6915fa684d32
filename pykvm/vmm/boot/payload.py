"""The kernel inside a bzImage: its compressed payload, decompressed in the VMM.

A bzImage's protected-mode part is the decompressor followed by the compressed
``vmlinux.bin`` (the kernel's ELF image, stripped, with its relocation table appended);
setup header fields ``payload_offset``/``payload_length`` (boot protocol 2.08) locate it,
and its last four bytes hold the decompressed size (for gzip the ISIZE trailer, for the
other formats four bytes the kernel's build appends after the stream). :func:`extract_vmlinux` returns that ELF,
so a VMM can load it itself and enter the kernel at ``startup_64`` without running the
decompressor in the guest ("direct boot": what Firecracker asks of its users, done here
from the bzImage they have).

gzip, xz, lzma and bzip2 payloads decompress with the standard library; zstd with
``compression.zstd`` (Python 3.14) or the ``zstd`` command, lz4 and lzo with the ``lz4`` and
``lzop`` commands (their output read up to the size the trailer records, as with the library
decoders). A missing decompressor is a clear error, not a guess.
"""
from __future__ import annotations

import struct
from typing import Callable, Dict, NamedTuple, Optional, Tuple

from .bzimage import BzImage
from .elf import ElfKernel, elf_file_size, is_elf, parse_elf
from .errors import BootImageError

MIN_PAYLOAD_PROTOCOL = 0x0208  # payload_offset/payload_length
MAX_VMLINUX = 1 << 30  # a decompressed size beyond this is a corrupt trailer, not a kernel


class Format(NamedTuple):
    name: str
    magic: bytes
    command: Optional[Tuple[str, ...]]  # decompress stdin to stdout, when not in the standard library
    package: str  # Debian package with the command


FORMATS = (
    Format("gzip", b"\x1f\x8b", None, ""),
    Format("xz", b"\xfd7zXZ\x00", None, ""),
    Format("bzip2", b"BZh", None, ""),
    Format("zstd", b"\x28\xb5\x2f\xfd", ("zstd", "-d", "-c", "-q"), "zstd"),
    Format("lz4", b"\x02\x21\x4c\x18", ("lz4", "-d", "-c", "-q"), "lz4"),
    Format("lzo", b"\x89LZO", ("lzop", "-d", "-c", "-q"), "lzop"),
    Format("lzma", b"\x5d\x00\x00", None, ""),  # LZMA-alone: properties byte 0x5d, dictionary size LE
)


def payload_format(payload: bytes) -> Format:
    """The compression of ``payload``, from its magic bytes; BootImageError if none matches."""
    for fmt in FORMATS:
        if payload[:len(fmt.magic)] == fmt.magic:
            return fmt
    raise BootImageError(f"the bzImage's payload starts with {bytes(payload[:6]).hex()}, which is no compression "
                         f"Linux uses ({', '.join(f.name for f in FORMATS)}): corrupt image?")


def _gzip(data: bytes, limit: int) -> bytes:
    import zlib

    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(data, limit)
    if not d.eof and len(out) < limit:
        raise ValueError("the gzip stream ends early")
    return out


def _xz(data: bytes, limit: int) -> bytes:
    import lzma

    return _lzma_like(data, limit, lzma.FORMAT_XZ)


def _lzma(data: bytes, limit: int) -> bytes:
    import lzma

    return _lzma_like(data, limit, lzma.FORMAT_ALONE)


def _lzma_like(data: bytes, limit: int, fmt: int) -> bytes:
    import lzma

    d = lzma.LZMADecompressor(format=fmt)
    out = d.decompress(data, limit)
    if not d.eof and len(out) < limit and fmt != lzma.FORMAT_ALONE:  # LZMA-alone with a known size has no end mark
        raise ValueError("the xz stream ends early")
    return out


def _bzip2(data: bytes, limit: int) -> bytes:
    import bz2

    d = bz2.BZ2Decompressor()
    out = d.decompress(data, limit)
    if not d.eof and len(out) < limit:
        raise ValueError("the bzip2 stream ends early")
    return out


def _zstd_library() -> Optional[Callable[[bytes, int], bytes]]:
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python >= 3.14
    except ImportError:
        return None
    return lambda data, limit: zstd.ZstdDecompressor().decompress(data, limit)


STDLIB: Dict[str, Callable[[bytes, int], bytes]] = {"gzip": _gzip, "xz": _xz, "lzma": _lzma, "bzip2": _bzip2}


def decompress(fmt: Format, data: bytes, limit: int = MAX_VMLINUX) -> bytes:
    """``data`` decompressed as ``fmt``, at most ``limit`` bytes of it (a corrupt or hostile stream
    cannot fill memory, whether a library or a command decompresses it); BootImageError saying why
    not (corrupt, or no decompressor)."""
    import lzma
    import zlib

    decoder = STDLIB.get(fmt.name) or (_zstd_library() if fmt.name == "zstd" else None)
    try:
        if decoder is not None:
            return decoder(bytes(data), limit)
    except (zlib.error, lzma.LZMAError, OSError, ValueError, EOFError, MemoryError) as exc:  # bz2: OSError
        raise BootImageError(f"the bzImage's {fmt.name} payload does not decompress ({exc}): corrupt image") from None
    import shutil

    assert fmt.command is not None
    if shutil.which(fmt.command[0]) is None:
        raise BootImageError(f"the bzImage's payload is {fmt.name}-compressed and this host has no `{fmt.command[0]}` "
                             f"to decompress it: install it (apt-get install {fmt.package}), or boot without --direct")
    out, status, errors = _run_bounded(fmt.command, data, limit)
    if status and len(out) < limit:
        why = errors.decode(errors="replace").strip().splitlines()
        raise BootImageError(f"the bzImage's {fmt.name} payload does not decompress "
                             f"({why[-1] if why else f'{fmt.command[0]} exit status {status}'}): corrupt image")
    return out


def _run_bounded(command: Tuple[str, ...], data: bytes, limit: int) -> Tuple[bytes, int, bytes]:
    """``command``'s standard output for ``data`` on its input, read up to ``limit`` bytes (the
    command is killed there), its exit status and the end of its standard error. The input is a
    temporary file and standard error another, so no pipe can fill and stall either side."""
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as source, tempfile.TemporaryFile() as errors:
        source.write(data)
        source.seek(0)
        with subprocess.Popen(command, stdin=source, stdout=subprocess.PIPE, stderr=errors) as p:
            assert p.stdout is not None
            out = bytearray()  # grown as output comes: the limit is the trailer's word, not a size to reserve
            while len(out) < limit:
                chunk = p.stdout.read1(min(1 << 20, limit - len(out)))
                if not chunk:
                    break
                out += chunk
            if len(out) == limit:
                p.kill()  # what it would write beyond the limit is not read
            status = p.wait()
        errors.seek(max(0, errors.tell() - 4096))
        return bytes(out), status, errors.read()


class Vmlinux(NamedTuple):
    """The kernel ELF recovered from a bzImage, with its parse."""

    image: bytes  # the ELF file: headers, segments and section headers (the relocation table dropped)
    elf: ElfKernel
    compression: str


def extract_vmlinux(bz: BzImage) -> Vmlinux:
    """Decompress ``bz``'s payload and check it is the x86-64 kernel ELF; BootImageError otherwise."""
    hdr = bz.header
    if hdr.version < MIN_PAYLOAD_PROTOCOL or hdr.payload_length < 5:
        raise BootImageError(f"this bzImage (boot protocol {hdr.version_string}) does not say where its compressed "
                             "kernel is (payload_offset/payload_length, protocol 2.08): boot it without --direct")
    payload = bz.kernel[hdr.payload_offset:hdr.payload_offset + hdr.payload_length]
    fmt = payload_format(payload)
    size = struct.unpack_from("<I", payload, len(payload) - 4)[0]
    if not 64 <= size <= MAX_VMLINUX:
        raise BootImageError(f"the bzImage's payload says it decompresses to {size} bytes: corrupt image")
    out = decompress(fmt, payload if fmt.name == "gzip" else payload[:-4], size + 1)  # gzip's trailer is its own
    if len(out) != size:
        got = f"more than {size}" if len(out) > size else f"{len(out)}"
        raise BootImageError(f"the bzImage's {fmt.name} payload decompressed to {got} bytes, not the {size} "
                             "its trailer records: corrupt image")
    if not is_elf(out):
        raise BootImageError(f"the bzImage's payload ({fmt.name}) is not an ELF kernel (starts {out[:4].hex()}): "
                             "boot it without --direct")
    elf = parse_elf(out)
    return Vmlinux(out[:elf_file_size(out)], elf, fmt.name)

