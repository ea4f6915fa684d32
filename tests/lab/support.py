"""Small helpers shared by the lab tests."""
from __future__ import annotations

import subprocess
import sys
import time
from typing import Callable


def wait_for(predicate: Callable[[], object], timeout: float = 15.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass (sysfs/udev settle)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def host(*args: str) -> subprocess.CompletedProcess:
    """``pykvm host ARGS`` through the real CLI, as a user runs it (never a traceback)."""
    proc = subprocess.run([sys.executable, "-m", "pykvm", "host", *args], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc

