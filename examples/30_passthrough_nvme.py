"""PCI passthrough: a Linux guest drives a real NVMe controller, and pykvm is not in the data path.

    python3 examples/30_passthrough_nvme.py [BDF]          # as root, on a host with an IOMMU
    python3 -m pykvm lab run -- python3 examples/30_passthrough_nvme.py 0000:00:05.0   # anywhere

Host preparation (step 1 below, what ``pykvm host bind BDF`` does): the controller is taken
from the host's ``nvme`` driver and given to ``vfio-pci`` with three sysfs writes
(``driver_override``, ``driver/unbind``, ``drivers_probe``); vfio-pci then offers its IOMMU
group as ``/dev/vfio/GROUP``. The controller's disk is gone from the host until step 4.

The machine (step 3, ``pykvm run --vfio BDF``): ``MachineConfig(vfio=[BDF])`` makes the
machine open a VFIO container and the group, and map all guest RAM into the IOMMU with
IOVA = guest physical address. So when the guest's nvme driver writes a guest-physical
address into a submission queue entry, the controller's DMA to that address is translated
by the IOMMU into the right page of pykvm's RAM mapping: reads and writes of the disk
move data without any exit. The controller's config space is virtualized (BARs placed by
the guest, MSI-X capability emulated), its BAR0 is mmap'd from VFIO into KVM memory slots
except the page holding the MSI-X table, which traps so pykvm can route each vector: VFIO
signals an eventfd per vector and KVM injects it through an irqfd with an MSI route, so
interrupts do not pass through Python either. Only config-space accesses and MSI-X table
writes reach pykvm; the run's exit statistics at the end show how few that is.

Teardown (step 4): the machine disables interrupts, unmaps DMA, closes the device and
group; ``restore`` gives the controller back to the host's driver (``pykvm host restore``).

The guest is the kernel this machine runs (in the lab: the lab's Debian kernel) with a
busybox initramfs carrying the nvme module. Exits 77 where there is no VFIO to show.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pykvm.host.bind import bind, restore  # noqa: E402
from pykvm.host.sysfs import Root  # noqa: E402
from pykvm.lab.l2 import build_guest_initramfs, guest_cmdline, guest_kernel  # noqa: E402
from pykvm.vmm.console import BufferConsole  # noqa: E402
from pykvm.vmm.machine import Machine, MachineConfig  # noqa: E402
from pykvm.vmm.stats import exit_report  # noqa: E402

LAB_NVME = "0000:00:05.0"
UNSUPPORTED = 77

# The guest's /init (after mounting /proc, /sys, /dev and loading nvme): what it found, read, saw.
GUEST_INIT = r"""
for d in /sys/bus/pci/devices/*; do
  echo "guest: PCI ${d##*/} $(cut -c3- $d/vendor):$(cut -c3- $d/device) driver $(basename "$(readlink $d/driver)")"
done
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
echo "guest: /dev/nvme0n1 has $(cat /sys/block/nvme0n1/size) sectors; its first 32 bytes (O_DIRECT):"
dd if=/dev/nvme0n1 bs=4096 count=1 iflag=direct 2>/dev/null | head -c 32 | hexdump -C
grep nvme /proc/interrupts | sed 's/^/guest: irq /'
poweroff -f
"""


def echo(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


def main(bdf: str) -> int:
    if not os.path.exists("/dev/vfio/vfio"):
        print("no /dev/vfio/vfio here (no VFIO/IOMMU): run it in the lab, "
              f"`python3 -m pykvm lab run -- python3 {sys.argv[0]} {LAB_NVME}`")
        return UNSUPPORTED
    kernel, modules = guest_kernel()
    with tempfile.TemporaryDirectory(prefix="pykvm-example-") as tmp:
        initrd = build_guest_initramfs(Path(tmp) / "initrd.img", GUEST_INIT, ["nvme"], modules_dir=modules)

        # 1. Host preparation: the controller leaves the host's driver for vfio-pci.
        result = bind(Root(), bdf, state_dir=tmp)
        moved = any(change.before != change.after for change in result.changes)
        for path, text in result.writes:
            print(f"host: echo {text.strip()} > {path}")
        print(f"host: {bdf} is on vfio-pci now, IOMMU group {result.group} (/dev/vfio/{result.group})")
        try:
            # 2.-3. A machine with the device on its PCI bus; the guest console is echoed here.
            config = MachineConfig(kernel=str(kernel), initrd=str(initrd), cmdline=guest_cmdline(),
                                   memory="256M", vfio=[bdf], timeout=240)
            console = BufferConsole(echo=echo)
            machine = Machine(config, console=console)
            outcome = machine.run()  # builds (passthrough checks first), runs, tears down
            print(f"\nhost: guest {outcome} (exit status {outcome.status})")
            print(exit_report(machine.exit_stats()))
        finally:
            # 4. The controller goes back to the host's driver (if it was on one before).
            for change in restore(Root(), bdf, state_dir=tmp).changes if moved else []:
                print(f"host: {change.bdf} back on {change.after}")
    read_the_disk = "\n00000000  " in console.output.decode(errors="replace")  # hexdump's first line
    return 0 if outcome.status == 0 and read_the_disk else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else LAB_NVME))
