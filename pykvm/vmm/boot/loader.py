"""Plan a Linux boot: what bytes go where in guest memory, and the boot vCPU's entry state.

:func:`plan_boot` is pure: it takes the kernel image, an optional initrd, the
command line and the memory :class:`~pykvm.vmm.layout.Layout`, checks that
they make a bootable machine, and returns a :class:`BootPlan`. The machine
writes ``plan.writes`` into guest RAM (assumed zero-filled, as fresh anonymous
memory is), sets the registers from ``plan.regs``/``plan.sregs`` and runs.
Every error is raised here, before any vCPU exists.

Three ways in:

- bzImage: the protected-mode kernel at its preferred address (where the
  decompressor works anyway: it never runs below it), entered at load + 0x200 (startup_64 of the decompressor) in long mode with identity
  paging, rsi = zero page.
- ELF vmlinux with a PVH note: segments at their physical addresses, entered
  at the PVH entry in 32-bit protected mode without paging, ebx = hvm_start_info.
- ELF vmlinux without a PVH note (or ``pvh=False``): entered at e_entry
  (startup_64) like a bzImage, with a synthetic setup header.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple, Union

from .. import layout as L
from ..cpu_tables import (
    RFLAGS_RESERVED, SpecialRegs, gdt_bytes, identity_page_tables, long_mode_sregs, protected_mode_sregs,
)
from .bzimage import ENTRY_64_OFFSET, BzImage, is_bzimage, parse_bzimage
from .elf import ElfKernel, is_elf, parse_elf
from .errors import BootError, BootImageError
from .zeropage import build_pvh_start_info, build_zero_page, synthetic_setup_header

IDENTITY_MAP_GIB = 4  # everything below 4 GiB: kernel, zero page, cmdline, initrd
ELF_CMDLINE_SIZE = 2047  # x86 COMMAND_LINE_SIZE (2048) less the NUL, for kernels without a header

Write = Tuple[int, Union[bytes, memoryview]]


class EntryRegs(NamedTuple):
    """General-purpose register state at kernel entry (all others zero)."""

    rip: int
    rsp: int
    rsi: int = 0  # 64-bit boot protocol: the zero page
    rbx: int = 0  # PVH: hvm_start_info
    rflags: int = RFLAGS_RESERVED


class BootPlan(NamedTuple):
    """Everything a vCPU needs to start the kernel: the bytes to write into RAM, the entry and its registers."""

    kind: str  # "bzimage", "elf64" or "pvh"
    writes: Tuple[Write, ...]  # (guest-physical address, bytes), in RAM, non-overlapping
    entry: int
    boot_params: int  # address of boot_params (zero page) or hvm_start_info
    long_mode: bool  # True: 64-bit entry with paging; False: 32-bit PVH entry, paging off
    regs: EntryRegs
    sregs: SpecialRegs
    kernel: Tuple[int, int]  # (address, size) the kernel occupies or needs at boot
    initrd: Optional[Tuple[int, int]]
    cmdline: bytes  # as written, without the NUL


def _align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a


def plan_boot(
    kernel: bytes,
    layout: L.Layout,
    cmdline: Union[str, bytes] = "",
    initrd: Optional[bytes] = None,
    pvh: bool = True,
) -> BootPlan:
    """Check and lay out a boot of ``kernel`` (bzImage or ELF vmlinux); see the module doc."""
    cmd = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in cmd:
        raise BootError("the kernel command line contains a NUL byte")
    if is_bzimage(kernel):
        return _plan_bzimage(parse_bzimage(kernel), layout, cmd, initrd)
    if is_elf(kernel):
        return _plan_elf(kernel, parse_elf(kernel), layout, cmd, initrd, pvh)
    raise BootImageError("kernel is neither a bzImage (no 'HdrS' header) nor an ELF vmlinux: pass e.g. /boot/vmlinuz-*")


def _check_cmdline(cmd: bytes, limit: int) -> None:
    limit = min(limit, L.CMDLINE_MAX - 1)
    if len(cmd) > limit:
        raise BootError(f"kernel command line is {len(cmd)} bytes; this kernel accepts at most {limit} (shorten it)")


def _place_initrd(initrd: Optional[bytes], kernel_end: int, top: int) -> Optional[Tuple[int, int]]:
    """As high as allowed below ``top``, page aligned, above the kernel's memory."""
    if not initrd:
        return None
    size = len(initrd)
    addr = (top - size) // L.PAGE_SIZE * L.PAGE_SIZE
    if addr < kernel_end:
        room = max(0, top - kernel_end)
        raise BootError(
            f"initrd of {size / L.MiB:.1f} MiB does not fit: only {room / L.MiB:.1f} MiB between the kernel's end "
            f"({kernel_end:#x}) and {top:#x}; give the guest more memory (e.g. --memory {_suggest(kernel_end + size)}) "
            "or use a smaller initrd"
        )
    return addr, size


def _suggest(needed: int) -> str:
    return f"{_align_up(needed + 16 * L.MiB, 64 * L.MiB) // L.MiB}M"


