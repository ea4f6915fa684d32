"""pykvm boots Debian's stock kernel in L2 (runs inside L1, where KVM can boot Linux).

The L2 initramfs is busybox with an /init that prints a marker and ``nproc``,
then powers off (or reboots). ``pykvm run`` runs in a subprocess with a
timeout; its exit status and console output are what is checked.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest

from pykvm.lab.image import LabUnavailable
from pykvm.lab.initramfs import build_initramfs
from pykvm.lab.l2 import GUEST_MEMORY, find_busybox, guest_cmdline, guest_kernel, pykvm_argv
from pykvm.vmm.cpu import host_cpu_brand
from tests.conftest import require_or_skip

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
MARKER = "PYKVM-L2-BOOTED"
# pykvm's default command line plus quiet: every console byte is two exits (LSR poll, THR
# write), and exits are costly in nested KVM (see DEFAULT_CMDLINE for pci=noearly and i8042.noaux).
CMDLINE = guest_cmdline()
MEMORY = GUEST_MEMORY
BOOT_TIMEOUT = 240
# Port I/O exits answered in Python during a whole quiet boot. Each costs ~130-320 us in nested
# KVM; a quiet boot takes ~500 (PCI config, CMOS, i8042, UART setup, the marker line). A device
# left unanswered in C shows up here: Linux's i8042 AUX probe alone once took ~10000.
PYTHON_IO_EXIT_BUDGET = 2000

INIT = """#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "{marker} nproc=$(nproc)"
grep -m1 "model name" /proc/cpuinfo
grep -m1 "Kernel code" /proc/iomem
{action}
"""


def lab_kernel() -> Tuple[Path, Path]:
    """(bzImage, modules dir) of the kernel L1 runs: the lab's Debian kernel, from its
    (read-only, in L1) cache (:func:`pykvm.lab.l2.guest_kernel`); L2 boots the same image."""
    try:
        return guest_kernel()
    except LabUnavailable as exc:
        require_or_skip("PYKVM_REQUIRE_LAB", str(exc))


def l2_initramfs(path: Path, action: str = "poweroff -f") -> Path:
    """A busybox initramfs whose /init prints ``MARKER nproc=N`` and then runs ``action``."""
    try:
        busybox = find_busybox()
    except LabUnavailable as exc:
        require_or_skip("PYKVM_REQUIRE_LAB", str(exc))
    build_initramfs(path, INIT.format(marker=MARKER, action=action), [], modules_dir=lab_kernel()[1], busybox=busybox)
    return path


def pykvm_run(kernel: Path, initrd: Path, cpus: int, timeout: float = BOOT_TIMEOUT, direct: bool = False,
              env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    argv = pykvm_argv(kernel, initrd, cpus=cpus, timeout=timeout, marker=MARKER, direct=direct)
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                          timeout=timeout + 60, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def kernel() -> Path:
    path, _ = lab_kernel()
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("l2")
    return {"poweroff": l2_initramfs(d / "poweroff.img"), "reboot": l2_initramfs(d / "reboot.img", "reboot -f")}


def check_booted(p: subprocess.CompletedProcess, cpus: int, how: str) -> None:
    detail = f"exit {p.returncode}\n--- stdout (tail) ---\n{p.stdout[-3000:]}\n--- stderr ---\n{p.stderr[-3000:]}"
    assert p.returncode == 0, detail
    assert f"{MARKER} nproc={cpus}" in p.stdout, detail
    assert re.search(rf"model name\s*: {re.escape(host_cpu_brand()[:47])}\r?$", p.stdout, re.M), detail  # CPUID brand
    assert f"guest {how}" in p.stderr, detail
    assert "guest marker" in p.stderr and "exits by reason" in p.stderr, detail
    io = re.search(r"^IO\s+(\d+)\s+(\d+)\s+(\d+)\s", p.stderr, re.M)
    assert io and int(io.group(3)) < PYTHON_IO_EXIT_BUDGET, detail


@pytest.mark.parametrize("cpus", [1, 2])
def test_debian_kernel_boots_to_init_and_powers_off(kernel, images, cpus):
    p = pykvm_run(kernel, images["poweroff"], cpus)
    check_booted(p, cpus, "poweroff")


def test_guest_reboot_ends_the_run_cleanly(kernel, images):
    p = pykvm_run(kernel, images["reboot"], 2)
    check_booted(p, 2, "reset")


def test_direct_boot_runs_the_kernel_where_it_was_linked_and_caches_it(kernel, images, tmp_path):
    """--direct: the first run decompresses the bzImage's kernel into the cache, the second
    starts from there; both guests boot to init with 2 vCPUs, and their kernel code sits at
    its link address, 0x1000000 (the decompressor, which would have put it at a random
    place for KASLR, never ran: the command line has no nokaslr)."""
    env = dict(os.environ, PYKVM_KERNEL_CACHE=str(tmp_path / "kernels"))
    for first in (True, False):
        p = pykvm_run(kernel, images["poweroff"], 2, direct=True, env=env)
        check_booted(p, 2, "poweroff")
        assert ("decompressed the kernel" in p.stderr) == first, p.stderr
        assert re.search(r"^\s*01000000-[0-9a-f]+ : Kernel code\r?$", p.stdout, re.M), p.stdout[-2000:]
    assert len(list((tmp_path / "kernels").glob("*.vmlinux"))) == 1


def test_missing_initrd_is_refused_before_the_guest_runs(kernel, tmp_path):
    p = pykvm_run(kernel, tmp_path / "absent.img", 1, timeout=30)
    assert p.returncode == 2 and "does not exist" in p.stderr and p.stdout == ""
