"""A host PCI function given to the guest through VFIO: :class:`VfioPciDevice`.

What the guest touches, and where it goes:

- **Configuration space** is virtual. It starts as a copy of what vfio-pci shows
  (IDs, class, capability list), with BARs sized from VFIO's region info (not
  from the hardware registers), the expansion ROM hidden, and MSI/MSI-X emulated
  by :mod:`msi`/:mod:`msix`. Bytes of the other capabilities (PCIe, PM, ...) are
  read and written on the device, where vfio-pci filters them again. Of the
  command register only memory/IO decode, bus master and INTx disable reach the
  device (vfio-pci masks INTx on the last), and of the status register only the
  interrupt bit is read from it (guests that mask INTx poll it); BAR writes never
  reach the device.
- **BARs** are mmap'd once from the device fd and shown to the guest as KVM
  memory slots wherever the guest (or the VMM, firmware-like) places them, so
  the guest's MMIO runs at native speed. Only what cannot be mapped traps:
  regions or parts that VFIO does not let us mmap, and the pages that hold the
  MSI-X table and PBA (their contents are emulated). Trapped accesses reach the
  device by pread/pwrite on the region. An access past the region's end (the
  BAR the guest sees is rounded up to a power of two) or one the device fails
  (EIO) is answered as on real hardware: a read gives all ones, a write is
  dropped; the first few are logged, all are counted in ``bar_faults``.
- **DMA**: every byte of guest RAM is mapped in the IOMMU at IOVA = guest
  physical address, so the guest driver programs guest addresses and the
  device reaches exactly guest RAM, nothing else.
- **Interrupts** never pass through Python: each vector the guest enables gets
  an eventfd that vfio-pci signals (VFIO_DEVICE_SET_IRQS) and that KVM consumes
  (irqfd) on a GSI whose route is the guest's MSI message. Routes are made when
  the guest unmasks a vector and rewritten when it changes address/data; a
  masked vector keeps its eventfd, so an interrupt that arrives meanwhile is
  delivered when it is unmasked. Devices without MSI use INTx: a level-triggered
  irqfd on the slot's IOAPIC pin whose resample eventfd lets vfio-pci unmask
  the line after the guest's EOI.

:class:`VfioContext` is the per-VM part all passed-through devices share: one
container (guest RAM pinned and mapped once), the KVM-VFIO device (it tells
KVM which groups the VM uses, e.g. for coherent DMA) and the open groups.
"""
from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from pykvm._log import get_logger
from pykvm.errors import PykvmError
from pykvm.kvm.vm import Vm
from pykvm.memory import GuestMemory
from pykvm.vfio import Container, Device, EventFd, Group, lib
from pykvm.vfio.regions import Mmio, Region
from pykvm.vmm.pci.bus import PciFunction
from pykvm.vmm.pci.config import (
    ALL_ONES, BAR_MEM_TYPE_64, BAR_MEM_PREFETCH, BAR_SPACE_IO, BASE_ADDRESS_0, CAP_ID_MSI, CAP_ID_MSIX, COMMAND,
    COMMAND_INTX_DISABLE, COMMAND_IO, COMMAND_MASTER, COMMAND_MEMORY, CONFIG_SIZE, HEADER_SIZE, HEADER_TYPE,
    INTERRUPT_LINE, INTERRUPT_PIN, NUM_BARS, STATUS, STATUS_CAP_LIST, STATUS_INTERRUPT, BarKind, BarSpec, BarWindow,
    ConfigSpace,
)
from pykvm.vmm.pci.gsi import GsiRouter
from pykvm.vmm.pci.msi import MsiCap, Vectors
from pykvm.vmm.pci.msix import Msix
from pykvm.vmm.pci.preflight import PassthroughError, Target, preflight

__all__ = ["VfioPciDevice", "VfioContext", "PassthroughError"]

log = get_logger(__name__)

