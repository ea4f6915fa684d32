"""Moving a device to vfio-pci and back, through sysfs.

The kernel's recipe (Documentation/ABI/testing/sysfs-bus-pci):

1. ``driver_override`` <- ``vfio-pci``: from now on only vfio-pci may bind it;
2. ``driver/unbind`` <- BDF: the current driver lets go (the device is now idle);
3. ``/sys/bus/pci/drivers_probe`` <- BDF: the PCI core probes again and, because
   of the override, binds vfio-pci, which creates ``/dev/vfio/GROUP``.

``restore`` clears the override, unbinds vfio-pci and probes again, so the
kernel picks the device's normal driver.  What the device was bound to before is
kept in a small JSON file per device (``/run/pykvm/bind/BDF.json`` by default),
written before the first sysfs write.  Every decision (unknown device, no IOMMU
group, a group that would be split, someone else's override, no permission) is
made before anything is written.
"""
from __future__ import annotations

import errno
import gc
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

from pykvm.host.groups import IommuGroup, group_of
from pykvm.host.kernel import KernelConfig, read_kernel_config
from pykvm.host.pci import VFIO_DRIVER, PciDevice, devices_dir, read_device
from pykvm.host.pci_ids import PciIds
from pykvm.host.sysfs import HostError, Root

__all__ = ["BindResult", "Change", "bind", "restore", "persist_lines", "DEFAULT_STATE_DIR"]

DEFAULT_STATE_DIR = "/run/pykvm/bind"
PROBE = "/sys/bus/pci/drivers_probe"


@dataclass
class Change:
    """One device's move: the driver it had, the one it has after the writes."""

    bdf: str
    before: Optional[str]
    after: Optional[str]
    skipped: str = ""  # why nothing was written for it, if so


@dataclass
class BindResult:
    group: Optional[int]
    changes: List[Change] = field(default_factory=list)
    left_behind: List[str] = field(default_factory=list)  # "BDF (driver)" sharing the group, untouched
    writes: List[List[str]] = field(default_factory=list)  # [path, text] in order
    notes: List[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _state_dir(root: Root, state_dir: Optional[str]) -> Path:
    return Path(state_dir) if state_dir else root(DEFAULT_STATE_DIR)


def _state_path(root: Root, state_dir: Optional[str], bdf: str) -> Path:
    return _state_dir(root, state_dir) / f"{bdf}.json"


def _load_state(root: Root, state_dir: Optional[str], bdf: str) -> Optional[dict]:
    try:
        return json.loads(_state_path(root, state_dir, bdf).read_text())
    except (OSError, ValueError):
        return None


def _require_writable(root: Root, paths: List[str], state_dir: Optional[Path]) -> None:
    """Refuse before any write if one of ``paths`` (or the state directory) is not writable."""
    for rel in paths:
        if not root.writable(rel):
            raise HostError(f"no permission to write {root(rel)}: changing driver bindings needs root",
                            "run the command as root (sudo)")
    if state_dir is not None and not root.dry_run:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HostError(f"cannot create the state directory {state_dir}: {exc.strerror}",
                            "pass --state-dir DIR on a writable file system")
        if not os.access(state_dir, os.W_OK):
            raise HostError(f"no permission to write {state_dir}", "run as root or pass --state-dir DIR")


def _write_all(root: Root, writes: List[tuple], undo: List[tuple]) -> None:
    """Do the sysfs writes in order; if the kernel refuses one, do the ``undo`` writes
    (clear the override, probe the old driver back) and explain."""
    for rel, text in writes:
        try:
            root.write(rel, text)
        except OSError as exc:
            for urel, utext in undo:
                try:
                    root.write(urel, utext)
                except OSError:
                    pass
            raise HostError(f"the kernel refused writing {text.strip()!r} to {root(rel)}: {exc.strerror}",
                            "see `dmesg | tail` for the driver's reason") from exc


def _devices_to_move(dev: PciDevice, group: IommuGroup, whole_group: bool, allow_split: bool) -> tuple:
    """(targets, left_behind) after the group rule: VFIO can only use a group when
    no other device in it is still driven by the host."""
    targets = [d for d in group.devices if not d.is_bridge] if whole_group else [dev]
    others = [d for d in group.devices if d.bdf not in {t.bdf for t in targets} and not d.vfio_safe]
    if others and not allow_split:
        names = ", ".join(f"{d.bdf} ({d.description}, driver {d.driver})" for d in others)
        raise HostError(f"{dev.bdf} shares IOMMU group {group.number} with {names}; VFIO can only open the group "
                        "when all of them leave their host drivers",
                        f"pass --group to bind the whole group to vfio-pci, or --allow-split to bind only {dev.bdf} "
                        "(the group stays unusable until the others are unbound)")
    return targets, others


def disks_in_use(root: Root, bdf: str) -> List[str]:
    """Block devices below ``bdf`` that are mounted, used as swap or held by device-mapper/md:
    unbinding the controller would pull them from under the host."""
    mounts = {}
    for table in ("/proc/self/mounts", "/proc/swaps"):
        for line in (root.read_text(table) or "").splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0].startswith("/dev/"):
                mounts.setdefault(fields[0][5:], "swap" if table == "/proc/swaps" else f"mounted at {fields[1]}")
    busy = []
    for name in root.listdir("/sys/class/block"):
        if f"/{bdf}/" not in os.path.realpath(root(f"/sys/class/block/{name}")):
            continue
        holders = root.listdir(f"/sys/class/block/{name}/holders")
        if name in mounts:
            busy.append(f"/dev/{name} ({mounts[name]})")
        elif holders:
            busy.append(f"/dev/{name} (held by {', '.join(holders)})")
    return busy


