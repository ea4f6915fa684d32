"""``bind`` / ``restore`` decisions and the sysfs writes they make, on synthetic trees.

A synthetic tree does not rebind anything (no kernel behind it): these tests
check what would be written, in which order, and that refusals write nothing.
The real effect is tested in the lab (tests/lab/test_host_lab.py).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from pykvm.cli import main
from pykvm.host.bdf import BdfError
from pykvm.host.bind import bind, persist_lines, restore
from pykvm.host.sysfs import HostError, Root
from tests.unit.host.sysfs_tree import SysTree

NVME = "0000:00:05.0"
DEV = f"/sys/bus/pci/devices/{NVME}"


def state_of(tree, bdf=NVME):
    path = tree.path(f"/run/pykvm/bind/{bdf}.json")
    return json.loads(path.read_text()) if path.exists() else None


def snapshot(tree):
    """Every regular file's bytes: a refusal must leave all of them as they were."""
    return {p: p.read_bytes() for p in tree.base.rglob("*") if p.is_file() and not p.is_symlink()}


def test_bind_writes_override_unbind_probe_and_remembers_the_driver(tree):
    tree.lab_like()
    result = bind(tree.root, "00:05.0")
    assert result.writes == [[f"{DEV}/driver_override", "vfio-pci"], [f"{DEV}/driver/unbind", NVME],
                             ["/sys/bus/pci/drivers_probe", NVME]]
    assert tree.read(f"{DEV}/driver_override") == "vfio-pci"
    assert tree.read("/sys/bus/pci/drivers/nvme/unbind") == NVME  # through the driver symlink
    assert tree.read("/sys/bus/pci/drivers_probe") == NVME
    assert state_of(tree) == {"bdf": NVME, "driver": "nvme", "driver_override": None, "group": 4}
    assert result.group == 4 and result.left_behind == []


def test_bind_driverless_device_needs_no_unbind(tree):
    tree.lab_like()
    result = bind(tree.root, "0000:00:04.0")
    assert [w[0] for w in result.writes] == ["/sys/bus/pci/devices/0000:00:04.0/driver_override", "/sys/bus/pci/drivers_probe"]
    assert state_of(tree, "0000:00:04.0")["driver"] is None


def test_bind_on_vfio_pci_already_writes_nothing(tree):
    tree.lab_like()
    tree.device(NVME, 0x1B36, 0x0010, 0x010802, driver="vfio-pci", group=4, override="vfio-pci")
    before = snapshot(tree)
    result = bind(tree.root, NVME)
    assert result.writes == [] and result.changes[0].skipped == "already on vfio-pci"
    assert snapshot(tree) == before and state_of(tree) is None


def shared(tree):
    """nvme shares group 4 with a NIC on e1000e and a bridge on pcieport."""
    tree.lab_like()
    tree.device("0000:00:06.0", 0x8086, 0x10D3, 0x020000, driver="e1000e", group=4)
    tree.device("0000:00:07.0", 0x8086, 0x1901, 0x060400, driver="pcieport", group=4)
    return tree


def test_bind_refuses_to_split_a_group_and_changes_nothing(tree):
    shared(tree)
    before = snapshot(tree)
    with pytest.raises(HostError) as err:
        bind(tree.root, NVME)
    msg = str(err.value)
    assert "shares IOMMU group 4 with 0000:00:06.0" in msg and "e1000e" in msg and "00:07.0" not in msg
    assert "--group" in err.value.fix and "--allow-split" in err.value.fix
    assert tree.root.writes == [] and snapshot(tree) == before and state_of(tree) is None


def test_bind_group_moves_every_non_bridge_device(tree):
    shared(tree)
    result = bind(tree.root, NVME, whole_group=True)
    targets = [w[1] for w in result.writes if w[0] == "/sys/bus/pci/drivers_probe"]
    assert targets == [NVME, "0000:00:06.0"]  # not the bridge
    assert tree.read("/sys/bus/pci/devices/0000:00:06.0/driver_override") == "vfio-pci"
    assert tree.read("/sys/bus/pci/drivers/e1000e/unbind") == "0000:00:06.0"
    assert state_of(tree, "0000:00:06.0")["driver"] == "e1000e"
    assert not tree.path("/run/pykvm/bind/0000:00:07.0.json").exists()


