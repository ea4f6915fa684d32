"""The stdio console on a terminal in raw mode, and the file console's file (no KVM needed).

In raw mode the terminal does no output processing: a bare LF moves down without going back
to column 0. The guest's own output carries CR LF, but the VMM's messages written meanwhile
(logging, tracebacks) had plain LF and came out as a staircase over the guest's console."""
from __future__ import annotations

import os
import pty
import subprocess
import sys
import textwrap

import pytest

from pykvm.vmm.console import FileConsole, RawTerminalText, StdioConsole

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs in a child: no pytest logging handlers, so a warning takes logging's own way to
# sys.stderr (its last-resort handler), as in `pykvm run`.
RAW_CHILD = textwrap.dedent("""
    import os, pty, select, sys, termios
    from pykvm._log import get_logger
    from pykvm.vmm.console import RawTerminalText, StdioConsole
    master, slave = pty.openpty()
    sys.stderr = os.fdopen(os.dup(slave), "w", buffering=1)
    con = StdioConsole(stdin=slave, stdout=slave)
    con.connect(len)
    raw = not termios.tcgetattr(slave)[1] & termios.OPOST
    wrapped = isinstance(sys.stderr, RawTerminalText)
    get_logger("pykvm.vmm.halt_watch").warning("first line\\nsecond line")
    print("printed", file=sys.stderr)
    sys.stderr.flush()
    con.close()
    restored = not isinstance(sys.stderr, RawTerminalText) and termios.tcgetattr(slave)[1] & termios.OPOST
    out = b""
    while select.select([master], [], [], 0.5)[0]:
        out += os.read(master, 4096)
    sys.__stdout__.write(repr((raw, wrapped, bool(restored), out)))
""")


def test_vmm_messages_on_a_raw_terminal_go_out_with_crlf():
    proc = subprocess.run([sys.executable, "-c", RAW_CHILD], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr
    raw, wrapped, restored, out = eval(proc.stdout)
    assert raw and wrapped and restored
    assert out == b"first line\r\nsecond line\r\nprinted\r\n"


def test_stderr_on_another_terminal_or_a_file_is_left_alone(monkeypatch, tmp_path):
    master, slave = pty.openpty()
    err = open(tmp_path / "err.txt", "w")
    monkeypatch.setattr(sys, "stderr", err)
    con = StdioConsole(stdin=slave, stdout=slave)
    try:
        con.connect(len)
        assert sys.stderr is err
    finally:
        con.close()
        err.close()
        os.close(master)
        os.close(slave)


def test_raw_terminal_text_turns_every_newline_into_crlf_once():
    class Sink:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    sink = Sink()
    out = RawTerminalText(sink)
    assert out.write("a\nb\r\nc") == len("a\nb\r\nc")
    out.writelines(["d\n", "\n"])
    out.flush()
    assert sink.text == "a\r\nb\r\ncd\r\n\r\n"


def test_a_terminal_that_hung_up_drops_the_guest_output_instead_of_failing_the_vcpu(tmp_path):
    """After SIGHUP (ssh closed) writing to the terminal gives EIO; before, that OSError went up
    through the UART into the vCPU thread and ended the run as a VMM error."""
    master, slave = pty.openpty()
    os.close(master)
    con = StdioConsole(stdin=slave, stdout=slave)
    try:
        con.write(b"guest output\r\n")
        con.write(b"more\r\n")
    finally:
        os.close(slave)
    r, w = os.pipe()
    os.close(r)
    StdioConsole(stdin=w, stdout=w).write(b"to a closed pipe\n")
    os.close(w)


def test_a_console_file_made_for_a_run_that_never_started_is_removed(tmp_path):
    """Review finding 12: `--console file:X` left an empty X behind when building the machine
    failed (e.g. guest RAM could not be allocated)."""
    path = tmp_path / "console.log"
    FileConsole(str(path)).close()
    assert not path.exists()
    used = FileConsole(str(path))
    used.connect(len)
    used.write(b"guest output")
    used.close()
    assert path.read_bytes() == b"guest output"
    FileConsole(str(path)).close()  # a file that was there before stays, with what it had
    assert path.read_bytes() == b"guest output"


def test_the_null_console_leaves_dev_null_alone():
    FileConsole(os.devnull).close()
    assert os.path.exists(os.devnull)


def test_an_unopenable_console_file_says_why(tmp_path):
    with pytest.raises(ValueError, match="cannot open console file"):
        FileConsole(str(tmp_path / "missing" / "console.log"))
