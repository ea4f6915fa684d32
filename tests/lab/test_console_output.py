"""Console output from an L2 guest's user space costs few exits to Python (runs inside L1).

User space writes through the tty layer, so Linux's 8250 driver transmits with
interrupts: for each burst it enables IER.THRI (start_tx), the THRE interrupt
fires, its handler reads IIR, LSR and MSR, fills THR, and disables THRI again
(stop_tx) when the buffer is empty. The C run loop answers all of these; what
still reaches Python is setup (PCI config, CMOS, UART programming), a
constant, not a cost per kilobyte of output.
"""
from __future__ import annotations

import re
from typing import Tuple

import pytest

from tests.lab.test_boot_linux import MARKER, l2_initramfs, lab_kernel, pykvm_run

pytestmark = pytest.mark.lab

DMESG_REPEAT = 2  # a quiet boot's kernel log is ~20 KB of text: print it twice
MIN_OUTPUT = 20_000  # bytes the guest must print after the marker for the measure to mean something
# Port I/O exits answered in Python for the whole run (boot, ~40 KB of output, poweroff): measured
# 392, all setup. While the 8250 driver's IER writes (start_tx/stop_tx) went to Python: 2936, ~62
# more per KB of output, each ~250-650 us of VMM time in nested KVM.
PYTHON_IO_EXIT_BUDGET = 1000


def io_stats(stderr: str) -> Tuple[int, int, float]:
    """(IO exits, IO exits handled in Python, VMM ms spent on IO exits) from ``--stats``."""
    row = re.search(r"^IO\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s", stderr, re.M)
    assert row, stderr[-3000:]
    return int(row.group(1)), int(row.group(3)), float(row.group(5))


def test_interrupt_driven_console_output_stays_in_c(tmp_path):
    kernel, _ = lab_kernel()
    initrd = l2_initramfs(tmp_path / "dmesg.img", "; ".join(["dmesg"] * DMESG_REPEAT + ["poweroff -f"]))
    p = pykvm_run(kernel, initrd, 1)
    detail = f"exit {p.returncode}\n--- stdout (tail) ---\n{p.stdout[-2000:]}\n--- stderr ---\n{p.stderr[-3000:]}"
    assert p.returncode == 0 and "guest poweroff" in p.stderr, detail
    printed = p.stdout.split(MARKER, 1)[-1]
    assert len(printed) >= MIN_OUTPUT and printed.count("Linux version") == DMESG_REPEAT, detail
    exits, python, vmm_ms = io_stats(p.stderr)
    print(f"console {len(printed)} bytes after the marker; IO exits {exits}, "
          f"in Python {python} ({vmm_ms:.1f} ms of VMM time)")
    assert python < PYTHON_IO_EXIT_BUDGET, detail
