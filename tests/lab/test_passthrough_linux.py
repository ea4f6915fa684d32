"""End to end in L1: pykvm boots a Linux guest (L2) that drives the lab's NVMe and edu through VFIO.

Two guest boots (~15-20 s each in L1) carry most assertions; module fixtures run them
once, in order, and the tests check what the guest printed (:class:`GuestReport`,
the demo's parser) and what L1 sees before and after:

- ``first``: a ``pykvm run --vfio <nvme>`` while the NVMe is still on L1's nvme driver
  (refused), then ``pykvm lab demo``'s story (:func:`pykvm.lab.demo.story`): the NVMe
  alone on vfio-pci: list, bind, MSI-X, read, write with O_DIRECT; afterwards L1's nvme
  driver reads the guest's pattern;
- ``second``: edu and the same NVMe on vfio-pci; a non-existent BDF next to the NVMe and
  a memlock limit below guest RAM (root without CAP_IPC_LOCK) are refused, then one
  guest drives both devices and finds the first guest's pattern on the disk.

The guest writes only 4 KiB at ``WRITE_LBA`` (1 MiB before the disk's end, read by no
other test); QEMU opens the lab's disk with snapshot=on, so the image never changes.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm.lab import EDU_BDF, NVME_BDF, cache_root, nvme_sector
from pykvm.lab.demo import (
    BLOCK, EDU_INVERT_PROBE, GUEST_MARKER, WRITE_LBA, GuestReport, first_block, guest_script,
    host_reads_block, make_pattern, nvme_checks, sha256, story,
)
from pykvm.lab.image import LabUnavailable
from pykvm.lab.l2 import GUEST_MEMORY, build_guest_initramfs, driver_of, guest_kernel, run_guest, vfio_bound
from tests.conftest import require_or_skip

pytestmark = pytest.mark.lab

ABSENT_BDF = "0000:00:1e.0"  # no such function on the lab's q35
GUEST_RAM = 256 << 20        # GUEST_MEMORY in bytes
LOW_MEMLOCK = 64 << 10
# Root keeps uid 0 (so /dev/vfio opens) but loses CAP_IPC_LOCK across exec, and gets a small
# RLIMIT_MEMLOCK: what a non-root user with a default limit has for VFIO's pinning.
NO_IPC_LOCK = ["prlimit", f"--memlock={LOW_MEMLOCK}:{LOW_MEMLOCK}", "setpriv", "--bounding-set=-ipc_lock", "--"]
ERROR_TIMEOUT = 60.0


def refused_before_start(run) -> None:
    """The run failed with a message and the guest never ran (nothing on its console)."""
    assert run.returncode not in (0, 124), run.detail()
    assert run.console == "", run.detail()
    assert "pykvm run: guest" not in run.log and "Traceback" not in run.log, run.detail()


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    """(kernel, modules dir, work dir) of the L2 guest."""
    try:
        kernel, modules = guest_kernel()
    except LabUnavailable as exc:
        require_or_skip("PYKVM_REQUIRE_LAB", str(exc))
    return kernel, modules, tmp_path_factory.mktemp("l2")


def initramfs(guest, name: str, pattern: bytes, **script) -> Path:
    kernel, modules, work = guest
    return build_guest_initramfs(work / f"{name}.img", guest_script(**script), ["nvme"],
                                 {"/pattern.bin": pattern}, modules_dir=modules)


@pytest.fixture(scope="module")
def first(guest):
    """A run while the NVMe is on L1's driver (refused), then the demo's story itself."""
    assert driver_of(NVME_BDF) == "nvme", "the lab's NVMe starts on L1's nvme driver"
    unbound = run_guest(guest[0], initramfs(guest, "unbound", make_pattern("unused")), vfio=[NVME_BDF],
                        timeout=ERROR_TIMEOUT)
    unbound_after = (driver_of(NVME_BDF), host_reads_block(NVME_BDF, 0))
    lines = []
    result = story(say=lines.append)
    return {"run": result.run, "report": result.report, "pattern": result.pattern, "demo": result,
            "demo_output": "\n".join(lines), "unbound": unbound, "unbound_after": unbound_after,
            "driver_after": result.driver_after, "l1_block": result.l1_block}


@pytest.fixture(scope="module")
def second(guest, first):
    kernel = guest[0]
    pattern = make_pattern("test second")
    initrd = initramfs(guest, "second", pattern, edu=True)
    edu_before = driver_of(EDU_BDF)
    probe = subprocess.run([*NO_IPC_LOCK, sys.executable, "-c",
                            "import resource; print(resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]);"
                            "print(open('/proc/self/status').read().split('CapEff:')[1].split()[0])"],
                           capture_output=True, text=True, timeout=30)
    with vfio_bound([EDU_BDF, NVME_BDF]):
        absent = run_guest(kernel, initrd, vfio=[NVME_BDF, ABSENT_BDF], timeout=ERROR_TIMEOUT)
        memlock = run_guest(kernel, initrd, vfio=[NVME_BDF], timeout=ERROR_TIMEOUT, prefix=NO_IPC_LOCK)
        drivers_after_errors = (driver_of(EDU_BDF), driver_of(NVME_BDF))
        run = run_guest(kernel, initrd, vfio=[EDU_BDF, NVME_BDF], marker=GUEST_MARKER)
    return {"run": run, "report": GuestReport.parse(run.console), "pattern": pattern,
            "absent": absent, "memlock": memlock, "probe": probe, "drivers_after_errors": drivers_after_errors,
            "drivers": (edu_before, driver_of(EDU_BDF), driver_of(NVME_BDF)),
            "l1_block": host_reads_block(NVME_BDF, WRITE_LBA)}


# -- the NVMe alone ---------------------------------------------------------------------------
def test_guest_lists_the_nvme_and_its_driver_binds(first):
    report, run = first["report"], first["run"]
    assert run.returncode == 0, run.detail()
    assert "1b36:0010" in report.ids(), run.detail()
    nvme = [p for p in report.pci if p[1] == "1b36:0010"][0]
    assert nvme[2] == "010802" and int(nvme[4], 16) != 0, nvme  # NVMe class, BAR0 placed by pykvm
    driver, bdf, sectors, serial = report.nvme
    assert (driver, bdf, sectors * 512, serial) == ("nvme", nvme[0], 64 << 20, "pykvm-lab-nvme")
    assert report.done and not report.failures, run.detail()


def test_guest_nvme_interrupts_are_msix_and_fire(first):
    report = first["report"]
    vectors = {name: (mode, count) for _, mode, count, name in report.irqs}
    assert {"nvme0q0", "nvme0q1"} <= set(vectors), first["run"].detail()  # admin queue + one I/O queue
    assert all(mode == "msix" and count > 0 for mode, count in vectors.values()), vectors


def test_guest_reads_the_disk_and_writes_with_o_direct(first):
    report, pattern = first["report"], first["pattern"]
    assert report.first_block == (nvme_sector(0)[:14].decode(), sha256(first_block()))
    assert report.before_write == sha256(b"".join(nvme_sector(WRITE_LBA + i) for i in range(BLOCK // 512)))
    assert report.write == (sha256(pattern), sha256(pattern))
    assert all(ok for _, ok in nvme_checks(report, pattern)), nvme_checks(report, pattern)


def test_l1_driver_gets_the_device_back_and_reads_the_guest_pattern(first):
    assert first["driver_after"] == "nvme"
    assert first["l1_block"] == first["pattern"]


def test_pykvm_reports_exit_statistics(first):
    log = first["run"].log
    assert "guest poweroff" in log and "exits by reason" in log and "guest marker" in log, log


def test_demo_story_passes_every_check_and_shows_it(first):
    demo, shown = first["demo"], first["demo_output"]
    assert demo.ok, demo.checks
    assert "  | [guest] nvme: driver nvme bound to" in shown  # the guest console, streamed
    assert "exits by reason" in shown and f"L1 reads LBA {WRITE_LBA} with O_DIRECT: b'pykvm passthrough" in shown


def test_lab_disk_image_is_never_written(first):
    """QEMU opens the lab's disk with snapshot=on: the guest's write lives in this run only."""
    assert first["l1_block"] == first["pattern"]  # the write reached the device ...
    with open(cache_root() / "nvme-disk.img", "rb") as image:  # ... but not the image behind it
        image.seek(WRITE_LBA * 512)
        assert image.read(BLOCK) == b"".join(nvme_sector(WRITE_LBA + i) for i in range(BLOCK // 512))


def test_device_not_on_vfio_pci_is_refused_and_left_alone(first):
    run = first["unbound"]
    refused_before_start(run)
    assert f"{NVME_BDF} [1b36:0010] is bound to nvme, not to vfio-pci" in run.log, run.detail()
    assert f"pykvm host bind {NVME_BDF}" in run.log, run.detail()
    driver, block = first["unbound_after"]
    assert driver == "nvme" and block == first_block()  # still L1's, and it still works


# -- again, with edu: two devices, the same NVMe a second time -------------------------------
def test_same_nvme_works_in_a_second_run_and_sees_the_first_runs_data(first, second):
    report, run = second["report"], second["run"]
    assert run.returncode == 0, run.detail()
    assert all(ok for _, ok in nvme_checks(report, second["pattern"])), (nvme_checks(report, second["pattern"]), run.detail())
    assert report.before_write == sha256(first["pattern"])
    assert second["l1_block"] == second["pattern"]


def test_edu_passed_through_shows_its_bar_and_id(second):
    report = second["report"]
    edu = [p for p in report.pci if p[1] == "1234:11e8"]
    assert edu and int(edu[0][4], 16) != 0, second["run"].detail()
    bar0, ident, inverted = report.edu
    assert int(bar0, 16) == int(edu[0][4], 16)
    assert ident == 0x010000ED
    assert inverted == ~EDU_INVERT_PROBE & 0xFFFFFFFF  # a write reached the device and its answer came back


def test_two_devices_in_one_guest(second):
    report = second["report"]
    functions = {ids: (bdf, bar0) for bdf, ids, _, _, bar0 in report.pci}
    assert {"1234:11e8", "1b36:0010"} <= set(functions)
    assert functions["1234:11e8"][0] != functions["1b36:0010"][0]
    assert functions["1234:11e8"][1] != functions["1b36:0010"][1]
    assert report.nvme is not None and report.edu is not None
    assert second["drivers"] == (None, None, "nvme")  # edu has no L1 driver: back to none


def test_nonexistent_bdf_is_refused_and_the_other_device_released(second):
    run = second["absent"]
    refused_before_start(run)
    assert f"no PCI device {ABSENT_BDF} on this machine" in run.log, run.detail()
    assert "lspci -D" in run.log
    # The NVMe, opened before the bad address was reached, stays on vfio-pci and the next
    # run opens it again (test_same_nvme_works_in_a_second_run...).
    assert second["drivers_after_errors"] == ("vfio-pci", "vfio-pci")
    assert second["run"].returncode == 0


def test_memlock_below_guest_ram_is_refused_without_cap_ipc_lock(second):
    limit, cap_eff = second["probe"].stdout.split()
    assert int(limit) == LOW_MEMLOCK and not int(cap_eff, 16) >> 14 & 1, second["probe"]  # the premise
    run = second["memlock"]
    refused_before_start(run)
    assert "RLIMIT_MEMLOCK is 64 KiB but VFIO must pin all 256 MiB of guest RAM" in run.log, run.detail()
    assert "ulimit -l 262144" in run.log, run.detail()
    assert second["run"].returncode == 0  # nothing was left held: the next run works


def test_root_with_cap_ipc_lock_is_not_bound_by_memlock(first):
    """As root (CAP_IPC_LOCK) vfio_iommu_type1 pins beyond RLIMIT_MEMLOCK, and the preflight
    lets it: L1's default limit is far below the guest RAM the first run pinned."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert soft != resource.RLIM_INFINITY and soft < GUEST_RAM, soft
    assert GUEST_MEMORY == "256M" and first["run"].returncode == 0
    assert os.geteuid() == 0


def test_example_30_passes_the_nvme_to_a_guest_and_gives_it_back(second):
    """examples/30_passthrough_nvme.py as a user runs it (after the fixtures: the NVMe is on nvme)."""
    example = Path(__file__).resolve().parents[2] / "examples" / "30_passthrough_nvme.py"
    p = subprocess.run([sys.executable, str(example), NVME_BDF], capture_output=True, text=True,
                       errors="replace", timeout=300)
    out = p.stdout
    assert p.returncode == 0, f"{out[-4000:]}\n{p.stderr[-2000:]}"
    assert f"host: echo vfio-pci > /sys/bus/pci/devices/{NVME_BDF}/driver_override" in out
    assert "1b36:0010 driver nvme" in out
    assert "00000000  50 59 4b 56 4d 2d 4c 41  42 2d 4e 56 4d 45 0a 00  |PYKVM-LAB-NVME..|" in out
    assert "exits by reason" in out and f"host: {NVME_BDF} back on nvme" in out
    assert driver_of(NVME_BDF) == "nvme"
