"""``pykvm host show BDF``: one device as ``lspci -k -v`` shows it, read from sysfs,
plus its VFIO regions and interrupts when it is bound to vfio-pci."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional

from pykvm.host.config_space import Capability, Region, human_size, parse_capabilities, parse_resources
from pykvm.host.pci import VFIO_DRIVER, PciDevice, devices_dir, read_device
from pykvm.host.pci_ids import PciIds
from pykvm.host.sysfs import Root

__all__ = ["DeviceView", "show_device", "format_device"]


@dataclass
class DeviceView:
    device: PciDevice
    prog_if: Optional[str]
    irq: Optional[int]
    numa_node: Optional[int]
    config_size: int
    regions: List[Region]
    capabilities: List[Capability]
    notes: List[str] = field(default_factory=list)
    vfio_regions: List[dict] = field(default_factory=list)
    vfio_irqs: List[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _int(text: Optional[str]) -> Optional[int]:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def show_device(root: Optional[Root] = None, bdf: str = "", *, vfio: bool = True) -> DeviceView:
    """Everything sysfs says about ``bdf``; with ``vfio`` and the device on vfio-pci,
    also what VFIO reports for its regions and IRQs (needs the real root and root rights)."""
    root = root or Root()
    ids = PciIds.load(root)
    dev = read_device(root, bdf, ids)
    base = devices_dir(dev.bdf)
    config = root.read_bytes(f"{base}/config") or b""
    view = DeviceView(
        device=dev,
        prog_if=ids.prog_if_name(dev.class_code),
        irq=_int(root.read_text(f"{base}/irq")),
        numa_node=_int(root.read_text(f"{base}/numa_node")),
        config_size=len(config),
        regions=parse_resources(root.read_text(f"{base}/resource") or ""),
        capabilities=parse_capabilities(config),
    )
    if 0 < len(config) <= 64:
        view.notes.append("only the 64-byte header is readable: the capability list needs root")
    if vfio and dev.driver == VFIO_DRIVER:
        _add_vfio(root, view)
    return view


def _add_vfio(root: Root, view: DeviceView) -> None:
    """Open the device through the VFIO layer (group, container, device fd) and list its regions and IRQs."""
    dev = view.device
    if not root.is_real:
        view.notes.append("VFIO section skipped: a synthetic root has no devices to open")
        return
    if not root.exists(f"/dev/vfio/{dev.iommu_group}"):
        view.notes.append(f"VFIO section skipped: /dev/vfio/{dev.iommu_group} does not exist")
        return
    try:
        from pykvm.vfio import open_device_info
    except ImportError as exc:
        view.notes.append(f"VFIO section skipped: the VFIO layer is not available ({exc})")
        return
    try:
        regions, irqs = open_device_info(dev.bdf)
    except OSError as exc:
        view.notes.append(f"VFIO section skipped: {exc}")
        return
    view.vfio_regions, view.vfio_irqs = regions, irqs


def format_device(view: DeviceView) -> str:
    d = view.device
    head = f"{d.bdf} {d.class_name} [{d.class_code >> 8:04x}]: {d.vendor_name or 'Vendor'} {d.device_name or 'Device'} [{d.ids}]"
    if d.revision is not None:
        head += f" (rev {d.revision:02x})"
    if d.class_code & 0xFF:
        head += f" (prog-if {d.class_code & 0xFF:02x}" + (f" [{view.prog_if}])" if view.prog_if else ")")
    lines = [head]
    if d.subsystem_vendor is not None and d.subsystem_device is not None:
        lines.append(f"\tSubsystem: [{d.subsystem_vendor:04x}:{d.subsystem_device:04x}]")
    lines.append(f"\tIOMMU group: {d.iommu_group if d.iommu_group is not None else 'none'}")
    if view.irq is not None:
        lines.append(f"\tIRQ: {view.irq}" + (f", NUMA node: {view.numa_node}" if view.numa_node not in (None, -1) else ""))
    for r in view.regions:
        label = "Expansion ROM" if r.kind == "Expansion ROM" else f"Region {r.index}"
        where = "I/O ports at" if r.kind == "I/O ports" else "Memory at" if r.kind == "Memory" else "at"
        flags = f" ({r.flags})" if r.flags else ""
        lines.append(f"\t{label}: {where} {r.start:x}{flags} [size={human_size(r.size)}]")
    for c in view.capabilities:
        where = f"[{c.offset:03x}]" if c.extended else f"[{c.offset:02x}]"
        lines.append(f"\tCapabilities: {where} {c.name}" + (f": {c.detail}" if c.detail else ""))
    if d.driver_override:
        lines.append(f"\tDriver override: {d.driver_override}")
    lines.append(f"\tKernel driver in use: {d.driver or '(none)'}")
    if view.vfio_regions or view.vfio_irqs:
        lines.append("\tVFIO regions:")
        lines += [f"\t\t{r}" for r in view.vfio_regions]
        lines.append("\tVFIO IRQs:")
        lines += [f"\t\t{i}" for i in view.vfio_irqs]
    lines += [f"\tNote: {n}" for n in view.notes]
    return "\n".join(lines)
