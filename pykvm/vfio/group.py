"""VFIO groups (/dev/vfio/N): the unit of isolation the IOMMU can enforce.

A group exists in sysfs (/sys/kernel/iommu_groups/N) whenever the IOMMU is on;
its /dev/vfio/N node appears once a VFIO driver (vfio-pci) holds a device of
it. The group is *viable* when every device in it is bound to vfio-pci, a
VFIO-safe driver, or no driver. A viable group joins a container; then its
devices can be opened.
"""
from __future__ import annotations

import errno
import mmap
import os
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple, Union

from pykvm._fdobject import FdObject
from pykvm._native import ffi, lib
from pykvm.errors import VfioError
from pykvm.pci_address import canonical_bdf
from pykvm.vfio.container import CONTAINER_PATH
from pykvm.vfio.device import Device
from pykvm.vfio.errors import VfioUnavailableError, vfio_error

if TYPE_CHECKING:
    from pykvm.vfio.container import Container

__all__ = ["Group", "GroupStatus", "group_members", "group_of_device", "holders", "normalize_bdf"]

SYSFS = "/sys"


def normalize_bdf(bdf: str) -> str:
    """``00:05.0`` -> ``0000:00:05.0`` (sysfs and the kernel name devices with the domain)."""
    return canonical_bdf(bdf)


def _link_name(path: str) -> Optional[str]:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def group_of_device(bdf: str, sysfs: str = SYSFS) -> int:
    """The IOMMU group number of PCI device ``bdf``, from /sys/bus/pci/devices/BDF/iommu_group."""
    bdf = normalize_bdf(bdf)
    dev = f"{sysfs}/bus/pci/devices/{bdf}"
    if not os.path.exists(dev):
        raise vfio_error(errno.ENODEV, f"no PCI device {bdf} on this machine (`lspci -D` lists them)", "sysfs")
    group = _link_name(f"{dev}/iommu_group")
    if group is None:
        raise vfio_error(errno.ENODEV, f"{bdf} has no IOMMU group: the IOMMU is off or absent (boot with "
                                       "intel_iommu=on or amd_iommu=on); `pykvm host check` says more", "sysfs")
    return int(group)


def group_members(number: int, sysfs: str = SYSFS) -> List[Tuple[str, Optional[str]]]:
    """``(bdf, driver or None)`` for every device in IOMMU group ``number``."""
    base = f"{sysfs}/kernel/iommu_groups/{number}/devices"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    return [(bdf, _link_name(f"{base}/{bdf}/driver")) for bdf in names]


def _format_members(members: List[Tuple[str, Optional[str]]]) -> str:
    return ", ".join(f"{bdf} (driver: {drv or 'none'})" for bdf, drv in members) or "no devices listed in sysfs"


def holders(path: str) -> List[str]:
    """``pid (comm)`` of processes that have ``path`` open, as far as /proc lets us see."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in fds):
                with open(f"/proc/{pid}/comm") as f:
                    found.append(f"{pid} ({f.read().strip()})")
        except OSError:
            continue
    return found


def vfio_mappers() -> List[str]:
    """``pid (comm)`` of processes with a VFIO device's memory mapped (/proc/PID/maps shows
    the device file as ``anon_inode:[vfio-device]``; which device, it does not say). Such a
    mapping keeps its device open, and the device its group, after every fd is closed."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                if any(line.rstrip().endswith("anon_inode:[vfio-device]") for line in maps):
                    with open(f"/proc/{pid}/comm") as f:
                        found.append(f"{pid} ({f.read().strip()})")
        except OSError:
            continue
    return found


@dataclass(frozen=True)
class GroupStatus:
    viable: bool
    container_set: bool


