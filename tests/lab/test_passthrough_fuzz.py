"""A guest writing garbage into a passed-through device's config space and MSI-X table
(hypothesis, through the real ports and buses) cannot crash the VMM, cannot make it map
anything but the device's own BARs, cannot program the real BARs, and leaves DMA limited
to guest RAM. Runs inside L1 of the lab against edu and the NVMe."""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pykvm.lab import EDU_BDF, NVME_BDF
from pykvm.lab.l2 import vfio_bound
from pykvm.memory import GuestMemory
from pykvm.vmm.bus import Bus
from pykvm.vmm.pci.allocator import BarAllocator
from pykvm.vmm.pci.bus import PciBus
from pykvm.vmm.pci.config import BASE_ADDRESS_0
from pykvm.vmm.pci.gsi import GsiRouter
from pykvm.vmm.pci.passthrough import VfioPciDevice

pytestmark = pytest.mark.lab

RAM = 16 << 20
GiB = 1 << 30
PCI = "/sys/bus/pci/devices"

values = st.one_of(st.integers(0, 0xFFFFFFFF),
                   st.sampled_from([0, 0xFFFFFFFF, 0xFEE00000, 0xC0000000, 0x1000, 0x7, 0x1, 0x8000, 0xC000, 0x4000]))
table_writes = st.lists(st.tuples(st.integers(0, 64 * 16), st.sampled_from([4, 8]), values), max_size=30)


def config_writes(caps):
    """Writes anywhere, biased to the header's BARs/command and to the device's capabilities,
    with control-word writes that turn MSI/MSI-X on and off."""
    hot = [0x04, 0x06, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24, 0x30, 0x3C] + [c + i for c in caps for i in range(0, 24, 2)]
    anywhere = st.tuples(st.one_of(st.integers(0, 0xFF), st.sampled_from(hot)), st.sampled_from([1, 2, 4]), values)
    control = st.tuples(st.sampled_from([c + 2 for c in caps] or [0x42]), st.just(2),
                        st.sampled_from([0x0, 0x1, 0x11, 0x8000, 0xC000, 0x4000]))
    return st.lists(st.one_of(anywhere, control), min_size=1, max_size=40)


@pytest.fixture(scope="module")
def on_vfio(tmp_path_factory):
    """Both devices on vfio-pci for this module, given back at its end."""
    with vfio_bound([EDU_BDF, NVME_BDF], str(tmp_path_factory.mktemp("bind"))):
        yield


def run_garbage(kvm, bdf, data, msix_writes=()):
    vm = kvm.create_vm()
    vm.create_irqchip()
    memory = GuestMemory.flat(RAM)
    vm.map_memory(memory)
    mmio, pio = Bus("mmio", 1 << 48), Bus("pio", 1 << 16)
    allocator = BarAllocator.for_layout(0xC000_0000, 0x3EC0_0000, 4 * GiB, 40)
    pci = PciBus(allocator, mmio, pio)
    pci.register_ports(pio)
    router = GsiRouter(vm)
    dev = VfioPciDevice.open(bdf, vm=vm, memory=memory, gsi_router=router)
    try:
        slot = pci.add(dev)
        real_bars = dev.device.region(7).read(BASE_ADDRESS_0, 24)
        writes = data.draw(config_writes([off for _id, off in dev.config.capabilities()]), label="config writes")
        for offset, size, value in writes:
            pio.write(0xCF8, struct.pack("<I", 0x8000_0000 | slot << 11 | offset & 0xFC))
            pio.write(0xCFC + (offset & 3), (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))
            m = dev.msix
            bar = pci.mapped_bars(slot).get(m.table_bar) if m is not None else None
            for off, wsize, v in msix_writes if bar is not None else ():
                mmio.write(bar.address + m.table_offset + off % m.table_size // wsize * wsize, v.to_bytes(wsize, "little"))
        assert pio.faults == 0 and mmio.faults == 0, "a handler raised"
        event(f"interrupts: {dev.interrupt_mode}, {len(dev.routed_vectors())} routed")
        # Only the device's own BAR memory is ever mapped, inside windows the bus accepts.
        windows = pci.mapped_bars(slot)
        ram_slots = [s for s, ms in vm.slots.items() if ms.guest_phys_addr == 0 and ms.memory_size == RAM]
        assert len(ram_slots) == 1
        bar_slots = {s: i for i, w in windows.items() for s in dev.memslots(i)}
        assert set(vm.slots) == set(ram_slots) | set(bar_slots), "a memslot that is neither RAM nor a BAR"
        for s, i in bar_slots.items():
            ms, w = vm.slots[s], windows[i]
            assert w.address <= ms.guest_phys_addr and ms.guest_phys_addr + ms.memory_size <= w.end
            assert allocator.accepts(w.kind, w.address, w.size) and w.address >= RAM
            assert any(p.view is ms.backing for p in dev._pieces[i]), "memslot backed by something else"
        # The real BARs were never written, DMA reaches exactly guest RAM, routes match vectors.
        assert dev.device.region(7).read(BASE_ADDRESS_0, 24) == real_bars
        assert [(d.iova, d.size) for d in dev.context.dma] == [(0, RAM)]
        msi_routes = router.routes()[len(vm.default_irqchip_routes()):]
        assert {r.gsi for r in msi_routes} >= set(dev.routed_vectors().values())
    finally:
        dev.close()
        memory.close()
        vm.close()
    assert router.routes() == vm.default_irqchip_routes()
    assert os.path.basename(os.readlink(f"{PCI}/{bdf}/driver")) == "vfio-pci"


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_garbage_config_writes_to_edu(kvm, on_vfio, data):
    run_garbage(kvm, EDU_BDF, data)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), msix=table_writes)
def test_garbage_config_and_msix_writes_to_nvme(kvm, on_vfio, data, msix):
    run_garbage(kvm, NVME_BDF, data, msix)
