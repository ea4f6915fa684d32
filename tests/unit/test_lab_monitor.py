"""The lost-wakeup repair of the lab harness (pykvm.lab.monitor, run.StallGuard): pure logic.

The states are the monitor's text as QEMU 7.2 printed it for L1s that had stalled
(halted, interrupt 236 in the IRR) and for an L1 that was merely idle.
"""
from __future__ import annotations

from typing import List

from hypothesis import given, strategies as st

from pykvm.lab.monitor import lost_wakeup
from pykvm.lab.run import StallGuard

REGS = "RIP=ffffffff9c4592eb RFL={rfl:08x} [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT={hlt}\n"
LAPIC = """(info lapic)
dumping local APIC state for CPU 0 

LVTT\t 0x000000ec active-hi edge                 one-shot     Fixed  (vec 236)
Timer\t DCR=0x3 (divide by 16) initial_count = 89492 current_count = 0
SPIV\t 0x000001ff APIC {spiv}, focus=off, spurious vec 255
ISR\t (none)
IRR\t {irr}

APR 0x00 TPR 0x10 DFR 0x0f LDR 0x01 PPR 0x{ppr:02x}
"""


def state(rfl: int = 0x246, hlt: int = 1, irr: str = "236 ", ppr: int = 0x10, spiv: str = "enabled") -> str:
    return "(info registers)\n\nCPU#0\n" + REGS.format(rfl=rfl, hlt=hlt) + LAPIC.format(irr=irr, ppr=ppr, spiv=spiv)


def test_the_stalled_l1_is_recognised():
    assert lost_wakeup(state()) == 236


def test_an_idle_l1_waiting_for_its_timer_is_not():
    assert lost_wakeup(state(irr="(none)")) is None


def test_running_masked_or_disabled_is_not_a_lost_wakeup():
    assert lost_wakeup(state(hlt=0)) is None
    assert lost_wakeup(state(rfl=0x46)) is None  # IF clear: HLT waits for an NMI by design
    assert lost_wakeup(state(ppr=0xE0)) is None  # the pending vector is not above the priority
    assert lost_wakeup(state(spiv="disabled")) is None
    assert lost_wakeup("(QEMU's monitor did not answer: [Errno 111] Connection refused)") is None


@given(vectors=st.lists(st.integers(16, 255), max_size=4, unique=True), ppr=st.integers(0, 255),
       hlt=st.integers(0, 1), interrupts_on=st.booleans())
def test_lost_wakeup_follows_the_apic_delivery_rule(vectors: List[int], ppr: int, hlt: int, interrupts_on: bool):
    text = state(rfl=0x246 if interrupts_on else 0x46, hlt=hlt, irr=" ".join(map(str, vectors)) or "(none)", ppr=ppr)
    deliverable = bool(vectors) and max(vectors) >> 4 > ppr >> 4
    expected = max(vectors) if hlt and interrupts_on and deliverable else None
    assert lost_wakeup(text) == expected


class FakeQemu:
    def __init__(self) -> None:
        self.cpu = 0.0

    def cpu_seconds(self) -> float:
        return self.cpu


class FakeMonitor:
    def __init__(self, text: str) -> None:
        self.text, self.keys = text, 0

    def cpu_state(self) -> str:
        return self.text

    def press_key(self) -> None:
        self.keys += 1


def test_stall_guard_wakes_only_a_stalled_l1_after_the_idle_period(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("pykvm.lab.run.time.monotonic", lambda: clock[0])
    qemu, reports = FakeQemu(), []
    stalled, idle = FakeMonitor(state()), FakeMonitor(state(irr="(none)"))
    guard = StallGuard(qemu, stalled, idle_after=15, report=reports.append)
    clock[0] += 14
    guard.check()
    assert stalled.keys == 0  # not idle long enough
    qemu.cpu, clock[0] = 0.5, clock[0] + 10
    guard.check()  # QEMU ran: the idle period restarts
    clock[0] += 14
    guard.check()
    assert stalled.keys == 0
    clock[0] += 2
    guard.check()
    assert stalled.keys == 1 and guard.wakeups == 1 and "interrupt 236" in reports[0]
    quiet = StallGuard(qemu, idle, idle_after=15, report=reports.append)
    clock[0] += 60
    quiet.check()
    assert idle.keys == 0 and quiet.wakeups == 0
