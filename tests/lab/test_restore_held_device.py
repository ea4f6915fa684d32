"""`pykvm host restore` of a device a VFIO user still holds (inside L1, edu).

Unbinding a device from vfio-pci while a user holds it blocks in the kernel (vfio-pci's remove
waits, uninterruptibly after a first signal, until the device is released): restore must refuse
with a clear error instead. The holder may have the group open in another process (its fd shows
in /proc), or only a device region still mapped, its fds closed (nothing in /proc/PID/fd: the
mapping keeps the device, and the device the group). Each restore runs in its own process with a
deadline, so that a refusal that does not happen fails the test instead of hanging the lab.
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest

from pykvm.host.bind import bind, restore
from pykvm.host.sysfs import Root
from pykvm.lab import EDU_BDF
from pykvm.lab.l2 import await_group_node, driver_of
from tests.lab.edu import ID, Edu

pytestmark = pytest.mark.lab

DEADLINE = 30  # seconds for a restore that must refuse at once


@pytest.fixture
def edu_on_vfio(tmp_path):
    """edu bound to vfio-pci with its own state dir; given back at the end if a test did not."""
    state = str(tmp_path / "bind")
    bind(Root(), EDU_BDF, state_dir=state)
    await_group_node(EDU_BDF)
    yield state
    if driver_of(EDU_BDF) == "vfio-pci":
        restore(Root(), EDU_BDF, state_dir=state)


def restore_in_a_process(state: str, release=lambda: None) -> subprocess.CompletedProcess:
    """``pykvm host restore`` in a child; if it has not ended within DEADLINE, ``release`` lets
    the kernel's unbind finish (so the child can end) and the test fails."""
    argv = [sys.executable, "-m", "pykvm", "host", "restore", EDU_BDF, "--state-dir", state]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as p:
        try:
            out, err = p.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            release()
            p.communicate()
            pytest.fail(f"restore blocked in the kernel's unbind for {DEADLINE} s instead of refusing")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def test_restore_refuses_a_device_whose_group_another_process_has_open(edu_on_vfio):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pykvm.vfio import Group; "
                               f"g = Group.for_device({EDU_BDF!r}); print('open', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        refused = restore_in_a_process(edu_on_vfio, release=holder.kill)
        assert refused.returncode != 0, refused.stdout
        assert "is open through /dev/vfio/" in refused.stderr and f"{holder.pid} (python" in refused.stderr
        assert "would block until they close it" in refused.stderr
        assert driver_of(EDU_BDF) == "vfio-pci"  # left as it was
    finally:
        holder.kill()
        holder.wait()
    done = restore_in_a_process(edu_on_vfio)
    assert done.returncode == 0, done.stderr
    assert driver_of(EDU_BDF) != "vfio-pci"


def test_restore_refuses_a_device_whose_region_is_still_mapped(edu_on_vfio):
    """This process closes every VFIO fd but keeps a view of edu's BAR0: no fd in /proc, yet
    the device (and its group) stays held until the view goes."""
    e = Edu(EDU_BDF)
    bar = e.bar0.view[:0x100]
    e.bar0 = None
    e.container.close()  # groups and device closed too
    gc.collect()
    assert not any(os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/vfio/")
                   for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))

    def release() -> None:
        bar.release()
        gc.collect()

    try:
        with bar.cast("I") as words:
            assert words[ID // 4] == 0x010000ED  # the device is still there, through the view
        refused = restore_in_a_process(edu_on_vfio, release=release)
        assert refused.returncode != 0, refused.stdout
        assert ("is still held, though no process we can see has it open: a device region stays mapped "
                "(processes with a VFIO device mapped: ") in refused.stderr
        assert f"{os.getpid()} (" in refused.stderr  # the mapper named (from /proc/PID/maps)
        assert "release every view of it" in refused.stderr
        assert driver_of(EDU_BDF) == "vfio-pci"
    finally:
        release()
    done = restore_in_a_process(edu_on_vfio)
    assert done.returncode == 0, done.stderr
    assert driver_of(EDU_BDF) != "vfio-pci"
