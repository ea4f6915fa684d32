"""A device doing DMA through the IOMMU, driven from Python: QEMU's ``edu`` device.

    python3 -m pykvm host bind 0000:00:04.0     # once: hand the device to vfio-pci
    python3 examples/20_vfio_edu_dma.py [BDF]

Walks through: open the container and the device's group, pick the type1v2 IOMMU,
map the edu's registers (BAR0), map a host buffer for DMA at an IOVA, let the device
copy RAM -> device -> RAM, then unmap the buffer and show the IOMMU refusing the
device's write (the kernel logs a DMAR fault; the buffer stays as it was).

edu registers: 0x00 ID (0x010000ed), 0x04 liveness (reads back NOT of what was
written), 0x80/0x88/0x90/0x98 DMA source/destination/count/command. Its internal
buffer sits at 0x40000 and its DMA addresses are 28 bits wide.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pykvm.vfio import Container, DmaAllocator, Group, lib  # noqa: E402

EDU_BDF = "0000:00:04.0"
ID, LIVENESS = 0x00, 0x04
DMA_SRC, DMA_DST, DMA_COUNT, DMA_CMD = 0x80, 0x88, 0x90, 0x98
DMA_START, DMA_TO_RAM = 1, 2
EDU_BUFFER = 0x40000


def dma(bar0, src: int, dst: int, count: int, to_ram: bool, timeout: float = 10.0) -> None:
    """Start one edu DMA and wait for the device to clear its busy bit (~100 ms each)."""
    bar0.write64(DMA_SRC, src)
    bar0.write64(DMA_DST, dst)
    bar0.write64(DMA_COUNT, count)
    bar0.write64(DMA_CMD, DMA_START | (DMA_TO_RAM if to_ram else 0))
    deadline = time.monotonic() + timeout
    while bar0.read64(DMA_CMD) & DMA_START:
        if time.monotonic() > deadline:
            raise TimeoutError("edu DMA did not complete")
        time.sleep(0.01)


def main(bdf: str = EDU_BDF) -> int:
    with Container() as container, Group.for_device(bdf) as group:
        group.set_container(container)
        container.set_iommu(lib.VFIO_TYPE1v2_IOMMU)
        info = container.iommu_info()
        print(f"IOMMU page sizes {info.page_sizes:#x}, IOVA ranges "
              + ", ".join(f"[{s:#x}, {e:#x}]" for s, e in info.iova_ranges or ()))
        device = group.get_device(bdf)
        device.config.enable(memory=True, bus_master=True)  # bus mastering is off after binding
        bar0 = device.region(lib.VFIO_PCI_BAR0_REGION_INDEX).mmap()
        print(f"edu ID register: {bar0.read32(ID):#010x}")
        bar0.write32(LIVENESS, 0x12345678)
        print(f"liveness: wrote 0x12345678, read {bar0.read32(LIVENESS):#010x}")

        dmas = DmaAllocator(container, limit=1 << 28)  # edu's DMA mask is 28 bits
        src, src_iova = dmas.alloc(4096)
        dst, dst_iova = dmas.alloc(4096)
        message = b"hello from host memory, via the IOMMU"
        src[: len(message)] = message
        dma(bar0, src_iova, EDU_BUFFER, len(message), to_ram=False)
        dma(bar0, EDU_BUFFER, dst_iova, len(message), to_ram=True)
        print(f"RAM@{src_iova:#x} -> edu -> RAM@{dst_iova:#x}: {bytes(dst[: len(message)])!r}")

        dst[:4096] = b"\xee" * 4096
        container.unmap_dma(dst_iova, 4096)  # the buffer stays ours, the device loses it
        dma(bar0, EDU_BUFFER, dst_iova, len(message), to_ram=True)
        untouched = bytes(dst[: len(message)]) == b"\xee" * len(message)
        print(f"after unmap_dma: the device's write to {dst_iova:#x} was "
              f"{'refused by the IOMMU (see dmesg: DMAR fault)' if untouched else 'NOT refused'}")
        dst.close()
        bar0.close()
        dmas.close()
        return 0 if untouched else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
