"""Lab preparation pieces that need no network or QEMU: cpio, ELF check, cache paths,
the NVMe pattern and the QEMU command line."""
from __future__ import annotations

import gzip
import stat
import sys
from pathlib import Path

from hypothesis import given, strategies as st

from pykvm.lab.devices import (
    EDU_BDF, GROUP_NVME_DISK_MAGIC, GROUP_NVME_SERIAL, NVME_BDF, NVME_DISK_MAGIC, NVME_SECTOR_SIZE, NVME_SERIAL,
    TESTDEV_BDF, nvme_sector,
)
from pykvm.lab.image import LabImage, cache_root, is_static_elf, parse_kernel_depends
from pykvm.lab.initramfs import CpioWriter, build_initramfs
from pykvm.lab.qemu import qemu_argv


def read_newc(data: bytes) -> dict:
    """name -> (mode, content, (rdevmajor, rdevminor)), per the newc format spec."""
    entries, pos = {}, 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, namesize = fields[1], fields[6], fields[9], fields[10], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        content = data[pos : pos + size]
        pos += size + (-size % 4)
        if name == "TRAILER!!!":
            assert not data[pos:].strip(b"\0")
            return entries
        entries[name] = (mode, content, (rmaj, rmin))


@given(st.dictionaries(st.from_regex(r"[a-z]{1,8}(/[a-z]{1,8}){0,2}", fullmatch=True), st.binary(max_size=70), max_size=6))
def test_cpio_roundtrip(files):
    dirs = {"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)}
    files = {n: c for n, c in files.items() if n not in dirs}
    writer = CpioWriter()
    for name, content in files.items():
        writer.file(name, content, 0o640)
    entries = read_newc(writer.getvalue())
    for name, content in files.items():
        assert entries[name][1] == content and entries[name][0] == stat.S_IFREG | 0o640
    for name in {"/".join(n.split("/")[:i]) for n in files for i in range(1, n.count("/") + 1)}:
        assert stat.S_ISDIR(entries[name][0])


def test_build_initramfs(tmp_path):
    mods = tmp_path / "lib/modules/9.9.9-test"
    (mods / "kernel/a").mkdir(parents=True)
    (mods / "modules.dep").write_text("kernel/a/x-y.ko: kernel/a/z.ko\nkernel/a/z.ko:\nkernel/a/unused.ko:\n")
    (mods / "modules.builtin").write_text("kernel/a/builtin.ko\n")
    for name in ("x-y", "z", "unused"):
        (mods / f"kernel/a/{name}.ko").write_bytes(name.encode())
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"\x7fELF fake")
    out = tmp_path / "initrd.img"
    order = build_initramfs(out, "#!/bin/sh\necho hi\n", ["x_y", "builtin"], {"/etc/motd": "hello\n"},
                            modules_dir=mods, busybox=busybox)
    assert order == ["kernel/a/z.ko", "kernel/a/x-y.ko"]
    entries = read_newc(gzip.decompress(out.read_bytes()))
    assert entries["init"][1] == b"#!/bin/sh\necho hi\n" and entries["init"][0] & 0o111
    assert entries["dev/console"][0] == stat.S_IFCHR | 0o600 and entries["dev/console"][2] == (5, 1)
    assert entries["bin/sh"][0] == stat.S_IFLNK | 0o777 and entries["bin/sh"][1] == b"busybox"
    assert entries["lib/modules/kernel/a/x-y.ko"][1] == b"x-y"
    assert "lib/modules/kernel/a/unused.ko" not in entries
    loader = entries["bin/pykvm-load-modules"][1].decode()
    assert loader.index("kernel/a/z.ko") < loader.index("kernel/a/x-y.ko")
    assert entries["etc/motd"][1] == b"hello\n"


def _elf(path: Path, program_types) -> Path:
    """A minimal ELF64 little-endian header with program headers of the given p_types."""
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    header[32:40] = (64).to_bytes(8, "little")        # e_phoff
    header[54:56] = (56).to_bytes(2, "little")        # e_phentsize
    header[56:58] = len(program_types).to_bytes(2, "little")
    table = b"".join(t.to_bytes(4, "little") + bytes(52) for t in program_types)
    path.write_bytes(bytes(header) + table)
    return path


def test_static_elf_check(tmp_path):
    assert is_static_elf(_elf(tmp_path / "static", [1, 1, 4]))      # PT_LOAD, PT_NOTE
    assert not is_static_elf(_elf(tmp_path / "dynamic", [6, 3, 1]))  # PT_PHDR, PT_INTERP
    assert not is_static_elf(Path(sys.executable).resolve())          # a real dynamic binary
    assert not is_static_elf(Path(__file__))                          # not ELF


