"""L1's KVM exit trace (pykvm.lab.ktrace) against a guest whose exits are known."""
from __future__ import annotations

import os

import pytest

from pykvm.kvm import IoExit, Kvm
from pykvm.lab.ktrace import ExitTrace, summarize
from tests.kvm.guests import CODE, HLT, real_mode_vcpu

PORT = 0x510
OUTS = 25


@pytest.mark.lab
def test_the_trace_shows_each_port_write_at_its_rip_and_the_time_between():
    """A real-mode guest writes port 0x510 OUTS times (a window mark before the first);
    the trace must show OUTS io exits of this thread, at the OUT instructions' RIPs, with
    the time the guest ran and the time L1 spent handling them."""
    out = bytes([0xBA, PORT & 0xFF, PORT >> 8, 0xEE])  # mov dx, PORT ; out dx, al
    with Kvm() as kvm, kvm.create_vm() as vm:
        vcpu, _ = real_mode_vcpu(vm, out * OUTS + HLT)
        rips = {CODE + 4 * i + 3 for i in range(OUTS)}  # the OUT byte of each pair
        seen = 0
        with ExitTrace() as trace:
            trace.mark("outs")
            while seen < OUTS:
                ex = vcpu.run(timeout=10)
                assert isinstance(ex, IoExit) and ex.port == PORT, ex
                seen += 1
            trace.mark("done")
    summary = summarize(trace.events(), pids=[os.getpid()], until="done")
    window = summary.by_name().get("outs")
    assert window is not None, summary
    assert window.exits["io"][0] == OUTS, window.exits
    io_rips = [e.rip for e in trace.events() if e.kind == "exit" and e.reason == "io" and e.pid == os.getpid()]
    assert set(io_rips) <= rips | {CODE + 4 * i for i in range(OUTS)}, sorted(hex(r) for r in set(io_rips))
    assert window.handling > 0 and window.running > 0
    assert not trace.overflowed
