"""L1 exit traces (pykvm.lab.ktrace): parsing the trace text and cutting it into windows."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.lab.ktrace import START, Event, boot_phase, parse, summarize

FW, DECOMP, KERNEL = 0xFD0, 0x3A0_0000, 0xFFFF_FFFF_8100_0000


def exit_line(ts: float, reason: str, rip: int, task: str = "qemu-system-x86", pid: int = 151) -> str:
    return (f"  {task}-{pid}     [000] d..2.  {ts:.6f}: kvm_exit: vcpu 0 reason {reason} rip 0x{rip:x} "
            f"info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x00000000 error_code 0x00000000")


def entry_line(ts: float, pid: int = 151) -> str:
    return f"  qemu-system-x86-{pid}     [000] d..1.  {ts:.6f}: kvm_entry: vcpu 0, rip 0xfd0"


def mark_line(ts: float, text: str) -> str:
    return f"          python3-90      [000] .....  {ts:.6f}: tracing_mark_write: {text}"


def test_parse_reads_exits_entries_and_marks_and_skips_the_rest():
    text = [
        "# tracer: nop",
        "# entries-in-buffer/entries-written: 4/4   #P:1",
        mark_line(10.0, START),
        exit_line(10.5, "io", 0x3F8, task="python3"),
        entry_line(10.6),
        "  kworker/0:2-30 [000] d..1. 10.7: sched_switch: prev_comm=x next_comm=y",
        mark_line(11.0, "marker"),
    ]
    events = list(parse(text))
    assert [e.kind for e in events] == ["mark", "exit", "entry", "mark"]
    assert events[1] == Event(10.5, "exit", 151, "io", 0x3F8)
    assert events[0].text == START and events[3].text == "marker"


def test_boot_phases_are_charged_running_and_handling_time():
    lines = [
        mark_line(9.0, "earlier run"),  # before the start mark: ignored
        exit_line(9.5, "io", FW),
        mark_line(10.0, START),
        exit_line(10.5, "io", FW), entry_line(10.6),
        exit_line(11.0, "npf", DECOMP), entry_line(11.2),
        exit_line(12.0, "msr", KERNEL), entry_line(12.1),
        mark_line(12.5, "marker"),
        exit_line(13.0, "hlt", KERNEL), entry_line(13.5),
    ]
    s = summarize(parse(lines), classify=boot_phase, until="marker")
    assert s.first_exit == pytest.approx(0.5)
    assert [w.name for w in s.windows] == ["firmware", "decompressor", "kernel"]
    fw, decomp, kernel = s.windows
    assert (fw.running, fw.handling) == (0.0, pytest.approx(0.1))
    assert (decomp.running, decomp.handling) == (pytest.approx(0.4), pytest.approx(0.2))
    assert (kernel.running, kernel.handling) == (pytest.approx(0.8), pytest.approx(0.1))
    assert kernel.exits == {"msr": [1, pytest.approx(0.1)]}  # the hlt after the marker is not counted
    assert s.marks == [(2.5, "marker")]


def test_windows_by_marks_and_threads():
    lines = [
        mark_line(0.0, START),
        exit_line(0.1, "io", KERNEL, pid=1), entry_line(0.2, pid=1),
        exit_line(0.15, "io", KERNEL, pid=2), entry_line(0.25, pid=2),
        mark_line(1.0, "reads"),
        exit_line(1.5, "interrupt", KERNEL, pid=1), entry_line(1.75, pid=1),
    ]
    s = summarize(parse(lines), pids=[1])
    assert [w.name for w in s.windows] == ["", "reads"]
    assert s.windows[0].exits == {"io": [1, pytest.approx(0.1)]}
    assert s.windows[1].running == pytest.approx(1.3) and s.windows[1].handling == pytest.approx(0.25)


def test_by_name_adds_up_windows_that_share_a_name():
    lines = [mark_line(0.0, START)]
    t = 0.0
    for rip in (FW, KERNEL, FW, KERNEL):
        lines += [exit_line(t + 0.1, "io", rip), entry_line(t + 0.3)]
        t += 1.0
    totals = summarize(parse(lines), classify=boot_phase).by_name()
    assert set(totals) == {"firmware", "kernel"}
    assert totals["firmware"].exits["io"][0] == 2 and totals["kernel"].exit_count == 2
    assert totals["firmware"].handling == pytest.approx(0.4)


@given(st.lists(st.tuples(st.sampled_from([FW, DECOMP, KERNEL]), st.integers(1, 10**6), st.integers(1, 10**6)),
                min_size=1, max_size=60))
def test_running_plus_handling_covers_the_time_from_the_first_exit(steps):
    """Alternating exits and entries: every microsecond after the first exit is either the guest
    running or L1 handling an exit, and every exit is counted once."""
    lines, t = [mark_line(1.0, START)], 1.0
    for rip, handle_us, run_us in steps:
        t += run_us / 1e6
        lines.append(exit_line(t, "io", rip))
        t += handle_us / 1e6
        lines.append(entry_line(t))
    s = summarize(parse(lines), classify=boot_phase)
    running = sum(w.running for w in s.windows)
    handling = sum(w.handling for w in s.windows)
    first = 1.0 + steps[0][2] / 1e6
    assert running + handling == pytest.approx(t - first, abs=len(steps) * 2e-6)
    assert sum(w.exit_count for w in s.windows) == len(steps)
