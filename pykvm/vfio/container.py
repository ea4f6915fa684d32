"""The VFIO container (/dev/vfio/vfio): one IOMMU context shared by its groups.

Groups join a container, then ``set_iommu`` picks the IOMMU backend (type1v2 on
x86). ``map_dma`` pins host pages and maps them at an IOVA for every device
of the container's groups; ``map_dma_batch`` maps many pieces of one buffer with the
ioctls issued from C. Dirty tracking reports the mapped pages devices may have
written (for migration). When the last group leaves, the kernel releases the
IOMMU, unpins every mapping and forgets the tracking; the container mirrors that in
its records.
"""
from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

from pykvm._fdobject import FdObject
from pykvm._native import ffi, lib
from pykvm.errors import VfioError
from pykvm.vfio.caps import query_info, read_array, read_struct, walk_chain
from pykvm.vfio.dirty import DirtyBitmap, bitmap_bytes
from pykvm.vfio.errors import VfioUnavailableError, vfio_error
from pykvm.vfio.iova import Range, merge_ranges, outside_ranges

if TYPE_CHECKING:
    import numpy as np

    from pykvm.vfio.dma_batch import ArrayLike, DmaBatch  # imports numpy: only when a batch is made
    from pykvm.vfio.group import Group

__all__ = ["Container", "DmaMapping", "IommuInfo", "Migration", "parse_iommu_caps", "CONTAINER_PATH"]

CONTAINER_PATH = "/dev/vfio/vfio"
_READ, _WRITE = lib.VFIO_DMA_MAP_FLAG_READ, lib.VFIO_DMA_MAP_FLAG_WRITE


@dataclass(frozen=True)
class Migration:
    """Dirty-page tracking support (VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION)."""

    flags: int
    pgsize_bitmap: int
    max_dirty_bitmap_size: int


@dataclass(frozen=True)
class IommuInfo:
    """VFIO_IOMMU_GET_INFO: page sizes and the capability chain."""

    flags: int
    page_sizes: int  # bitmap of supported IOMMU page sizes
    iova_ranges: Optional[Tuple[Range, ...]]  # inclusive; None when the kernel does not say
    dma_avail: Optional[int]  # how many more mappings the kernel allows
    migration: Optional[Migration]
    other_caps: Tuple[int, ...] = ()

    @property
    def min_page_size(self) -> int:
        return self.page_sizes & -self.page_sizes if self.page_sizes else mmap.PAGESIZE


def parse_iommu_caps(buf: bytes, first: int) -> Dict[str, Any]:
    """Parse a VFIO_IOMMU_GET_INFO capability chain into IommuInfo's optional fields."""
    out: Dict[str, Any] = {"iova_ranges": None, "dma_avail": None, "migration": None, "other_caps": []}
    for cap_id, _version, off in walk_chain(buf, first, ffi.sizeof("struct vfio_iommu_type1_info")):
        if cap_id == lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            ctype = "struct vfio_iommu_type1_info_cap_iova_range"
            n = read_struct(buf, off, ctype).nr_iovas
            cap = read_array(buf, off, ctype, "iova_ranges", n, "struct vfio_iova_range")
            out["iova_ranges"] = tuple((cap.iova_ranges[i].start, cap.iova_ranges[i].end) for i in range(n))
        elif cap_id == lib.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
            out["dma_avail"] = read_struct(buf, off, "struct vfio_iommu_type1_info_dma_avail").avail
        elif cap_id == lib.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION:
            cap = read_struct(buf, off, "struct vfio_iommu_type1_info_cap_migration")
            out["migration"] = Migration(cap.flags, cap.pgsize_bitmap, cap.max_dirty_bitmap_size)
        else:
            out["other_caps"].append(cap_id)
    out["other_caps"] = tuple(out["other_caps"])
    return out


def _released(pin: Any, exc: BaseException) -> BaseException:
    """Drop a refused mapping's hold on its buffer before raising ``exc``: the traceback keeps
    the frame (and ``pin``) alive, and the caller may want to close the buffer meanwhile."""
    ffi.release(pin)
    return exc


