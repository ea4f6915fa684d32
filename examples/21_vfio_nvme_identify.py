"""A userspace NVMe driver in a page of Python: IDENTIFY CONTROLLER through VFIO.

    python3 -m pykvm host bind 0000:00:05.0     # takes the disk away from the kernel's nvme driver
    python3 examples/21_vfio_nvme_identify.py [BDF]
    python3 -m pykvm host restore 0000:00:05.0  # gives it back

The controller's registers are BAR0: CAP (0x00), CC (0x14), CSTS (0x1c), AQA (0x24),
ASQ (0x28), ACQ (0x30) and doorbells from 0x1000 (stride 4 << CAP.DSTRD). The admin
submission and completion queues and the 4 KiB identify buffer live in host memory
mapped for the device with map_dma; the controller reads commands from and writes
completions to them by DMA. A completion is new when its phase bit flips to 1.
"""
from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pykvm.vfio import Container, DmaAllocator, Group, lib  # noqa: E402

NVME_BDF = "0000:00:05.0"
CAP, CC, CSTS, AQA, ASQ, ACQ, DOORBELLS = 0x00, 0x14, 0x1C, 0x24, 0x28, 0x30, 0x1000
CC_EN, CC_IOSQES_64B, CC_IOCQES_16B = 1, 6 << 16, 4 << 20
CSTS_RDY = 1
ENTRIES = 16  # admin queue depth
OPC_IDENTIFY, CNS_CONTROLLER = 0x06, 1


def write64(bar0, offset: int, value: int) -> None:
    """64-bit registers as two 32-bit writes, low half first (allowed by the NVMe spec)."""
    bar0.write32(offset, value & 0xFFFFFFFF)
    bar0.write32(offset + 4, value >> 32)


def wait_ready(bar0, ready: bool, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while bool(bar0.read32(CSTS) & CSTS_RDY) != ready:
        if time.monotonic() > deadline:
            raise TimeoutError(f"controller did not become {'ready' if ready else 'disabled'} (CSTS {bar0.read32(CSTS):#x})")
        time.sleep(0.001)


def identify(bdf: str = NVME_BDF) -> dict:
    """Bring the controller up with an admin queue pair and return IDENTIFY CONTROLLER's strings."""
    with Container() as container, Group.for_device(bdf) as group:
        group.set_container(container)
        container.set_iommu(lib.VFIO_TYPE1v2_IOMMU)
        device = group.get_device(bdf)
        device.config.enable(memory=True, bus_master=True)
        bar0 = device.region(lib.VFIO_PCI_BAR0_REGION_INDEX).mmap()
        cap = bar0.read32(CAP) | bar0.read32(CAP + 4) << 32
        stride = 4 << ((cap >> 32) & 0xF)
        timeout = ((cap >> 24) & 0xFF) * 0.5 + 1

        with DmaAllocator(container) as dmas:
            sq, sq_iova = dmas.alloc(ENTRIES * 64)
            cq, cq_iova = dmas.alloc(ENTRIES * 16)
            data, data_iova = dmas.alloc(4096)

            bar0.write32(CC, 0)  # reset the controller, then describe the admin queues
            wait_ready(bar0, False, timeout)
            bar0.write32(AQA, (ENTRIES - 1) << 16 | (ENTRIES - 1))
            write64(bar0, ASQ, sq_iova)
            write64(bar0, ACQ, cq_iova)
            bar0.write32(CC, CC_EN | CC_IOSQES_64B | CC_IOCQES_16B)
            wait_ready(bar0, True, timeout)

            # command dwords: 0 opcode|cid<<16, 1 nsid, 6-7 PRP1, 10 CNS
            command = struct.pack("<IIQQQQIIIIII", OPC_IDENTIFY | 1 << 16, 0, 0, 0, data_iova, 0,
                                  CNS_CONTROLLER, 0, 0, 0, 0, 0)
            sq[0:64] = command
            bar0.write32(DOORBELLS, 1)  # SQ 0 tail = 1
            deadline = time.monotonic() + timeout
            while not struct.unpack_from("<I", cq, 12)[0] >> 16 & 1:  # phase bit of completion 0
                if time.monotonic() > deadline:
                    raise TimeoutError("no completion for IDENTIFY")
                time.sleep(0.001)
            status = struct.unpack_from("<I", cq, 12)[0] >> 17
            bar0.write32(DOORBELLS + stride, 1)  # CQ 0 head = 1
            if status:
                raise RuntimeError(f"IDENTIFY failed: status {status:#x}")
            vid, = struct.unpack_from("<H", data, 0)
            result = {
                "vid": vid,
                "serial": bytes(data[4:24]).decode("ascii").strip(),
                "model": bytes(data[24:64]).decode("ascii").strip(),
                "firmware": bytes(data[64:72]).decode("ascii").strip(),
            }
            bar0.write32(CC, 0)
            wait_ready(bar0, False, timeout)
        bar0.close()
        return result


def main(bdf: str = NVME_BDF) -> int:
    ident = identify(bdf)
    print(f"vendor {ident['vid']:#06x}  model {ident['model']!r}  serial {ident['serial']!r}  "
          f"firmware {ident['firmware']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
