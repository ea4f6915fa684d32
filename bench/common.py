"""Small helpers every bench shares: build a C baseline, time things, report.

Each bench prints its baseline, its results and the ratios, and with
``--json PATH`` writes them as JSON too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return p


def compile_c(source: str, workdir: str) -> str:
    """Compile ``source`` (a path under bench/) with cc -O2 into ``workdir``; returns the binary."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("bench: no C compiler found: install gcc (apt-get install gcc)")
    out = os.path.join(workdir, os.path.splitext(os.path.basename(source))[0])
    subprocess.run([cc, "-O2", "-Wall", "-o", out, os.path.join(ROOT, "bench", source)], check=True)
    return out


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="pykvm-bench-")


def run_c(binary: str, *args: object) -> str:
    """Run a compiled baseline; returns its stdout stripped."""
    return subprocess.run([binary, *map(str, args)], check=True, capture_output=True, text=True).stdout.strip()


def time_ns(fn: Callable[[], object]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def median(xs: List[float]) -> float:
    return statistics.median(xs)


class PairedRatio(NamedTuple):
    """``other`` against ``base`` over rounds that ran both back to back."""

    ratio: float  # median(other) / median(base)
    low: float  # percentile-bootstrap interval of that ratio
    high: float
    level: float
    lower: int  # rounds in which other < base
    higher: int  # rounds in which other > base
    rounds: int
    sign_p: float  # two-sided sign test of lower against higher (ties dropped)

    def describe(self, better: str = "lower") -> str:
        """One line; ``better`` says which way is good ("lower" for times, "higher" for rates)."""
        if self.high < 1 or self.low > 1:
            side = "lower" if self.high < 1 else "higher"
            said = f"{side} than the baseline ({'better' if side == better else 'worse'})"
        else:
            said = "not told apart from the baseline"
        count = self.lower if better == "lower" else self.higher
        return (f"{self.ratio:.3f}x, {self.level:.0%} interval [{self.low:.3f}, {self.high:.3f}]: {said}; "
                f"{better} in {count} of {self.rounds} rounds (sign test p={self.sign_p:.2f})")


def paired_ratio(base: Sequence[float], other: Sequence[float], level: float = 0.95, resamples: int = 10000,
                 seed: int = 0) -> PairedRatio:
    """The ratio of medians ``other/base`` with a bootstrap interval that resamples whole rounds.

    ``base[i]`` and ``other[i]`` ran in the same round, one after the other, so whatever slowed
    that round (the machine's load, the lab's memory state) hit both: resampling rounds in
    pairs keeps that, and the interval says whether the difference is larger than the
    round-to-round swing. Deterministic for a given ``seed``."""
    import numpy as np

    if len(base) != len(other) or not base:
        raise ValueError(f"paired rounds needed: {len(base)} baseline, {len(other)} other")
    b, o = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(b), size=(resamples, len(b)))
    ratios = np.median(o[idx], axis=1) / np.median(b[idx], axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    lower, higher = int(np.sum(o < b)), int(np.sum(o > b))
    return PairedRatio(float(np.median(o) / np.median(b)), float(low), float(high), level, lower, higher, len(b),
                       sign_test(lower, higher))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` out of ``wins + losses`` fair coin flips."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def verdict(ratio: float, target: float, paired: Optional[PairedRatio] = None, better: str = "lower") -> str:
    """"met", "NOT met", or, when the medians meet the target but the rounds' interval
    reaches past it, "not shown" with the interval."""
    ok = ratio <= target if better == "lower" else ratio >= target
    if not ok:
        return "NOT met"
    if paired is not None and (paired.high > target if better == "lower" else paired.low < target):
        return f"not shown (interval [{paired.low:.3f}, {paired.high:.3f}])"
    return "met"


def report(title: str, baseline_name: str, results: Dict[str, float], unit: str,
           targets: Dict[str, float], extra: Optional[dict] = None, json_path: Optional[str] = None,
           paired: Optional[Dict[str, PairedRatio]] = None) -> dict:
    """Print each result, its ratio to the baseline and whether its target (max ratio) is met
    (with ``paired``, only when the rounds' interval lies within the target too)."""
    base = results[baseline_name]
    print(title)
    out = {"title": title, "unit": unit, "baseline": baseline_name, "results": {}, **(extra or {})}
    for name, value in results.items():
        ratio = value / base
        target = targets.get(name)
        said = None if target is None else verdict(ratio, target, (paired or {}).get(name))
        tail = "" if said is None else f"  target <= {target:.2f}x: {said}"
        print(f"  {name:<30}{value:>10.2f} {unit}  {ratio:>6.3f}x{tail}")
        out["results"][name] = {"value": value, "ratio": ratio, "target": target,
                                "met": None if said is None else said == "met"}
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
    return out


def rerun_in_lab(script: str, args: List[str], json_name: str, json_dest: Optional[str], timeout: float) -> int:
    """Run ``script args --json @lab`` inside L1 (for benches that need VFIO), stream its
    output, and copy the JSON it wrote into the lab's share to ``json_dest``."""
    from pykvm.lab import Lab, LabError, LabUnavailable

    argv = [sys.executable, os.path.abspath(script), *args, "--json", "@lab"]
    try:
        lab = Lab.prepare(progress=lambda m: print(f"[lab] {m}", file=sys.stderr))
        result = lab.run(argv, timeout=timeout, stream=print)
    except (LabUnavailable, LabError) as exc:
        print(f"bench: needs the lab, and it could not run: {exc}", file=sys.stderr)
        return 2
    try:
        produced = result.out_dir / json_name
        if json_dest and produced.exists():
            os.makedirs(os.path.dirname(os.path.abspath(json_dest)), exist_ok=True)
            shutil.copy(produced, json_dest)
    finally:
        shutil.rmtree(result.out_dir, ignore_errors=True)
    print(f"host load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"lab: boot {result.timings['boot']:.1f} s, bench {result.timings['command']:.1f} s")
    return result.returncode