class DmaMapping:
    """Host memory mapped at ``iova`` for the container's devices.

    Holds the buffer (and a cffi view of it, so an mmap cannot be closed under the
    device) until unmapped.
    """

    __slots__ = ("container", "buffer", "_pin", "iova", "size", "readable", "writable")

    def __init__(self, container: "Container", buffer: Any, pin: Any, iova: int, size: int,
                 readable: bool, writable: bool):
        self.container, self.buffer, self._pin = container, buffer, pin
        self.iova, self.size, self.readable, self.writable = iova, size, readable, writable

    @property
    def mapped(self) -> bool:
        return self._pin is not None

    @property
    def vaddr(self) -> Optional[int]:
        """The host virtual address the device reaches at ``iova`` (None once unmapped)."""
        return None if self._pin is None else int(ffi.cast("uintptr_t", self._pin))

    def unmap(self) -> None:
        """Unmap from the IOMMU (idempotent; a no-op once the container dropped it)."""
        if self._pin is not None:
            self.container.unmap_dma(self.iova, self.size)

    def _forget(self) -> None:
        self._pin = None
        self.buffer = None

    def __enter__(self) -> "DmaMapping":
        return self

    def __exit__(self, *exc) -> None:
        self.unmap()

    def __repr__(self) -> str:
        state = "" if self.mapped else " unmapped"
        return f"<DmaMapping iova={self.iova:#x} size={self.size:#x}{state}>"


