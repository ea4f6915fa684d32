"""IOMMU groups: the smallest sets of devices the IOMMU can isolate from each other.

The kernel lists them as ``/sys/kernel/iommu_groups/N/devices/BDF``.  VFIO hands
out whole groups: a group is usable once every device in it is on vfio-pci, has
no driver, or is a bridge (or on a driver that does not do DMA for the host,
pci-stub/pcieport).  Otherwise the host could still DMA through a device the
guest shares the IOMMU domain with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional

from pykvm.host.pci import PciDevice, read_device
from pykvm.host.pci_ids import PciIds
from pykvm.host.sysfs import HostError, Root

__all__ = ["IommuGroup", "list_groups", "read_group", "group_of"]

GROUPS_DIR = "/sys/kernel/iommu_groups"


@dataclass
class IommuGroup:
    number: int
    devices: List[PciDevice]

    @property
    def blockers(self) -> List[PciDevice]:
        """Devices still held by a host driver that does DMA: they keep the group from VFIO."""
        return [d for d in self.devices if not d.vfio_safe]

    @property
    def ready(self) -> bool:
        """Can VFIO open this group now (every device on vfio-pci, driverless, or a bridge)?"""
        return not self.blockers

    def to_json(self) -> dict:
        return {"group": self.number, "ready": self.ready, "devices": [asdict(d) for d in self.devices]}


def read_group(root: Root, number: int, ids: Optional[PciIds] = None) -> IommuGroup:
    ids = ids or PciIds.load(root)
    bdfs = root.listdir(f"{GROUPS_DIR}/{number}/devices")
    return IommuGroup(number, [read_device(root, bdf, ids) for bdf in bdfs])


def list_groups(root: Optional[Root] = None) -> List[IommuGroup]:
    """Every IOMMU group in numeric order; empty when the IOMMU is off."""
    root = root or Root()
    ids = PciIds.load(root)
    numbers = sorted(int(n) for n in root.listdir(GROUPS_DIR) if n.isdigit())
    return [read_group(root, n, ids) for n in numbers]


def group_of(root: Root, device: PciDevice, ids: Optional[PciIds] = None) -> IommuGroup:
    """The group ``device`` is in; :class:`HostError` when it has none (no IOMMU translates its DMA)."""
    if device.iommu_group is None:
        raise HostError(f"{device.bdf} is in no IOMMU group: no IOMMU translates its DMA, so VFIO cannot take it",
                        "enable VT-d/AMD-Vi and boot with intel_iommu=on; `pykvm host check` shows what is missing")
    return read_group(root, device.iommu_group, ids)


def format_groups(groups: List[IommuGroup]) -> str:
    if not groups:
        return ("no IOMMU groups: /sys/kernel/iommu_groups is empty, the IOMMU is off\n"
                "  fix: enable VT-d/AMD-Vi in firmware and boot with intel_iommu=on; `pykvm host check` explains")
    lines = []
    for g in groups:
        state = "ready for VFIO" if g.ready else "not ready: " + ", ".join(f"{d.bdf} on {d.driver}" for d in g.blockers)
        lines.append(f"IOMMU group {g.number} ({state})")
        for d in g.devices:
            driver = d.driver or "no driver"
            lines.append(f"  {d.bdf} [{d.class_code >> 8:04x}] {d.description}  driver: {driver}")
    return "\n".join(lines)