PAGE = mmap.PAGESIZE
INTX, MSI, MSIX = lib.VFIO_PCI_INTX_IRQ_INDEX, lib.VFIO_PCI_MSI_IRQ_INDEX, lib.VFIO_PCI_MSIX_IRQ_INDEX
CONFIG_REGION = lib.VFIO_PCI_CONFIG_REGION_INDEX
DEVICE_COMMAND_BITS = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE  # what the device sees
HEADER_TYPE_MULTIFUNCTION = 0x80
BIST = 0x0F
BAR_FAULT_LOG_LIMIT = 5  # trapped BAR accesses that failed and are logged; later ones are only counted


class VfioContext:
    """The VFIO state of one VM: a container with all guest RAM mapped (IOVA = GPA),
    the VM's KVM-VFIO device, and its open groups (shared by devices of one group)."""

    def __init__(self, vm: Vm, memory: GuestMemory):
        self.vm = vm
        self.memory = memory
        self.container: Optional[Container] = None
        self.kvm_device = None
        self.groups: Dict[int, Group] = {}
        self._users: Dict[int, int] = {}
        self.dma: list = []

    def acquire(self, number: int) -> Group:
        """Open group ``number`` (or share it), join the container, map RAM on first use."""
        if number in self.groups:
            self._users[number] += 1
            return self.groups[number]
        if self.container is None:
            self.container = Container()
        group = Group(number)
        try:
            group.set_container(self.container)
            if self.container.iommu_type is None:
                self.container.set_iommu()
                self.dma = [self.container.map_dma(r.buffer, r.gpa, r.size, writable=not r.readonly)
                            for r in self.memory]
                warn_small_pages(self.memory)
            if self.kvm_device is None:
                self.kvm_device = self.vm.create_device(lib.KVM_DEV_TYPE_VFIO)
            self.kvm_device.vfio_group_add(group.fileno())
        except BaseException:
            group.close()
            if not self.groups:
                self.close()
            raise
        self.groups[number] = group
        self._users[number] = 1
        return group

    def release(self, number: int) -> None:
        """One user of group ``number`` is done; the last one closes it (and the context when empty)."""
        if number not in self._users:  # the context was closed first
            return
        self._users[number] -= 1
        if self._users[number]:
            return
        group = self.groups.pop(number)
        del self._users[number]
        if self.kvm_device is not None and not self.kvm_device.closed:
            try:
                self.kvm_device.vfio_group_del(group.fileno())
            except PykvmError as exc:
                log.warning("KVM-VFIO: removing group %d failed: %s", number, exc)
        if not self.groups:
            self.close()
        group.close()

    def close(self) -> None:
        """Unmap guest RAM from the IOMMU and close everything (idempotent)."""
        for m in self.dma:
            try:
                m.unmap()
            except PykvmError as exc:
                log.warning("DMA unmap of [%#x, %#x) failed: %s", m.iova, m.iova + m.size, exc)
        self.dma = []
        for group in list(self.groups.values()):
            group.close()
        self.groups.clear()
        self._users.clear()
        if self.kvm_device is not None:
            self.kvm_device.close()
            self.kvm_device = None
        if self.container is not None:
            self.container.close()
            self.container = None


def warn_small_pages(memory: GuestMemory) -> None:
    """Log a warning for guest RAM that is not on huge pages once pinned for DMA.

    VFIO pins the pages (faulting them in) and the IOMMU driver maps each physically
    contiguous, aligned 2 MiB run with one superpage entry; 4 KiB pages cost an IOMMU
    page-table entry (and an IOTLB entry) per 4 KiB of DMA, and KVM's nested page tables
    use 4 KiB entries for them too. In the lab (bench/README.md, passthrough_dma.py
    --l1-thp never) guest RAM on 4 KiB pages read the NVMe 14-15% slower in interleaved
    pairs of runs, a difference close to the lab's run-to-run noise."""
    for r in memory:
        huge = r.huge_page_bytes()
        if huge < r.size:
            log.warning("guest RAM [%#x, %#x): %d of %d MiB on huge pages, the rest on 4 KiB pages (slower DMA "
                        "and guest memory access): enable transparent huge pages (echo madvise > "
                        "/sys/kernel/mm/transparent_hugepage/enabled) and make sure memory is free for them",
                        r.gpa, r.end, huge >> 20, r.size >> 20)


