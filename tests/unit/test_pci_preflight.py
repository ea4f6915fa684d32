"""Passthrough pre-checks read sysfs and the process limits: each failure names the fix.

The sysfs trees here are synthetic directories laid out like the kernel's (pure logic);
the lab tests run the same checks against real devices.
"""
from __future__ import annotations

import os
import resource

import pytest

from pykvm.vmm.pci import preflight
from pykvm.vmm.pci.preflight import PassthroughError, check_device, check_memlock, check_unique, resolve


def make_sysfs(root, devices):
    """``devices``: {bdf: (driver or None, group, class)}."""
    for bdf, (drv, group, cls) in devices.items():
        d = root / "bus/pci/devices" / bdf
        d.mkdir(parents=True)
        (d / "vendor").write_text("0x1b36\n")
        (d / "device").write_text("0x0010\n")
        (d / "class").write_text(f"{cls:#08x}\n")
        if drv:
            (root / "bus/pci/drivers" / drv).mkdir(parents=True, exist_ok=True)
            os.symlink(root / "bus/pci/drivers" / drv, d / "driver")
        g = root / "kernel/iommu_groups" / str(group)
        (g / "devices").mkdir(parents=True, exist_ok=True)
        os.symlink(g, d / "iommu_group")
        os.symlink(d, g / "devices" / bdf)
    return str(root)


def test_resolve_accepts_addresses_and_sysfs_paths(tmp_path):
    sysfs = make_sysfs(tmp_path, {"0000:00:05.0": ("vfio-pci", 7, 0x010802)})
    assert resolve("00:05.0") == "0000:00:05.0"
    assert resolve("0000:00:05.0") == "0000:00:05.0"
    assert resolve(f"{sysfs}/bus/pci/devices/0000:00:05.0/") == "0000:00:05.0"
    for bad in ("05.0", "00:20.0", "zz", f"{sysfs}/bus"):
        with pytest.raises(PassthroughError):
            resolve(bad)


def test_ready_device_passes(tmp_path):
    sysfs = make_sysfs(tmp_path, {"0000:00:05.0": ("vfio-pci", 7, 0x010802), "0000:00:00.0": (None, 7, 0x060000)})
    t = check_device("00:05.0", sysfs)
    assert (t.bdf, t.group, t.ids) == ("0000:00:05.0", 7, "1b36:0010")


def test_missing_and_wrongly_bound_devices(tmp_path):
    sysfs = make_sysfs(tmp_path, {"0000:00:05.0": ("nvme", 7, 0x010802), "0000:00:04.0": (None, 8, 0xFF0000)})
    with pytest.raises(PassthroughError, match="no PCI device 0000:00:06.0") as e:
        check_device("00:06.0", sysfs)
    assert "lspci -D" in e.value.fix
    with pytest.raises(PassthroughError, match=r"0000:00:05.0 \[1b36:0010\] is bound to nvme") as e:
        check_device("00:05.0", sysfs)
    assert "pykvm host bind 0000:00:05.0" in str(e.value)
    with pytest.raises(PassthroughError, match="not bound to any driver"):
        check_device("00:04.0", sysfs)


def test_non_viable_group_lists_its_devices(tmp_path):
    sysfs = make_sysfs(tmp_path, {
        "0000:01:00.0": ("vfio-pci", 3, 0x030000),
        "0000:01:00.1": ("snd_hda_intel", 3, 0x040300),
        "0000:00:01.0": ("pcieport", 3, 0x060400),
    })
    with pytest.raises(PassthroughError, match="IOMMU group 3 of 0000:01:00.0 is not viable") as e:
        check_device("01:00.0", sysfs)
    text = str(e.value)
    assert "0000:01:00.1 (driver: snd_hda_intel)" in text and "0000:00:01.0 (driver: pcieport)" in text
    assert "pykvm host bind --group 0000:01:00.0" in text


def test_memlock(monkeypatch):
    monkeypatch.setattr(preflight, "_has_cap_ipc_lock", lambda: False)
    monkeypatch.setattr(resource, "getrlimit", lambda which: (8 << 20, 8 << 20))
    check_memlock(8 << 20)
    with pytest.raises(PassthroughError) as e:
        check_memlock(512 << 20)
    text = str(e.value)
    assert "RLIMIT_MEMLOCK is 8 MiB" in text and "512 MiB of guest RAM" in text
    assert "ulimit -l 524288" in text and "limits.conf" in text and "LimitMEMLOCK=524288K" in text
    monkeypatch.setattr(preflight, "_has_cap_ipc_lock", lambda: True)
    check_memlock(1 << 40)


@pytest.mark.parametrize("cls,kind", [(0x060000, "host bridge"), (0x060100, "ISA bridge"),
                                      (0x060400, "PCI-to-PCI bridge"), (0x068000, "bridge")])
def test_a_bridge_is_refused_as_not_passable_not_sent_to_host_bind(tmp_path, cls, kind):
    """Review finding 12: for 00:00.0 (a host bridge) the fix offered was `pykvm host bind`."""
    sysfs = make_sysfs(tmp_path, {"0000:00:00.0": (None, 1, cls), "0000:00:01.0": ("vfio-pci", 2, cls)})
    for bdf in ("00:00.0", "00:01.0"):  # unbound, or even on vfio-pci
        with pytest.raises(PassthroughError, match=f"is a {kind} .*cannot be passed through") as e:
            check_device(bdf, sysfs)
        assert "host bind" not in str(e.value) and "endpoint" in e.value.fix


def test_the_same_device_twice_is_refused(tmp_path):
    """Review finding 12: --vfio X --vfio X (or X as a BDF and as its sysfs path) would put one
    function on two slots."""
    sysfs = make_sysfs(tmp_path, {"0000:00:05.0": ("vfio-pci", 7, 0x010802), "0000:00:06.0": ("vfio-pci", 8, 0x010802)})
    assert check_unique(["00:05.0", "0000:00:06.0"]) == ["0000:00:05.0", "0000:00:06.0"]
    with pytest.raises(PassthroughError, match=r"0000:00:05.0 is given more than once \('00:05.0' twice\)"):
        check_unique(["00:05.0", "00:06.0", "00:05.0"])
    path = f"{sysfs}/bus/pci/devices/0000:00:05.0"
    with pytest.raises(PassthroughError, match=r"more than once \('0000:00:05.0' and '.*/0000:00:05.0'\)") as e:
        check_unique(["0000:00:05.0", path], sysfs)
    assert "each device once" in e.value.fix
