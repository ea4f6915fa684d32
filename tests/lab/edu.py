"""The lab's edu device opened through pykvm.vfio: shared by the VFIO lab tests.

edu (QEMU's teaching device) has an ID register, a liveness register that returns
the complement of what was written, and a DMA engine with a 28-bit mask moving data
between its 4 KiB internal buffer (at EDU_BUFFER) and IOVAs.
"""
from __future__ import annotations

import os
import time

import pytest

from pykvm.lab import EDU_BDF
from pykvm.lab.l2 import vfio_bound
from pykvm.vfio import Container, Group, lib
from tests.conftest import open_fds

ID, LIVENESS, IRQ_STATUS, IRQ_RAISE, IRQ_ACK = 0x00, 0x04, 0x24, 0x60, 0x64
DMA_SRC, DMA_DST, DMA_COUNT, DMA_CMD = 0x80, 0x88, 0x90, 0x98
DMA_START, DMA_TO_RAM, DMA_IRQ = 1, 2, 4
EDU_BUFFER = 0x40000
EDU_DMA_LIMIT = 1 << 28
PAGE = 4096


@pytest.fixture(scope="module")
def edu_bound(tmp_path_factory):
    """The lab's edu bound to vfio-pci for one test module, then given back."""
    with vfio_bound([EDU_BDF], str(tmp_path_factory.mktemp("bind"))):
        yield EDU_BDF


class Edu:
    """An opened edu: container + group + device + mapped BAR0."""

    def __init__(self, bdf: str):
        self.container = Container()
        self.group = Group.for_device(bdf)
        self.group.set_container(self.container)
        self.container.set_iommu()
        self.device = self.group.get_device(bdf)
        self.device.config.enable(memory=True, bus_master=True)
        self.bar0 = self.device.region(lib.VFIO_PCI_BAR0_REGION_INDEX).mmap()

    def dma(self, src: int, dst: int, count: int, to_ram: bool, irq: bool = False) -> None:
        self.bar0.write64(DMA_SRC, src)
        self.bar0.write64(DMA_DST, dst)
        self.bar0.write64(DMA_COUNT, count)
        self.bar0.write64(DMA_CMD, DMA_START | (DMA_TO_RAM if to_ram else 0) | (DMA_IRQ if irq else 0))
        deadline = time.monotonic() + 20
        while self.bar0.read64(DMA_CMD) & DMA_START:
            assert time.monotonic() < deadline, "edu DMA did not complete"
            time.sleep(0.01)

    def alive(self) -> bool:
        self.bar0.write32(LIVENESS, 0x0F0F1234)
        return self.bar0.read32(ID) == 0x010000ED and self.bar0.read32(LIVENESS) == 0xF0F0EDCB

    def close(self) -> None:
        self.container.close()


@pytest.fixture
def edu(edu_bound):
    """An opened :class:`Edu`; closing it must close every fd it opened."""
    before = open_fds()
    e = Edu(edu_bound)
    yield e
    e.close()
    assert e.device.closed and e.group.closed and e.bar0.closed
    assert open_fds() == before, "fds leaked"


def kmsg_reader() -> int:
    """/dev/kmsg opened at its end: what the kernel logs from now on."""
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def kmsg_new(fd: int) -> str:
    """Everything logged since the last call."""
    lines = []
    while True:
        try:
            lines.append(os.read(fd, 8192).decode(errors="replace"))
        except BlockingIOError:
            return "".join(lines)
