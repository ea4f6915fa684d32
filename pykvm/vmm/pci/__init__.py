"""PCI for the VMM: bus 0, configuration space, BAR placement, MSI/MSI-X and VFIO passthrough.

Modules:

- ``config``: a function's configuration space with hardware write semantics
  (write masks, RW1C bits, BAR sizing, ROM BAR, capability list);
- ``bus``: :class:`~bus.PciBus`, bus 0 with a host bridge at 00:00.0, configuration
  mechanism #1 (ports 0xCF8/0xCFC), optional ECAM, stable slots, and BAR ranges kept
  on the machine's MMIO/PIO buses as the guest moves BARs or toggles decode;
- ``allocator``: firmware-like initial BAR placement in the 32-bit hole, above RAM
  (sized from the CPU's physical address bits) and in I/O ports 0xC000-0xFFFF;
- ``msi``/``msix``: the guest's MSI and MSI-X programming as :class:`~msi.Vectors`;
- ``gsi``: :class:`~gsi.GsiRouter`, the VM's GSI allocator and routing table (share one per VM);
- ``preflight``: checks before a passthrough (vfio-pci binding, viable group, memlock);
- ``passthrough``: :class:`~passthrough.VfioPciDevice`, a host device given to the guest.

How a machine uses it::

    from pykvm.vmm.pci.allocator import BarAllocator
    from pykvm.vmm.pci.bus import PciBus
    from pykvm.vmm.pci.gsi import GsiRouter
    from pykvm.vmm.pci.passthrough import VfioContext, VfioPciDevice

    vm.create_irqchip()                                   # before any route or irqfd
    base, size = layout.mmio32
    pci = PciBus(BarAllocator.for_layout(base, size, layout.mmio64_base, phys_bits), mmio_bus, pio_bus)
    pci.register_ports(pio_bus)                           # 0xCF8-0xCFF
    router = GsiRouter(vm)                                # one per VM, for every MSI user
    context = VfioContext(vm, guest_memory)               # one per VM: container, RAM DMA map, KVM-VFIO
    devices = [VfioPciDevice.open(bdf, vm=vm, memory=guest_memory, gsi_router=router, context=context)
               for bdf in args.vfio]                      # PassthroughError (with .fix) if not ready
    for dev in devices:
        pci.add(dev)                                      # slots 1, 2, ... in --vfio order; BARs placed
    build_mptable(..., pci_irqs=pci.intx_routes())        # INTx lines for the MP table
    ... run the guest ...
    for dev in devices:
        dev.close()                                       # irqs off, memslots gone, reset, DMA unmapped

Open devices after guest RAM exists (it is mapped for DMA at open) and after
``create_irqchip`` (INTx irqfds are wired when ``pci.add`` assigns the slot). The
guest's MMIO to mapped BAR parts never exits; trapped parts (MSI-X table/PBA
pages, unmappable regions) arrive as MMIO exits on ``mmio_bus`` like any device.
Configuration writes may come from any vCPU thread: the bus serializes them.
Port 0xCF9 (PC reset control) sits inside 0xCF8-0xCFB and is not served: use
``reboot=k`` (i8042) or ACPI to reset.
"""