def test_bind_allow_split_says_what_stays_behind(tree, capsys):
    shared(tree)
    assert main(["host", "bind", NVME, "--allow-split", "--root", str(tree.base)]) == 1  # nothing rebinds here
    out = capsys.readouterr()
    assert "0000:00:05.0: nvme -> nvme" in out.out
    assert ("IOMMU group 4 is split: 0000:00:06.0 (e1000e) stays on its host driver, so VFIO cannot open the "
            "group until it is unbound too") in out.out
    assert "not on vfio-pci after the probe" in out.err
    assert tree.read("/sys/bus/pci/devices/0000:00:06.0/driver_override") == "(null)\n"


def test_bind_allow_split_names_several_left_behind_in_the_plural(tree):
    shared(tree)
    tree.device("0000:00:08.0", 0x8086, 0x10D3, 0x020000, driver="igb", group=4)
    result = bind(tree.root, NVME, allow_split=True)
    assert result.left_behind == ["0000:00:06.0 (e1000e)", "0000:00:08.0 (igb)"]  # not the bridge
    assert result.notes == ["IOMMU group 4 is split: 0000:00:06.0 (e1000e), 0000:00:08.0 (igb) stay on their host "
                            "drivers, so VFIO cannot open the group until they are unbound too"]
    assert [w[1] for w in result.writes if w[0] == "/sys/bus/pci/drivers_probe"] == [NVME]  # only NVME moved
    for bdf in ("0000:00:06.0", "0000:00:08.0"):
        assert tree.read(f"/sys/bus/pci/devices/{bdf}/driver_override") == "(null)\n"


@pytest.mark.parametrize("args, message", [
    (["0000:00:05"], "is not a PCI address"),
    (["0000:00:09.0"], "no PCI device 0000:00:09.0"),
    (["0000:00:0a.0"], "in no IOMMU group"),
    (["0000:00:0b.0"], "already claimed for pci-stub"),
])
def test_bind_bad_input_is_refused_with_nothing_changed(tree, capsys, args, message):
    tree.lab_like()
    tree.device("0000:00:0a.0", 0x8086, 0x10D3, 0x020000, driver="e1000e")
    tree.device("0000:00:0b.0", 0x8086, 0x10D3, 0x020000, group=7, override="pci-stub")
    before = snapshot(tree)
    assert main(["host", "bind", *args, "--root", str(tree.base)]) == 1
    err = capsys.readouterr().err
    assert message in err and "fix:" in err and "Traceback" not in err
    assert snapshot(tree) == before and not tree.path("/run/pykvm").exists()


def test_bind_refuses_a_controller_whose_disks_are_in_use(tree):
    tree.lab_like()
    disk = f"../../devices/pci0000:00/{NVME}/nvme/nvme0/nvme0n1"
    tree.dir(f"/sys/devices/pci0000:00/{NVME}/nvme/nvme0/nvme0n1/nvme0n1p1/holders")
    tree.dir(f"/sys/devices/pci0000:00/{NVME}/nvme/nvme0/nvme0n1/holders")
    tree.link("/sys/class/block/nvme0n1", disk)
    tree.link("/sys/class/block/nvme0n1p1", disk + "/nvme0n1p1")
    tree.file("/proc/self/mounts", "proc /proc proc rw 0 0\n/dev/nvme0n1p1 / ext4 rw,relatime 0 0\n")
    before = snapshot(tree)
    with pytest.raises(HostError, match=r"carries disks the host uses: /dev/nvme0n1p1 \(mounted at /\)") as err:
        bind(tree.root, NVME)
    assert "unmount" in err.value.fix and tree.root.writes == [] and snapshot(tree) == before
    tree.file("/proc/self/mounts", "proc /proc proc rw 0 0\n")
    tree.link(f"/sys/devices/pci0000:00/{NVME}/nvme/nvme0/nvme0n1/holders/dm-0", "../../../../../../virtual/block/dm-0")
    with pytest.raises(HostError, match=r"/dev/nvme0n1 \(held by dm-0\)"):
        bind(tree.root, NVME)
    tree.path(f"/sys/devices/pci0000:00/{NVME}/nvme/nvme0/nvme0n1/holders/dm-0").unlink()
    assert bind(tree.root, NVME).changes[0].bdf == NVME  # nothing in use: allowed


def test_bind_needs_vfio_pci_loaded(tree):
    tree.lab_like()
    shutil.rmtree(tree.path("/sys/bus/pci/drivers/vfio-pci"))
    with pytest.raises(HostError, match="vfio-pci driver is not loaded") as err:
        bind(tree.root, NVME)
    assert "modprobe vfio-pci" in err.value.fix and tree.root.writes == []


