"""Direct boot's kernel: the vmlinux inside a bzImage, decompressed once and kept on disk.

Decompressing Debian's kernel (66 MB of xz) is most of a boot when the guest does it under
nested virtualization, and still a few hundred milliseconds in the VMM: so the ELF is kept
in ``$XDG_CACHE_HOME/pykvm/kernels`` (``~/.cache/...``; ``PYKVM_KERNEL_CACHE`` overrides),
under a name made of the bzImage's real path, size, inode and modification and change times (a kernel
rebuilt or replaced in place gets a new entry; the old one for that path is removed), at
most :data:`MAX_ENTRIES` of them, the most recently used.

The cached file is a plain ELF vmlinux (``pykvm run --kernel`` and QEMU boot it too) written
sparse: pages of zeros are holes. Loading asks the file system where the data is
(``SEEK_DATA``/``SEEK_HOLE``) and copies only that into guest RAM, which is fresh and
zero-filled: half of Debian's kernel image is zero pages (.bss and friends). An entry is
written to a temporary name and renamed, so a crash leaves no half file under the real name.
Without a writable cache the kernel is decompressed on every boot.
"""
from __future__ import annotations

import errno
import mmap
import os
import zlib
from typing import List, NamedTuple, Optional, Tuple, Union

from pykvm._log import get_logger

from .bzimage import BzImage
from .elf import ElfKernel, parse_elf
from .payload import extract_vmlinux

log = get_logger(__name__)
PAGE = 4096
MAX_ENTRIES = 8  # kernels kept (~30 MB on disk each for a distribution kernel), the most recently used
Extent = Tuple[int, int]  # (file offset, length) of bytes that may be non-zero
PathLike = Union[str, "os.PathLike[str]"]


class DirectKernel(NamedTuple):
    """A vmlinux ready to load: the file's bytes, where its data is, and where it came from."""

    image: "bytes | mmap.mmap"
    elf: ElfKernel
    extents: Optional[List[Extent]]  # None: all of the file may hold data
    path: Optional[str]  # the cache entry, None when nothing could be cached
    extracted: bool  # decompressed by this call (a cache miss)


def cache_dir() -> str:
    """The cache directory (paths are strings here: pathlib costs ~60 ms of start-up in L1)."""
    if os.environ.get("PYKVM_KERNEL_CACHE"):
        return os.environ["PYKVM_KERNEL_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pykvm", "kernels")


def entry_name(bzimage_path: str, st: Optional[os.stat_result] = None) -> Tuple[str, str]:
    """(prefix, file name) of the cache entry for the bzImage at ``bzimage_path``: the prefix
    names the path, the rest the file's identity (size, inode, mtime, and ctime, which no one
    can set: ``cp -p`` over the file in place keeps size, inode and mtime), from ``st`` (the
    status of the file whose bytes are at hand: the path may name another file by now) or
    else from the file the path names now."""
    real = os.path.realpath(bzimage_path)
    st = os.stat(real) if st is None else st
    raw = os.fsencode(real)
    prefix = f"{zlib.crc32(raw):08x}{zlib.adler32(raw):08x}"  # (hashlib costs ~40 ms of start-up in L1)
    return prefix, f"{prefix}-{st.st_size}-{st.st_dev}-{st.st_ino}-{st.st_mtime_ns}-{st.st_ctime_ns}.vmlinux"


def direct_kernel(bzimage_path: str, bz: BzImage, directory: Optional[PathLike] = None,
                  st: Optional[os.stat_result] = None) -> DirectKernel:
    """The vmlinux of ``bz`` (read from ``bzimage_path``, whose status when opened was ``st``):
    from the cache, or decompressed and cached now. BootImageError when the payload is not a
    kernel this can decompress."""
    directory = cache_dir() if directory is None else os.fspath(directory)
    prefix, name = entry_name(bzimage_path, st)
    path = os.path.join(directory, name)
    try:
        return load(path)
    except (OSError, ValueError):  # no entry yet (or an unreadable one): make it
        pass
    vmlinux = extract_vmlinux(bz)
    try:
        extents = store(vmlinux.image, path, prefix)
    except OSError as exc:
        log.warning("pykvm: cannot cache the decompressed kernel in %s (%s): it is decompressed again on every "
                    "boot (set PYKVM_KERNEL_CACHE to a writable directory with room for it)", directory, exc.strerror)
        return DirectKernel(vmlinux.image, vmlinux.elf, None, None, True)
    return DirectKernel(vmlinux.image, vmlinux.elf, extents, path, True)


def load(path: str) -> DirectKernel:
    """A cached vmlinux, mapped read-only (its pages come from the page cache, not copied)."""
    with open(path, "rb") as f:
        image = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            extents = _extents(f.fileno(), len(image))
            elf = parse_elf(image)
        except BaseException:
            image.close()
            raise
    try:
        os.utime(path)  # its mtime is its last use: the most recently used entries are kept
    except OSError:
        pass
    return DirectKernel(image, elf, extents, path, False)


def store(image: bytes, path: str, prefix: str) -> Optional[List[Extent]]:
    """Write ``image`` to ``path`` with its zero pages as holes, durably and atomically (a new
    file, synced, then renamed), and remove the other entries for the same bzImage path
    (``prefix``). Returns the entry's data extents, as :func:`load` would find them."""
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    zero = bytes(PAGE)
    view = memoryview(image)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with open(fd, "wb") as f:
            for off in range(0, len(image), PAGE):
                page = view[off:off + PAGE]
                if page != zero[:len(page)]:
                    f.seek(off)
                    f.write(page)
            f.truncate(len(image))
            f.flush()
            os.fsync(fd)  # a rename to a new name is not ordered after the data by every file system
            extents = _extents(fd, len(image))
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _prune(directory, prefix, name)
    return extents


def _prune(directory: str, prefix: str, keep: str) -> None:
    """Remove the other entries for this bzImage path (``prefix``) and all but the
    :data:`MAX_ENTRIES` most recently used ones; entries another process removes first are fine."""
    others = []
    for old in os.listdir(directory):
        if not old.endswith(".vmlinux") or old == keep:
            continue
        path = os.path.join(directory, old)
        try:
            if old.startswith(f"{prefix}-"):
                os.unlink(path)
            else:
                others.append((os.stat(path).st_mtime_ns, path))
        except OSError:
            pass
    for _, path in sorted(others, reverse=True)[MAX_ENTRIES - 1:]:
        try:
            os.unlink(path)
        except OSError:
            pass


def _extents(fd: int, size: int) -> Optional[List[Extent]]:
    """The file's data ranges from SEEK_DATA/SEEK_HOLE; None where the file system cannot say."""
    extents: List[Extent] = []
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                break
            return None  # EINVAL: no hole support here
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, min(end, size) - start))
        pos = end
    return extents
