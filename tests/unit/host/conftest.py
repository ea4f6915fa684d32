"""Fixtures for pykvm.host tests: a fresh synthetic root per test (see sysfs_tree)."""
from __future__ import annotations

import pytest

from tests.unit.host.sysfs_tree import SysTree


@pytest.fixture
def tree(tmp_path) -> SysTree:
    return SysTree(tmp_path / "root")