def _initrd_write(initrd: Optional[bytes], placed: Optional[Tuple[int, int]]) -> List[Write]:
    return [(placed[0], initrd)] if initrd and placed else []


def _common_writes(cmd: bytes) -> List[Write]:
    return [(L.BOOT_GDT_ADDR, gdt_bytes()), (L.CMDLINE_ADDR, cmd + b"\0")]


def _plan_bzimage(img: BzImage, layout: L.Layout, cmd: bytes, initrd: Optional[bytes]) -> BootPlan:
    hdr = img.header
    _check_cmdline(cmd, hdr.cmdline_size)
    # The decompressor runs from max(load address, LOAD_PHYSICAL_ADDR = pref_address), and
    # needs init_size bytes there: loading lower saves nothing, so load at pref_address.
    load = hdr.pref_address
    kernel_end = load + hdr.init_size
    if load < L.HIGH_MEMORY_START or kernel_end > layout.low_ram_end:
        raise BootError(
            f"kernel needs {hdr.init_size / L.MiB:.1f} MiB from {load:#x} to boot but RAM below the PCI hole is "
            f"[1 MiB, {layout.low_ram_end:#x}); give the guest more memory (e.g. --memory {_suggest(kernel_end)})"
        )
    placed = _place_initrd(initrd, kernel_end, min(layout.low_ram_end, hdr.initrd_addr_max + 1))
    zero_page = build_zero_page(hdr.raw, layout.e820, L.CMDLINE_ADDR, load, placed)
    writes = _common_writes(cmd) + [(L.ZERO_PAGE_ADDR, zero_page), (load, img.kernel)]
    return _long_mode_plan("bzimage", load + ENTRY_64_OFFSET, writes, (load, hdr.init_size), initrd, placed, cmd)


def _plan_elf(image: bytes, elf: ElfKernel, layout: L.Layout, cmd: bytes, initrd: Optional[bytes], pvh: bool) -> BootPlan:
    _check_cmdline(cmd, ELF_CMDLINE_SIZE)
    for s in elf.segments:
        if s.paddr < L.HIGH_MEMORY_START or s.end > layout.low_ram_end:
            raise BootError(
                f"kernel segment at {s.paddr:#x}+{s.memsz:#x} is outside RAM from 1 MiB to {layout.low_ram_end:#x}; "
                f"give the guest more memory (e.g. --memory {_suggest(elf.end)})"
            )
    placed = _place_initrd(initrd, _align_up(elf.end, L.PAGE_SIZE), layout.low_ram_end)
    writes = _common_writes(cmd)
    view = memoryview(image)
    for s in elf.segments:
        writes.append((s.paddr, view[s.offset:s.offset + s.filesz]))
        if s.memsz > s.filesz:
            writes.append((s.paddr + s.filesz, bytes(s.memsz - s.filesz)))
    kernel_range = (elf.start, elf.end - elf.start)
    if pvh and elf.pvh_entry is not None:
        info = build_pvh_start_info(L.PVH_START_INFO_ADDR, layout.e820, L.CMDLINE_ADDR, placed)
        writes.append((L.PVH_START_INFO_ADDR, info))
        writes += _initrd_write(initrd, placed)
        return BootPlan(
            kind="pvh", writes=tuple(writes), entry=elf.pvh_entry, boot_params=L.PVH_START_INFO_ADDR, long_mode=False,
            regs=EntryRegs(rip=elf.pvh_entry, rsp=L.BOOT_STACK_TOP, rbx=L.PVH_START_INFO_ADDR),
            sregs=protected_mode_sregs(L.BOOT_GDT_ADDR, L.BOOT_IDT_ADDR),
            kernel=kernel_range, initrd=placed, cmdline=cmd,
        )
    zero_page = build_zero_page(synthetic_setup_header(ELF_CMDLINE_SIZE), layout.e820, L.CMDLINE_ADDR, elf.start, placed)
    writes.append((L.ZERO_PAGE_ADDR, zero_page))
    return _long_mode_plan("elf64", elf.entry, writes, kernel_range, initrd, placed, cmd)


def _long_mode_plan(kind: str, entry: int, writes: List[Write], kernel_range: Tuple[int, int],
                    initrd: Optional[bytes], placed: Optional[Tuple[int, int]], cmd: bytes) -> BootPlan:
    writes.append((L.PAGE_TABLES_ADDR, identity_page_tables(L.PAGE_TABLES_ADDR, IDENTITY_MAP_GIB)))
    writes += _initrd_write(initrd, placed)
    return BootPlan(
        kind=kind, writes=tuple(writes), entry=entry, boot_params=L.ZERO_PAGE_ADDR, long_mode=True,
        regs=EntryRegs(rip=entry, rsp=L.BOOT_STACK_TOP, rsi=L.ZERO_PAGE_ADDR),
        sregs=long_mode_sregs(L.BOOT_GDT_ADDR, L.BOOT_IDT_ADDR, L.PAGE_TABLES_ADDR),
        kernel=kernel_range, initrd=placed, cmdline=cmd,
    )
