"""PCI devices as sysfs shows them under ``/sys/bus/pci/devices/BDF``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from pykvm.host.bdf import parse_bdf
from pykvm.host.pci_ids import PciIds
from pykvm.host.sysfs import HostError, Root

__all__ = ["PciDevice", "read_device", "list_devices", "VFIO_DRIVER", "BRIDGE_CLASS"]

VFIO_DRIVER = "vfio-pci"
BRIDGE_CLASS = 0x06  # base class: host, ISA, PCI-to-PCI bridges
# Drivers that leave a group viable for VFIO: they declare driver_managed_dma, so the
# IOMMU core lets VFIO claim the group's DMA ownership while they hold its other devices.
VFIO_SAFE_DRIVERS = (VFIO_DRIVER, "pci-stub", "pcieport")


def devices_dir(bdf: str) -> str:
    return f"/sys/bus/pci/devices/{bdf}"


@dataclass
class PciDevice:
    """One function's identity and binding, read from its sysfs directory."""

    bdf: str
    vendor: int
    device: int
    class_code: int
    revision: Optional[int]
    subsystem_vendor: Optional[int]
    subsystem_device: Optional[int]
    driver: Optional[str]
    driver_override: Optional[str]
    iommu_group: Optional[int]
    class_name: str
    vendor_name: Optional[str]
    device_name: Optional[str]

    @property
    def ids(self) -> str:
        """``vendor:device`` as ``lspci -d`` and ``vfio-pci ids=`` take it."""
        return f"{self.vendor:04x}:{self.device:04x}"

    @property
    def is_bridge(self) -> bool:
        return self.class_code >> 16 == BRIDGE_CLASS

    @property
    def vfio_safe(self) -> bool:
        """Does this device let its IOMMU group be handed to VFIO as it is bound now?"""
        return self.driver is None or self.driver in VFIO_SAFE_DRIVERS or self.is_bridge

    @property
    def description(self) -> str:
        name = self.device_name or "Device"
        vendor = self.vendor_name or f"Vendor {self.vendor:04x}"
        return f"{self.class_name}: {vendor} {name} [{self.ids}]"


def _hex(root: Root, path: str) -> Optional[int]:
    text = root.read_text(path)
    try:
        return int(text.strip(), 16) if text is not None else None
    except ValueError:
        return None


def read_device(root: Root, bdf: str, ids: Optional[PciIds] = None) -> PciDevice:
    """Read ``bdf`` (any spelling ``parse_bdf`` takes); :class:`HostError` when it does not exist."""
    bdf = parse_bdf(bdf)
    base = devices_dir(bdf)
    if not root.exists(base):
        raise HostError(f"no PCI device {bdf} on this machine", "`pykvm host groups` or `lspci -D` lists the devices")
    ids = ids or PciIds.load(root)
    vendor, device = _hex(root, f"{base}/vendor"), _hex(root, f"{base}/device")
    class_code = _hex(root, f"{base}/class")
    if vendor is None or device is None or class_code is None:
        raise HostError(f"{base} lacks readable vendor/device/class files", "is this a sysfs PCI device directory?")
    override = (root.read_text(f"{base}/driver_override") or "").strip()
    group = root.link_name(f"{base}/iommu_group")
    return PciDevice(
        bdf=bdf,
        vendor=vendor,
        device=device,
        class_code=class_code,
        revision=_hex(root, f"{base}/revision"),
        subsystem_vendor=_hex(root, f"{base}/subsystem_vendor"),
        subsystem_device=_hex(root, f"{base}/subsystem_device"),
        driver=root.link_name(f"{base}/driver"),
        driver_override=None if override in ("", "(null)") else override,
        iommu_group=int(group) if group and group.isdigit() else None,
        class_name=ids.class_name(class_code),
        vendor_name=ids.vendor_name(vendor),
        device_name=ids.device_name(vendor, device),
    )


def list_devices(root: Root, ids: Optional[PciIds] = None) -> List[PciDevice]:
    """Every PCI function under ``/sys/bus/pci/devices``, in address order."""
    ids = ids or PciIds.load(root)
    return [read_device(root, bdf, ids) for bdf in root.listdir("/sys/bus/pci/devices")]
