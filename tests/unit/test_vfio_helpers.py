"""VFIO helpers that need no device: SET_IRQS arguments, eventfds, iommufd detection, group sysfs."""
import errno
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm._native import ffi, lib
from pykvm.vfio import EventFd
from pykvm.vfio.group import group_members, group_of_device, normalize_bdf
from pykvm.vfio.iommufd import IommufdSupport, detect
from pykvm.vfio.irqs import irq_set
from pykvm.vfio.regions import Mmio


@given(st.integers(0, 4), st.integers(0, 2047),
       st.lists(st.one_of(st.none(), st.integers(-1, 1 << 20)), max_size=64))
def test_irq_set_eventfds(index, start, fds):
    arg = irq_set(index, start, len(fds), lib.VFIO_IRQ_SET_ACTION_TRIGGER, eventfds=fds)
    assert arg.flags == lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_TRIGGER
    assert (arg.index, arg.start, arg.count) == (index, start, len(fds))
    assert arg.argsz == ffi.offsetof("struct vfio_irq_set", "data") + 4 * len(fds)
    data = ffi.cast("__s32 *", arg.data)
    assert [data[i] for i in range(len(fds))] == [-1 if f is None else f for f in fds]


def test_irq_set_bools_and_none():
    arg = irq_set(0, 1, 3, lib.VFIO_IRQ_SET_ACTION_MASK, bools=[True, False, True])
    assert arg.flags == lib.VFIO_IRQ_SET_DATA_BOOL | lib.VFIO_IRQ_SET_ACTION_MASK
    assert [arg.data[i] for i in range(3)] == [1, 0, 1]
    off = irq_set(1, 0, 0, lib.VFIO_IRQ_SET_ACTION_TRIGGER)
    assert off.flags == lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_TRIGGER and off.count == 0
    assert off.argsz == ffi.sizeof("struct vfio_irq_set")


def test_eventfd_counts_and_times_out():
    before = len(os.listdir("/proc/self/fd"))
    with EventFd() as ev:
        assert ev.wait(0.05) is None
        ev.write(2)
        ev.write(5)
        assert ev.wait(1.0) == 7
        assert ev.drain() == 0
    with EventFd(semaphore=True) as sem:
        sem.write(2)
        assert (sem.read(), sem.read(), sem.wait(0)) == (1, 1, None)
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(OSError) as exc:
        ev.write()
    assert exc.value.errno == errno.EBADF


def test_iommufd_reports_what_is_missing():
    sup = detect()
    # This build's headers are what they are; the report must agree with the compiled flags.
    assert sup.headers_iommufd == bool(lib.PYKVM_HAVE_IOMMUFD_H)
    if not sup.available:
        assert "iommufd/VFIO cdev unavailable" in sup.describe()
        assert sup.missing()
    bare = IommufdSupport(dev_iommu=False, kernel_options={"CONFIG_IOMMUFD": None, "CONFIG_VFIO_DEVICE_CDEV": "y"})
    text = bare.describe()
    assert "<linux/iommufd.h>" in text and "CONFIG_IOMMUFD unset" in text and "CONFIG_VFIO_DEVICE_CDEV" not in text
    assert "/dev/iommu does not exist" in text


def _fake_sysfs(tmp_path):
    """A sysfs with group 7 = {00:05.0 (nvme), 00:05.1 (no driver)}."""
    sysfs = tmp_path / "sys"
    (sysfs / "kernel/iommu_groups/7/devices").mkdir(parents=True)
    (sysfs / "bus/pci/drivers/nvme").mkdir(parents=True)
    for bdf, drv in (("0000:00:05.0", "nvme"), ("0000:00:05.1", None)):
        dev = sysfs / "bus/pci/devices" / bdf
        dev.mkdir(parents=True)
        os.symlink("../../../../kernel/iommu_groups/7", dev / "iommu_group")
        if drv:
            os.symlink(f"../../../../bus/pci/drivers/{drv}", dev / "driver")
        os.symlink(f"../../../../bus/pci/devices/{bdf}", sysfs / "kernel/iommu_groups/7/devices" / bdf)
    (sysfs / "bus/pci/devices/0000:00:06.0").mkdir()
    return str(sysfs)


def test_group_sysfs_lookup(tmp_path):
    sysfs = _fake_sysfs(tmp_path)
    assert normalize_bdf("00:05.0") == "0000:00:05.0"
    assert group_of_device("00:05.0", sysfs) == 7
    assert group_members(7, sysfs) == [("0000:00:05.0", "nvme"), ("0000:00:05.1", None)]
    with pytest.raises(OSError, match="no IOMMU group"):
        group_of_device("0000:00:06.0", sysfs)
    with pytest.raises(OSError, match="no PCI device 0000:00:09.0"):
        group_of_device("0000:00:09.0", sysfs)


def test_an_mmio_whose_memory_a_caller_still_views_stays_usable_when_close_fails():
    """Mmio's own views are released to unmap; a caller's slice keeps the memory exported, so
    mmap.close() refuses: the Mmio must not be left with dead views (it was: ValueError on the
    next read). Anonymous memory stands in for a BAR: this is the Python view bookkeeping only."""
    import mmap

    unmapped = []
    m = Mmio(mmap.mmap(-1, 2 * mmap.PAGESIZE), 0x1000, lambda: unmapped.append(True))
    held = m.view[8:16].cast("Q")
    with pytest.raises(BufferError):
        m.close()
    assert not m.closed and unmapped == []
    m.write64(0x1008, 0x1122334455667788)
    assert m.read64(0x1008) == held[0] == 0x1122334455667788
    held.release()
    exported = ffi.from_buffer(m.view)  # what map_dma(mmio.view) and a memory slot's backing hold
    with pytest.raises(BufferError):
        m.close()
    assert not m.closed and m.read64(0x1008) == 0x1122334455667788 and unmapped == []
    ffi.release(exported)
    m.close()
    m.close()  # idempotent
    assert m.closed and unmapped == [True]


class _Container:
    """Records which groups left it (Group's bookkeeping only: no /dev/vfio here)."""

    def __init__(self):
        self.detached = []

    def _detach(self, group):
        self.detached.append(group.number)


def _bookkept_group():
    """A Group over /dev/null with a recording container: its mapping accounting, nothing of the kernel's."""
    from pykvm._fdobject import FdObject
    from pykvm.vfio.group import Group

    g = Group.__new__(Group)
    g.number, g.path, g._sysfs, g._mapped, g._releasing = 7, "/dev/vfio/7", "/sys", 0, False
    g.container = _Container()
    FdObject.__init__(g, os.open("/dev/null", os.O_RDONLY))
    return g


def test_a_group_leaves_its_container_at_the_last_unmap_even_when_it_races_the_close():
    """The last view going between Group._release's look at the count and the fd's close (another
    thread, or a GC pass) must still take the group out of its container: it used to stay forever."""
    import gc
    import mmap

    for race in (False, True):
        g = _bookkept_group()
        container = g.container
        mm = mmap.mmap(-1, mmap.PAGESIZE)
        m = Mmio(mm, 0, g._track_mapping(mm))
        held = m.view[:8]
        del m, mm
        gc.collect()
        if race:
            release = g._release
            g._release = lambda: (release(), held.release())
        g.close()
        if not race:
            assert container.detached == [] and g.container is container  # the view keeps it in
            held.release()
        gc.collect()
        assert g._mapped == 0 and container.detached == [7] and g.container is None, race