class Group(FdObject):
    """``Group(26)``, ``Group("/dev/vfio/26")`` or ``Group.for_device("0000:00:05.0")``."""

    _error_family = VfioError
    _what = "VFIO group"

    def __init__(self, group: Union[int, str], sysfs: str = SYSFS):
        if isinstance(group, int) or str(group).isdigit():
            self.number, self.path = int(group), f"/dev/vfio/{int(group)}"
        else:
            self.path = str(group)
            self.number = int(os.path.basename(self.path))
        self._sysfs = sysfs
        self.container: Optional["Container"] = None
        self._mapped = 0  # region mappings of its devices not unmapped yet (see _track_mapping)
        self._releasing = False  # set before _release looks at _mapped: an unmap racing it must see it
        super().__init__(self._open())

    @classmethod
    def for_device(cls, bdf: str, sysfs: str = SYSFS) -> "Group":
        """Open the group that holds PCI device ``bdf``."""
        return cls(group_of_device(bdf, sysfs), sysfs)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if not os.path.exists(CONTAINER_PATH):
                raise VfioUnavailableError(CONTAINER_PATH) from None
            members = self.members()
            if not members:
                raise vfio_error(errno.ENOENT, f"IOMMU group {self.number} does not exist", "open") from None
            fix = " ".join(bdf for bdf, drv in members if drv != "vfio-pci")
            raise vfio_error(errno.ENOENT, f"{self.path} does not exist: group {self.number} is not bound to "
                                           f"vfio-pci ({_format_members(members)}). Fix: `pykvm host bind {fix}`",
                             "open") from None
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                who, mappers = holders(self.path), vfio_mappers()
                if who:
                    why = f"open in {', '.join(who)}"
                elif mappers:  # no fd: a device region still mapped holds the device, which holds the group
                    why = (f"held by a device region still mapped until it is unmapped; processes with a VFIO "
                           f"device mapped: {', '.join(mappers)}")
                else:  # /proc shows us neither (another user's processes)
                    why = "open in another process, or held by a device region it keeps mapped"
                raise vfio_error(errno.EBUSY, f"{self.path} is in use ({why}); a group can be open "
                                              "once at a time", "open") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise vfio_error(exc.errno, f"cannot open {self.path}: permission denied (run as root or "
                                            "chown the group node)", "open") from None
            raise

    def members(self) -> List[Tuple[str, Optional[str]]]:
        """``(bdf, driver)`` of the devices in this group, from sysfs."""
        return group_members(self.number, self._sysfs)

    @property
    def status(self) -> GroupStatus:
        """VFIO_GROUP_GET_STATUS: viable (every device of the group is bound to a VFIO
        driver or none) and whether the group is set to a container."""
        arg = ffi.new("struct vfio_group_status *")
        arg.argsz = ffi.sizeof(arg[0])
        self._ioctl("VFIO_GROUP_GET_STATUS", arg)
        return GroupStatus(bool(arg.flags & lib.VFIO_GROUP_FLAGS_VIABLE),
                           bool(arg.flags & lib.VFIO_GROUP_FLAGS_CONTAINER_SET))

    def _require_viable(self, op: str) -> None:
        if not self.status.viable:
            members = self.members()
            others = [(b, d) for b, d in members if d not in ("vfio-pci", None)]
            fix = " ".join(b for b, _ in others)
            raise vfio_error(errno.EPERM, f"group {self.number} is not viable: the IOMMU cannot isolate its devices "
                                          "from each other, so VFIO gives the group out only once none of them is "
                                          f"on a host driver; still on one: {_format_members(others)}. Members: "
                                          f"{_format_members(members)}. Fix: `pykvm host bind {fix}` (`pykvm host "
                                          f"restore {fix}` gives {'it' if len(others) == 1 else 'them'} back)", op)

    def set_container(self, container: "Container") -> None:
        """Join ``container`` (its IOMMU context); the group must be viable."""
        self._require_viable("VFIO_GROUP_SET_CONTAINER")
        fd = ffi.new("int *", container.fileno())
        self._ioctl("VFIO_GROUP_SET_CONTAINER", fd)
        self.container = container
        container._attach(self)

    def unset_container(self) -> None:
        """Leave the container (devices must be closed first: the kernel refuses with EBUSY)."""
        for child in list(self._children):
            child.close()
        try:
            self._ioctl("VFIO_GROUP_UNSET_CONTAINER")
        except VfioError as exc:
            if exc.errno != errno.EBUSY or not self._mapped:
                raise
            raise vfio_error(errno.EBUSY, f"group {self.number} cannot leave its container while a region of its "
                                          f"device is still mapped ({self._mapped} mapping(s) a caller's view keeps): "
                                          "release every view of it first", "VFIO_GROUP_UNSET_CONTAINER") from None
        self._left()

    def _left(self) -> None:
        container, self.container = self.container, None
        if container is not None:
            container._detach(self)

    def _track_mapping(self, mm: mmap.mmap) -> weakref.finalize:
        """Count ``mm``, a mapping of one of its devices' regions, until it is unmapped: the
        kernel keeps that device open until munmap, and the device keeps this group (and so
        its place in the container). The finalizer runs at munmap (the mmap's end, or a call)."""
        self._mapped += 1
        done = weakref.finalize(mm, self._unmapped)
        done.atexit = False
        return done

    def _unmapped(self) -> None:
        self._mapped -= 1
        if not self._mapped and (self._releasing or self.closed):
            self._left()  # the kernel released the last device: the group leaves its container now

    def get_device(self, bdf: str) -> Device:
        """Open device ``bdf`` of this group (needs a container with an IOMMU set)."""
        bdf = normalize_bdf(bdf)
        self._require_viable("VFIO_GROUP_GET_DEVICE_FD")
        if self.container is None or self.container.iommu_type is None:
            raise vfio_error(errno.EINVAL, f"group {self.number} needs a container with an IOMMU before its "
                                           "devices open: group.set_container(c); c.set_iommu()",
                             "VFIO_GROUP_GET_DEVICE_FD")
        try:
            fd = self._ioctl("VFIO_GROUP_GET_DEVICE_FD", ffi.new("char[]", bdf.encode()))
        except VfioError as exc:
            if exc.errno == errno.EBUSY:
                raise vfio_error(errno.EBUSY, f"device {bdf} is in use (already open)",
                                 "VFIO_GROUP_GET_DEVICE_FD") from None
            if exc.errno in (errno.ENODEV, errno.EINVAL):
                raise vfio_error(exc.errno, f"no device {bdf} in group {self.number} (members: "
                                            f"{_format_members(self.members())})", "VFIO_GROUP_GET_DEVICE_FD") from None
            raise
        return Device(fd, self, bdf)

    @property
    def devices(self) -> List[Device]:
        """The devices opened through this group and not closed yet."""
        return [d for d in self._children if not d.closed]

    def _release(self) -> None:
        # Closing the group fd takes it out of its container in the kernel once its devices are
        # released; a device region the caller still maps (a view of it is held) keeps its device
        # open, and the group in the container with the IOMMU and every DMA mapping, until munmap.
        self._releasing = True
        if not self._mapped:
            self._left()  # _left is idempotent: an unmap racing this may have called it too

    def __repr__(self) -> str:
        return f"<Group {self.number} {'closed' if self.closed else f'fd={self._fd}'}>"
