"""``pykvm run`` on a pseudo-terminal, for the tests of what the stdio console does to it."""
from __future__ import annotations

import contextlib
import os
import pty
import select
import subprocess
import sys
import termios
import time
from typing import Iterator, List, NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PtyRun(NamedTuple):
    process: subprocess.Popen
    master: int  # the user's side: write keys here
    slave: int  # pykvm's stdin and stdout
    before: List  # the terminal's attributes before pykvm started


@contextlib.contextmanager
def pykvm_on_a_pty(args: List[str], wait_for: bytes, timeout: float = 30) -> Iterator[PtyRun]:
    """Start ``pykvm run ARGS`` with a pty as its terminal, wait until the guest printed
    ``wait_for`` and check the terminal went raw; kill it and close the pty afterwards."""
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    p = subprocess.Popen([sys.executable, "-m", "pykvm", "run", *args], stdin=slave, stdout=slave,
                         stderr=subprocess.PIPE, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        seen, deadline = b"", time.monotonic() + timeout
        while wait_for not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 1024)
        assert wait_for in seen, seen
        assert not termios.tcgetattr(slave)[3] & termios.ICANON  # raw while the guest runs
        yield PtyRun(p, master, slave, before)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(master)
        os.close(slave)
