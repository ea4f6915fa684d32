"""Small helpers shared by the lab tests."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator


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


@contextlib.contextmanager
def bound_to_vfio(bdf: str, state_dir: str) -> Iterator[str]:
    """``bdf`` on vfio-pci, its /dev/vfio/N present, for the block; then back on its driver."""
    from pykvm.host.bind import bind, restore
    from pykvm.host.sysfs import Root

    bind(Root(), bdf, state_dir=state_dir)
    try:
        group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
        assert wait_for(lambda: Path(f"/dev/vfio/{group}").exists(), timeout=10), f"/dev/vfio/{group} did not appear"
        yield bdf
    finally:
        restore(Root(), bdf, state_dir=state_dir)
