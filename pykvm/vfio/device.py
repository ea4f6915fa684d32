"""A VFIO device fd: regions, interrupts, ioeventfds, features, reset.

Obtained from :meth:`pykvm.vfio.group.Group.get_device`. Closing it removes its
ioeventfds, then vfio-pci disables its interrupts and resets it (when it can) for
the next user.
"""
from __future__ import annotations

import errno
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Union

from pykvm._fdobject import FdObject
from pykvm._native import ffi, lib
from pykvm.errors import VfioError
from pykvm.vfio.caps import query_info
from pykvm.vfio.errors import vfio_error
from pykvm.vfio.irqs import EventFdLike, IrqInfo, irq_set
from pykvm.vfio.pci import ConfigSpace
from pykvm.vfio.regions import Mmio, Region, RegionCaps, RegionInfo, parse_region_caps

if TYPE_CHECKING:
    from pykvm.vfio.eventfd import EventFd
    from pykvm.vfio.group import Group

__all__ = ["Device", "DeviceInfo", "HotResetDependent", "IoEventFd"]

_IOEVENTFD_SIZES = {1: lib.VFIO_DEVICE_IOEVENTFD_8, 2: lib.VFIO_DEVICE_IOEVENTFD_16,
                    4: lib.VFIO_DEVICE_IOEVENTFD_32, 8: lib.VFIO_DEVICE_IOEVENTFD_64}


@dataclass(frozen=True)
class DeviceInfo:
    flags: int
    num_regions: int
    num_irqs: int

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & lib.VFIO_DEVICE_FLAGS_PCI)

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & lib.VFIO_DEVICE_FLAGS_RESET)


@dataclass(frozen=True)
class HotResetDependent:
    """A device that a PCI hot reset of this one would also reset (and the group it is in)."""

    group: int
    bdf: str


class IoEventFd:
    """A VFIO_DEVICE_IOEVENTFD registration made by :meth:`Device.ioeventfd`: while it is
    active, each signal of ``eventfd`` makes the kernel write ``data`` (``size`` bytes) at
    ``offset`` of region ``region``. ``remove()`` (or closing the device) undoes it; the
    eventfd itself stays its owner's."""

    def __init__(self, device: "Device", region: int, offset: int, data: int, size: int,
                 eventfd: Union[int, "EventFd"]):
        self.device, self.region, self.offset, self.data, self.size = device, region, offset, data, size
        self.eventfd = eventfd
        self.active = False

    def remove(self) -> None:
        """Unregister (idempotent): signals of the eventfd no longer reach the device."""
        if self.active:
            self.active = False
            self.device._ioeventfds.remove(self)
            self.device._set_ioeventfd(self, -1)

    def __enter__(self) -> "IoEventFd":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"<IoEventFd region {self.region} offset {self.offset:#x} data {self.data:#x} size {self.size}"
                f"{'' if self.active else ' removed'}>")