def test_dry_run_records_the_writes_and_changes_nothing(tree, capsys):
    tree.lab_like()
    before = snapshot(tree)
    assert main(["host", "bind", NVME, "--dry-run", "--root", str(tree.base)]) == 0
    out = capsys.readouterr().out
    assert f"vfio-pci > {DEV}/driver_override" in out and f"{NVME} > /sys/bus/pci/drivers_probe" in out
    assert snapshot(tree) == before and state_of(tree) is None


def test_a_refused_write_is_undone(tree):
    tree.lab_like()
    probe = tree.path("/sys/bus/pci/drivers_probe")
    probe.unlink()
    probe.mkdir()  # writing it fails (EISDIR), as a kernel refusal would
    with pytest.raises(HostError, match="refused writing") as err:
        bind(tree.root, NVME)
    assert "dmesg" in err.value.fix
    assert tree.read(f"{DEV}/driver_override") == "\n"  # override cleared again
    assert state_of(tree) is None


def test_a_refused_write_in_a_group_leaves_no_record_for_devices_it_never_moved(tree):
    """bind --group wrote every device's saved state before the first sysfs write: a refusal
    at the first device left records of drivers for devices pykvm never touched."""
    shared(tree)
    probe = tree.path("/sys/bus/pci/drivers_probe")
    probe.unlink()
    probe.mkdir()  # the first device's probe is refused
    with pytest.raises(HostError, match="refused writing"):
        bind(tree.root, NVME, whole_group=True)
    assert state_of(tree) is None and state_of(tree, "0000:00:06.0") is None
    assert tree.read("/sys/bus/pci/devices/0000:00:06.0/driver_override") == "(null)\n"  # never touched


def test_restore_clears_override_unbinds_vfio_and_probes(tree):
    tree.lab_like()
    bind(tree.root, NVME)
    tree.link(f"/sys/devices/pci0000:00/{NVME}/driver", "../../../bus/pci/drivers/vfio-pci")  # what the kernel did
    root = Root(tree.base)
    result = restore(root, NVME)
    assert result.writes == [[f"{DEV}/driver_override", "\n"], [f"{DEV}/driver/unbind", NVME],
                             ["/sys/bus/pci/drivers_probe", NVME]]
    assert tree.read("/sys/bus/pci/drivers/vfio-pci/unbind") == NVME
    assert state_of(tree) is None
    # no kernel here, so the device still looks bound to vfio-pci: restore says how to finish by hand
    assert "echo 0000:00:05.0 > /sys/bus/pci/drivers/nvme/bind" in result.notes[0]


def test_a_refused_write_in_restore_puts_the_device_back_as_it_was(tree):
    """The kernel refuses the probe that should hand the device to its driver: the override goes
    back to vfio-pci (and vfio-pci is probed again), and the record stays for another restore."""
    tree.lab_like()
    bind(tree.root, NVME)
    tree.link(f"/sys/devices/pci0000:00/{NVME}/driver", "../../../bus/pci/drivers/vfio-pci")  # what the kernel did
    record = state_of(tree)
    probe = tree.path("/sys/bus/pci/drivers_probe")
    probe.unlink()
    probe.mkdir()  # writing it fails (EISDIR), as a kernel refusal would
    with pytest.raises(HostError, match="refused writing") as err:
        restore(Root(tree.base), NVME)
    assert "dmesg" in err.value.fix
    assert tree.read(f"{DEV}/driver_override").strip() == "vfio-pci"  # not cleared
    assert state_of(tree) == record is not None


def test_a_refused_write_in_a_group_restore_names_the_devices_already_given_back(tree):
    shared(tree)
    bind(tree.root, NVME, whole_group=True)
    for bdf in (NVME, "0000:00:06.0"):
        tree.link(f"/sys/devices/pci0000:00/{bdf}/driver", "../../../bus/pci/drivers/vfio-pci")
    override = tree.path("/sys/bus/pci/devices/0000:00:06.0/driver_override")
    override.unlink()
    override.mkdir()  # the NIC's override cannot be written
    with pytest.raises(HostError, match=r"refused writing .*0000:00:06.0 is as it was, and already given back: "
                                        r"0000:00:05.0 \(now on") as err:
        restore(Root(tree.base), NVME, whole_group=True)
    assert "dmesg" in err.value.fix
    assert state_of(tree) is None and state_of(tree, "0000:00:06.0") is not None  # only the NIC can be retried


def test_restore_puts_back_a_previous_override(tree):
    tree.lab_like()
    tree.device("0000:00:0b.0", 0x8086, 0x10D3, 0x020000, driver="vfio-pci", group=7, override="vfio-pci")
    tree.file("/run/pykvm/bind/0000:00:0b.0.json", json.dumps({"driver": "e1000e", "driver_override": "e1000e"}))
    result = restore(tree.root, "0000:00:0b.0")
    assert result.writes[0] == ["/sys/bus/pci/devices/0000:00:0b.0/driver_override", "e1000e"]


