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

The initrd goes as high as it may below the PCI hole and the kernel's
``initrd_addr_max``, page aligned, above the kernel. A bzImage that sets
XLF_CAN_BE_LOADED_ABOVE_4G (boot protocol: "kernel/boot_params/cmdline/ramdisk
can be above 4G"; Linux sets it for every relocatable 64-bit kernel, and its
own EFI stub then ignores initrd_addr_max) takes an initrd that does not fit
there at the top of RAM above 4 GiB (the zero page's ext_ramdisk_image/size
carry the high half), or else anywhere in low RAM. When nothing fits, the
error names the limit that binds: more ``--memory`` is suggested only when it
would help (and the size suggested is one that works).
- ELF vmlinux with a PVH note: segments at their physical addresses, entered
  at the PVH entry in 32-bit protected mode without paging, ebx = hvm_start_info.
- ELF vmlinux without a PVH note (or ``pvh=False``): entered at e_entry
  (startup_64) like a bzImage, with a synthetic setup header.
- Direct boot (``setup_header``): the vmlinux decompressed from a bzImage
  (:mod:`.vmlinux_cache`), entered at its startup_64 with the bzImage's own setup
  header in the zero page, so the boot protocol's limits (command line size,
  initrd_addr_max, XLF_CAN_BE_LOADED_ABOVE_4G) are the kernel's. The guest skips its
  decompressor, and with it KASLR: the kernel runs where it was linked.

ELF segments are written only where the file may hold data (``extents``, from the
file system's holes) and not at all past their file size (.bss): fresh RAM is zero.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

from .. import layout as L
from ..cpu_tables import (
    RFLAGS_RESERVED, SpecialRegs, gdt_bytes, identity_page_tables, long_mode_sregs, protected_mode_sregs,
)
from .bzimage import ENTRY_64_OFFSET, BzImage, SetupHeader, is_bzimage, parse_bzimage
from .elf import ElfKernel, is_elf, parse_elf
from .errors import BootError, BootImageError
from .zeropage import build_pvh_start_info, build_zero_page, synthetic_setup_header

IDENTITY_MAP_GIB = 4  # everything below 4 GiB: kernel, zero page, cmdline, initrd
ELF_CMDLINE_SIZE = 2047  # x86 COMMAND_LINE_SIZE (2048) less the NUL, for kernels without a header

Write = Tuple[int, Union[bytes, memoryview]]
Extent = Tuple[int, int]  # (file offset, length)


class EntryRegs(NamedTuple):
    """General-purpose register state at kernel entry (all others zero)."""

    rip: int
    rsp: int
    rsi: int = 0  # 64-bit boot protocol: the zero page
    rbx: int = 0  # PVH: hvm_start_info
    rflags: int = RFLAGS_RESERVED


class BootPlan(NamedTuple):
    """Everything a vCPU needs to start the kernel: the bytes to write into RAM, the entry and its registers."""

    kind: str  # "bzimage", "elf64", "direct" or "pvh"
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
    setup_header: Optional[SetupHeader] = None,
    extents: Optional[Sequence[Extent]] = None,
) -> BootPlan:
    """Check and lay out a boot of ``kernel`` (bzImage or ELF vmlinux); see the module doc.
    ``setup_header``: boot the ELF ``kernel`` directly, with the header of the bzImage it came
    from. ``extents``: the parts of an ELF file that may hold data (None: all of it).

    A str ``cmdline`` is encoded as UTF-8, with the bytes of undecodable arguments
    (Python's surrogateescape, as ``sys.argv`` holds them) passed through unchanged."""
    if isinstance(cmdline, str):
        try:
            cmd = cmdline.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError as exc:
            raise BootError(f"the kernel command line has a character that is not text ({cmdline[exc.start]!r} "
                            f"at {exc.start}): pass the bytes, or valid UTF-8") from None
    else:
        cmd = bytes(cmdline)
    if b"\0" in cmd:
        raise BootError("the kernel command line contains a NUL byte")
    if is_bzimage(kernel):
        return _plan_bzimage(parse_bzimage(kernel), layout, cmd, initrd)
    if is_elf(kernel):
        return _plan_elf(kernel, parse_elf(kernel), layout, cmd, initrd, pvh, setup_header, extents)
    raise BootImageError("kernel is neither a bzImage (no 'HdrS' header) nor an ELF vmlinux: pass e.g. /boot/vmlinuz-*")


def _check_cmdline(cmd: bytes, limit: int) -> None:
    limit = min(limit, L.CMDLINE_MAX - 1)
    if len(cmd) > limit:
        raise BootError(f"kernel command line is {len(cmd)} bytes; this kernel accepts at most {limit} (shorten it)")


