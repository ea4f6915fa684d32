"""What `pykvm run` imports at start-up: start-up time counts in the boot-time bench, and in
the lab (Python under TCG) every heavy module costs seconds. These modules load on first use."""
from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("numpy", "tomllib", "pykvm.lab", "pykvm.host", "pykvm.kvm.msr_filter", "pykvm.kvm.dirty_ring",
         "pykvm.kvm.mce", "pykvm.kvm.pmu", "pykvm.kvm.nested")


@pytest.mark.parametrize("module", ["pykvm.vmm.cli", "pykvm.vmm.machine", "pykvm.vmm.pci.passthrough", "pykvm.vfio"])
def test_the_run_path_does_not_import_heavy_modules(module: str):
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"importing {module} loads {loaded}"


# What @dataclass costs: the dataclasses module imports inspect (and ast, dis, tokenize...), and
# each decorated class has its methods generated with exec(). pykvm run's own classes are
# NamedTuples or plain classes (pykvm._record); the VFIO side still uses dataclasses.
DATACLASSES = ("dataclasses", "inspect")


@pytest.mark.parametrize("module", ["pykvm.vmm.cli", "pykvm.vmm.machine"])
def test_the_run_path_does_not_import_dataclasses(module: str):
    code = f"import sys, {module}; print(' '.join(m for m in {DATACLASSES!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"importing {module} loads {loaded}"


def test_a_dma_batch_still_brings_numpy_when_used():
    code = "import sys; from pykvm.vfio import DmaBatch; print(DmaBatch.__module__, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["pykvm.vfio.dma_batch", "True"]


def test_the_capability_enum_is_built_on_first_use_only():
    code = ("import sys, pykvm.vmm.cli, pykvm.vmm.machine; caps = sys.modules['pykvm.kvm.caps']; "
            "print('Cap' in vars(caps)); from pykvm.kvm import Cap; print(Cap.USER_MEMORY.name, 'Cap' in vars(caps))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "USER_MEMORY", "True"]


def test_logging_loads_only_for_a_message_that_can_be_shown():
    """pykvm's loggers (pykvm._log) import logging for a warning, not for debug/info while
    nobody has configured logging (Python's defaults would drop those)."""
    code = ("import sys, pykvm.vmm.machine; from pykvm.vmm.bus import log; a = 'logging' in sys.modules; "
            "log.debug('dropped %d', 1); b = 'logging' in sys.modules; log.warning('shown %d', 2); "
            "print(a, b, 'logging' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False", "True"]
    assert "shown 2" in proc.stderr and "dropped" not in proc.stderr