def bind(root: Root, bdf: str, *, whole_group: bool = False, allow_split: bool = False,
         state_dir: Optional[str] = None) -> BindResult:
    """Bind ``bdf`` (or its whole IOMMU group) to vfio-pci, remembering the drivers it had."""
    ids = PciIds.load(root)
    dev = read_device(root, bdf, ids)
    group = group_of(root, dev, ids)
    if not root.exists("/sys/bus/pci/drivers/vfio-pci"):
        raise HostError("the vfio-pci driver is not loaded", "modprobe vfio-pci vfio_iommu_type1")
    targets, others = _devices_to_move(dev, group, whole_group, allow_split)
    result = BindResult(group.number, left_behind=[f"{d.bdf} ({d.driver})" for d in others])
    for d in targets:
        busy = disks_in_use(root, d.bdf) if d.driver != VFIO_DRIVER else []
        if busy:
            raise HostError(f"{d.bdf} ({d.driver}) carries disks the host uses: {', '.join(busy)}",
                            "unmount them (swapoff, vgchange -an, ...) first; a controller holding the root "
                            "file system cannot be passed through")
        if d.driver_override not in (None, VFIO_DRIVER):
            raise HostError(f"{d.bdf} is already claimed for {d.driver_override} (its driver_override)",
                            f"clear it first: pykvm host restore {d.bdf}, or echo > {devices_dir(d.bdf)}/driver_override")
    moving = [d for d in targets if d.driver != VFIO_DRIVER]
    for d in targets:
        if d.driver == VFIO_DRIVER:
            result.changes.append(Change(d.bdf, d.driver, d.driver, skipped="already on vfio-pci"))
    if not moving:
        return result
    paths = [PROBE] + [f"{devices_dir(d.bdf)}/driver_override" for d in moving]
    paths += [f"{devices_dir(d.bdf)}/driver/unbind" for d in moving if d.driver]
    state = _state_dir(root, state_dir)
    _require_writable(root, paths, state)
    start = len(root.writes)
    for d in moving:
        if not root.dry_run:  # each record just before its device moves: a refusal leaves none for the rest
            _state_path(root, state_dir, d.bdf).write_text(json.dumps(
                {"bdf": d.bdf, "driver": d.driver, "driver_override": d.driver_override, "group": group.number}) + "\n")
        base = devices_dir(d.bdf)
        writes = [(f"{base}/driver_override", VFIO_DRIVER)]
        if d.driver:
            writes.append((f"{base}/driver/unbind", d.bdf))
        writes.append((PROBE, d.bdf))
        try:
            _write_all(root, writes, [(f"{base}/driver_override", "\n"), (PROBE, d.bdf)])
        except HostError:
            if not root.dry_run:
                _state_path(root, state_dir, d.bdf).unlink(missing_ok=True)
            raise
        result.changes.append(Change(d.bdf, d.driver, read_device(root, d.bdf, ids).driver))
    result.writes = [list(w) for w in root.writes[start:]]
    if others:
        one = len(others) == 1
        result.notes.append(f"IOMMU group {group.number} is split: {', '.join(result.left_behind)} "
                            f"{'stays on its host driver' if one else 'stay on their host drivers'}, so VFIO cannot "
                            f"open the group until {'it is' if one else 'they are'} unbound too")
    return result