def _place_initrd(initrd: Optional[bytes], kernel_end: int, layout: L.Layout, addr_max: Optional[int] = None,
                  above_4g: bool = False) -> Optional[Tuple[int, int]]:
    """Where the initrd goes, page aligned, as high as allowed: below the PCI hole and
    ``addr_max`` (the last byte it may occupy) above the kernel's memory; if the kernel may
    have it above 4 GiB and it does not fit there, at the top of high RAM, or else anywhere
    in low RAM above the kernel. BootError naming the binding limit when nothing fits."""
    if not initrd:
        return None
    size = len(initrd)
    spots = [(kernel_end, _low_top(layout, addr_max))]
    if above_4g:
        spots += [(r.gpa, r.end) for r in layout.ram[1:]] + [(kernel_end, layout.low_ram_end)]
    for bottom, top in spots:
        addr = (top - size) // L.PAGE_SIZE * L.PAGE_SIZE
        if addr >= bottom:
            return addr, size
    raise _initrd_misfit(size, kernel_end, layout, addr_max, above_4g)


def _low_top(layout: L.Layout, addr_max: Optional[int]) -> int:
    return layout.low_ram_end if addr_max is None else min(layout.low_ram_end, addr_max + 1)


def _initrd_memory_need(size: int, kernel_end: int, hole: int, addr_max: Optional[int], above_4g: bool) -> Optional[int]:
    """The least guest memory with which an initrd of ``size`` bytes fits (None: no size this
    VMM maps would do): low RAM up to the kernel's end plus the initrd, where the kernel's
    limits let more low RAM reach that far; else, if the kernel allows, RAM above 4 GiB."""
    needed = _align_up(kernel_end, L.PAGE_SIZE) + _align_up(size, L.PAGE_SIZE)
    reach = hole if addr_max is None or above_4g else min(hole, addr_max + 1)
    need = needed if needed <= reach else hole + _align_up(size, L.PAGE_SIZE) if above_4g else None
    return need if need is not None and _suggest_bytes(need) <= L.MAX_MEMORY else None


def _initrd_misfit(size: int, kernel_end: int, layout: L.Layout, addr_max: Optional[int], above_4g: bool) -> BootError:
    hole, low_top = layout.pci_hole_start, _low_top(layout, addr_max)
    room = max(0, low_top - kernel_end)
    what = (f"initrd of {size / L.MiB:.1f} MiB does not fit: only {room / L.MiB:.1f} MiB between the kernel's "
            f"end ({kernel_end:#x}) and {low_top:#x}")
    need = _initrd_memory_need(size, kernel_end, hole, addr_max, above_4g)
    if need is not None and need <= hole:
        return BootError(f"{what}; give the guest more memory (e.g. --memory {_suggest(need)}) or use a smaller initrd")
    if need is not None:
        return BootError(f"{what}, and the guest has {L.human_size(layout.memory - layout.low_ram_end)} above 4 GiB; "
                         f"give the guest more memory (e.g. --memory {_suggest(need)}: RAM beyond the PCI hole goes "
                         "above 4 GiB, where this kernel accepts an initrd) or use a smaller initrd")
    if above_4g:
        return BootError(f"{what}: even above 4 GiB it would need more than the {L.human_size(L.MAX_MEMORY)} of RAM "
                         "this VMM maps; use a smaller initrd")
    if addr_max is not None and addr_max + 1 < hole:
        return BootError(f"{what}: this kernel accepts an initrd only below {addr_max + 1:#x} (its initrd_addr_max) "
                         "and not above 4 GiB (no XLF_CAN_BE_LOADED_ABOVE_4G), so more memory cannot help; use an "
                         f"initrd of at most {max(0, addr_max + 1 - kernel_end) / L.MiB:.1f} MiB")
    return BootError(f"{what}: RAM below 4 GiB ends at the 32-bit PCI hole ({hole:#x}) and this boot path places "
                     f"the initrd below 4 GiB, so more memory cannot help; use an initrd of at most "
                     f"{max(0, hole - kernel_end) / L.MiB:.1f} MiB")


def _suggest_bytes(needed: int) -> int:
    return _align_up(needed + 16 * L.MiB, 64 * L.MiB)


def _suggest(needed: int) -> str:
    """A --memory value that gives at least ``needed`` bytes of RAM (with some room)."""
    return f"{_suggest_bytes(needed) // L.MiB}M"


