"""``pykvm host groups`` and ``pykvm host show`` on synthetic trees."""
from __future__ import annotations

import json
import struct

from pykvm.cli import main
from pykvm.host.groups import format_groups, list_groups
from pykvm.host.show import format_device, show_device
from tests.unit.host.sysfs_tree import PCI_IDS


def shared_machine(tree):
    """Group 1: a root port (pcieport) + a GPU (nouveau) + its audio (snd_hda_intel); group 2: a NIC on
    vfio-pci; group 3: driverless; group 4: a device next to a pci-stub sibling."""
    tree.lab_like()
    tree.device("0000:00:01.0", 0x8086, 0x1901, 0x060400, driver="pcieport", group=1)
    tree.device("0000:01:00.0", 0x10DE, 0x1C82, 0x030000, driver="nouveau", group=1)
    tree.device("0000:01:00.1", 0x10DE, 0x0FB9, 0x040300, driver="snd_hda_intel", group=1)
    tree.device("0000:02:00.0", 0x8086, 0x10D3, 0x020000, driver="vfio-pci", group=2)
    tree.device("0000:03:00.0", 0x8086, 0x10D3, 0x020000, driver="pci-stub", group=4)
    return tree


def test_groups_list_devices_drivers_and_readiness(tree):
    groups = {g.number: g for g in list_groups(shared_machine(tree).root)}
    assert sorted(groups) == [0, 1, 2, 3, 4]
    g1 = groups[1]
    assert [(d.bdf, d.ids, d.driver, d.class_name) for d in g1.devices] == [
        ("0000:00:01.0", "8086:1901", "pcieport", "PCI bridge"),
        ("0000:01:00.0", "10de:1c82", "nouveau", "VGA compatible controller"),
        ("0000:01:00.1", "10de:0fb9", "snd_hda_intel", "Audio device"),
    ]
    assert not g1.ready and [d.bdf for d in g1.blockers] == ["0000:01:00.0", "0000:01:00.1"]
    assert groups[2].ready  # on vfio-pci
    assert groups[3].ready  # edu without a driver
    assert not groups[4].ready and [d.bdf for d in groups[4].blockers] == ["0000:00:05.0"]  # nvme beside pci-stub
    text = format_groups(list(groups.values()))
    assert "IOMMU group 1 (not ready: 0000:01:00.0 on nouveau, 0000:01:00.1 on snd_hda_intel)" in text
    assert "IOMMU group 2 (ready for VFIO)" in text
    assert "0000:00:05.0 [0108] Non-Volatile memory controller: Vendor 1b36 Device [1b36:0010]  driver: nvme" in text


def test_groups_use_pci_ids_when_installed(tree, capsys):
    tree.lab_like()
    tree.file("/usr/share/misc/pci.ids", PCI_IDS)
    assert main(["host", "groups", "--root", str(tree.base), "--json"]) == 0
    data = {g["group"]: g for g in json.loads(capsys.readouterr().out)}
    nvme = data[4]["devices"][0]
    assert (nvme["vendor_name"], nvme["device_name"], nvme["driver"]) == ("Red Hat, Inc.", "QEMU NVM Express Controller", "nvme")
    assert data[3]["devices"][0]["device_name"] == "Edu device" and data[3]["ready"] is True


def test_groups_without_iommu_says_so(tree, capsys):
    tree.no_iommu()
    assert main(["host", "groups", "--root", str(tree.base)]) == 0
    assert "no IOMMU groups" in capsys.readouterr().out


def nvme_caps() -> bytes:
    """PM at 0x40 -> MSI-X at 0x50 -> Express (RC integrated endpoint) at 0x60."""
    caps = bytearray(0x30)
    caps[0x00:0x02] = bytes([0x01, 0x50])
    struct.pack_into("<HH", caps, 0x02, 0x0003, 0x0000)
    caps[0x10:0x12] = bytes([0x11, 0x60])
    struct.pack_into("<HII", caps, 0x12, 0x8000 | 64, 0x2000, 0x3000)  # enabled, 65 vectors, BAR0
    caps[0x20:0x22] = bytes([0x10, 0x00])
    struct.pack_into("<H", caps, 0x22, 0x0092)
    return bytes(caps)


def test_show_is_an_lspci_like_view(tree, capsys):
    tree.lab_like()
    tree.file("/usr/share/misc/pci.ids", PCI_IDS)
    tree.device("0000:00:05.0", 0x1B36, 0x0010, 0x010802, driver="nvme", group=4, caps=nvme_caps(),
                resource="0x00000000febf0000 0x00000000febf3fff 0x0000000000140204\n")
    view = show_device(tree.root, "00:05.0")
    assert [c.name for c in view.capabilities] == ["Power Management", "MSI-X", "Express"]
    text = format_device(view)
    lines = text.splitlines()
    assert lines[0] == ("0000:00:05.0 Non-Volatile memory controller [0108]: Red Hat, Inc. QEMU NVM Express Controller "
                        "[1b36:0010] (rev 02) (prog-if 02 [NVM Express])")
    assert "\tIOMMU group: 4" in lines
    assert "\tRegion 0: Memory at febf0000 (64-bit, non-prefetchable) [size=16K]" in lines
    assert ("\tCapabilities: [50] MSI-X: Enable+ Count=65 Masked- Vector table: BAR=0 offset=00002000 "
            "PBA: BAR=0 offset=00003000") in lines
    assert "\tCapabilities: [60] Express: v2 Root Complex Integrated Endpoint" in lines
    assert lines[-1] == "\tKernel driver in use: nvme"
    assert main(["host", "show", "0000:00:05.0", "--root", str(tree.base), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"]["iommu_group"] == 4


def test_show_on_vfio_pci_in_a_synthetic_tree_notes_the_missing_vfio_section(tree):
    tree.lab_like()
    tree.device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00, driver="vfio-pci", group=3)
    text = format_device(show_device(tree.root, "0000:00:04.0"))
    assert "Kernel driver in use: vfio-pci" in text and "VFIO section skipped" in text


def test_show_short_config_needs_root(tree):
    tree.lab_like()
    tree.file("/sys/devices/pci0000:00/0000:00:04.0/config", bytes(64))
    assert "needs root" in format_device(show_device(tree.root, "0000:00:04.0"))


def test_show_unknown_and_malformed(tree, capsys):
    tree.lab_like()
    assert main(["host", "show", "0000:00:09.0", "--root", str(tree.base)]) == 1
    assert "no PCI device 0000:00:09.0" in capsys.readouterr().err
    assert main(["host", "show", "nvme0", "--root", str(tree.base)]) == 1
    assert "'nvme0' is not a PCI address" in capsys.readouterr().err