@dataclass
class _Piece:
    """A page-aligned part of a BAR that is mapped into the guest as a memslot."""

    offset: int  # in the BAR
    size: int
    view: memoryview  # host memory of the device's mmap'd BAR


class VfioPciDevice(PciFunction):
    """A passed-through function; make it with :meth:`open`, put it on a PciBus, :meth:`close` it at the end."""

    def __init__(self, device: Device, target: Target, vm: Vm, gsi_router: GsiRouter, context: VfioContext):
        self.device = device
        self.target = target
        self.name = f"vfio-{target.bdf}"
        self.vm = vm
        self.router = gsi_router
        self.context = context
        self.msi: Optional[MsiCap] = None
        self.msix: Optional[Msix] = None
        self.regions: Dict[int, Region] = {}
        self._mmios: List[Mmio] = []
        self._pieces: Dict[int, List[_Piece]] = {}
        self._slots: Dict[int, List[int]] = {}
        self._passthrough = bytearray(CONFIG_SIZE)  # 1: the byte lives on the device
        self._irq_lock = threading.RLock()
        self._active: Optional[int] = None  # the VFIO interrupt index enabled now
        self._fds: List[EventFd] = []
        self._gsis: List[Optional[int]] = []
        self._attached: List[bool] = []
        self._intx_gsi: Optional[int] = None
        self._intx: Optional[Tuple[EventFd, EventFd]] = None
        self.bar_faults = 0  # trapped BAR accesses past a region's end or failed by the device
        self.closed = False
        super().__init__(self._build_config())
        self._map_bars()

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, device: str, *, vm: Vm, memory: GuestMemory, gsi_router: GsiRouter,
             context: Optional[VfioContext] = None, sysfs: str = "/sys", reset: bool = True) -> "VfioPciDevice":
        """Check, open and set up ``device`` (a PCI address or its sysfs directory).

        Raises :class:`PassthroughError` (with the fix) before touching anything when a
        check fails; any later failure undoes what was done. Pass one ``context`` to
        every device of a VM (the default makes a private one: fine for one device).
        """
        target = preflight(device, memory.size, sysfs)
        context = context or VfioContext(vm, memory)
        group = context.acquire(target.group)
        try:
            vdev = group.get_device(target.bdf)
        except BaseException:
            context.release(target.group)
            raise
        try:
            if not vdev.info.is_pci:
                raise PassthroughError(f"{target.bdf} is not a PCI device to VFIO (flags {vdev.info.flags:#x})")
            if reset and vdev.info.can_reset:
                vdev.reset()
            return cls(vdev, target, vm, gsi_router, context)
        except BaseException:
            vdev.close()
            context.release(target.group)
            raise

    def _build_config(self) -> ConfigSpace:
        """The guest's view of the config space, from the device's (as vfio-pci shows it)."""
        real = self.device.region(CONFIG_REGION).read(0, CONFIG_SIZE)
        c = ConfigSpace(CONFIG_SIZE, real)
        c.set(COMMAND, 2, 0)
        c.set(STATUS, 2, c.get(STATUS, 2) & STATUS_CAP_LIST)
        c.set(HEADER_TYPE, 1, c.get(HEADER_TYPE, 1) & ~HEADER_TYPE_MULTIFUNCTION)  # only function 0 is shown
        c.set(BIST, 1, 0)
        c.set(INTERRUPT_LINE, 1, 0)
        for i in range(NUM_BARS):
            c.set(BASE_ADDRESS_0 + 4 * i, 4, 0)
        index = 0
        while index < NUM_BARS:
            flags = int.from_bytes(real[BASE_ADDRESS_0 + 4 * index:BASE_ADDRESS_0 + 4 * index + 4], "little")
            spec = self._bar_spec(index, flags)
            if spec is not None:
                c.set_bar(index, spec)
                self.regions[index] = self.device.region(lib.VFIO_PCI_BAR0_REGION_INDEX + index)
            index += 2 if spec is not None and spec.kind is BarKind.MEM64 else 1
        c.set_rom(0)  # hidden: Linux does not need option ROMs, and they are firmware from the host
        if self.device.irq_info(INTX).count == 0:
            c.set(INTERRUPT_PIN, 1, 0)
        self._passthrough[HEADER_SIZE:] = b"\x01" * (CONFIG_SIZE - HEADER_SIZE)
        for cap_id, offset in c.capabilities():
            if cap_id == CAP_ID_MSI and self.msi is None:
                self.msi = MsiCap(c, offset, lambda: self._irqs_changed(MSI))
                self._passthrough[offset:offset + self.msi.length] = bytes(self.msi.length)
            elif cap_id == CAP_ID_MSIX and self.msix is None:
                self.msix = Msix(c, offset, lambda: self._irqs_changed(MSIX))
                self._passthrough[offset:offset + 12] = bytes(12)
        if self.msix is not None and not {self.msix.table_bar, self.msix.pba_bar} <= set(c.bars):
            log.warning("%s: MSI-X table/PBA in a BAR the device does not have; MSI-X hidden", self.target.bdf)
            self._passthrough[self.msix.offset:self.msix.offset + 12] = b"\x01" * 12
            self.msix = None
        return c

    def _bar_spec(self, index: int, flags: int) -> Optional[BarSpec]:
        """What BAR ``index`` is: type from the register's low bits, size from VFIO's region info."""
        region = self.device.region(lib.VFIO_PCI_BAR0_REGION_INDEX + index)
        if region.size == 0:
            return None
        size = 1 << (region.size - 1).bit_length()
        if flags & BAR_SPACE_IO:
            kind, prefetch, size = BarKind.IO, False, max(size, 4)
        else:
            kind = BarKind.MEM64 if flags & 0x6 == BAR_MEM_TYPE_64 and index < NUM_BARS - 1 else BarKind.MEM32
            prefetch, size = bool(flags & BAR_MEM_PREFETCH), max(size, 16)
        try:
            return BarSpec(size, kind, prefetch)
        except ValueError as exc:
            log.warning("%s: BAR%d not shown: %s", self.target.bdf, index, exc)
            return None

    def _trapped(self, index: int) -> List[Tuple[int, int]]:
        """Page ranges of BAR ``index`` that must trap: the MSI-X table and PBA."""
        out = []
        m = self.msix
        if m is not None:
            for bar, off, size in ((m.table_bar, m.table_offset, m.table_size), (m.pba_bar, m.pba_offset, m.pba_size)):
                if bar == index:
                    out.append((off // PAGE * PAGE, -(-(off + size) // PAGE) * PAGE))
        return out

    def _map_bars(self) -> None:
        """mmap every mappable area of every BAR and cut it into memslot pieces around the MSI-X pages."""
        try:
            self._map_bar_areas()
        except BaseException:
            self._unmap_bars()
            raise

    def _unmap_bars(self) -> None:
        for pieces in self._pieces.values():
            for p in pieces:
                p.view.release()
        self._pieces.clear()
        for mmio in self._mmios:
            mmio.close()
        self._mmios.clear()

    def _map_bar_areas(self) -> None:
        for index, region in self.regions.items():
            spec = self.config.bars[index]
            if spec.kind is BarKind.IO or spec.size < PAGE:
                continue
            pieces = []
            for area in region.info.mmap_areas():
                start = -(-area.offset // PAGE) * PAGE
                end = min(area.offset + area.size, spec.size) // PAGE * PAGE
                if start >= end:
                    continue
                mmio = region.mmap(start, end - start)
                self._mmios.append(mmio)
                cuts = [(start, end)]
                for t0, t1 in self._trapped(index):
                    cuts = [(a, b) for s, e in cuts for a, b in ((s, min(e, t0)), (max(s, t1), e)) if a < b]
                pieces += [_Piece(a, b - a, mmio.view[a - start:b - start]) for a, b in cuts]
            self._pieces[index] = pieces

    # -- configuration space -------------------------------------------------------------
    def _device_config(self) -> Region:
        return self.device.region(CONFIG_REGION)

    def config_read(self, offset: int, size: int) -> int:
        if self.closed or not self.config.valid(offset, size):
            return (1 << 8 * size) - 1 if 0 < size <= 4 else ALL_ONES
        live = self._passthrough[offset:offset + size]
        if not any(live):
            value = self.config.read(offset, size)
            if offset <= STATUS < offset + size:
                value |= self._device_interrupt_status() << 8 * (STATUS - offset)
            return value
        try:
            real = self._device_config().read(offset, size)
        except (OSError, ValueError) as exc:
            log.warning("%s: config read %#x/%d failed: %s", self.target.bdf, offset, size, exc)
            return (1 << 8 * size) - 1
        virt = self.config.get(offset, size).to_bytes(size, "little")
        return int.from_bytes(bytes(r if p else v for r, v, p in zip(real, virt, live)), "little")

    def _device_interrupt_status(self) -> int:
        """STATUS_INTERRUPT if the device asserts INTx now (also while vfio-pci masks it), else 0."""
        try:
            return int.from_bytes(self._device_config().read(STATUS, 1), "little") & STATUS_INTERRUPT
        except (OSError, ValueError) as exc:
            log.warning("%s: status read failed: %s", self.target.bdf, exc)
            return 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        if self.closed or not self.config.valid(offset, size):
            return
        old_command = self.config.get(COMMAND, 2)
        self.config.write(offset, size, value)
        data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        live = self._passthrough[offset:offset + size]
        try:
            i = 0
            while i < size:  # each run of device-backed bytes as one write
                if not live[i]:
                    i += 1
                    continue
                j = i
                while j < size and live[j]:
                    j += 1
                self._device_config().write(offset + i, data[i:j])
                i = j
            new_command = self.config.get(COMMAND, 2)
            if (old_command ^ new_command) & DEVICE_COMMAND_BITS:
                cfg = self._device_config()
                real = int.from_bytes(cfg.read(COMMAND, 2), "little")
                real = (real & ~DEVICE_COMMAND_BITS) | (new_command & DEVICE_COMMAND_BITS)
                cfg.write(COMMAND, real.to_bytes(2, "little"))
        except (OSError, ValueError) as exc:
            log.warning("%s: config write %#x/%d failed: %s", self.target.bdf, offset, size, exc)

    # -- BARs ----------------------------------------------------------------------------
    def bar_moved(self, index: int, old: Optional[BarWindow], new: Optional[BarWindow]) -> None:
        """Follow the guest: drop the BAR's memslots at ``old``, create them at ``new``."""
        for slot in self._slots.pop(index, []):
            self.vm.delete_memory_region(slot)
        if new is None or self.closed:
            return
        slots = []
        for p in self._pieces.get(index, []):
            slot = self.vm.free_slot()
            try:
                self.vm.set_user_memory_region(slot, new.address + p.offset, p.size, backing=p.view)
            except PykvmError as exc:  # e.g. overlapping RAM: the range keeps trapping, served by read/write
                log.warning("%s: BAR%d [%#x, %#x) not mapped, accesses will trap: %s", self.target.bdf, index,
                            new.address + p.offset, new.address + p.offset + p.size, exc)
                continue
            slots.append(slot)
        self._slots[index] = slots

    def memslots(self, index: int) -> List[int]:
        """The KVM memory slots that show BAR ``index`` now."""
        return list(self._slots.get(index, []))

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        m = self.msix
        if m is not None:
            if index == m.table_bar and m.table_offset <= offset < m.table_offset + m.table_size:
                return m.table_read(offset - m.table_offset, size)
            if index == m.pba_bar and m.pba_offset <= offset < m.pba_offset + m.pba_size:
                return m.pba_read(offset - m.pba_offset, size)
        region = self.regions.get(index)
        if self.closed or region is None:
            return b"\xff" * size
        if 0 <= offset and offset + size <= region.size:
            try:
                return region.read(offset, size)
            except (OSError, ValueError) as exc:
                self._bar_fault("read", index, offset, size, exc)
        else:
            self._bar_fault("read", index, offset, size, None)
        return b"\xff" * size  # what a read that no device answers returns

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        m = self.msix
        if m is not None:
            if index == m.table_bar and m.table_offset <= offset < m.table_offset + m.table_size:
                m.table_write(offset - m.table_offset, data)
                return
            if index == m.pba_bar and m.pba_offset <= offset < m.pba_offset + m.pba_size:
                return  # the PBA is read-only
        region = self.regions.get(index)
        if self.closed or region is None:
            return
        if 0 <= offset and offset + len(data) <= region.size:
            try:
                region.write(offset, data)
            except (OSError, ValueError) as exc:
                self._bar_fault("write", index, offset, len(data), exc)
        else:
            self._bar_fault("write", index, offset, len(data), None)  # dropped, as hardware would

    def _bar_fault(self, what: str, index: int, offset: int, size: int, exc: Optional[BaseException]) -> None:
        """Count a trapped BAR access that could not reach the device; log the first few
        (a guest can do this thousands of times a second)."""
        self.bar_faults += 1
        if self.bar_faults > BAR_FAULT_LOG_LIMIT:
            return
        why = f"failed: {exc}" if exc is not None else f"is past the end of region {index} ({self.regions[index].size:#x} bytes)"
        log.warning("%s: BAR%d %s of %d bytes at %#x %s%s", self.target.bdf, index, what, size, offset, why,
                    "; further faults are only counted (bar_faults)" if self.bar_faults == BAR_FAULT_LOG_LIMIT else "")

    # -- interrupts ----------------------------------------------------------------------
    def plugged(self, slot: int, intx_gsi: Optional[int]) -> None:
        self._intx_gsi = intx_gsi
        with self._irq_lock:
            if self._active is None:
                self._enable_intx()

    @property
    def interrupt_mode(self) -> str:
        """What vfio-pci delivers now: ``"none"``, ``"intx"``, ``"msi"`` or ``"msix"``."""
        return {None: "none", INTX: "intx", MSI: "msi", MSIX: "msix"}[self._active]

    def routed_vectors(self) -> Dict[int, int]:
        """Vector -> GSI for the MSI/MSI-X vectors whose irqfd is attached (unmasked) now."""
        with self._irq_lock:
            return {v: g for v, (g, on) in enumerate(zip(self._gsis, self._attached)) if on}

    def _irqs_changed(self, index: int) -> None:
        want = self.msi.vectors() if index == MSI else self.msix.vectors()
        try:
            self._reconcile(index, want)
        except (OSError, ValueError, RuntimeError) as exc:
            log.error("%s: setting up %s interrupts failed: %s", self.target.bdf,
                      "MSI" if index == MSI else "MSI-X", exc)

    def _reconcile(self, index: int, want: Vectors) -> None:
        """Make VFIO and KVM deliver exactly the vectors the guest enabled and unmasked."""
        with self._irq_lock:
            if self.closed:
                return
            if not want.enabled:
                if self._active == index:
                    self._disable_vectors()
                    self._enable_intx()
                return
            if self._active != index or len(self._fds) != want.count:
                if self._active == INTX:
                    self._disable_intx()
                elif self._active is not None:
                    self._disable_vectors()
                fds = [EventFd() for _ in range(want.count)]
                try:
                    self.device.set_irqs(index, fds)
                except BaseException:
                    for fd in fds:
                        fd.close()
                    raise
                self._active, self._fds = index, fds
                self._gsis, self._attached = [None] * want.count, [False] * want.count
            for vector, msg in enumerate(want.messages):
                gsi = self._gsis[vector]
                if msg is None:
                    if self._attached[vector]:
                        self.vm.irqfd_deassign(self._fds[vector], gsi)
                        self._attached[vector] = False
                    continue
                if gsi is None:
                    gsi = self._gsis[vector] = self.router.allocate(msg.address, msg.data)
                else:
                    self.router.update(gsi, msg.address, msg.data)
                if not self._attached[vector]:
                    self.vm.irqfd(self._fds[vector], gsi)
                    self._attached[vector] = True

    def _disable_vectors(self) -> None:
        for vector, gsi in enumerate(self._gsis):
            if self._attached[vector]:
                self.vm.irqfd_deassign(self._fds[vector], gsi)
            if gsi is not None:
                self.router.free(gsi)
        try:
            self.device.disable_irqs(self._active)
        finally:
            for fd in self._fds:
                fd.close()
            self._active, self._fds, self._gsis, self._attached = None, [], [], []

    def _enable_intx(self) -> None:
        """INTx: vfio-pci signals ``trigger`` and masks the line; KVM raises the IOAPIC pin
        level-triggered and, at the guest's EOI, signals ``resample``, which unmasks it."""
        if self._intx_gsi is None or not self.config.get(INTERRUPT_PIN, 1) or self.closed:
            return
        trigger, resample = EventFd(), EventFd()
        try:
            self.device.set_irqs(INTX, [trigger])
            self.device.set_unmask_eventfds(INTX, [resample])
            self.vm.irqfd(trigger, self._intx_gsi, resample_fd=resample)
        except BaseException as exc:
            try:
                self.device.disable_irqs(INTX)
            except PykvmError:
                pass
            trigger.close()
            resample.close()
            log.error("%s: INTx on GSI %d not wired: %s", self.target.bdf, self._intx_gsi, exc)
            return
        self._intx = (trigger, resample)
        self._active = INTX

    def _disable_intx(self) -> None:
        if self._intx is None:
            return
        trigger, resample = self._intx
        try:
            self.vm.irqfd_deassign(trigger, self._intx_gsi)
            self.device.disable_irqs(INTX)
        finally:
            trigger.close()
            resample.close()
            self._intx, self._active = None, None

    # -- closing -------------------------------------------------------------------------
    def close(self) -> None:
        """Give everything back: interrupts off, memslots gone, device reset, fds closed,
        DMA unmapped (with the last device of the context). Idempotent."""
        if self.closed:
            return
        errors = []

        def attempt(what: str, fn) -> None:
            try:
                fn()
            except Exception as exc:  # keep going: the rest must be released too
                errors.append(f"{what}: {exc}")

        with self._irq_lock:
            if self._active == INTX:
                attempt("INTx", self._disable_intx)
            elif self._active is not None:
                attempt("MSI/MSI-X", self._disable_vectors)
            self.closed = True
        for index in list(self._slots):
            attempt(f"BAR{index} memslots", lambda index=index: self.bar_moved(index, None, None))
        attempt("BAR unmap", self._unmap_bars)
        if not self.device.closed and self.device.info.can_reset:
            attempt("reset", self.device.reset)
        attempt("device", self.device.close)
        attempt("group", lambda: self.context.release(self.target.group))  # the last one closes the context
        for e in errors:
            log.warning("%s: close: %s", self.target.bdf, e)

    def __enter__(self) -> "VfioPciDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<VfioPciDevice {self.target.bdf} [{self.target.ids}]{' closed' if self.closed else ''}>"