def _refuse_if_open(bdf: str, group: int) -> None:
    """Unbinding a device that a VFIO user holds blocks until it lets go (the kernel
    waits in vfio-pci's remove): refuse instead. Our own process may hold it only
    through objects waiting for garbage collection (a device fd outlives nothing else
    that shows in /proc): collect them first. A device region still mapped holds the
    device, and with it the group, though no fd shows: opening the group node then
    fails with EBUSY, which is asked last."""
    from pykvm.vfio.group import holders, vfio_mappers  # only on a real system

    gc.collect()  # our own VFIO objects awaiting collection (device fds included) close now
    path = f"/dev/vfio/{group}"
    users = holders(path)
    if users:
        raise HostError(f"{bdf} is open through {path} by {', '.join(users)}: unbinding it from vfio-pci "
                        "would block until they close it",
                        "stop that VMM or program (or close its VFIO group and device), then restore again")
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            return  # no node (yet), or not ours to open: the unbind itself will say
        mappers = vfio_mappers()
        held = (f"a device region stays mapped (processes with a VFIO device mapped: {', '.join(mappers)})"
                if mappers else "by a process /proc does not show us (another user's?), with it open or a region mapped")
        raise HostError(f"{bdf}'s group {path} is still held, though no process we can see has it open: {held}; "
                        "unbinding it from vfio-pci would block until it lets go",
                        "stop that VMM or program, or unmap the region (release every view of it), "
                        "then restore again") from None


def restore(root: Root, bdf: str, *, whole_group: bool = False, state_dir: Optional[str] = None) -> BindResult:
    """Undo :func:`bind`: clear the override, unbind vfio-pci, let the kernel probe the normal driver."""
    ids = PciIds.load(root)
    dev = read_device(root, bdf, ids)
    targets = [dev]
    if whole_group:
        group = group_of(root, dev, ids)
        targets = [d for d in group.devices if d.bdf == dev.bdf or _load_state(root, state_dir, d.bdf)]
    result = BindResult(dev.iommu_group)
    todo = []
    for d in targets:
        saved = _load_state(root, state_dir, d.bdf)
        if d.driver not in (None, VFIO_DRIVER):
            if saved and d.driver == saved.get("driver") and d.driver_override is None:
                result.changes.append(Change(d.bdf, d.driver, d.driver, skipped=f"already back on {d.driver}"))
                if not root.dry_run:
                    _state_path(root, state_dir, d.bdf).unlink(missing_ok=True)
                continue
            raise HostError(f"{d.bdf} is bound to {d.driver}, not to vfio-pci: there is nothing of pykvm's to restore",
                            f"unbind it from {d.driver} yourself if that is what you want")
        if d.driver is None and saved is None and d.driver_override not in (None, VFIO_DRIVER):
            raise HostError(f"{d.bdf} has no driver and is claimed for {d.driver_override} (its driver_override), "
                            "not by pykvm: there is nothing of pykvm's to restore",
                            f"clear it yourself if that is what you want: echo > {devices_dir(d.bdf)}/driver_override")
        if d.driver == VFIO_DRIVER and d.iommu_group is not None and root.is_real:
            _refuse_if_open(d.bdf, d.iommu_group)
        todo.append((d, saved))
    if not todo:
        return result
    paths = [PROBE] + [f"{devices_dir(d.bdf)}/driver_override" for d, _ in todo]
    paths += [f"{devices_dir(d.bdf)}/driver/unbind" for d, _ in todo if d.driver]
    _require_writable(root, paths, None)
    start = len(root.writes)
    for d, saved in todo:
        base = devices_dir(d.bdf)
        # A lone newline clears the override. An override of vfio-pci that the device had before
        # bind (a half-done manual or interrupted bind) is not put back: the probe below would
        # hand the device straight back to vfio-pci instead of its driver.
        override = (saved or {}).get("driver_override")
        override = override if override and override != VFIO_DRIVER else "\n"
        writes = [(f"{base}/driver_override", override)]
        if d.driver:
            writes.append((f"{base}/driver/unbind", d.bdf))
        writes.append((PROBE, d.bdf))
        # A refusal puts the device back as it was: its override, and vfio-pci probed back if it
        # had left it. Its record stays, so `restore` can be run again.
        undo = [(f"{base}/driver_override", d.driver_override or "\n")]
        if d.driver:
            undo.append((PROBE, d.bdf))
        try:
            _write_all(root, writes, undo)
        except HostError as exc:
            done = [f"{c.bdf} (now on {c.after or 'no driver'})" for c in result.changes if not c.skipped]
            if not done:
                raise
            raise HostError(f"{exc.args[0]}; {d.bdf} is as it was, and already given back: {', '.join(done)}",
                            exc.fix) from exc
        after = read_device(root, d.bdf, ids).driver
        result.changes.append(Change(d.bdf, d.driver, after))
        wanted = (saved or {}).get("driver")
        if saved is None:
            result.notes.append(f"{d.bdf}: no record of its original driver; the kernel chose {after or 'none'}")
        elif wanted and after != wanted:
            result.notes.append(f"{d.bdf}: was on {wanted}, now on {after or 'no driver'}; "
                                f"bind it by hand: echo {d.bdf} > /sys/bus/pci/drivers/{wanted}/bind")
        if not root.dry_run:
            _state_path(root, state_dir, d.bdf).unlink(missing_ok=True)
    result.writes = [list(w) for w in root.writes[start:]]
    return result


