"""Parse a Linux bzImage's setup header (Documentation/arch/x86/boot.rst).

A bzImage is the real-mode setup code (``setup_sects`` + 1 sectors of 512
bytes, with the setup header at 0x1F1) followed by the protected-mode kernel:
a self-decompressing blob whose 64-bit entry point sits 0x200 bytes in. This
VMM skips the real-mode code and enters at that 64-bit entry, which needs boot
protocol 2.12 or later (for ``xloadflags``) and the XLF_KERNEL_64 flag.
Every field a loader relies on is checked here, so a wrong or damaged file
fails with a message instead of a guest that never prints anything.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from .errors import BootImageError

SETUP_HEADER_OFFSET = 0x1F1
HEADER_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, the 64-bit entry is advertised
PROTOCOL_2_15_END = 0x26C  # end of the header with kernel_info_offset
MIN_HEADER_END = 0x264  # through init_size: the fields this loader reads
ENTRY_64_OFFSET = 0x200  # startup_64, relative to the protected-mode load address

LOADED_HIGH = 1 << 0  # loadflags: protected-mode code at 0x100000 (a bzImage)
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1


class SetupHeader(NamedTuple):
    """The setup header fields a 64-bit loader uses, and the raw header bytes."""

    setup_sects: int
    syssize: int  # protected-mode code size in 16-byte paragraphs
    version: int  # boot protocol, e.g. 0x020F for 2.15
    loadflags: int
    initrd_addr_max: int  # highest address the initrd may occupy (inclusive)
    kernel_alignment: int
    relocatable: bool
    min_alignment: int  # log2 of the minimum alignment a relocatable kernel accepts
    xloadflags: int
    cmdline_size: int  # maximum command line length, without the terminating NUL
    payload_offset: int
    payload_length: int
    pref_address: int
    init_size: int  # memory the kernel needs from its runtime start before it reads e820
    raw: bytes  # image bytes [0x1F1, header end): copied into boot_params.hdr

    @property
    def version_string(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF}"

    @property
    def initrd_above_4g(self) -> bool:
        """XLF_CAN_BE_LOADED_ABOVE_4G: the kernel takes its initrd (and boot_params) above 4 GiB."""
        return bool(self.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G)

    @property
    def setup_size(self) -> int:
        """Bytes before the protected-mode kernel: the boot sector plus setup sectors."""
        return (self.setup_sects + 1) * 512


class BzImage(NamedTuple):
    """A parsed bzImage: its setup header and the protected-mode kernel after the setup sectors."""

    header: SetupHeader
    kernel: memoryview  # the protected-mode part, to be loaded at the load address


def is_bzimage(image: bytes) -> bool:
    """True if ``image`` carries the boot sector flag and the ``HdrS`` header magic."""
    return len(image) >= 0x206 and image[0x1FE:0x200] == b"\x55\xaa" and image[0x202:0x206] == HEADER_MAGIC


def parse_bzimage(image: bytes) -> BzImage:
    """Check and parse a bzImage; raise :class:`BootImageError` saying what is wrong."""
    n = len(image)
    if n < 0x208:  # through the protocol version at 0x206
        raise BootImageError(f"kernel image is only {n} bytes: too short for a bzImage setup header (truncated?)")
    if not is_bzimage(image):
        raise BootImageError("not a bzImage: no 0xAA55 boot flag and 'HdrS' magic at 0x1FE/0x202 (pass a bzImage such as /boot/vmlinuz-*, or an ELF vmlinux)")
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < MIN_PROTOCOL:
        raise BootImageError(f"boot protocol {version >> 8}.{version & 0xFF} is too old: the 64-bit entry needs 2.12 or later (Linux >= 3.8)")
    header_end = 0x202 + image[0x201]
    if header_end < MIN_HEADER_END:
        raise BootImageError(f"setup header ends at {header_end:#x}, before init_size at 0x260: corrupt image (bad jump at 0x200)")
    if n < header_end:
        raise BootImageError(f"kernel image is {n} bytes but its setup header ends at {header_end:#x}: truncated")
    (setup_sects, _root_flags, syssize) = struct.unpack_from("<BHI", image, 0x1F1)
    setup_sects = setup_sects or 4  # boot.rst: 0 means 4
    loadflags = image[0x211]
    initrd_addr_max, kernel_alignment, relocatable, min_alignment, xloadflags, cmdline_size = struct.unpack_from("<IIBBHI", image, 0x22C)
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    pref_address, init_size = struct.unpack_from("<QI", image, 0x258)
    hdr = SetupHeader(
        setup_sects=setup_sects, syssize=syssize, version=version, loadflags=loadflags,
        initrd_addr_max=initrd_addr_max, kernel_alignment=kernel_alignment, relocatable=bool(relocatable),
        min_alignment=min_alignment, xloadflags=xloadflags, cmdline_size=cmdline_size,
        payload_offset=payload_offset, payload_length=payload_length, pref_address=pref_address,
        init_size=init_size, raw=bytes(image[SETUP_HEADER_OFFSET:header_end]),
    )
    _check(hdr, n)
    return BzImage(hdr, memoryview(image)[hdr.setup_size:])


def _check(hdr: SetupHeader, n: int) -> None:
    if not hdr.loadflags & LOADED_HIGH:
        raise BootImageError("this is a zImage (loads below 1 MiB), not a bzImage: rebuild with 'make bzImage'")
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise BootImageError("the kernel has no 64-bit entry point (XLF_KERNEL_64 unset): boot an x86-64 kernel")
    kernel_size = n - hdr.setup_size
    if kernel_size <= 0:
        raise BootImageError(f"image is {n} bytes but its {hdr.setup_sects} setup sectors need {hdr.setup_size}: truncated")
    if hdr.syssize * 16 > kernel_size:
        raise BootImageError(f"protected-mode kernel is {kernel_size} bytes but the header says {hdr.syssize * 16}: truncated")
    if hdr.payload_offset + hdr.payload_length > kernel_size:
        raise BootImageError(f"compressed payload ({hdr.payload_offset:#x}+{hdr.payload_length:#x}) runs past the end of the kernel: truncated or corrupt")
    if hdr.init_size < kernel_size:
        raise BootImageError(f"init_size {hdr.init_size:#x} is smaller than the kernel itself ({kernel_size:#x}): corrupt header")
    if hdr.cmdline_size == 0:
        raise BootImageError("cmdline_size is 0: corrupt header")
    align = hdr.kernel_alignment
    if align == 0 or align & (align - 1) or align > 1 << 30:
        raise BootImageError(f"kernel_alignment {align:#x} is not a power of two up to 1 GiB: corrupt header")
    if not hdr.relocatable and hdr.pref_address % align:
        raise BootImageError(f"non-relocatable kernel with pref_address {hdr.pref_address:#x} not aligned to {align:#x}: corrupt header")
