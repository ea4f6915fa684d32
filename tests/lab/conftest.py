"""Lab tests: tests here marked ``@pytest.mark.lab`` run inside L1, reported on the host.

On the host (``PYKVM_IN_LAB`` unset), each selected lab test is replaced by a proxy item.
The first proxy to run boots the lab once for the session and runs
``python -m pytest <all selected lab node ids>`` inside L1; an inner plugin (this file,
loaded again inside) writes one JSON line per test phase to ``$PYKVM_LAB_OUT``, and each
proxy then passes, fails with the inner failure text, or skips with the inner reason. If
the run dies midway (timeout, crash), tests that finished keep their results and the
others fail with the console's last lines.

If the lab cannot start (no QEMU, no kernel), lab tests skip with the reason; with
``PYKVM_REQUIRE_LAB=1`` they fail instead, and so does a test that skipped inside L1 (L1
sees the variable too, so its own skip points already fail there), unless L1 declared the
skip covered elsewhere (tests/conftest.py). ``PYKVM_LAB_TIMEOUT`` bounds the whole inner run
(seconds, default 1500); ``PYKVM_LAB_STREAM=1`` (or ``-v``) shows the inner output live;
``PYKVM_LAB_KEEP_OUT=1`` keeps the run's ``$PYKVM_LAB_OUT`` (with ``junit.xml``).

Inside L1 (``PYKVM_IN_LAB=1``) the tests run as usual; the checkout is read-only there,
so Hypothesis keeps its data under /tmp.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from tests.conftest import COVERED_BY, require_or_skip, skip_covered_by

HERE = Path(__file__).resolve().parent
IN_LAB = os.environ.get("PYKVM_IN_LAB") == "1"
RESULTS_FILE = "lab-results.jsonl"
INNER_ONLY_MARKS = {"skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def _unavailable(reason: str) -> None:
    """Skip, or fail when the lab is required (CI)."""
    require_or_skip("PYKVM_REQUIRE_LAB", f"lab unavailable: {reason}")


@pytest.fixture(scope="session")
def lab():
    """A prepared :class:`pykvm.lab.Lab` for host-side tests that boot L1 themselves."""
    if IN_LAB:
        pytest.skip("already inside the lab: L1 does not boot another lab")
    from pykvm.lab import Lab, LabUnavailable

    try:
        return Lab.prepare(progress=lambda message: None)
    except LabUnavailable as exc:
        _unavailable(str(exc))


if IN_LAB:
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir("/tmp/hypothesis")

    def pytest_runtest_logreport(report: pytest.TestReport) -> None:
        skip_reason = None
        if report.skipped and isinstance(report.longrepr, tuple):
            skip_reason = report.longrepr[2]
        record = {
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "longrepr": None if report.passed else str(report.longreprtext),
            "skip_reason": skip_reason,
            "covered_by": dict(report.user_properties).get(COVERED_BY),
            "wasxfail": getattr(report, "wasxfail", None),
            "duration": report.duration,
        }
        with open(Path(os.environ["PYKVM_LAB_OUT"]) / RESULTS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

else:

    class LabSession:
        """Runs the selected lab tests in one L1 boot, lazily, and keeps their results."""

        def __init__(self, config: pytest.Config, nodeids: List[str]) -> None:
            self.config = config
            self.nodeids = nodeids
            self.ran = False
            self.unavailable: Optional[str] = None
            self.error: Optional[str] = None
            self.records: Dict[str, List[dict]] = {}
            self.output_tail = ""

        def run(self) -> None:
            if self.ran:
                return
            self.ran = True
            from pykvm.lab import LAB_OUT_GUEST, Lab, LabError, LabUnavailable

            capman = self.config.pluginmanager.getplugin("capturemanager")
            writer = self.config.get_terminal_writer()
            live = self.config.option.verbose > 0 or os.environ.get("PYKVM_LAB_STREAM") == "1"
            timeout = float(os.environ.get("PYKVM_LAB_TIMEOUT") or 1500)
            root = self.config.rootpath
            argv = [
                sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEs", "-o", "faulthandler_timeout=300",
                f"--rootdir={root}", f"--junitxml={LAB_OUT_GUEST}/junit.xml",
                *[str(root / nodeid) for nodeid in self.nodeids],
            ]
            out_dir = Path(tempfile.mkdtemp(prefix="pykvm-lab-pytest-"))
            with capman.global_and_fixture_disabled():
                say = lambda line: writer.line(f"[lab] {line}")  # noqa: E731
                writer.line("")
                say(f"preparing the lab and running {len(self.nodeids)} test(s) inside L1")
                try:
                    lab = Lab.prepare(progress=say)
                    result = lab.run(argv, timeout=timeout, cwd=str(root), stream=say if live else None, out_dir=out_dir)
                    t = result.timings
                    say(f"inner pytest exit {result.returncode}: boot {t['boot']:.1f} s, tests {t['command']:.1f} s")
                    self.output_tail = result.output[-4000:]
                except LabUnavailable as exc:
                    self.unavailable = str(exc)
                except LabError as exc:
                    # Tests that finished before a hang or crash keep their own results.
                    self.error = str(exc)
                    say(f"lab run failed: {str(exc).splitlines()[0]}")
                self._collect(out_dir)
                if os.environ.get("PYKVM_LAB_KEEP_OUT") == "1":
                    say(f"outputs (junit.xml, {RESULTS_FILE}) kept in {out_dir}")
                else:
                    shutil.rmtree(out_dir, ignore_errors=True)

        def _collect(self, out_dir: Path) -> None:
            results = out_dir / RESULTS_FILE
            for line in results.read_text().splitlines() if results.exists() else []:
                record = json.loads(line)
                self.records.setdefault(record["nodeid"], []).append(record)

        def report(self, nodeid: str) -> None:
            """Raise the inner outcome of ``nodeid`` (return means it passed)."""
            self.run()
            if self.unavailable:
                _unavailable(self.unavailable)
            records = self.records.get(nodeid)
            if not records or (self.error and not any(r["when"] == "teardown" for r in records)):
                if self.error:
                    pytest.fail(f"lab run failed before this test finished: {self.error}", pytrace=False)
                pytest.fail(f"no result from L1 for this test; inner output:\n{self.output_tail}", pytrace=False)
            failed = [r for r in records if r["outcome"] == "failed"]
            if failed:
                text = "\n".join(f"[in L1, {r['when']}]\n{r['longrepr']}" for r in failed)
                pytest.fail(text, pytrace=False)
            skipped = [r for r in records if r["outcome"] == "skipped"]
            if skipped:
                r = skipped[0]
                if r["wasxfail"] is not None:
                    pytest.xfail(f"in L1: {r['wasxfail']}")
                reason = (r["skip_reason"] or "").removeprefix("Skipped: ")
                covering = r.get("covered_by")
                if covering:  # declared in L1 as covered elsewhere: a skip here too
                    skip_covered_by(covering, f"in L1: {reason.removesuffix(f' [covered by {covering}]')}")
                require_or_skip("PYKVM_REQUIRE_LAB", f"in L1: {reason}")

    class LabItem(pytest.Item):
        """Host-side stand-in for a lab test: no fixtures here, the outcome comes from L1."""

        def __init__(self, *, lab_session: LabSession, **kwargs) -> None:
            super().__init__(**kwargs)
            self.lab_session = lab_session

        def iter_markers_with_node(self, name=None):
            # skip/skipif/xfail conditions are evaluated in L1, where they mean something.
            for node, mark in super().iter_markers_with_node(name):
                if mark.name not in INNER_ONLY_MARKS:
                    yield node, mark

        def runtest(self) -> None:
            self.lab_session.report(self.nodeid)

        def reportinfo(self):
            return self.path, None, f"{self.name} (in L1)"

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: List[pytest.Item]) -> None:
        lab_items = [
            i for i in items if i.get_closest_marker("lab") and HERE in Path(i.path).resolve().parents
        ]
        if not lab_items:
            return
        lab_session = LabSession(config, [i.nodeid for i in lab_items])
        for index, item in enumerate(items):
            if item in lab_items:
                proxy = LabItem.from_parent(item.parent, name=item.name, nodeid=item.nodeid, lab_session=lab_session)
                proxy.own_markers = list(item.own_markers)
                items[index] = proxy