def persist_lines(root: Root, bdf: str, *, whole_group: bool = False, state_dir: Optional[str] = None) -> List[str]:
    """The modprobe.d and initramfs lines that bind the device (or its group) to vfio-pci at every boot.

    ``options vfio-pci ids=`` claims every device with those IDs; ``softdep X pre:
    vfio-pci`` loads vfio-pci before the host driver so it wins the race (for a device
    already on vfio-pci, the host driver is the one :func:`bind` remembered).
    """
    ids = PciIds.load(root)
    dev = read_device(root, bdf, ids)
    devices = [dev]
    lines: List[str] = []
    if dev.iommu_group is None:
        lines.append(f"# note: {dev.bdf} is in no IOMMU group now; these lines only help once the IOMMU is on")
    elif whole_group:
        devices = [d for d in group_of(root, dev, ids).devices if not d.is_bridge]
    id_list = ",".join(sorted({d.ids for d in devices}))
    host_drivers = [(_load_state(root, state_dir, d.bdf) or {}).get("driver") if d.driver == VFIO_DRIVER else d.driver
                    for d in devices]
    drivers = sorted({drv for drv in host_drivers if drv})
    config = read_kernel_config(root)
    modules = _initramfs_modules(config)
    lines += [
        "# /etc/modprobe.d/vfio-pci-pykvm.conf",
        f"options vfio-pci ids={id_list}",
        *[f"softdep {drv.replace('-', '_')} pre: vfio-pci" for drv in drivers],
        f"# note: ids= claims EVERY device with these IDs ({id_list}), not only {dev.bdf}",
    ]
    if config and config.value("CONFIG_VFIO") == "n":
        lines.append("# note: this kernel has no VFIO (CONFIG_VFIO is not set): boot a kernel that has it")
    if modules:
        lines += [
            "",
            "# Debian/Ubuntu: append to /etc/initramfs-tools/modules, then run update-initramfs -u",
            *modules,
            "",
            "# dracut (Fedora, RHEL): /etc/dracut.conf.d/vfio-pci-pykvm.conf, then run dracut -f",
            f'force_drivers+=" {" ".join(modules)} "',
        ]
    return lines


def _initramfs_modules(config: Optional[KernelConfig]) -> List[str]:
    """The VFIO modules the initramfs must carry: those this kernel builds as modules
    (vfio_virqfd is its own module before 6.2); none when VFIO is built in."""
    wanted = [("vfio", "CONFIG_VFIO"), ("vfio_virqfd", "CONFIG_VFIO_VIRQFD"),
              ("vfio_iommu_type1", "CONFIG_VFIO_IOMMU_TYPE1"), ("vfio_pci", "CONFIG_VFIO_PCI")]
    if config is None:
        return ["vfio", "vfio_iommu_type1", "vfio_pci"]
    return [name for name, symbol in wanted if config.value(symbol) == "m"]
