"""The source distribution carries what the extension's build needs: a wheel built from it
compiles csrc/ (runloop.c includes runloop.h, and cffi reads runloop.h's prototypes)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_sdist_contains_every_file_of_csrc_and_the_build_scripts(tmp_path):
    """Built from a copy of the files git tracks, so a stale egg-info in the checkout cannot help."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the files git tracks are what an sdist is made from)")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    src = tmp_path / "src"
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist"), "--formats=gztar"],
                   cwd=src, check=True, capture_output=True)
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir() if p.suffix in (".c", ".h")}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "pykvm" / "_build").glob("*.py")}
    assert needed and needed <= names, sorted(needed - names)
