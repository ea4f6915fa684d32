"""The README's API tour runs as written (on the real /dev/kvm)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.kvm
def test_the_kvm_tour_runs(kvm):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    tour = next(b for b in blocks if "from pykvm.kvm import" in b)
    exec(compile(tour, "README.md (tour)", "exec"), {})  # its own asserts check the exits
