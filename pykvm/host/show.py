"""``pykvm host show BDF``: one device as ``lspci -k -v`` shows it, read from sysfs,
plus its VFIO regions and interrupts when it is bound to vfio-pci."""
from __future__ import annotations

import errno
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


_REGION_NAMES = {0: "BAR0", 1: "BAR1", 2: "BAR2", 3: "BAR3", 4: "BAR4", 5: "BAR5", 6: "ROM", 7: "config", 8: "VGA"}


def _add_vfio(root: Root, view: DeviceView) -> None:
    """Open the device through the VFIO layer (container, group, device fd) and list its regions and IRQs.

    Opening a group takes it for this process: when a VMM holds it, the kernel answers EBUSY
    and the section is skipped with that reason.
    """
    dev = view.device
    if not root.is_real:
        view.notes.append("VFIO section skipped: a synthetic root has no devices to open")
        return
    if not root.exists(f"/dev/vfio/{dev.iommu_group}"):
        view.notes.append(f"VFIO section skipped: /dev/vfio/{dev.iommu_group} does not exist")
        return
    try:
        from pykvm.vfio import Container, Group
    except ImportError as exc:
        view.notes.append(f"VFIO section skipped: the VFIO layer is not available ({exc})")
        return
    try:
        with Container() as container, Group(dev.iommu_group) as group:
            group.set_container(container)
            container.set_iommu()
            device = group.get_device(dev.bdf)
            for index in range(device.info.num_regions):
                try:
                    info = device.region(index).info
                except OSError as exc:
                    if exc.errno == errno.EINVAL:  # the VGA region of a non-VGA device
                        continue
                    raise
                if info.size == 0:
                    continue
                flags = [f for f, on in (("read", info.readable), ("write", info.writable), ("mmap", info.mmappable)) if on]
                view.vfio_regions.append({
                    "index": info.index, "name": _REGION_NAMES.get(info.index, f"region {info.index}"),
                    "size": info.size, "offset": info.offset, "flags": flags,
                    "mmap_areas": [[a.offset, a.size] for a in info.mmap_areas()],
                })
            for index in range(device.info.num_irqs):
                irq = device.irq_info(index)
                flags = [f for f, on in (("eventfd", irq.eventfd), ("maskable", irq.maskable),
                                         ("automasked", irq.automasked), ("noresize", irq.noresize)) if on]
                view.vfio_irqs.append({"index": index, "name": irq.name, "count": irq.count, "flags": flags})
    except OSError as exc:
        view.notes.append(f"VFIO section skipped: {exc}")


def _region_line(r: dict) -> str:
    areas = ""
    if r["mmap_areas"] and r["mmap_areas"] != [[0, r["size"]]]:
        areas = " mmap areas " + ", ".join(f"[{o:#x}+{human_size(n)}]" for o, n in r["mmap_areas"])
    return f"{r['index']} {r['name']:<6} size={human_size(r['size'])} fd offset={r['offset']:#x} {','.join(r['flags'])}{areas}"


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
        lines += [f"\t\t{_region_line(r)}" for r in view.vfio_regions]
        lines.append("\tVFIO IRQs:")
        lines += [f"\t\t{i['index']} {i['name']:<6} count={i['count']} {','.join(i['flags'])}" for i in view.vfio_irqs]
    lines += [f"\tNote: {n}" for n in view.notes]
    return "\n".join(lines)
