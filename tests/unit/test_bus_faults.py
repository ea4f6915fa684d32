"""A device that raises on a guest access: the bus answers all ones / drops the write, counts
it in Bus.faults, and logs only the first FAULT_LOG_LIMIT with their tracebacks (a guest can
cause thousands a second, each a multi-line traceback on the console)."""
from __future__ import annotations

import logging
import threading

from pykvm.vmm.bus import FAULT_LOG_LIMIT, Bus


class Broken:
    def read(self, offset: int, size: int) -> bytes:
        raise RuntimeError("model bug")

    def write(self, offset: int, data: bytes) -> None:
        raise RuntimeError("model bug")


def test_faults_are_all_counted_but_only_the_first_logged(caplog):
    bus = Bus("pio", 1 << 16)
    bus.register(0x100, 8, Broken(), "broken")
    with caplog.at_level(logging.WARNING, logger="pykvm.vmm.bus"):
        for i in range(500):
            assert bus.read(0x100 + i % 8, 1) == b"\xff"
            bus.write(0x100, b"\x00")
    assert bus.faults == 1000
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == FAULT_LOG_LIMIT
    assert "further ones are only counted" in caplog.records[-1].getMessage()
    assert len(caplog.records) == FAULT_LOG_LIMIT + 1


def test_faults_from_several_vcpu_threads_are_counted_exactly(caplog):
    bus = Bus("mmio", 1 << 32)
    bus.register(0x1000, 0x1000, Broken(), "broken")

    def hammer() -> None:
        for _ in range(2000):
            bus.read(0x1000, 4)

    with caplog.at_level(logging.CRITICAL, logger="pykvm.vmm.bus"):
        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert bus.faults == 8000
