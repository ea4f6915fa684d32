"""``Vm``: a VM fd (memory slots, interrupt controllers, routing, eventfds, vCPUs)."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Sequence, Union

from pykvm._bitmap import bitmap_bytes, set_bits
from pykvm._fdobject import FdObject
from pykvm._native import ffi, lib
from pykvm._record import record_eq, record_hash, record_repr
from pykvm.errors import KvmError
from pykvm.kvm.caps import CapLike, cap_number
from pykvm.kvm.regs import ClockData, IrqChip, PitState
from pykvm.memory import PAGE_SIZE, GuestMemory, MemoryRegion

if TYPE_CHECKING:  # numpy is imported where it is used (start-up time)
    import numpy as np

    from pykvm.kvm.msr_filter import MsrFilterRange
    from pykvm.kvm.stats import KvmStats


class MemFlag(enum.IntFlag):
    """KVM_MEM_* flags of a memory slot."""

    LOG_DIRTY_PAGES = lib.KVM_MEM_LOG_DIRTY_PAGES
    READONLY = lib.KVM_MEM_READONLY


class IrqChipId(enum.IntEnum):
    PIC_MASTER = lib.KVM_IRQCHIP_PIC_MASTER
    PIC_SLAVE = lib.KVM_IRQCHIP_PIC_SLAVE
    IOAPIC = lib.KVM_IRQCHIP_IOAPIC


class MemorySlot:
    """A registered memslot. While the slot exists it holds a buffer export of its backing,
    so the host memory KVM maps for the guest cannot be unmapped or resized under it
    (closing the backing then leaves the mapping until the slot is deleted or the VM closes).

    Compared by identity (``is``), like any object."""

    __slots__ = ("slot", "guest_phys_addr", "memory_size", "userspace_addr", "flags", "backing", "_pin")
    slot: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    flags: int
    backing: Any

    _repr_fields = ("slot", "guest_phys_addr", "memory_size", "userspace_addr", "flags", "backing")

    def __init__(self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int,
                 backing: Any = None, pin: Any = None) -> None:
        self.slot = slot
        self.guest_phys_addr = guest_phys_addr
        self.memory_size = memory_size
        self.userspace_addr = userspace_addr
        self.flags = flags
        self.backing = backing
        self._pin = pin

    __repr__ = record_repr

    def _unpin(self) -> None:
        """Let the backing go: KVM no longer maps it (slot deleted, VM closed)."""
        pin, self._pin = self._pin, None
        if pin is not None:
            ffi.release(pin)

    @property
    def pages(self) -> int:
        return (self.memory_size + PAGE_SIZE - 1) // PAGE_SIZE


# The two kinds of route are plain records rather than NamedTuples: a routing table mixes
# them, and an IrqchipRoute must never equal an MsiRoute (or a tuple) with the same numbers.
class IrqchipRoute:
    """GSI -> pin of an in-kernel PIC/IOAPIC (KVM_IRQ_ROUTING_IRQCHIP)."""

    __slots__ = ("gsi", "irqchip", "pin")
    gsi: int
    irqchip: int
    pin: int

    _repr_fields = _eq_fields = __slots__

    def __init__(self, gsi: int, irqchip: int, pin: int) -> None:
        self.gsi = gsi
        self.irqchip = irqchip
        self.pin = pin

    __repr__ = record_repr
    __eq__ = record_eq
    __hash__ = record_hash


class MsiRoute:
    """GSI -> an MSI message (KVM_IRQ_ROUTING_MSI)."""

    __slots__ = ("gsi", "address", "data")
    gsi: int
    address: int
    data: int

    _repr_fields = _eq_fields = __slots__

    def __init__(self, gsi: int, address: int, data: int) -> None:
        self.gsi = gsi
        self.address = address
        self.data = data

    __repr__ = record_repr
    __eq__ = record_eq
    __hash__ = record_hash


Route = Union[IrqchipRoute, MsiRoute]


def _fd_of(obj: Union[int, Any]) -> int:
    return obj if isinstance(obj, int) else obj.fileno()


def _pin(backing: Any, size: int, writable: bool) -> Any:
    """A buffer export of ``backing`` (a MemoryRegion or any buffer) covering ``size`` bytes:
    ``ffi.cast("uintptr_t", pin)`` is its host address, and it keeps that memory mapped."""
    if isinstance(backing, MemoryRegion):
        if backing.size < size:
            raise ValueError(f"memslot of {size:#x} bytes is larger than its backing region ({backing.size:#x})")
        backing = backing.buffer  # GuestMemoryError if the region is closed
    try:
        pin = ffi.from_buffer(backing, require_writable=writable)
    except BufferError as exc:
        if writable:
            raise ValueError("the backing buffer is read-only, but the guest may write this slot: give a writable "
                             "buffer or map it with MemFlag.READONLY") from exc
        raise
    if len(pin) < size:
        ffi.release(pin)
        raise ValueError(f"memslot of {size:#x} bytes is larger than its backing buffer ({len(pin):#x})")
    return pin


class Vm(FdObject):
    """A virtual machine. Created by ``Kvm.create_vm()``; closes its vCPUs and devices first."""

    _error_family = KvmError
    _what = "Vm"

    def __init__(self, fd: int, kvm):
        super().__init__(fd, kvm)
        self.kvm = kvm
        self.slots: Dict[int, MemorySlot] = {}
        self._irqfds: Dict[tuple, Any] = {}
        self._ioeventfds: Dict[tuple, Any] = {}
        self.dirty_ring_size = 0  # bytes per vCPU ring, once enable_dirty_ring succeeded

    def check_extension(self, cap: CapLike) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers can differ per VM type)."""
        return self._ioctl("KVM_CHECK_EXTENSION", cap_number(cap))

    def enable_cap(self, cap: CapLike, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP: turn on an optional VM-wide behaviour (e.g. X86_USER_SPACE_MSR)."""
        if len(args) > 4:
            raise ValueError(f"KVM_ENABLE_CAP takes at most 4 arguments, not {len(args)}")
        c = ffi.new("struct kvm_enable_cap *", {"cap": cap_number(cap), "flags": flags, "args": list(args)})
        self._ioctl("KVM_ENABLE_CAP", c)

    # -- memory -----------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               backing: Any = None, flags: int = 0,
                               userspace_addr: Optional[int] = None) -> Optional[MemorySlot]:
        """KVM_SET_USER_MEMORY_REGION: back ``[gpa, gpa+size)`` with host memory.

        ``backing`` is a MemoryRegion or any buffer, writable unless ``flags`` has
        MemFlag.READONLY; the slot pins it (see MemorySlot). A raw ``userspace_addr``
        may be given instead, and is then the caller's to keep mapped. Size 0 deletes
        the slot.
        """
        pin = None
        if memory_size and userspace_addr is None:
            if backing is None:
                raise ValueError("give backing memory or userspace_addr")
            pin = _pin(backing, memory_size, writable=not int(flags) & MemFlag.READONLY)
            userspace_addr = int(ffi.cast("uintptr_t", pin))
        c = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": int(flags), "guest_phys_addr": guest_phys_addr,
            "memory_size": memory_size, "userspace_addr": userspace_addr or 0,
        })
        try:
            self._ioctl("KVM_SET_USER_MEMORY_REGION", c)
        except BaseException:
            if pin is not None:
                ffi.release(pin)
            raise
        old = self.slots.pop(slot, None)
        if old is not None:
            old._unpin()
        if memory_size == 0:
            return None
        ms = MemorySlot(slot, guest_phys_addr, memory_size, userspace_addr, int(flags), backing, pin)
        self.slots[slot] = ms
        return ms

    def delete_memory_region(self, slot: int) -> None:
        """Remove a memslot (KVM_SET_USER_MEMORY_REGION with size 0)."""
        self.set_user_memory_region(slot, 0, 0)

    def free_slot(self) -> int:
        n = 0
        while n in self.slots:
            n += 1
        return n

    def map_memory(self, memory: GuestMemory, flags: int = 0) -> List[MemorySlot]:
        """Register every region of ``memory`` in a free memslot."""
        out = []
        for r in memory:
            f = flags | (MemFlag.READONLY if r.readonly else 0)
            out.append(self.set_user_memory_region(self.free_slot(), r.gpa, r.size, r, f))
        return out

    def get_dirty_log(self, slot: int) -> "np.ndarray":
        """KVM_GET_DIRTY_LOG: page indices (within the slot) written since the last call."""
        import numpy as np

        ms = self.slots[slot]
        bitmap = np.zeros(max(bitmap_bytes(ms.pages) // 8, 1), dtype=np.uint64)
        c = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": ffi.from_buffer(bitmap)})
        self._ioctl("KVM_GET_DIRTY_LOG", c)
        return set_bits(bitmap, ms.pages)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int) -> None:
        """KVM_CLEAR_DIRTY_LOG: re-protect pages (needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)."""
        import numpy as np

        bitmap = np.full(bitmap_bytes(num_pages) // 8, np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
        c = ffi.new("struct kvm_clear_dirty_log *", {
            "slot": slot, "num_pages": num_pages, "first_page": first_page,
            "dirty_bitmap": ffi.from_buffer(bitmap)})
        self._ioctl("KVM_CLEAR_DIRTY_LOG", c)

    def enable_dirty_ring(self, size_bytes: int, acq_rel: bool = False) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING or, with ``acq_rel``, _ACQ_REL): log the pages
        written in LOG_DIRTY_PAGES slots in a ring per vCPU (``Vcpu.dirty_ring()``) instead of the
        slots' bitmaps (KVM_GET_DIRTY_LOG then fails with ENXIO), so a harvest costs what was
        written rather than a scan of all memory. ``size_bytes`` is a power of two, at least a page
        and at most ``check_extension`` of the capability; only once, before any vCPU exists
        (EINVAL). ACQ_REL promises acquire/release ordering on the entries' flags, which is what
        x86 does anyway; the plain capability exists on x86 only."""
        self.enable_cap(lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else lib.KVM_CAP_DIRTY_LOG_RING, size_bytes)
        self.dirty_ring_size = size_bytes

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: KVM takes back every harvested (RESET) entry of every vCPU's
        ring and write-protects those pages again, so their next write is logged anew; returns
        how many entries it reset."""
        return self._ioctl("KVM_RESET_DIRTY_RINGS")

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: 3 pages of guest-physical space VMX needs for real mode."""
        self._ioctl("KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for VMX's unpaged-mode EPT identity map."""
        self._ioctl("KVM_SET_IDENTITY_MAP_ADDR", ffi.new("__u64 *", addr))

    # -- interrupt controllers --------------------------------------------
    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and a LAPIC per vCPU."""
        self._ioctl("KVM_CREATE_IRQCHIP")

    def get_irqchip(self, chip_id: int) -> IrqChip:
        """KVM_GET_IRQCHIP: the state of the in-kernel PIC master/slave or IOAPIC (IrqChipId)."""
        s = IrqChip(chip_id=chip_id)
        self._ioctl("KVM_GET_IRQCHIP", s.ptr)
        return s

    def set_irqchip(self, state: IrqChip) -> None:
        """KVM_SET_IRQCHIP: load one in-kernel PIC's or the IOAPIC's state (``chip_id`` says which)."""
        self._ioctl("KVM_SET_IRQCHIP", state.ptr)

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: an in-kernel i8254 timer (its IRQ goes to GSI 0)."""
        self._ioctl("KVM_CREATE_PIT2", ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def get_pit2(self) -> PitState:
        """KVM_GET_PIT2: the in-kernel PIT's three channels (count, mode, latch state) and flags."""
        s = PitState()
        self._ioctl("KVM_GET_PIT2", s.ptr)
        return s

    def set_pit2(self, state: PitState) -> None:
        """KVM_SET_PIT2: load the in-kernel PIT's channels (a new count restarts the channel)."""
        self._ioctl("KVM_SET_PIT2", state.ptr)

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: set an in-kernel irqchip input (GSI) high or low."""
        self._ioctl("KVM_IRQ_LINE", ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level}))

    def irq_line_status(self, irq: int, level: int) -> int:
        """KVM_IRQ_LINE_STATUS: KVM_IRQ_LINE that also reports what became of the interrupt, so
        a timer device can tell that the guest lost a tick and inject it again. The status sums
        the answers of the chips behind the GSI: an IOAPIC, the number of LAPICs it delivered to
        (0 if it coalesced: the edge line was already high, or the LAPIC is disabled); a PIC, 1
        (0 if a new edge finds the previous request still pending). A chip that masks the pin
        (or, level-triggered, still waits for the EOI) is left out, and -1 means all were.
        Lowering a line reports a positive count too."""
        c = ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level})
        self._ioctl("KVM_IRQ_LINE_STATUS", c)
        return c.status

    def reinject_control(self, pit_reinject: bool) -> None:
        """KVM_REINJECT_CONTROL: whether the in-kernel PIT delivers the ticks a guest missed
        later (True, the default: for guests that count ticks to keep time) or drops them
        (False: no bursts of catch-up interrupts for guests that read a clock). Needs
        ``create_pit2`` first (ENXIO)."""
        self._ioctl("KVM_REINJECT_CONTROL", ffi.new("struct kvm_reinject_control *", {"pit_reinject": pit_reinject}))

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """KVM_SIGNAL_MSI: inject one MSI; returns >0 if delivered, 0 if blocked by the guest."""
        c = ffi.new("struct kvm_msi *", {"address_lo": address & 0xFFFFFFFF, "address_hi": address >> 32,
                                         "data": data, "flags": flags, "devid": devid})
        return self._ioctl("KVM_SIGNAL_MSI", c)

    def set_gsi_routing(self, routes: Iterable[Route]) -> None:
        """KVM_SET_GSI_ROUTING: replace the whole GSI routing table."""
        routes = list(routes)
        c = ffi.new("struct kvm_irq_routing *", {"nr": len(routes), "entries": len(routes)})
        for i, r in enumerate(routes):
            e = c.entries[i]
            e.gsi = r.gsi
            if isinstance(r, IrqchipRoute):
                e.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = r.irqchip
                e.u.irqchip.pin = r.pin
            else:
                e.type = lib.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = r.address & 0xFFFFFFFF
                e.u.msi.address_hi = r.address >> 32
                e.u.msi.data = r.data
        self._ioctl("KVM_SET_GSI_ROUTING", c)

    @staticmethod
    def default_irqchip_routes() -> List[IrqchipRoute]:
        """The routing KVM_CREATE_IRQCHIP installs: GSI 0-15 to both PICs and the IOAPIC, 16-23 to the IOAPIC."""
        routes: List[IrqchipRoute] = []
        for gsi in range(24):
            if gsi < 8:
                routes.append(IrqchipRoute(gsi, IrqChipId.PIC_MASTER, gsi))
            elif gsi < 16:
                routes.append(IrqchipRoute(gsi, IrqChipId.PIC_SLAVE, gsi - 8))
            routes.append(IrqchipRoute(gsi, IrqChipId.IOAPIC, gsi))
        return routes

    def irqfd(self, eventfd: Any, gsi: int, resample_fd: Any = None) -> None:
        """KVM_IRQFD: a write to ``eventfd`` raises GSI ``gsi`` inside the kernel.

        With ``resample_fd`` the GSI is level-triggered: KVM lowers it on EOI and
        signals ``resample_fd`` so the device (e.g. VFIO INTx) can re-assert.
        """
        c = ffi.new("struct kvm_irqfd *", {"fd": _fd_of(eventfd), "gsi": gsi})
        if resample_fd is not None:
            c.flags = lib.KVM_IRQFD_FLAG_RESAMPLE
            c.resamplefd = _fd_of(resample_fd)
        self._ioctl("KVM_IRQFD", c)
        self._irqfds[(_fd_of(eventfd), gsi)] = (eventfd, resample_fd)

    def irqfd_deassign(self, eventfd: Any, gsi: int) -> None:
        """KVM_IRQFD with DEASSIGN: signals on ``eventfd`` no longer raise ``gsi``."""
        c = ffi.new("struct kvm_irqfd *", {"fd": _fd_of(eventfd), "gsi": gsi, "flags": lib.KVM_IRQFD_FLAG_DEASSIGN})
        self._ioctl("KVM_IRQFD", c)
        self._irqfds.pop((_fd_of(eventfd), gsi), None)

    def _ioeventfd(self, eventfd: Any, addr: int, length: int, pio: bool, datamatch: Optional[int], deassign: bool) -> None:
        flags = 0
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        c = ffi.new("struct kvm_ioeventfd *", {"datamatch": datamatch or 0, "addr": addr, "len": length,
                                               "fd": _fd_of(eventfd), "flags": flags})
        self._ioctl("KVM_IOEVENTFD", c)
        key = (addr, length, pio, datamatch)
        if deassign:
            self._ioeventfds.pop(key, None)
        else:
            self._ioeventfds[key] = eventfd

    def ioeventfd(self, eventfd: Any, addr: int, length: int, pio: bool = False, datamatch: Optional[int] = None) -> None:
        """KVM_IOEVENTFD: a guest write to ``addr`` signals ``eventfd`` without an exit."""
        self._ioeventfd(eventfd, addr, length, pio, datamatch, False)

    def ioeventfd_deassign(self, eventfd: Any, addr: int, length: int, pio: bool = False, datamatch: Optional[int] = None) -> None:
        self._ioeventfd(eventfd, addr, length, pio, datamatch, True)

    def register_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """KVM_REGISTER_COALESCED_MMIO: writes to the zone are queued in a ring, not exited."""
        c = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": addr, "size": size, "pio": int(pio)})
        self._ioctl("KVM_REGISTER_COALESCED_MMIO", c)

    def unregister_coalesced_mmio(self, addr: int, size: int, pio: bool = False) -> None:
        """KVM_UNREGISTER_COALESCED_MMIO: writes to the zone exit to userspace again."""
        c = ffi.new("struct kvm_coalesced_mmio_zone *", {"addr": addr, "size": size, "pio": int(pio)})
        self._ioctl("KVM_UNREGISTER_COALESCED_MMIO", c)

    # -- clock ------------------------------------------------------------
    def get_clock(self) -> ClockData:
        """KVM_GET_CLOCK: kvmclock's current guest time in ns (``clock``). Where the host
        clocksource is a stable TSC, ``flags`` also has KVM_CLOCK_REALTIME and
        KVM_CLOCK_HOST_TSC: ``realtime`` is the host's CLOCK_REALTIME and ``host_tsc`` its
        TSC at the same instant."""
        s = ClockData()
        self._ioctl("KVM_GET_CLOCK", s.ptr)
        return s

    def set_clock(self, clock: Union[int, ClockData], flags: int = 0, realtime: Optional[int] = None) -> None:
        """KVM_SET_CLOCK: set kvmclock's guest time. Pass what ``get_clock()`` returned to
        restore it. With KVM_CLOCK_REALTIME in the flags KVM adds the wall-clock time that
        passed since ``realtime`` (host CLOCK_REALTIME, ns), so a guest restored later has
        not fallen behind: ``realtime`` is required then (KVM would add the whole epoch
        to a 0). KVM ignores the other flags here."""
        if isinstance(clock, ClockData):
            clock, flags, realtime = clock.clock, clock.flags, clock.realtime
        if flags & lib.KVM_CLOCK_REALTIME and not realtime:
            raise ValueError("KVM_CLOCK_REALTIME needs realtime= (the host CLOCK_REALTIME ns the clock was read at)")
        s = ClockData(clock=clock, flags=flags, realtime=realtime or 0)
        self._ioctl("KVM_SET_CLOCK", s.ptr)

    # -- CPU features -------------------------------------------------------
    def set_msr_filter(self, ranges: Sequence["MsrFilterRange"], default_allow: bool = True) -> None:
        """KVM_X86_SET_MSR_FILTER: deny guest RDMSR/WRMSR that KVM would otherwise handle, per
        MSR and direction (pykvm.kvm.msr_filter); MSRs no range covers follow ``default_allow``.
        Denied accesses #GP, or exit as an ``MsrExit`` with msr_reason FILTER after
        ``enable_cap(X86_USER_SPACE_MSR, MsrExitReason.FILTER)``, so a VMM can emulate or
        hide MSRs. Replaces the previous filter, also while vCPUs run; ``[]`` removes it.
        Input KVM would refuse raises ValueError first."""
        from pykvm.kvm.msr_filter import msr_filter_struct

        c, keepalive = msr_filter_struct(ranges, default_allow)  # c's ranges point into keepalive
        self._ioctl("KVM_X86_SET_MSR_FILTER", c)

    def set_pmu_event_filter(self, action: int, events: Iterable[int], fixed_counter_bitmap: int = 0) -> None:
        """KVM_SET_PMU_EVENT_FILTER: which events the guest's vPMU counters may count. ``events``
        are raw event selects (event bits 0-7 and 32-35, unit mask << 8); with
        ``PmuEventAction.ALLOW`` (pykvm.kvm.pmu) only those count, with DENY all others; bit i of
        ``fixed_counter_bitmap`` names fixed counter i the same way. KVM checks it when the guest
        programs a counter, so a guest cannot measure what the host keeps from it. Replaces the
        previous filter (DENY with no events allows everything)."""
        codes = list(events)
        c = ffi.new("struct kvm_pmu_event_filter *", {
            "action": int(action), "nevents": len(codes), "fixed_counter_bitmap": fixed_counter_bitmap,
            "events": codes})
        self._ioctl("KVM_SET_PMU_EVENT_FILTER", c)

    # -- children ---------------------------------------------------------
    def set_boot_cpu_id(self, vcpu_id: int) -> None:
        """KVM_SET_BOOT_CPU_ID: which vCPU id is the bootstrap processor (0 unless set): its
        IA32_APIC_BASE has the BSP bit, and with the in-kernel irqchip it starts runnable while
        the others wait for INIT/SIPI. Only before the first vCPU is created (EBUSY)."""
        self._ioctl("KVM_SET_BOOT_CPU_ID", vcpu_id)

    def create_vcpu(self, vcpu_id: int = 0) -> "Vcpu":
        """KVM_CREATE_VCPU: a vCPU with this APIC ID; its kvm_run page is mmap'd."""
        from pykvm.kvm.vcpu import Vcpu

        fd = self._ioctl("KVM_CREATE_VCPU", vcpu_id)
        return Vcpu(fd, self, vcpu_id)

    def create_device(self, dev_type: int, test: bool = False) -> Optional["DeviceFd"]:
        """KVM_CREATE_DEVICE: an in-kernel device such as KVM_DEV_TYPE_VFIO.

        With ``test=True`` only asks whether the type is supported (returns None)."""
        from pykvm.kvm.device import DeviceFd

        c = ffi.new("struct kvm_create_device *", {"type": dev_type,
                                                   "flags": lib.KVM_CREATE_DEVICE_TEST if test else 0})
        self._ioctl("KVM_CREATE_DEVICE", c)
        return None if test else DeviceFd(c.fd, self, dev_type)

    def stats(self) -> "KvmStats":
        """KVM_GET_STATS_FD: the kernel's counters for this VM (TLB flushes, MMU pages, ...),
        read with pread on a fd that this VM closes first."""
        from pykvm.kvm.stats import KvmStats

        return KvmStats(self._ioctl("KVM_GET_STATS_FD"), self)

    def _release(self) -> None:
        for ms in self.slots.values():  # every vCPU is closed: nothing runs on this memory
            ms._unpin()
        self.slots.clear()
        self._irqfds.clear()
        self._ioeventfds.clear()
