"""QEMU's monitor over QMP: L1's CPU state, and a wake-up for a lost interrupt.

QEMU 7.2's TCG (Debian bookworm's, the lab's L1) can lose a wakeup: L1's only CPU then
sits in HLT with interrupts enabled and a deliverable interrupt in its local APIC's IRR
(seen: the APIC timer's vector 236, both in a lone L1 and in two L1s at once), and never
runs again. An NMI does not wake it; any interrupt that goes through the APIC does: a key
press on L1's i8042 (IRQ 1) makes QEMU re-evaluate the APIC and the CPU runs on.
:func:`lost_wakeup` recognises the state from the monitor's text, :meth:`Monitor.press_key`
is the wake-up, and :class:`pykvm.lab.run.Lab` applies both when L1 sits idle too long.
The monitor's ``info`` commands show its current CPU, #0: with PYKVM_LAB_CPUS > 1 a stall
of another CPU goes unrecognised (the lab's L1 has one CPU by default).
"""
from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path
from typing import Optional

# What the monitor shows about a stuck L1: whether its CPU is halted (HLT=1 in the flags
# line), where it runs, and its local APIC (is a timer armed? an interrupt pending?).
STATE_COMMANDS = ("info cpus", "info registers", "info lapic")
RFLAGS_IF = 1 << 9


class Monitor:
    """A QMP connection to one QEMU (``qmp``: its ``-qmp unix:...`` socket), per call."""

    def __init__(self, qmp: Path, timeout: float = 10.0) -> None:
        self.qmp, self.timeout = qmp, timeout

    def _session(self, *commands: tuple) -> list:
        """Connect, negotiate, run ``(name, arguments)`` commands; their ``return`` values."""
        deadline = time.monotonic() + self.timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            sock.connect(str(self.qmp))
            stream = sock.makefile("rw", encoding="utf-8", newline="\n")
            json.loads(stream.readline())  # the greeting
            results = []
            for name, arguments in (("qmp_capabilities", {}), *commands):
                stream.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
                stream.flush()
                while True:  # skip asynchronous events
                    if time.monotonic() > deadline:
                        raise TimeoutError("no QMP reply")
                    reply = json.loads(stream.readline() or "{}")
                    if "error" in reply:
                        raise OSError(f"QMP {name}: {reply['error'].get('desc', reply['error'])}")
                    if "return" in reply:
                        results.append(reply["return"])
                        break
            return results[1:]

    def cpu_state(self) -> str:
        """L1's CPU registers and local APIC (the monitor's ``info`` text). Never raises:
        a QEMU that does not answer is reported as such."""
        try:
            replies = self._session(*(("human-monitor-command", {"command-line": line}) for line in STATE_COMMANDS))
        except (OSError, ValueError) as exc:
            return f"(QEMU's monitor did not answer: {exc})"
        return "\n".join(f"({line})\n{reply}" for line, reply in zip(STATE_COMMANDS, replies))

    def press_key(self) -> None:
        """Press and release Shift on L1's keyboard: an i8042 interrupt through the APIC."""
        self._session(("send-key", {"keys": [{"type": "qcode", "data": "shift"}]}))


def lost_wakeup(state: str) -> Optional[int]:
    """The pending vector if ``state`` (from :meth:`Monitor.cpu_state`) shows a CPU halted
    with interrupts enabled while its APIC holds an interrupt it should deliver (the
    highest IRR vector's priority class above the PPR's); else None."""
    flags = re.search(r"RFL=([0-9a-fA-F]+).*?\bHLT=(\d)", state)
    irr = re.search(r"^IRR\s+(.*)$", state, re.MULTILINE)
    ppr = re.search(r"\bPPR (0x[0-9a-fA-F]+)", state)
    enabled = re.search(r"^SPIV.*APIC enabled", state, re.MULTILINE)
    if not (flags and irr and ppr and enabled) or flags.group(2) != "1" or not int(flags.group(1), 16) & RFLAGS_IF:
        return None
    vectors = [int(v) for v in irr.group(1).split() if v.isdigit()]
    if not vectors:
        return None
    vector = max(vectors)
    return vector if vector >> 4 > int(ppr.group(1), 16) >> 4 else None
