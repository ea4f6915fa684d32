"""``DeviceFd``: an in-kernel device made by KVM_CREATE_DEVICE, driven by attributes."""
from __future__ import annotations

from typing import Optional

from pykvm._fdobject import FdObject
from pykvm._native import ffi, lib
from pykvm.errors import KvmError

VFIO = lib.KVM_DEV_TYPE_VFIO


class DeviceFd(FdObject):
    """A KVM device fd; state is read and written as (group, attr) attributes."""

    _error_family = KvmError
    _what = "DeviceFd"

    def __init__(self, fd: int, vm, dev_type: int):
        super().__init__(fd, vm)
        self.vm = vm
        self.type = dev_type

    def _attr(self, group: int, attr: int, addr: int = 0, flags: int = 0):
        return ffi.new("struct kvm_device_attr *", {"flags": flags, "group": group, "attr": attr, "addr": addr})

    def has_attr(self, group: int, attr: int) -> bool:
        """KVM_HAS_DEVICE_ATTR: whether the device knows (group, attr)."""
        try:
            self._ioctl("KVM_HAS_DEVICE_ATTR", self._attr(group, attr))
            return True
        except KvmError:
            return False

    def set_attr(self, group: int, attr: int, value: Optional[object] = None) -> None:
        """KVM_SET_DEVICE_ATTR; ``value`` is an int, passed by pointer as an ``__s32`` (a fd,
        as KVM_DEV_VFIO_GROUP_ADD/DEL take), or cdata pointing at whatever the attribute
        takes (e.g. ``ffi.new("__u64 *", v)`` for a 64-bit attribute)."""
        keep = None
        addr = 0
        if isinstance(value, int):
            keep = ffi.new("__s32 *", value)
            addr = int(ffi.cast("uintptr_t", keep))
        elif value is not None:
            keep = value
            addr = int(ffi.cast("uintptr_t", value))
        self._ioctl("KVM_SET_DEVICE_ATTR", self._attr(group, attr, addr))
        del keep

    def get_attr(self, group: int, attr: int, size: int = 8) -> bytes:
        """KVM_GET_DEVICE_ATTR into a ``size``-byte buffer."""
        buf = ffi.new("char[]", size)
        self._ioctl("KVM_GET_DEVICE_ATTR", self._attr(group, attr, int(ffi.cast("uintptr_t", buf))))
        return bytes(ffi.buffer(buf))

    def vfio_group_add(self, group_fd: int) -> None:
        """Tell the KVM-VFIO device about a VFIO group (KVM_DEV_VFIO_GROUP_ADD)."""
        self.set_attr(lib.KVM_DEV_VFIO_GROUP, lib.KVM_DEV_VFIO_GROUP_ADD, group_fd)

    def vfio_group_del(self, group_fd: int) -> None:
        self.set_attr(lib.KVM_DEV_VFIO_GROUP, lib.KVM_DEV_VFIO_GROUP_DEL, group_fd)
