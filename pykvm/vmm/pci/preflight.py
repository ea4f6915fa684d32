"""Checks before a device is passed through: each failure says what is wrong and how to fix it.

Three things must hold, and all are visible without opening anything:

- the function exists, is not a bridge (class 0x06: a host, ISA or PCI-to-PCI bridge
  routes the host's own buses; no guest can have it), and is bound to vfio-pci (only
  then does /dev/vfio/GROUP exist);
- its IOMMU group is viable: every other device in the group is on vfio-pci, a
  driver that does no DMA for the host (pci-stub, pcieport), or no driver;
- vfio_iommu_type1 may pin all of guest RAM: it charges pinned pages to
  RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK, and fails the DMA map
  with ENOMEM otherwise (after the guest was set up, with a vaguer message).
"""
from __future__ import annotations

import os
import re
import resource
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from pykvm.errors import FixableError
from pykvm.pci_address import BDF_PATTERN, canonical_bdf
from pykvm.vfio.group import group_members
from pykvm.vmm.layout import human_size as _human

VFIO_DRIVER = "vfio-pci"
VFIO_SAFE_DRIVERS = (VFIO_DRIVER, "pci-stub", "pcieport")
CAP_IPC_LOCK = 14


class PassthroughError(FixableError, RuntimeError):
    """A device cannot be passed through as things are; ``fix`` says what to do."""


@dataclass(frozen=True)
class Target:
    """A function that passed the checks: its address and IOMMU group."""

    bdf: str
    group: int
    ids: str  # vendor:device


def _link(path: str) -> Optional[str]:
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return "?"


def resolve(device: str, sysfs: str = "/sys") -> str:
    """The canonical BDF of ``device``: a PCI address (``00:05.0``) or its sysfs directory."""
    text = str(device).strip()
    if "/" in text:
        name = os.path.basename(os.path.realpath(text.rstrip("/")))
        if not os.path.isdir(text) or not BDF_PATTERN.fullmatch(name):
            raise PassthroughError(f"{text} is not a PCI device directory in sysfs",
                                   "give a PCI address (0000:00:05.0) or /sys/bus/pci/devices/<address>")
        text = name
    try:
        return canonical_bdf(text)
    except ValueError:
        raise PassthroughError(f"{device!r} is not a PCI address",
                               "write it as DOMAIN:BUS:DEVICE.FUNCTION, e.g. 0000:00:05.0 (`lspci -D` lists them)") from None


BRIDGE_CLASS = "0x06"
_BRIDGE_KINDS = {"0x0600": "host bridge", "0x0601": "ISA bridge", "0x0604": "PCI-to-PCI bridge",
                 "0x0609": "PCI-to-PCI bridge"}


def _is_bridge(bdf: str, sysfs: str) -> bool:
    return _read(f"{sysfs}/bus/pci/devices/{bdf}/class").startswith(BRIDGE_CLASS)


def check_unique(devices: Sequence[str], sysfs: str = "/sys") -> List[str]:
    """The canonical BDFs of ``devices``; PassthroughError if one function is given twice
    (also as a BDF and as its sysfs path): it would sit on two slots of the guest's bus."""
    seen: Dict[str, str] = {}
    for device in devices:
        bdf = resolve(device, sysfs)
        if bdf in seen:
            both = f"{seen[bdf]!r} and {device!r}" if seen[bdf] != device else f"{device!r} twice"
            raise PassthroughError(f"PCI device {bdf} is given more than once ({both})",
                                   "pass each device once (one --vfio per device, or one entry in vfio = [...])")
        seen[bdf] = device
    return list(seen)


def check_device(device: str, sysfs: str = "/sys") -> Target:
    """The function exists, is on vfio-pci, and its IOMMU group is viable."""
    bdf = resolve(device, sysfs)
    base = f"{sysfs}/bus/pci/devices/{bdf}"
    if not os.path.isdir(base):
        raise PassthroughError(f"no PCI device {bdf} on this machine",
                               "check the address with `lspci -D` or `pykvm host groups`")
    ids = f"{_read(base + '/vendor')[2:]}:{_read(base + '/device')[2:]}"
    cls = _read(f"{base}/class")
    if cls.startswith(BRIDGE_CLASS):
        kind = _BRIDGE_KINDS.get(cls[:6], "bridge")
        raise PassthroughError(f"{bdf} [{ids}] is a {kind} (class {cls}): bridges carry the host's own PCI buses "
                               "and cannot be passed through to a guest",
                               "pass an endpoint device instead (`lspci -D` lists them; `pykvm host groups` shows "
                               "which devices share its IOMMU group)")
    driver = _link(f"{base}/driver")
    if driver != VFIO_DRIVER:
        now = f"bound to {driver}" if driver else "not bound to any driver"
        raise PassthroughError(f"{bdf} [{ids}] is {now}, not to vfio-pci, so VFIO cannot open it",
                               f"`pykvm host bind {bdf}` (moves it to vfio-pci; `pykvm host restore {bdf}` gives it back)")
    group = _link(f"{base}/iommu_group")
    if group is None or not group.isdigit():
        raise PassthroughError(f"{bdf} has no IOMMU group: the IOMMU is off",
                               "enable VT-d/AMD-Vi and boot with intel_iommu=on (Intel); `pykvm host check` says more")
    members = group_members(int(group), sysfs)
    blockers = [(b, d) for b, d in members if d not in VFIO_SAFE_DRIVERS and d is not None and not _is_bridge(b, sysfs)]
    if blockers:
        listing = ", ".join(f"{b} (driver: {d or 'none'})" for b, d in members)
        raise PassthroughError(
            f"IOMMU group {group} of {bdf} is not viable: {', '.join(b for b, _ in blockers)} still "
            f"{'has a host driver' if len(blockers) == 1 else 'have host drivers'}; the group holds {listing}",
            f"`pykvm host bind --group {bdf}` (the IOMMU isolates groups, not devices: every device of a group goes "
            f"to the guest's IOMMU domain together); `pykvm host restore --group {bdf}` gives them back afterwards")
    return Target(bdf, int(group), ids)


def _has_cap_ipc_lock() -> bool:
    status = _read("/proc/self/status")
    m = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", status, re.MULTILINE)
    return bool(m and int(m.group(1), 16) >> CAP_IPC_LOCK & 1)


def check_memlock(guest_ram: int) -> None:
    """RLIMIT_MEMLOCK (or CAP_IPC_LOCK) lets VFIO pin ``guest_ram`` bytes."""
    if _has_cap_ipc_lock():
        return
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or soft >= guest_ram:
        return
    kib = -(-guest_ram // 1024)
    raise PassthroughError(
        f"RLIMIT_MEMLOCK is {_human(soft)} but VFIO must pin all {_human(guest_ram)} of guest RAM for device DMA",
        f"raise it: `ulimit -l {kib}` (or unlimited) in the shell that runs pykvm; for a user, "
        f"`USER hard memlock {kib}` in /etc/security/limits.conf; for a service, LimitMEMLOCK={kib}K "
        "(or infinity) in its systemd unit; or run as root (CAP_IPC_LOCK)")


def preflight(device: str, guest_ram: int, sysfs: str = "/sys") -> Target:
    """Every check, device first; raises :class:`PassthroughError` at the first failure."""
    target = check_device(device, sysfs)
    check_memlock(guest_ram)
    return target