class Device(FdObject):
    """An open VFIO device. ``name`` is its PCI address."""

    _error_family = VfioError
    _what = "VFIO device"

    def __init__(self, fd: int, group: "Group", name: str):
        super().__init__(fd, group)
        self.group = group
        self.name = name
        self._regions: Dict[int, Region] = {}
        self._info: Optional[DeviceInfo] = None
        self._config: Optional[ConfigSpace] = None
        self._mmaps: "weakref.WeakSet[Mmio]" = weakref.WeakSet()
        self._ioeventfds: List[IoEventFd] = []

    @property
    def info(self) -> DeviceInfo:
        """VFIO_DEVICE_GET_INFO (asked once): flags (PCI, reset), region and IRQ counts."""
        if self._info is None:
            arg = ffi.new("struct vfio_device_info *")
            arg.argsz = ffi.sizeof(arg[0])
            self._ioctl("VFIO_DEVICE_GET_INFO", arg)
            self._info = DeviceInfo(arg.flags, arg.num_regions, arg.num_irqs)
        return self._info

    # -- regions -----------------------------------------------------------
    def region(self, index: int) -> Region:
        """Region ``index`` (``lib.VFIO_PCI_BAR0_REGION_INDEX`` ... ``VFIO_PCI_CONFIG_REGION_INDEX``)."""
        self.fileno()  # a closed device's regions are gone
        if index not in self._regions:
            if not 0 <= index < self.info.num_regions:
                raise vfio_error(errno.EINVAL, f"{self.name} has regions 0..{self.info.num_regions - 1}, not {index}",
                                 "VFIO_DEVICE_GET_REGION_INFO")

            def setup(info):
                info.index = index

            info, buf = query_info(self, "VFIO_DEVICE_GET_REGION_INFO", "struct vfio_region_info", setup)
            caps = RegionCaps()
            if info.flags & lib.VFIO_REGION_INFO_FLAG_CAPS and info.cap_offset:
                caps = parse_region_caps(buf, info.cap_offset)
            self._regions[index] = Region(self, RegionInfo(index, info.flags, info.size, info.offset, caps))
        return self._regions[index]

    def regions(self) -> List[Region]:
        """Every region index the device has (unimplemented ones have size 0)."""
        return [self.region(i) for i in range(self.info.num_regions)]

    @property
    def config(self) -> ConfigSpace:
        """PCI config space helpers (read/write, enable, capabilities)."""
        if self._config is None:
            self._config = ConfigSpace(self.region(lib.VFIO_PCI_CONFIG_REGION_INDEX))
        return self._config

    # -- interrupts --------------------------------------------------------
    def irq_info(self, index: int) -> IrqInfo:
        """Interrupt index ``index`` (``lib.VFIO_PCI_INTX_IRQ_INDEX``, ``..._MSI_...``, ``..._MSIX_...``)."""
        arg = ffi.new("struct vfio_irq_info *")
        arg.argsz, arg.index = ffi.sizeof(arg[0]), index
        self._ioctl("VFIO_DEVICE_GET_IRQ_INFO", arg)
        return IrqInfo(index, arg.flags, arg.count)

    def set_irqs(self, index: int, eventfds: Sequence[EventFdLike], start: int = 0) -> None:
        """Signal vectors ``start..start+len(eventfds)-1`` of ``index`` on these eventfds.

        ``None`` (or -1) in the list leaves a vector unassigned. Enables the index.
        """
        self._set_irqs(irq_set(index, start, len(eventfds), lib.VFIO_IRQ_SET_ACTION_TRIGGER, eventfds=eventfds))

    def set_unmask_eventfds(self, index: int, eventfds: Sequence[EventFdLike], start: int = 0) -> None:
        """Unmask vectors when these eventfds are written (e.g. KVM's irqfd resample for INTx),
        without a syscall of ours in between. ``None`` removes one."""
        self._set_irqs(irq_set(index, start, len(eventfds), lib.VFIO_IRQ_SET_ACTION_UNMASK, eventfds=eventfds))

    def disable_irqs(self, index: int) -> None:
        """Tear down every vector of ``index`` (the device falls back to no interrupts).
        Idempotent: vfio-pci answers EINVAL for an index that is not enabled, which here is
        no error (so a ``finally: disable_irqs(...)`` after a failed ``set_irqs`` cannot
        hide that failure); an index the device does not have still raises."""
        try:
            self._ioctl("VFIO_DEVICE_SET_IRQS", irq_set(index, 0, 0, lib.VFIO_IRQ_SET_ACTION_TRIGGER))
        except VfioError as exc:
            if exc.errno != errno.EINVAL:
                raise
            if not 0 <= index < self.info.num_irqs:
                raise self._no_such_index(index, "SET_IRQS could not disable") from None

    def mask(self, index: int, start: int = 0, count: int = 1) -> None:
        self._set_irqs(irq_set(index, start, count, lib.VFIO_IRQ_SET_ACTION_MASK))

    def unmask(self, index: int, start: int = 0, count: int = 1) -> None:
        """Unmask (INTx is masked by the kernel each time it fires)."""
        self._set_irqs(irq_set(index, start, count, lib.VFIO_IRQ_SET_ACTION_UNMASK))

    def trigger(self, index: int, start: int = 0, count: int = 1) -> None:
        """Fire the vectors' eventfds from the kernel (loopback test of the wiring)."""
        self._set_irqs(irq_set(index, start, count, lib.VFIO_IRQ_SET_ACTION_TRIGGER))

    def _set_irqs(self, arg) -> None:
        try:
            self._ioctl("VFIO_DEVICE_SET_IRQS", arg)
        except VfioError as exc:
            if exc.errno != errno.EINVAL:
                raise
            try:
                info = self.irq_info(arg.index)
            except VfioError:
                raise self._no_such_index(arg.index, "SET_IRQS refused: no") from None
            raise vfio_error(errno.EINVAL, f"{self.name}: SET_IRQS on {info.name} vectors "
                                           f"[{arg.start}, {arg.start + arg.count}) refused; the index has "
                                           f"{info.count} vector(s), flags {info.flags:#x}"
                                           + (" (NORESIZE: disable the index and set all vectors at once)"
                                              if info.noresize else ""), "VFIO_DEVICE_SET_IRQS") from None

    def _no_such_index(self, index: int, what: str) -> VfioError:
        return vfio_error(errno.EINVAL, f"{self.name}: {what} interrupt index {index} "
                                        f"(the device has indexes 0..{self.info.num_irqs - 1})", "VFIO_DEVICE_SET_IRQS")

    # -- ioeventfds and features ---------------------------------------------
    def ioeventfd(self, region: int, offset: int, data: int, size: int, eventfd: Union[int, "EventFd"]) -> IoEventFd:
        """VFIO_DEVICE_IOEVENTFD: when ``eventfd`` (an fd or an :class:`EventFd`) is signalled,
        the kernel writes ``data`` (``size``: 1, 2, 4 or 8 bytes) at ``offset`` of region
        ``region``, with no return to user space. Given the same eventfd, KVM_IOEVENTFD takes a
        guest's doorbell write straight to the device. vfio-pci accepts BARs only, outside the
        MSI-X table; one registration per (offset, data, size)."""
        reg = IoEventFd(self, region, offset, data, size, eventfd)
        self._set_ioeventfd(reg, eventfd if isinstance(eventfd, int) else eventfd.fileno())
        reg.active = True
        self._ioeventfds.append(reg)
        return reg

    def _set_ioeventfd(self, reg: IoEventFd, fd: int) -> None:
        """Register ``reg`` on ``fd``, or remove it (-1: the kernel matches offset, data and size)."""
        if reg.size not in _IOEVENTFD_SIZES:
            raise vfio_error(errno.EINVAL, f"an ioeventfd writes 1, 2, 4 or 8 bytes, not {reg.size}",
                             "VFIO_DEVICE_IOEVENTFD")
        region = self.region(reg.region)
        arg = ffi.new("struct vfio_device_ioeventfd *")
        arg.argsz, arg.flags = ffi.sizeof(arg[0]), _IOEVENTFD_SIZES[reg.size]
        arg.offset, arg.data, arg.fd = region.info.offset + reg.offset, reg.data, fd
        try:
            self._ioctl("VFIO_DEVICE_IOEVENTFD", arg)
        except VfioError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise vfio_error(errno.EINVAL, f"{self.name}: no ioeventfd for a {reg.size}-byte write at {reg.offset:#x} "
                                           f"of region {reg.region} ({region.size:#x} bytes): vfio-pci takes them "
                                           "inside a BAR (regions 0-5) and outside the MSI-X table only, on an "
                                           "eventfd", "VFIO_DEVICE_IOEVENTFD") from None

    def probe_feature(self, feature: int, get: bool = False, set: bool = False) -> bool:
        """VFIO_DEVICE_FEATURE with PROBE: does the device support ``feature``
        (``lib.VFIO_DEVICE_FEATURE_*``), with GET and/or SET when asked? The kernel answers 0,
        ENOTTY for a feature the device lacks, EINVAL for an operation the feature lacks."""
        if not 0 <= feature <= lib.VFIO_DEVICE_FEATURE_MASK:
            raise vfio_error(errno.EINVAL, f"feature {feature:#x} is not a 16-bit feature index", "VFIO_DEVICE_FEATURE")
        arg = ffi.new("struct vfio_device_feature *")
        arg.argsz = ffi.sizeof(arg[0])
        arg.flags = (feature | lib.VFIO_DEVICE_FEATURE_PROBE | (lib.VFIO_DEVICE_FEATURE_GET if get else 0)
                     | (lib.VFIO_DEVICE_FEATURE_SET if set else 0))
        try:
            self._ioctl("VFIO_DEVICE_FEATURE", arg)
        except VfioError as exc:
            if exc.errno == errno.ENOTTY or (exc.errno == errno.EINVAL and (get or set)):
                return False
            raise
        return True

    # -- reset -------------------------------------------------------------
    def reset(self) -> None:
        """VFIO_DEVICE_RESET: function-level (or equivalent) reset of this device alone."""
        if not self.info.can_reset:
            raise vfio_error(errno.ENOTTY, f"{self.name} has no reset method the kernel can use",
                             "VFIO_DEVICE_RESET")
        self._ioctl("VFIO_DEVICE_RESET")

    def hot_reset_info(self) -> List[HotResetDependent]:
        """The devices a PCI bus (hot) reset of this one would reset too."""
        count = 0
        while True:
            ctype = "struct vfio_pci_hot_reset_info"
            size = ffi.offsetof(ctype, "devices") + count * ffi.sizeof("struct vfio_pci_dependent_device")
            raw = bytearray(max(size, ffi.sizeof(ctype)))
            arg = ffi.from_buffer(ctype + " *", raw)
            arg.argsz = len(raw)
            try:
                self._ioctl("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", arg)
            except VfioError as exc:
                if exc.errno == errno.ENOSPC and arg.count > count:
                    count = arg.count
                    continue
                raise
            out = []
            for i in range(arg.count):
                d = arg.devices[i]
                out.append(HotResetDependent(d.group_id, f"{d.segment:04x}:{d.bus:02x}:{d.devfn >> 3:02x}.{d.devfn & 7}"))
            return out

    def hot_reset(self, groups: Sequence["Group"]) -> None:
        """VFIO_DEVICE_PCI_HOT_RESET: reset this device's slot or bus, and so every device
        :meth:`hot_reset_info` lists; vfio-pci saves and restores their config space around it.
        The kernel wants proof that the caller owns them all: ``groups`` must hold an open
        group of each, and no more groups than there are devices."""
        fds = [g.fileno() for g in groups]
        ctype = "struct vfio_pci_hot_reset"
        raw = bytearray(max(ffi.sizeof(ctype), ffi.offsetof(ctype, "group_fds") + len(fds) * ffi.sizeof("__s32")))
        arg = ffi.from_buffer(ctype + " *", raw)
        arg.argsz, arg.count = len(raw), len(fds)
        for i, fd in enumerate(fds):
            arg.group_fds[i] = fd
        try:
            self._ioctl("VFIO_DEVICE_PCI_HOT_RESET", arg)
        except VfioError as exc:
            if exc.errno == errno.ENODEV:
                why = "the kernel can reset neither its slot nor its bus (a root bus has no bridge to reset it)"
            elif exc.errno == errno.EINVAL:
                deps = self.hot_reset_info()
                why = (f"the reset takes along {len(deps)} device(s) of group(s) {sorted({d.group for d in deps})}: "
                       f"pass an open group of each, at most one per device (passed: {[g.number for g in groups]})")
            else:
                raise
            raise vfio_error(exc.errno, f"{self.name}: no hot reset: {why}", "VFIO_DEVICE_PCI_HOT_RESET") from None

    def _release(self) -> None:
        # Stop the kernel's writes before the fd goes (an mmap kept alive would keep them going).
        for reg in list(self._ioeventfds):
            reg.remove()
        # Unmap the BARs we mapped: a live mapping would keep the device open in the kernel.
        for mm in list(self._mmaps):
            try:
                mm.close()
            except BufferError:
                pass  # the caller still holds a view of it; the kernel releases the device at munmap
                # (and only then lets the group leave its container: Group._track_mapping)

    def __repr__(self) -> str:
        return f"<Device {self.name} {'closed' if self.closed else f'fd={self._fd}'}>"
