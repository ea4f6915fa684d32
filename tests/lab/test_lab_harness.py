"""The lab itself: L1 has what the VFIO and KVM tests rely on, and the harness reports
exit statuses and timeouts faithfully."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pykvm.lab import EDU_BDF, EDU_ID, NVME_BDF, NVME_ID, TESTDEV_BDF, TESTDEV_ID, nvme_sector
from pykvm.lab import LabCrash, LabTimeout

PCI = Path("/sys/bus/pci/devices")


@pytest.mark.lab
def test_vfio_and_type1_backend_are_there():
    assert Path("/dev/vfio/vfio").exists()
    assert Path("/sys/module/vfio_iommu_type1").is_dir()
    assert Path("/sys/module/vfio_pci").is_dir()


@pytest.mark.lab
def test_kvm_is_there():
    assert Path("/dev/kvm").exists()
    assert Path("/sys/module/kvm_amd").is_dir()


@pytest.mark.lab
@pytest.mark.parametrize("bdf, ids", [(EDU_BDF, EDU_ID), (NVME_BDF, NVME_ID), (TESTDEV_BDF, TESTDEV_ID)])
def test_pci_devices_at_pinned_addresses(bdf, ids):
    device = PCI / bdf
    assert int((device / "vendor").read_text(), 16) == ids[0]
    assert int((device / "device").read_text(), 16) == ids[1]
    # Each device sits alone in its IOMMU group: the emulated IOMMU is active.
    assert os.listdir(device / "iommu_group" / "devices") == [bdf]


@pytest.mark.lab
def test_nvme_disk_holds_the_known_pattern():
    assert (PCI / NVME_BDF / "driver").resolve().name == "nvme"
    with open("/dev/nvme0n1", "rb") as disk:
        assert disk.read(512) == nvme_sector(0)
        disk.seek(12345 * 512)
        assert disk.read(512) == nvme_sector(12345)


@pytest.mark.lab
def test_lab_out_is_writable():
    out = Path(os.environ["PYKVM_LAB_OUT"])
    (out / "probe.txt").write_text("written in L1\n")
    assert (out / "probe.txt").read_text() == "written in L1\n"


def test_run_returns_status_output_and_reports_timeout_and_panic(lab, tmp_path):
    """On the host: three short L1 boots (a failing command, one that overruns, a panic)."""
    result = lab.run(["sh", "-c", "echo to-stdout; echo to-stderr >&2; echo x > $PYKVM_LAB_OUT/f; exit 7"], timeout=60, out_dir=tmp_path / "out0")
    assert result.returncode == 7
    assert result.output.splitlines() == ["to-stdout", "to-stderr"]
    assert (result.out_dir / "f").read_text() == "x\n"
    assert "PYKVM-LAB-" in result.console

    started = time.monotonic()
    with pytest.raises(LabTimeout) as excinfo:
        lab.run(["sh", "-c", "echo sleeping; sleep 600"], timeout=5, out_dir=tmp_path / "out")
    assert time.monotonic() - started < lab.boot_timeout + 5 + 15
    assert "sleeping" in excinfo.value.console_tail
    # The monitor's view of L1 comes with the timeout: its registers (HLT= says whether it
    # was halted) and its local APIC's timer, to tell a lost wakeup from a spinning L1.
    state = excinfo.value.cpu_state
    assert "RIP=" in state and "HLT=" in state and "LVTT" in state, state
    assert "L1's CPU when it was stopped" in str(excinfo.value)

    with pytest.raises(LabCrash) as excinfo:
        lab.run(["sh", "-c", "echo c > /proc/sysrq-trigger"], timeout=60, out_dir=tmp_path / "out2")
    assert "Kernel panic" in excinfo.value.console_tail


# In L1: wait (60 s at most) for the i8042 keyboard interrupt count to grow; print the growth.
_AWAIT_KEY = r"""
import time
def count():
    return sum(int(f) for line in open("/proc/interrupts") if line.rstrip().endswith("i8042")
               for f in line.split()[1:] if f.isdigit())
before = count()
print("WAITING-FOR-KEY", flush=True)
deadline = time.monotonic() + 60
while count() == before and time.monotonic() < deadline:
    time.sleep(0.05)
print("i8042 interrupts:", count() - before, flush=True)
raise SystemExit(0 if count() > before else 1)
"""


def test_monitor_key_press_reaches_l1_as_an_interrupt(lab, tmp_path):
    """On the host: the harness's wake-up for QEMU's lost wakeups (a key press through QMP)
    arrives in L1 as keyboard interrupts."""
    pressed = []

    def on_console(line: str) -> None:
        if "WAITING-FOR-KEY" in line and not pressed:
            lab.monitor.press_key()
            pressed.append(line)

    result = lab.run(["python3", "-c", _AWAIT_KEY], timeout=120, console=on_console, out_dir=tmp_path / "out")
    assert pressed and result.returncode == 0, result.output
    assert int(result.output.split("i8042 interrupts:")[1].split()[0]) >= 1
    assert result.wakeups == 0  # the command never left L1 idle for long
