"""``DirtyRing``: one vCPU's ring of dirtied guest pages (KVM_CAP_DIRTY_LOG_RING).

With ``Vm.enable_dirty_ring`` KVM logs each first write to a page of a LOG_DIRTY_PAGES slot
as a ``struct kvm_dirty_gfn`` in the writing vCPU's ring instead of in the slot's bitmap, so
user space reads only the pages written, not a bitmap of every page. User space harvests
entries in ring order, marks each one RESET, and ``Vm.reset_dirty_rings()`` lets KVM reuse
them and write-protect those pages again. A ring close to full stops its vCPU with
``DirtyRingFullExit`` until that is done.
"""
from __future__ import annotations

import mmap
import os
from typing import TYPE_CHECKING, Any, List, NamedTuple, Optional

from pykvm._fdobject import FdObject
from pykvm._native import ffi, lib
from pykvm.errors import KvmError
from pykvm.memory import PAGE_SIZE

if TYPE_CHECKING:
    from pykvm.kvm.vcpu import Vcpu


class DirtyPage(NamedTuple):
    """A page written since its last reset: page ``offset`` within memslot ``slot`` (bits 16
    and up of ``slot`` hold the address space, 1 for SMM)."""

    slot: int
    offset: int


class DirtyRing(FdObject):
    """The ring mapped from page KVM_DIRTY_LOG_PAGE_OFFSET of a vCPU fd. Made by
    ``Vcpu.dirty_ring()``; it owns a duplicate of the vCPU fd so that, as the vCPU's child,
    it is unmapped before the vCPU is closed."""

    _error_family = KvmError
    _what = "DirtyRing"

    def __init__(self, vcpu: "Vcpu"):
        size = vcpu.vm.dirty_ring_size
        if not size:
            raise RuntimeError("the VM has no dirty ring: call Vm.enable_dirty_ring() before creating vCPUs")
        super().__init__(os.dup(vcpu.fileno()), vcpu)
        self._gfns: Any = None
        self._mm: Optional[mmap.mmap] = None
        try:
            self._mm = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                 offset=lib.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
        except BaseException:
            self.close()
            raise
        self._gfns = ffi.from_buffer("struct kvm_dirty_gfn[]", self._mm)
        self._fetch = 0  # free-running index of the next entry to harvest

    def harvest(self) -> List[DirtyPage]:
        """The pages KVM logged since the last harvest, in ring order; each entry is marked
        KVM_DIRTY_GFN_F_RESET for the next ``Vm.reset_dirty_rings()``."""
        self.fileno()
        gfns, out = self._gfns, []
        while True:
            e = gfns[self._fetch % len(gfns)]
            if not e.flags & lib.KVM_DIRTY_GFN_F_DIRTY:
                return out
            out.append(DirtyPage(e.slot, e.offset))
            e.flags = lib.KVM_DIRTY_GFN_F_RESET
            self._fetch += 1

    def _release(self) -> None:
        if self._gfns is not None:
            ffi.release(self._gfns)
            self._gfns = None
        if self._mm is not None:
            self._mm.close()
            self._mm = None