class Container(FdObject):
    """``Container()`` opens /dev/vfio/vfio and checks the API version."""

    _error_family = VfioError
    _what = "VFIO container"

    def __init__(self, path: str = CONTAINER_PATH):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VfioUnavailableError(path) from None
        except PermissionError as exc:
            raise vfio_error(exc.errno, f"cannot open {path}: permission denied (run as root, or give your "
                                        "user access to /dev/vfio)", "open") from None
        super().__init__(fd)
        self._groups: List["Group"] = []
        self._mappings: Dict[int, DmaMapping] = {}
        self._batches: Dict[DmaBatch, None] = {}  # insertion-ordered set
        self._iommu_type: Optional[int] = None
        self._info: Optional[IommuInfo] = None  # what does not change while the groups stay
        self._ranges: Optional[Tuple[Range, ...]] = None
        self._dirty_tracking = False
        self.api_version = self._ioctl("VFIO_GET_API_VERSION")
        if self.api_version != lib.VFIO_API_VERSION:
            self.close()
            raise vfio_error(errno.EPROTO, f"kernel VFIO API version {self.api_version}, pykvm speaks "
                                           f"{lib.VFIO_API_VERSION}", "VFIO_GET_API_VERSION")

    # -- IOMMU -------------------------------------------------------------
    def check_extension(self, extension: int) -> int:
        """VFIO_CHECK_EXTENSION: non-zero when the kernel supports ``extension`` (an IOMMU type, ...)."""
        return self._ioctl("VFIO_CHECK_EXTENSION", extension)

    @property
    def iommu_type(self) -> Optional[int]:
        return self._iommu_type

    def set_iommu(self, type: int = lib.VFIO_TYPE1v2_IOMMU) -> None:
        """Pick the IOMMU backend. Needs at least one group in the container."""
        if not self._groups:
            raise vfio_error(errno.EINVAL, "the container has no group: call group.set_container(container) "
                                           "before set_iommu()", "VFIO_SET_IOMMU")
        if not self.check_extension(type):
            raise vfio_error(errno.ENODEV, f"IOMMU type {type} is not offered by this kernel (is the "
                                           "vfio_iommu_type1 module loaded? `modprobe vfio_iommu_type1`)",
                             "VFIO_SET_IOMMU")
        self._ioctl("VFIO_SET_IOMMU", type)
        self._iommu_type = type
        self._forget_info()

    def iommu_info(self) -> IommuInfo:
        """VFIO_IOMMU_GET_INFO with its capability chain parsed."""
        self._need_iommu("VFIO_IOMMU_GET_INFO")
        info, buf = query_info(self, "VFIO_IOMMU_GET_INFO", "struct vfio_iommu_type1_info", lambda i: None)
        caps = {"iova_ranges": None, "dma_avail": None, "migration": None, "other_caps": ()}
        if info.flags & lib.VFIO_IOMMU_INFO_CAPS and info.cap_offset:
            caps = parse_iommu_caps(buf, info.cap_offset)
        return IommuInfo(info.flags, info.iova_pgsizes, **caps)

    def _group_info(self) -> IommuInfo:
        """:meth:`iommu_info` as of the container's present groups: the IOVA ranges and the
        migration capability change only when a group comes or goes (``dma_avail`` changes
        with every mapping: ask :meth:`iommu_info` for it)."""
        if self._info is None:
            self._info = self.iommu_info()
        return self._info

    def _forget_info(self) -> None:
        self._info = None
        self._ranges = None

    @property
    def iova_ranges(self) -> Tuple[Range, ...]:
        """Usable IOVA ranges (inclusive), cached until the container's groups change."""
        if self._ranges is None:
            ranges = self._group_info().iova_ranges
            self._ranges = merge_ranges(ranges) if ranges is not None else ((0, (1 << 64) - 1),)
        return self._ranges

    def _need_iommu(self, op: str) -> None:
        self.fileno()
        if self._iommu_type is None:
            raise vfio_error(errno.EINVAL, "no IOMMU set: attach a group and call set_iommu() first", op)

    # -- DMA ---------------------------------------------------------------
    @property
    def mappings(self) -> List[Union[DmaMapping, DmaBatch]]:
        """Every live mapping: a DmaMapping per ``map_dma``, a DmaBatch per ``map_dma_batch``."""
        return [*self._mappings.values(), *self._batches]

    def map_dma(self, buffer: Any, iova: int, size: Optional[int] = None, readable: bool = True,
                writable: bool = True) -> DmaMapping:
        """Map ``buffer`` (page-aligned memory: an mmap, a numpy array of one) at ``iova``.

        ``readable``/``writable`` say what the device may do. The returned mapping keeps
        the buffer alive until it is unmapped. This is a hot path (see
        bench/vfio_map_dma.py): checks that cost nothing run first, explanations only
        on failure.
        """
        if self._iommu_type is None or self._fd < 0:  # closed: ClosedError (its IOMMU may outlive the fd)
            self._need_iommu("VFIO_IOMMU_MAP_DMA")
        pin = ffi.from_buffer("char[]", buffer, writable)  # positional: measurably cheaper
        if size is None:
            size = len(pin)
        elif size > len(pin):
            raise _released(pin, vfio_error(errno.EINVAL, f"size {size:#x} exceeds the buffer ({len(pin):#x} bytes)",
                                            "VFIO_IOMMU_MAP_DMA"))
        last = iova + size - 1
        for lo, hi in self._ranges or self.iova_ranges:
            if lo <= iova and last <= hi:
                break
        else:
            raise _released(pin, vfio_error(errno.EINVAL, outside_ranges(iova, size, self.iova_ranges),
                                            "VFIO_IOMMU_MAP_DMA"))
        flags = (_READ if readable else 0) | (_WRITE if writable else 0)
        if lib.pykvm_vfio_map_dma(self._fd, flags, pin, iova, size) < 0:
            err = ffi.errno
            raise _released(pin, vfio_error(err, self._map_explanation(err, int(ffi.cast("uintptr_t", pin)), iova,
                                                                       size), "VFIO_IOMMU_MAP_DMA"))
        mapping = self._mappings[iova] = DmaMapping(self, buffer, pin, iova, size, readable, writable)
        return mapping

    def map_dma_batch(self, buffer: Any, iovas: ArrayLike, sizes: ArrayLike, offsets: Optional[ArrayLike] = None,
                      readable: bool = True, writable: bool = True) -> DmaBatch:
        """Map ``buffer[offsets[i]:offsets[i] + sizes[i]]`` at ``iovas[i]`` for every i, the
        VFIO_IOMMU_MAP_DMA ioctls issued from C; returns one :class:`DmaBatch` to unmap them all.

        ``iovas``/``sizes``/``offsets`` are integer sequences or numpy arrays; ``sizes`` may be
        one number for all entries, and without ``offsets`` the entries lie back to back from
        the buffer's start (``map_dma_batch(buf, iovas, 4096)`` maps page i of ``buf`` at
        ``iovas[i]``). All or nothing: if the kernel refuses entry k, entries 0..k-1 are
        unmapped again and the VfioError (its ``entry`` attribute is k) says why.
        """
        from pykvm.vfio.dma_batch import DmaBatch, batch_arrays, check_batch

        if self._iommu_type is None or self._fd < 0:  # closed: ClosedError (its IOMMU may outlive the fd)
            self._need_iommu("VFIO_IOMMU_MAP_DMA")
        pin = ffi.from_buffer("char[]", buffer, writable)
        try:
            offsets_, iovas_, sizes_ = batch_arrays(iovas, sizes, offsets)
            check_batch(len(pin), offsets_, iovas_, sizes_, self._ranges or self.iova_ranges)
            self._map_batch(pin, offsets_, iovas_, sizes_, (_READ if readable else 0) | (_WRITE if writable else 0))
        except BaseException as exc:
            raise _released(pin, exc)
        batch = DmaBatch(self, buffer, pin, offsets_, iovas_, sizes_, readable, writable)
        self._batches[batch] = None
        return batch

    def _map_batch(self, pin: Any, offsets: np.ndarray, iovas: np.ndarray, sizes: np.ndarray, flags: int) -> None:
        """Map every entry in C; if entry k fails, unmap 0..k-1 (in C) and raise why k failed."""
        from pykvm.vfio.dma_batch import u64_pointer

        p_iovas, p_sizes, n = u64_pointer(iovas), u64_pointer(sizes), len(iovas)
        done = lib.pykvm_vfio_map_dma_batch(self._fd, flags, pin, u64_pointer(offsets), p_iovas, p_sizes, n)
        if done == n:
            return
        err = ffi.errno
        iova, size = int(iovas[done]), int(sizes[done])
        why = self._map_explanation(err, int(ffi.cast("uintptr_t", pin)) + int(offsets[done]), iova, size)
        undone = lib.pykvm_vfio_unmap_dma_batch(self._fd, p_iovas, p_sizes, done)
        if undone < done:  # should not happen: these are whole mappings just made
            why += (f"; undoing entries 0..{done - 1} failed at entry {undone} ({os.strerror(ffi.errno)}): "
                    "close the container to drop every mapping")
        elif done:
            why += f"; entries 0..{done - 1}, mapped before it, were unmapped again"
        exc = vfio_error(err, f"batch entry {done} of {n}: {why}", "VFIO_IOMMU_MAP_DMA")
        exc.entry = done
        raise exc

    def _map_explanation(self, err: int, vaddr: int, iova: int, size: int) -> str:
        """What a failed VFIO_IOMMU_MAP_DMA of ``[iova, iova+size)`` from ``vaddr`` means, and what to do."""
        if err == errno.EINVAL and ((vaddr | iova | size) & (mmap.PAGESIZE - 1) or not size):
            return (f"map_dma needs page-aligned vaddr ({vaddr:#x}), iova ({iova:#x}) and a non-zero page-multiple "
                    f"size ({size:#x}); allocate buffers with mmap (or DmaAllocator)")
        if err == errno.EEXIST:
            clash = [(m.iova, m.iova + m.size) for m in self._mappings.values()
                     if m.iova < iova + size and iova < m.iova + m.size]
            clash += [entry for b in self._batches for entry in b.overlapping(iova, size)]
            what = ", ".join(f"[{lo:#x}, {hi:#x})" for lo, hi in sorted(clash)) or "a mapping made elsewhere"
            return f"IOVA [{iova:#x}, {iova + size:#x}) overlaps {what}: unmap it first or pick another IOVA"
        if err == errno.ENOSPC:
            return "the kernel's limit on DMA mappings is reached (vfio_iommu_type1 dma_entry_limit)"
        if err == errno.ENOMEM:
            return "cannot pin the pages: RLIMIT_MEMLOCK too low (raise `ulimit -l`) or out of memory"
        return os.strerror(err)

    def _unmap_batch(self, batch: DmaBatch) -> None:
        """Unmap a batch's live entries in C; the batch is forgotten even if one fails."""
        from pykvm.vfio.dma_batch import u64_pointer

        self.fileno()  # closed: ClosedError, and the batch stays recorded as the kernel keeps it
        iovas, sizes = batch.live_arrays()
        failed = lib.pykvm_vfio_unmap_dma_batch(self._fd, u64_pointer(iovas), u64_pointer(sizes), len(iovas))
        err = ffi.errno
        self._batches.pop(batch, None)
        batch._forget()
        if failed < len(iovas):
            iova, size = int(iovas[failed]), int(sizes[failed])
            raise vfio_error(err, f"unmap of batch entry [{iova:#x}, {iova + size:#x}) failed: {os.strerror(err)} "
                                  "(the other entries were unmapped)", "VFIO_IOMMU_UNMAP_DMA")

    def unmap_dma(self, iova: int, size: int) -> int:
        """Unmap every mapping inside ``[iova, iova+size)``; returns the bytes the kernel unmapped.

        Unmapping nothing is an error (FileNotFoundError), as is cutting a mapping in two.
        """
        if self._iommu_type is None or self._fd < 0:  # closed: ClosedError (its IOMMU may outlive the fd)
            self._need_iommu("VFIO_IOMMU_UNMAP_DMA")
        done = lib.pykvm_vfio_unmap_dma(self._fd, iova, size)
        if done < 0:
            err = ffi.errno
            hint = ""
            if err == errno.EINVAL:
                if (iova | size) & (mmap.PAGESIZE - 1) or not size:
                    hint = f" (unmap_dma needs a page-aligned iova and a non-zero page-multiple size ({size:#x}))"
                else:
                    hint = " (the range cuts a mapping in two: unmap whole mappings)"
            raise vfio_error(err, f"unmap of [{iova:#x}, {iova + size:#x}) failed: {os.strerror(err)}{hint}",
                             "VFIO_IOMMU_UNMAP_DMA")
        mapping = self._mappings.get(iova)
        if mapping is not None and mapping.size == size:  # the usual case: one whole mapping
            del self._mappings[iova]
            mapping._pin = mapping.buffer = None
        else:
            for m in [m for m in self._mappings.values() if iova <= m.iova and m.iova + m.size <= iova + size]:
                del self._mappings[m.iova]
                m._forget()
            for b in list(self._batches):
                b._drop_inside(iova, size)
                if not b.mapped:
                    del self._batches[b]
        if not done:
            raise vfio_error(errno.ENOENT, f"nothing is mapped in [{iova:#x}, {iova + size:#x})",
                             "VFIO_IOMMU_UNMAP_DMA")
        return done

    # -- dirty page tracking -----------------------------------------------
    @property
    def dirty_tracking(self) -> bool:
        """Whether :meth:`start_dirty_tracking` is in force."""
        return self._dirty_tracking

    def start_dirty_tracking(self) -> None:
        """VFIO_IOMMU_DIRTY_PAGES with START: the IOMMU driver logs the pages devices may write,
        in every mapping, present and future, so a migration can copy them again."""
        self._dirty_pages(lib.VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
        self._dirty_tracking = True

    def stop_dirty_tracking(self) -> None:
        """VFIO_IOMMU_DIRTY_PAGES with STOP: the kernel stops logging and frees its bitmaps."""
        self._dirty_pages(lib.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP)
        self._dirty_tracking = False

    def dirty_bitmap(self, iova: int, size: int) -> DirtyBitmap:
        """VFIO_IOMMU_DIRTY_PAGES with GET_BITMAP: the pages of ``[iova, iova+size)`` written
        since the last call (or START), at the IOMMU's smallest page size, the only one the
        kernel reports. The range must not cut a mapping in two. Mapped pages read right;
        Linux 6.1 may mark unmapped ones: a mapping that sat at an offset not a multiple of
        64 pages in an earlier answer leaves bits past its end in later ones."""
        op = "VFIO_IOMMU_DIRTY_PAGES"
        self._need_iommu(op)
        migration = self._group_info().migration
        if migration is None:
            raise vfio_error(errno.ENOTTY, "this IOMMU backend reports no dirty pages (no migration capability)", op)
        pgsize = migration.pgsize_bitmap & -migration.pgsize_bitmap
        npages = size // pgsize
        nbytes = bitmap_bytes(npages)
        if nbytes > migration.max_dirty_bitmap_size:
            raise vfio_error(errno.EINVAL, f"[{iova:#x}, {iova + size:#x}) needs a bitmap over the kernel's limit of "
                                           f"{migration.max_dirty_bitmap_size:#x} bytes: ask in parts", op)
        words = ffi.new("__u64[]", nbytes // 8)

        def setup(get: Any) -> None:
            get.iova, get.size = iova, size
            get.bitmap.pgsize, get.bitmap.size, get.bitmap.data = pgsize, nbytes, words

        try:
            self._dirty_pages(lib.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, setup)
        except VfioError as exc:
            if exc.errno != errno.EINVAL:
                raise
            why = (f"[{iova:#x}, {iova + size:#x}) must be a non-empty range aligned to {pgsize:#x} that cuts no "
                   "mapping in two" if self._dirty_tracking else "dirty tracking is off: start_dirty_tracking() first")
            raise vfio_error(errno.EINVAL, why, op) from None
        return DirtyBitmap(iova, pgsize, npages, bytes(ffi.buffer(words)))

    def _dirty_pages(self, flag: int, setup: Optional[Callable[[Any], None]] = None) -> None:
        """Issue VFIO_IOMMU_DIRTY_PAGES; ``setup`` fills the GET_BITMAP range that follows the header."""
        self._need_iommu("VFIO_IOMMU_DIRTY_PAGES")
        ctype, get = "struct vfio_iommu_type1_dirty_bitmap", "struct vfio_iommu_type1_dirty_bitmap_get"
        raw = bytearray(ffi.offsetof(ctype, "data") + (ffi.sizeof(get) if setup else 0))
        arg = ffi.from_buffer(ctype + " *", raw)
        arg.argsz, arg.flags = len(raw), flag
        if setup:
            setup(ffi.cast(get + " *", arg.data))
        self._ioctl("VFIO_IOMMU_DIRTY_PAGES", arg)

    # -- groups ------------------------------------------------------------
    def _attach(self, group: "Group") -> None:
        self._groups.append(group)
        self._children.add(group)
        self._forget_info()

    def _detach(self, group: "Group") -> None:
        """A group left. The last one leaving makes the kernel drop the IOMMU and all mappings."""
        if group in self._groups:
            self._groups.remove(group)
            self._children.discard(group)
        self._forget_info()
        if not self._groups:
            self._drop_iommu()

    def _drop_iommu(self) -> None:
        for m in [*self._mappings.values(), *self._batches]:
            m._forget()
        self._mappings.clear()
        self._batches.clear()
        self._iommu_type = None
        self._dirty_tracking = False

    def close(self) -> None:
        """Stop dirty tracking while the IOMMU still exists (the last group leaving releases
        it), then close the groups and the container."""
        try:
            if self._dirty_tracking:
                self.stop_dirty_tracking()
        finally:
            super().close()

    def _release(self) -> None:
        # Groups (children) are closed by now and have left, so the kernel has unmapped
        # everything, unless a group's device region is still mapped: that group stays in the
        # kernel's container, which outlives this fd with its IOMMU and mappings until the
        # group leaves (at munmap); its _detach drops the records then.
        if not self._groups:
            self._drop_iommu()
