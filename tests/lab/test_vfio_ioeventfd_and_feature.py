"""VFIO_DEVICE_IOEVENTFD and VFIO_DEVICE_FEATURE on the lab's edu (0000:00:04.0), inside L1.

edu's liveness register (BAR0 0x04) reads back the bitwise NOT of the last value written,
so it shows whether, and what, the kernel wrote for an ioeventfd.
"""
from __future__ import annotations

import errno
import time

import pytest

from pykvm.vfio import EventFd, VfioError, lib
from tests.conftest import open_fds
from tests.lab.edu import LIVENESS, Edu, edu, edu_bound  # noqa: F401 (edu and edu_bound are fixtures)

pytestmark = pytest.mark.lab

BAR0 = lib.VFIO_PCI_BAR0_REGION_INDEX
X = 0x12345678  # the ioeventfd's data; liveness then reads ~X
NOT_X = ~X & 0xFFFFFFFF


def liveness_after_signal(e: Edu, eventfd: EventFd, expected: int, timeout: float = 5.0) -> int:
    """Signal ``eventfd``, then read liveness until it shows ``expected`` or ``timeout`` passes."""
    eventfd.write()
    deadline = time.monotonic() + timeout
    while (value := e.bar0.read32(LIVENESS)) != expected and time.monotonic() < deadline:
        time.sleep(0.001)
    return value


def test_ioeventfd_makes_the_kernel_write_and_removing_it_stops_that(edu):
    with EventFd() as ev:
        edu.bar0.write32(LIVENESS, 0)
        reg = edu.device.ioeventfd(BAR0, LIVENESS, X, 4, ev)
        assert reg.active and edu.bar0.read32(LIVENESS) == 0xFFFFFFFF  # nothing written before a signal
        assert liveness_after_signal(edu, ev, NOT_X) == NOT_X
        with pytest.raises(VfioError) as exc:  # one registration per (offset, data, size)
            edu.device.ioeventfd(BAR0, LIVENESS, X, 4, ev)
        assert exc.value.errno == errno.EEXIST and exc.value.ioctl == "VFIO_DEVICE_IOEVENTFD"
        reg.remove()
        assert not reg.active
        reg.remove()  # idempotent
        edu.bar0.write32(LIVENESS, 1)
        assert liveness_after_signal(edu, ev, NOT_X, timeout=0.3) == 0xFFFFFFFE  # changes nothing


def test_ioeventfd_refusals_name_errno_and_ioctl(edu):
    refusals = [
        (BAR0, LIVENESS, 3, "1, 2, 4 or 8 bytes, not 3"),  # no such size flag: refused before the ioctl
        (BAR0, 1 << 20, 4, "inside a BAR"),  # past the end of the 1 MiB BAR
        (BAR0, (1 << 20) - 2, 4, "inside a BAR"),  # straddles its end
        (lib.VFIO_PCI_CONFIG_REGION_INDEX, 0x04, 4, "inside a BAR"),  # config space
        (lib.VFIO_PCI_BAR1_REGION_INDEX, 0, 4, "inside a BAR"),  # edu has no BAR1 (size 0)
    ]
    with EventFd() as ev:
        for region, offset, size, text in refusals:
            with pytest.raises(VfioError) as exc:
                edu.device.ioeventfd(region, offset, X, size, ev)
            assert exc.value.errno == errno.EINVAL and exc.value.ioctl == "VFIO_DEVICE_IOEVENTFD", (region, offset)
            assert text in str(exc.value), str(exc.value)
        with pytest.raises(VfioError) as exc:  # the container's fd is no eventfd
            edu.device.ioeventfd(BAR0, LIVENESS, X, 4, edu.container)
        assert exc.value.errno == errno.EINVAL
        with edu.device.ioeventfd(BAR0, LIVENESS, X, 8, ev) as wide:  # 64-bit writes are fine on x86-64
            assert wide.active
        assert not wide.active
    assert edu.alive()


def test_closing_the_device_removes_its_ioeventfds(edu_bound):
    before = open_fds()
    with EventFd() as ev:
        e = Edu(edu_bound)
        reg = e.device.ioeventfd(BAR0, LIVENESS, X, 4, ev)
        e.close()
        assert not reg.active and e.device.closed
        again = Edu(edu_bound)
        try:
            again.bar0.write32(LIVENESS, 0)
            assert liveness_after_signal(again, ev, NOT_X, timeout=0.3) == 0xFFFFFFFF
        finally:
            again.close()
    assert open_fds() == before


def test_feature_probe_answers(edu):
    probe = edu.device.probe_feature
    # vfio-pci's runtime power management: SET only (kernel: 0 for PROBE|SET, EINVAL for PROBE|GET)
    for feature in (lib.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY, lib.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP,
                    lib.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT):
        assert probe(feature) and probe(feature, set=True) and not probe(feature, get=True), feature
    # ENOTTY: edu is no SR-IOV PF (no VF token), vfio-pci has no migration or DMA logging driver for it
    for feature in (lib.VFIO_DEVICE_FEATURE_PCI_VF_TOKEN, lib.VFIO_DEVICE_FEATURE_MIGRATION,
                    lib.VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, lib.VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                    lib.VFIO_DEVICE_FEATURE_MASK):
        assert not probe(feature) and not probe(feature, set=True), feature
    with pytest.raises(VfioError) as exc:
        probe(lib.VFIO_DEVICE_FEATURE_MASK + 1)
    assert exc.value.errno == errno.EINVAL and exc.value.ioctl == "VFIO_DEVICE_FEATURE"