def _kernel_misfit(what: str, start: int, end: int, layout: L.Layout, field: str, initrd: Optional[bytes],
                   initrd_after: int, addr_max: Optional[int] = None, above_4g: bool = False) -> BootError:
    """BootError for a kernel (or segment) that needs [start, end) but does not fit: more
    memory is suggested only if it helps, and enough of it for the initrd too."""
    hole = layout.pci_hole_start
    if start < L.HIGH_MEMORY_START:
        return BootError(f"{what}, but that starts below 1 MiB, where RAM for the kernel begins: corrupt {field}?")
    if start >= hole:
        return BootError(f"{what}, but {start:#x} is beyond the RAM below the 32-bit PCI hole ({hole:#x}) that the "
                         f"kernel must be loaded into, so no memory size can help: corrupt {field}?")
    if end > hole:
        return BootError(f"{what}, but that runs to {end:#x}, past the 32-bit PCI hole at {hole:#x} where RAM below "
                         "4 GiB ends, so no memory size can help: corrupt image?")
    need = end
    if initrd:
        initrd_need = _initrd_memory_need(len(initrd), initrd_after, hole, addr_max, above_4g)
        if initrd_need is None:  # more memory would fit the kernel, never the initrd: say why
            return _initrd_misfit(len(initrd), initrd_after, L.memory_layout(L.MAX_MEMORY, hole), addr_max, above_4g)
        need = max(need, initrd_need)
    return BootError(f"{what}; RAM below the PCI hole is [1 MiB, {layout.low_ram_end:#x}): give the guest more "
                     f"memory (e.g. --memory {_suggest(need)})")


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
    above_4g = hdr.initrd_above_4g
    if load < L.HIGH_MEMORY_START or kernel_end > layout.low_ram_end:
        raise _kernel_misfit(f"kernel needs {hdr.init_size / L.MiB:.1f} MiB from {load:#x} to boot", load, kernel_end,
                             layout, "pref_address", initrd, kernel_end, hdr.initrd_addr_max, above_4g)
    placed = _place_initrd(initrd, kernel_end, layout, hdr.initrd_addr_max, above_4g)
    zero_page = build_zero_page(hdr.raw, layout.e820, L.CMDLINE_ADDR, load, placed)
    writes = _common_writes(cmd) + [(L.ZERO_PAGE_ADDR, zero_page), (load, img.kernel)]
    return _long_mode_plan("bzimage", load + ENTRY_64_OFFSET, writes, (load, hdr.init_size), initrd, placed, cmd)


def _plan_elf(image: bytes, elf: ElfKernel, layout: L.Layout, cmd: bytes, initrd: Optional[bytes], pvh: bool,
              header: Optional[SetupHeader] = None, extents: Optional[Sequence[Extent]] = None) -> BootPlan:
    _check_cmdline(cmd, ELF_CMDLINE_SIZE if header is None else header.cmdline_size)
    addr_max = None if header is None else header.initrd_addr_max
    above_4g = header is not None and header.initrd_above_4g
    kernel_end = _align_up(elf.end, L.PAGE_SIZE)
    for s in elf.segments:
        if s.paddr < L.HIGH_MEMORY_START or s.end > layout.low_ram_end:
            raise _kernel_misfit(f"kernel segment at {s.paddr:#x}+{s.memsz:#x} is outside RAM", s.paddr,
                                 max(elf.end, s.end), layout, "program header", initrd, kernel_end, addr_max, above_4g)
    placed = _place_initrd(initrd, kernel_end, layout, addr_max, above_4g)
    writes = _common_writes(cmd)
    view = memoryview(image)
    for s in elf.segments:  # past filesz (.bss) RAM stays as it is: zero
        for off, size in _data_in(s.offset, s.filesz, extents):
            writes.append((s.paddr + off - s.offset, view[off:off + size]))
    kernel_range = (elf.start, elf.end - elf.start)
    if header is None and pvh and elf.pvh_entry is not None:
        info = build_pvh_start_info(L.PVH_START_INFO_ADDR, layout.e820, L.CMDLINE_ADDR, placed)
        writes.append((L.PVH_START_INFO_ADDR, info))
        writes += _initrd_write(initrd, placed)
        return BootPlan(
            kind="pvh", writes=tuple(writes), entry=elf.pvh_entry, boot_params=L.PVH_START_INFO_ADDR, long_mode=False,
            regs=EntryRegs(rip=elf.pvh_entry, rsp=L.BOOT_STACK_TOP, rbx=L.PVH_START_INFO_ADDR),
            sregs=protected_mode_sregs(L.BOOT_GDT_ADDR, L.BOOT_IDT_ADDR),
            kernel=kernel_range, initrd=placed, cmdline=cmd,
        )
    raw = synthetic_setup_header(ELF_CMDLINE_SIZE) if header is None else header.raw
    zero_page = build_zero_page(raw, layout.e820, L.CMDLINE_ADDR, elf.start, placed)
    writes.append((L.ZERO_PAGE_ADDR, zero_page))
    return _long_mode_plan("elf64" if header is None else "direct", elf.entry, writes, kernel_range, initrd, placed, cmd)


def _data_in(offset: int, size: int, extents: Optional[Sequence[Extent]]) -> List[Extent]:
    """The parts of file range [offset, offset + size) inside ``extents`` (all of it if None)."""
    if extents is None:
        return [(offset, size)] if size else []
    end = offset + size
    parts = []
    for start, length in extents:
        lo, hi = max(start, offset), min(start + length, end)
        if lo < hi:
            parts.append((lo, hi - lo))
    return parts


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
