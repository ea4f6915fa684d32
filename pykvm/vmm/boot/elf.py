"""Parse an uncompressed x86-64 Linux kernel (``vmlinux``, ELF64).

The loader copies each PT_LOAD segment to its physical address (``p_paddr``).
A kernel built with CONFIG_PVH carries a Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY
(type 18) with the physical address of its 32-bit PVH entry; without it the
ELF's ``e_entry`` (startup_64, physical) is entered with the 64-bit boot
protocol.
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Optional, Tuple

from .errors import BootImageError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
ET_EXEC, ET_DYN = 2, 3
PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr, 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr, 56 bytes
_MACHINES = {3: "i386 (32-bit x86)", 40: "ARM", 183: "AArch64", 243: "RISC-V", 8: "MIPS", 21: "PowerPC64", 22: "s390"}


class LoadSegment(NamedTuple):
    """One PT_LOAD program header: ``filesz`` bytes from ``offset`` at ``paddr``, zero-filled to ``memsz``."""

    paddr: int
    offset: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


class ElfKernel(NamedTuple):
    """A parsed ELF vmlinux: its entry, load segments and PVH entry (if it has the note)."""

    entry: int  # e_entry: physical address of startup_64 in a vmlinux
    segments: Tuple[LoadSegment, ...]
    pvh_entry: Optional[int]  # XEN_ELFNOTE_PHYS32_ENTRY, if the kernel has one

    @property
    def start(self) -> int:
        return min(s.paddr for s in self.segments)

    @property
    def end(self) -> int:
        return max(s.end for s in self.segments)


def is_elf(image: bytes) -> bool:
    return image[:4] == ELF_MAGIC


def parse_elf(image: bytes) -> ElfKernel:
    """Check and parse an x86-64 ELF kernel; raise :class:`BootImageError` saying what is wrong."""
    n = len(image)
    if not is_elf(image):
        raise BootImageError("not an ELF file (no \\x7fELF magic)")
    if n < _EHDR.size:
        raise BootImageError(f"ELF file is only {n} bytes: truncated header")
    ident, e_type, machine, _ver, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum = _EHDR.unpack_from(image)[:11]
    if ident[4] != ELFCLASS64:
        raise BootImageError(f"ELF class {ident[4]} is not ELFCLASS64: boot a 64-bit x86-64 vmlinux")
    if ident[5] != ELFDATA2LSB:
        raise BootImageError("ELF is big-endian: not an x86-64 kernel")
    if machine != EM_X86_64:
        raise BootImageError(f"ELF is for machine {machine} ({_MACHINES.get(machine, 'unknown')}), not x86-64 (62): boot a kernel built for x86-64")
    if e_type not in (ET_EXEC, ET_DYN):
        raise BootImageError(f"ELF type {e_type} is not an executable: pass vmlinux, not an object or core file")
    if phnum == 0:
        raise BootImageError("ELF has no program headers: nothing to load")
    if phentsize < _PHDR.size:
        raise BootImageError(f"ELF program header size {phentsize} is below {_PHDR.size}: corrupt")
    if phoff + phnum * phentsize > n:
        raise BootImageError(f"ELF program headers ({phnum} at {phoff:#x}) run past the end of the {n}-byte file: truncated")
    segments, pvh_entry = [], None
    for i in range(phnum):
        p_type, _pflags, off, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(image, phoff + i * phentsize)
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if off + filesz > n:
            raise BootImageError(f"ELF segment {i} ({off:#x}+{filesz:#x}) runs past the end of the {n}-byte file: truncated")
        if p_type == PT_NOTE:
            pvh_entry = _find_pvh_entry(image, off, filesz) if pvh_entry is None else pvh_entry
        elif memsz:
            if filesz > memsz or paddr + memsz > 1 << 52:
                raise BootImageError(f"ELF segment {i} has filesz {filesz:#x} > memsz {memsz:#x} or lies beyond physical memory: corrupt")
            segments.append(LoadSegment(paddr, off, filesz, memsz))
    if not segments:
        raise BootImageError("ELF has no loadable segments")
    return ElfKernel(entry, tuple(segments), pvh_entry)


def elf_file_size(image: bytes) -> int:
    """Bytes of the ELF file at the start of ``image``: through its last segment, program header
    table or section header table (what follows, e.g. vmlinux.relocs, is not part of it)."""
    phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize, shnum, _shstrndx = _EHDR.unpack_from(image)[5:]
    end = max(_EHDR.size, phoff + phentsize * phnum, shoff + shentsize * shnum if shoff else 0)
    for i in range(phnum):
        _type, _flags, off, _vaddr, _paddr, filesz, _memsz, _align = _PHDR.unpack_from(image, phoff + i * phentsize)
        end = max(end, off + filesz)
    return min(end, len(image))


def _find_pvh_entry(image: bytes, off: int, size: int) -> Optional[int]:
    """Walk Elf64_Nhdr records for Xen's PHYS32_ENTRY note (a 4- or 8-byte address)."""
    pos, end = off, off + size
    while pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", image, pos)
        name_at = pos + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        nxt = desc_at + (descsz + 3) // 4 * 4
        if nxt > end:
            raise BootImageError(f"ELF note at {pos:#x} runs past its segment: corrupt")
        if image[name_at:name_at + namesz].rstrip(b"\0") == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
            if descsz not in (4, 8):
                raise BootImageError(f"Xen PHYS32_ENTRY note has {descsz} bytes, expected 4 or 8: corrupt")
            # Kernels write either a 4-byte .long or an 8-byte pointer (6.1 does the latter).
            entry = int.from_bytes(image[desc_at:desc_at + descsz], "little")
            if entry >= 1 << 32:
                raise BootImageError(f"PVH entry {entry:#x} is not a 32-bit physical address: corrupt note")
            return entry
        pos = nxt
    return None