def test_restore_refuses_a_device_bound_elsewhere(tree, capsys):
    tree.lab_like()
    before = snapshot(tree)
    assert main(["host", "restore", NVME, "--root", str(tree.base)]) == 1
    err = capsys.readouterr().err
    assert "bound to nvme, not to vfio-pci" in err and snapshot(tree) == before


def test_restore_when_already_back_forgets_the_state(tree, capsys):
    tree.lab_like()
    tree.file(f"/run/pykvm/bind/{NVME}.json", json.dumps({"driver": "nvme", "driver_override": None}))
    assert main(["host", "restore", NVME, "--root", str(tree.base)]) == 0
    assert "already back on nvme" in capsys.readouterr().out
    assert state_of(tree) is None and tree.root.writes == []


def test_restore_without_a_record_lets_the_kernel_choose(tree):
    tree.lab_like()
    tree.device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00, driver="vfio-pci", group=3, override="vfio-pci")
    result = restore(tree.root, "0000:00:04.0")
    assert [w[0].rsplit("/", 1)[-1] for w in result.writes] == ["driver_override", "unbind", "drivers_probe"]
    assert "no record of its original driver" in result.notes[0]


def test_state_dir_is_configurable(tree, tmp_path):
    tree.lab_like()
    bind(tree.root, NVME, state_dir=str(tmp_path / "state"))
    assert json.loads((tmp_path / "state" / f"{NVME}.json").read_text())["driver"] == "nvme"


def test_unwritable_state_dir_is_refused_before_any_write(tree, tmp_path):
    tree.lab_like()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HostError, match="cannot create the state directory"):
        bind(tree.root, NVME, state_dir=str(blocker / "sub"))
    assert tree.root.writes == []


def test_persist_prints_modprobe_and_initramfs_lines(tree, capsys):
    shared(tree)
    before = snapshot(tree)
    lines = persist_lines(tree.root, NVME, whole_group=True)
    assert "options vfio-pci ids=1b36:0010,8086:10d3" in lines
    assert "softdep nvme pre: vfio-pci" in lines and "softdep e1000e pre: vfio-pci" in lines
    assert ["vfio", "vfio_virqfd", "vfio_iommu_type1", "vfio_pci"] == lines[lines.index(
        "# Debian/Ubuntu: append to /etc/initramfs-tools/modules, then run update-initramfs -u") + 1:][:4]
    assert 'force_drivers+=" vfio vfio_virqfd vfio_iommu_type1 vfio_pci "' in lines
    assert main(["host", "bind", NVME, "--persist", "--root", str(tree.base)]) == 0
    assert "options vfio-pci ids=1b36:0010\n" in capsys.readouterr().out
    assert snapshot(tree) == before and tree.root.writes == []


def test_persist_after_bind_names_the_remembered_host_driver(tree):
    tree.lab_like()
    bind(tree.root, NVME)
    tree.link(f"/sys/devices/pci0000:00/{NVME}/driver", "../../../bus/pci/drivers/vfio-pci")
    assert "softdep nvme pre: vfio-pci" in persist_lines(tree.root, NVME)


def test_bdf_error_is_a_value_error():
    with pytest.raises(ValueError):
        raise BdfError("x")


def run_as_nobody(argv):
    """``main(argv)`` in a forked child that dropped to uid/gid 65534; (exit status, stderr).

    Forked rather than exec'd: the interpreter may live where 'nobody' cannot read it.
    """
    import contextlib
    import io

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        status = 99
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                status = main(argv)
            os.write(write_end, err.getvalue().encode())
        except BaseException as exc:  # report anything, never return into pytest
            os.write(write_end, f"child raised {exc!r}".encode())
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        err = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_no_permission_is_refused_with_nothing_changed():
    """The CLI as 'nobody' against a root-owned tree (sysfs attributes are root-only, 0644)."""
    base = Path(tempfile.mkdtemp(prefix="pykvm-host-perm-"))
    try:
        os.chmod(base, 0o755)
        tree = SysTree(base / "root").lab_like()
        for p in [tree.base, *tree.base.rglob("*")]:
            if not p.is_symlink():
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
        before = snapshot(tree)
        status, err = run_as_nobody(["host", "bind", NVME, "--root", str(tree.base)])
        assert status == 1, err
        assert "no permission to write" in err and "run the command as root" in err
        assert snapshot(tree) == before and not tree.path("/run/pykvm").exists()
    finally:
        shutil.rmtree(base)
