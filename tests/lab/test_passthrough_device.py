"""VfioPciDevice against real devices and real VFIO, without a guest (inside L1 of the lab).

edu (0000:00:04.0, no host driver) and the NVMe (0000:00:05.0, on ``nvme``) are moved to
vfio-pci for a test and given back after it, so later tests find them as they were.
A VM with an in-kernel irqchip and 16 MiB of RAM stands in for the machine: the tests
check what a guest would get (config space, memslots over the BARs, DMA mappings,
interrupt routes) and that ``close()`` returns all of it.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm.lab import EDU_BDF, EDU_ID, NVME_BDF, nvme_sector
from pykvm.lab.l2 import driver_of
from pykvm.memory import GuestMemory
from pykvm.vfio import Group
from pykvm.vmm.bus import Bus
from pykvm.vmm.pci.allocator import BarAllocator
from pykvm.vmm.pci.bus import PciBus
from pykvm.vmm.pci.config import BASE_ADDRESS_0, COMMAND, ROM_ADDRESS, BarKind
from pykvm.vmm.pci.gsi import GsiRouter
from pykvm.vmm.pci.passthrough import PassthroughError, VfioContext, VfioPciDevice
from tests.conftest import fd_targets
from tests.lab.support import wait_for

pytestmark = pytest.mark.lab

PCI = Path("/sys/bus/pci/devices")
RAM = 16 << 20
GiB = 1 << 30


def group_of(bdf: str) -> int:
    return int(os.path.basename(os.readlink(PCI / bdf / "iommu_group")))


class Binder:
    """Moves devices to vfio-pci (``pykvm host bind``) and gives them back (``restore``)."""

    def __init__(self, state_dir: Path):
        from pykvm.host.sysfs import Root

        self.root, self.state_dir, self.bound = Root(), str(state_dir), []

    def __call__(self, bdf: str) -> str:
        from pykvm.host.bind import bind

        bind(self.root, bdf, state_dir=self.state_dir)
        self.bound.append(bdf)
        assert driver_of(bdf) == "vfio-pci"
        return bdf

    def restore(self, bdf: str) -> None:
        from pykvm.host.bind import restore

        self.bound.remove(bdf)
        restore(self.root, bdf, state_dir=self.state_dir)


@pytest.fixture
def bound(tmp_path):
    """``bound(bdf)`` moves a device to vfio-pci; each is given back after the test."""
    binder = Binder(tmp_path)
    yield binder
    for bdf in list(binder.bound):
        binder.restore(bdf)


@pytest.fixture
def machine(vm):
    """A VM with an irqchip, 16 MiB of RAM in a memslot, a GSI router and PCI bus 0 with its buses."""
    vm.create_irqchip()
    memory = GuestMemory.flat(RAM)
    vm.map_memory(memory)
    mmio, pio = Bus("mmio", 1 << 48), Bus("pio", 1 << 16)
    pci = PciBus(BarAllocator.for_layout(0xC000_0000, 0x3EC0_0000, 4 * GiB, 40), mmio, pio)
    pci.register_ports(pio)

    class M:
        pass

    m = M()
    m.vm, m.memory, m.mmio, m.pio, m.pci, m.router = vm, memory, mmio, pio, pci, GsiRouter(vm)
    yield m
    memory.close()


def open_device(m, bdf: str) -> VfioPciDevice:
    return VfioPciDevice.open(bdf, vm=m.vm, memory=m.memory, gsi_router=m.router)


def vfio_fds() -> list:
    return [t for t in fd_targets() if t.startswith("/dev/vfio") or "vfio-device" in t or "kvm-vfio" in t]


def test_edu_config_space_is_virtualized(machine, bound):
    dev = open_device(machine, bound(EDU_BDF))
    try:
        assert dev.config_read(0, 4) == EDU_ID[1] << 16 | EDU_ID[0]
        region = dev.device.region(0)
        assert dev.config.bars[0].size == region.size == 1 << 20
        assert dev.config.bars[0].kind is BarKind.MEM32
        assert set(dev.config.bars) == {0}
        dev.config_write(BASE_ADDRESS_0, 4, 0xFFFFFFFF)  # sizing comes from VFIO's region info
        assert dev.config_read(BASE_ADDRESS_0, 4) == 0xFFF00000
        dev.config_write(ROM_ADDRESS, 4, 0xFFFFFFFF)
        assert dev.config_read(ROM_ADDRESS, 4) == 0  # ROM hidden
        assert dev.msi is not None and dev.msix is None
        assert dev.config.find_capability(0x05) == dev.msi.offset
        # BAR writes never reach the device: vfio-pci's own view of BAR0 is unchanged.
        real = dev.device.region(7).read(BASE_ADDRESS_0, 4)
        dev.config_write(BASE_ADDRESS_0, 4, 0xD000_0000)
        assert dev.device.region(7).read(BASE_ADDRESS_0, 4) == real
    finally:
        dev.close()


def test_edu_bar_becomes_a_memslot_that_follows_the_guest(machine, bound):
    m = machine
    dev = open_device(m, bound(EDU_BDF))
    try:
        slot = m.pci.add(dev)
        window = m.pci.mapped_bars(slot)[0]
        assert window.size == 1 << 20 and window.address % window.size == 0
        assert m.pci.config_read(0, slot, 0, COMMAND, 2) & 0x2  # memory decode on, firmware-like
        [memslot] = dev.memslots(0)
        ms = m.vm.slots[memslot]
        assert (ms.guest_phys_addr, ms.memory_size) == (window.address, 1 << 20)
        # The slot's host memory is the device's BAR: edu's ID register, and its inverter at 0x04.
        assert ctypes.c_uint32.from_address(ms.userspace_addr).value == 0x010000ED
        ctypes.c_uint32.from_address(ms.userspace_addr + 4).value = 0x12345678
        assert dev.bar_read(0, 4, 4) == (~0x12345678 & 0xFFFFFFFF).to_bytes(4, "little")  # trapped path agrees
        assert m.mmio.read(window.address, 4) == (0x010000ED).to_bytes(4, "little")
        # The guest moves the BAR: the memslot moves with it.
        m.pci.config_write(0, slot, 0, BASE_ADDRESS_0, 4, 0xD000_0000)
        [memslot] = dev.memslots(0)
        assert m.vm.slots[memslot].guest_phys_addr == 0xD000_0000
        # Decode off: no memslot, nothing on the MMIO bus.
        m.pci.config_write(0, slot, 0, COMMAND, 2, 0)
        assert dev.memslots(0) == [] and m.mmio.find(0xD000_0000) is None
        assert [s.guest_phys_addr for s in m.vm.slots.values()] == [0]
    finally:
        dev.close()
    assert [s.guest_phys_addr for s in m.vm.slots.values()] == [0]


def test_edu_msi_is_routed_by_irqfd_into_the_lapic(machine, bound):
    """Guest programs MSI (vector 0x31 to APIC 0); edu raises it; the vCPU's LAPIC has it pending."""
    m = machine
    vcpu = m.vm.create_vcpu(0)
    lapic = vcpu.get_lapic()
    lapic.set_reg(0xF0, 0x1FF)  # SVR: APIC software-enabled, spurious vector 0xFF
    vcpu.set_lapic(lapic)
    dev = open_device(m, bound(EDU_BDF))
    try:
        slot = m.pci.add(dev)
        assert dev.interrupt_mode == "intx"  # no MSI yet: INTx wired to the slot's IOAPIC pin
        o = dev.msi.offset
        cfg = lambda off, size, value: m.pci.config_write(0, slot, 0, off, size, value)  # noqa: E731
        cfg(o + 4, 4, 0xFEE0_0000)
        cfg(o + (0xC if dev.msi.is64 else 0x8), 2, 0x0031)
        cfg(o + 2, 2, 0x1)
        assert dev.interrupt_mode == "msi" and list(dev.routed_vectors()) == [0]
        assert len(m.router.routes()) == len(m.vm.default_irqchip_routes()) + 1
        cfg(COMMAND, 2, 0x6)  # memory + bus master: an MSI is a memory write by the device
        [memslot] = dev.memslots(0)
        base = m.vm.slots[memslot].userspace_addr
        ctypes.c_uint32.from_address(base + 0x60).value = 0x1  # edu: raise interrupt
        irr = lambda: vcpu.get_lapic().reg(0x200 + 0x10 * (0x31 // 32)) >> (0x31 % 32) & 1  # noqa: E731
        assert wait_for(lambda: irr() == 1, timeout=5), "MSI 0x31 never reached the LAPIC's IRR"
        ctypes.c_uint32.from_address(base + 0x64).value = 0x1  # acknowledge
        cfg(o + 2, 2, 0x0)
        assert dev.interrupt_mode == "intx" and m.router.routes() == m.vm.default_irqchip_routes()
    finally:
        dev.close()
        vcpu.close()


def test_close_returns_everything_and_the_device_opens_again(machine, bound):
    m = machine
    bdf = bound(EDU_BDF)
    for _ in range(2):
        dev = open_device(m, bdf)
        slot = m.pci.add(dev)
        cfg = lambda off, size, value: m.pci.config_write(0, slot, 0, off, size, value)  # noqa: E731
        cfg(dev.msi.offset + 4, 4, 0xFEE0_0000)
        cfg(dev.msi.offset + 2, 2, 0x1)
        assert dev.context.dma and dev.context.dma[0].iova == 0 and dev.context.dma[0].size == RAM
        m.pci.remove(slot)
        dev.close()
        dev.close()  # idempotent
        assert vfio_fds() == []
        assert [s.guest_phys_addr for s in m.vm.slots.values()] == [0]
        assert m.router.routes() == m.vm.default_irqchip_routes()
        assert dev.config_read(0, 4) == 0xFFFFFFFF
    Group(group_of(bdf)).close()  # the group is free for anyone


def test_nvme_msix_table_pages_trap_and_the_rest_is_mapped(machine, bound):
    m = machine
    dev = open_device(m, bound(NVME_BDF))
    try:
        msix = dev.msix
        assert msix is not None and msix.size > 1
        slot = m.pci.add(dev)
        bar = m.pci.mapped_bars(slot)[msix.table_bar]
        page = 4096
        table = (msix.table_offset // page * page, -(-(msix.table_offset + msix.table_size) // page) * page)
        mapped = [(m.vm.slots[s].guest_phys_addr - bar.address, m.vm.slots[s].memory_size)
                  for s in dev.memslots(msix.table_bar)]
        assert mapped, "nothing of the MSI-X BAR is mapped"
        for off, size in mapped:
            assert off + size <= table[0] or off >= table[1], "the MSI-X table page must trap"
        # NVMe registers through the memslot: CAP (offset 0) reads the same as through VFIO.
        bar0 = m.pci.mapped_bars(slot)[0].address
        [ms] = [m.vm.slots[s] for s in dev.memslots(0) if m.vm.slots[s].guest_phys_addr == bar0]
        assert ctypes.c_uint32.from_address(ms.userspace_addr).value == int.from_bytes(dev.bar_read(0, 0, 4), "little")
        # The guest enables MSI-X, programs vector 1 and unmasks it: one GSI, routed.
        cfg = lambda off, size, value: m.pci.config_write(0, slot, 0, off, size, value)  # noqa: E731
        cfg(msix.offset + 2, 2, 0xC000)  # enable + function mask, as Linux starts
        entry = msix.table_offset + 16
        m.mmio.write(bar.address + entry, (0xFEE0_0000).to_bytes(8, "little"))
        m.mmio.write(bar.address + entry + 8, (0x41).to_bytes(4, "little"))
        m.mmio.write(bar.address + entry + 12, (0).to_bytes(4, "little"))
        cfg(msix.offset + 2, 2, 0x8000)
        assert dev.interrupt_mode == "msix" and list(dev.routed_vectors()) == [1]
        msi_routes = m.router.routes()[len(m.vm.default_irqchip_routes()):]
        assert [(r.address, r.data) for r in msi_routes] == [(0xFEE0_0000, 0x41)]
        m.mmio.write(bar.address + entry + 8, (0x42).to_bytes(4, "little"))  # data rewritten
        assert m.router.routes()[-1].data == 0x42
        assert m.mmio.read(bar.address + entry + 8, 4) == (0x42).to_bytes(4, "little")
    finally:
        dev.close()
    assert vfio_fds() == []


def test_nvme_works_for_its_host_driver_after_passthrough(bound, machine):
    """After open/close, the NVMe goes back to ``nvme`` and its disk reads as before."""
    dev = open_device(machine, bound(NVME_BDF))
    dev.close()
    bound.restore(NVME_BDF)
    assert wait_for(lambda: driver_of(NVME_BDF) == "nvme")
    assert wait_for(lambda: os.path.exists("/dev/nvme0n1"))
    with open("/dev/nvme0n1", "rb") as disk:
        assert disk.read(512) == nvme_sector(0)


def test_edu_and_nvme_share_one_context(machine, bound):
    """Two devices in one VM: one container (RAM pinned and mapped once), one KVM-VFIO device."""
    m = machine
    context = VfioContext(m.vm, m.memory)
    devs = [VfioPciDevice.open(bound(bdf), vm=m.vm, memory=m.memory, gsi_router=m.router, context=context)
            for bdf in (EDU_BDF, NVME_BDF)]
    try:
        assert [m.pci.add(d) for d in devs] == [1, 2]
        assert sorted(context.groups) == sorted({group_of(EDU_BDF), group_of(NVME_BDF)})
        assert [(d.iova, d.size) for d in context.dma] == [(0, RAM)]
        assert all(d.context is context for d in devs) and context.kvm_device is not None
        assert m.pci.config_read(0, 1, 0, 0, 4) == 0x11E81234 and m.pci.config_read(0, 2, 0, 0, 4) == 0x00101B36
        assert m.pci.intx_routes() == [(1, 0, 16), (2, 0, 17)]
        assert all(d.memslots(0) for d in devs)
        devs[0].close()
        assert context.container is not None and [(d.iova, d.size) for d in context.dma] == [(0, RAM)]
    finally:
        for d in devs:
            d.close()
    assert context.container is None and context.dma == [] and vfio_fds() == []


# -- errors: each clear, before anything is opened, nothing left behind --------------------
def test_device_on_a_host_driver_is_refused(machine):
    assert driver_of(NVME_BDF) == "nvme"
    with pytest.raises(PassthroughError) as e:
        open_device(machine, NVME_BDF)
    assert "bound to nvme" in str(e.value) and f"pykvm host bind {NVME_BDF}" in str(e.value)
    assert driver_of(NVME_BDF) == "nvme" and vfio_fds() == []


def test_unbound_device_and_bad_addresses_are_refused(machine):
    assert driver_of(EDU_BDF) is None
    with pytest.raises(PassthroughError, match="not bound to any driver"):
        open_device(machine, EDU_BDF)
    with pytest.raises(PassthroughError, match="no PCI device 0000:00:1f.7"):
        open_device(machine, "00:1f.7")
    with pytest.raises(PassthroughError, match="not a PCI address"):
        open_device(machine, "05.0")
    assert vfio_fds() == [] and list(machine.vm.slots) == [0]


def test_sysfs_path_is_accepted(machine, bound):
    bound(EDU_BDF)
    dev = open_device(machine, f"/sys/bus/pci/devices/{EDU_BDF}")
    try:
        assert dev.target.bdf == EDU_BDF
    finally:
        dev.close()


MEMLOCK_SCRIPT = r"""
import ctypes, resource, sys
libc = ctypes.CDLL(None, use_errno=True)
class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
class Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
header, data = Header(0x20080522, 0), (Data * 2)()
assert libc.capget(ctypes.byref(header), data) == 0
data[0].effective &= ~(1 << 14); data[0].permitted &= ~(1 << 14)  # drop CAP_IPC_LOCK
assert libc.capset(ctypes.byref(header), data) == 0
resource.setrlimit(resource.RLIMIT_MEMLOCK, (1 << 20, 1 << 20))
from pykvm.kvm import Kvm
from pykvm.memory import GuestMemory
from pykvm.vmm.pci.gsi import GsiRouter
from pykvm.vmm.pci.passthrough import PassthroughError, VfioContext, VfioPciDevice
vm = Kvm().create_vm()
vm.create_irqchip()
memory = GuestMemory.flat(64 << 20)
try:
    VfioPciDevice.open(sys.argv[1], vm=vm, memory=memory, gsi_router=GsiRouter(vm))
except PassthroughError as exc:
    print(exc)
else:
    sys.exit("opened despite the limit")
# Skip the pre-check: the kernel refuses to pin, and the failure leaves nothing open.
import os
import pykvm.vmm.pci.passthrough as passthrough
from pykvm.errors import VfioError
from pykvm.vfio import Group
from pykvm.vmm.pci.preflight import check_device
passthrough.preflight = lambda device, ram, sysfs: check_device(device, sysfs)
try:
    VfioPciDevice.open(sys.argv[1], vm=vm, memory=memory, gsi_router=GsiRouter(vm))
except VfioError as exc:
    print("kernel:", exc)
links = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")]
print("vfio fds left:", [l for l in links if "vfio" in l])
Group(int(sys.argv[2])).close()
print("group reopened")
sys.exit(3)
"""


def test_memlock_below_guest_ram_is_refused(bound):
    bdf = bound(EDU_BDF)
    proc = subprocess.run([sys.executable, "-c", MEMLOCK_SCRIPT, bdf, str(group_of(bdf))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "RLIMIT_MEMLOCK is 1 MiB" in proc.stdout and "64 MiB of guest RAM" in proc.stdout
    assert "ulimit -l 65536" in proc.stdout and "limits.conf" in proc.stdout and "LimitMEMLOCK" in proc.stdout
    assert "kernel: VFIO_IOMMU_MAP_DMA: cannot pin the pages: RLIMIT_MEMLOCK too low" in proc.stdout
    assert "vfio fds left: []" in proc.stdout and "group reopened" in proc.stdout
    assert driver_of(bdf) == "vfio-pci"
    Group(group_of(bdf)).close()  # nothing holds the group