def test_parse_kernel_depends():
    out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n"
    assert parse_kernel_depends(out) == "6.1.0-56-amd64"
    assert parse_kernel_depends("linux-image-amd64\n") is None


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PYKVM_LAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg/pykvm/lab"
    monkeypatch.setenv("PYKVM_LAB_CACHE", str(tmp_path / "own"))
    assert cache_root() == tmp_path / "own"


@given(st.integers(0, 2**17 - 1))
def test_nvme_sector_pattern(lba):
    sector = nvme_sector(lba)
    assert len(sector) == 512 and sector.startswith(NVME_DISK_MAGIC)
    assert int.from_bytes(sector[15:23], "little") == lba
    assert sector[23] == lba % 256 and sector[24] == (lba + 1) % 256


@given(st.integers(0, 2**17 - 1))
def test_group_nvme_sector_has_the_main_disks_layout_with_its_own_magic(lba):
    main, group = nvme_sector(lba), nvme_sector(lba, GROUP_NVME_DISK_MAGIC)
    assert len(GROUP_NVME_DISK_MAGIC) == len(NVME_DISK_MAGIC) and GROUP_NVME_DISK_MAGIC != NVME_DISK_MAGIC
    assert len(group) == NVME_SECTOR_SIZE == 512 and group.startswith(GROUP_NVME_DISK_MAGIC)
    n = len(GROUP_NVME_DISK_MAGIC)
    assert int.from_bytes(group[n : n + 8], "little") == lba
    assert list(group[n + 8 :]) == [(lba + i) % 256 for i in range(512 - n - 8)]  # the ramp from lba % 256
    assert group[n:] == main[n:]  # only the magic differs


def test_qemu_argv_pins_devices(tmp_path):
    image = LabImage("v", Path("/k"), Path("/m"), Path("/i"), Path("/d"), Path("/q"), Path("/b"))
    argv = qemu_argv(image, tmp_path, memory_mb=4096, cpus=2)
    text = " ".join(argv)
    assert argv[0] == "/q"
    for fragment in (f"edu,addr={EDU_BDF[-4:]}", f"serial={NVME_SERIAL},addr={NVME_BDF[-4:]}",
                     f"pci-testdev,addr={TESTDEV_BDF[-4:]}", "intel-iommu,intremap=on,caching-mode=on",
                     "kernel-irqchip=split", "-m 4096", "-smp 2", f"path={tmp_path},mount_tag=labout",
                     "readonly=on", "snapshot=on", "-accel tcg"):
        assert fragment in text
    assert argv[argv.index("-initrd") + 1] == "/i"
    assert "pci-bridge" not in text and GROUP_NVME_SERIAL not in text  # no group disk: no bridge group


def test_qemu_argv_with_a_group_disk_adds_the_bridge_group(tmp_path):
    image = LabImage("v", Path("/k"), Path("/m"), Path("/i"), Path("/d"), Path("/q"), Path("/b"), Path("/g"))
    argv = qemu_argv(image, tmp_path, memory_mb=4096, cpus=2)
    text = " ".join(argv)
    for fragment in ("pci-bridge,id=lab-bridge,chassis_nr=1,shpc=off,addr=07.0", "edu,bus=lab-bridge,addr=01.0",
                     f"serial={GROUP_NVME_SERIAL},bus=lab-bridge,addr=02.0",
                     f"serial={NVME_SERIAL},addr={NVME_BDF[-4:]}", f"edu,addr={EDU_BDF[-4:]}"):
        assert fragment in text, fragment
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == ["file=/d,if=none,id=nvm,format=raw,snapshot=on", "file=/g,if=none,id=nvg,format=raw,snapshot=on"]
    nvme = next(argv[i + 1] for i, a in enumerate(argv) if a == "-device" and GROUP_NVME_SERIAL in argv[i + 1])
    assert nvme.startswith("nvme,drive=nvg,")  # the second NVMe is on the second disk
    devices = [argv[i + 1].split(",", 1)[0] for i, a in enumerate(argv) if a == "-device"]
    assert devices.index("pci-bridge") < devices.index("edu", devices.index("pci-bridge"))  # bridge before its devices


def test_lab_info_prints_both_disks(capsys):
    from pykvm.lab.cli import _print_image
    from pykvm.lab.run import Lab

    paths = [Path(p) for p in ("/k", "/m", "/i", "/d", "/q", "/b")]
    _print_image(Lab(LabImage("v", *paths, Path("/g")), memory_mb=2048, cpus=1))
    out = capsys.readouterr().out.splitlines()
    assert "nvme disk:   /d" in out and "group disk:  /g (the NVMe behind the bridge)" in out
    assert out.index("nvme disk:   /d") + 1 == out.index("group disk:  /g (the NVMe behind the bridge)")
    _print_image(Lab(LabImage("v", *paths), memory_mb=2048, cpus=1))
    assert "group disk" not in capsys.readouterr().out  # an image without the bridge group
