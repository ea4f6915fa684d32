"""Small helpers every bench shares: build a C baseline, time things, report.

Each bench prints its baseline, its results and the ratios, and with
``--json PATH`` writes them as JSON too.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple


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
    """``other`` against ``base`` over rounds that ran both back to back.

    ``ratio`` is the median of the per-round ratios ``other[i] / base[i]``; ``low`` and
    ``high`` bound it with the exact distribution-free interval of order statistics (the
    sign test inverted), which covers the median per-round ratio with probability at least
    ``level`` whatever the distribution of the rounds, as long as they are independent.
    Below :data:`MIN_ROUNDS` rounds no such interval exists: ``low`` is 0 and ``high`` inf."""

    ratio: float  # median of other[i] / base[i]
    low: float  # the interval of that median (order statistics of the per-round ratios)
    high: float
    level: float  # its exact coverage (at least the level asked for; 0 below MIN_ROUNDS)
    lower: int  # rounds in which other < base
    higher: int  # rounds in which other > base
    rounds: int
    sign_p: float  # two-sided sign test of lower against higher (ties dropped)

    @property
    def has_interval(self) -> bool:
        return self.level > 0

    def as_dict(self) -> dict:
        """For JSON: ``low`` and ``high`` are None when there is no interval (not inf)."""
        d = self._asdict()
        if not self.has_interval:
            d["low"] = d["high"] = None
        return d

    def describe(self, better: str = "lower") -> str:
        """One line; ``better`` says which way is good ("lower" for times, "higher" for rates)."""
        count = self.lower if better == "lower" else self.higher
        tail = f"{better} in {count} of {self.rounds} rounds (sign test p={self.sign_p:.2f})"
        if not self.has_interval:
            return (f"{self.ratio:.3f}x per round: no interval from {self.rounds} rounds (fewer than {MIN_ROUNDS}); "
                    f"{tail}")
        if self.high < 1 or self.low > 1:
            side = "lower" if self.high < 1 else "higher"
            said = f"{side} than the baseline ({'better' if side == better else 'worse'})"
        else:
            said = "not told apart from the baseline"
        return (f"{self.ratio:.3f}x per round, {self.level:.1%} interval [{self.low:.3f}, {self.high:.3f}]: "
                f"{said}; {tail}")


def order_rank(n: int, level: float = 0.95) -> Tuple[int, float]:
    """``(k, coverage)``: the largest ``k`` for which the k-th smallest and the k-th largest of
    ``n`` independent draws bound their distribution's median with probability at least
    ``level`` (that probability is ``coverage`` = 1 - 2 P(Binomial(n, 1/2) < k)); ``(0, 0.0)``
    when even the smallest and the largest do not (n < :func:`min_rounds`)."""
    tail = 0  # 2**n P(Binomial(n, 1/2) < k), in whole counts
    k = 0
    while k < n and 2 * (tail + math.comb(n, k)) <= (1 - level) * 2 ** n:
        tail += math.comb(n, k)
        k += 1
    return k, (1 - 2 * tail / 2 ** n) if k else 0.0


def min_rounds(level: float = 0.95) -> int:
    """The fewest paired rounds with an interval at ``level``: with n rounds, the widest one
    (the lowest to the highest per-round ratio) misses the median with probability 2 / 2**n."""
    n = 1
    while order_rank(n, level)[0] == 0:
        n += 1
    return n


MIN_ROUNDS = min_rounds(0.95)  # 6: below it, verdict() says "not shown (too few rounds ...)"


def paired_ratio(base: Sequence[float], other: Sequence[float], level: float = 0.95) -> PairedRatio:
    """The median of the per-round ratios ``other[i] / base[i]`` with its exact interval.

    ``base[i]`` and ``other[i]`` ran in the same round, one after the other, so whatever slowed
    that round (the machine's load, the lab's memory state) hit both, and their ratio cancels
    it; the interval says whether the ratio differs from 1 (or a target) by more than its
    round-to-round swing. It is the sign test inverted: a target lies outside it exactly when
    the sign test of the per-round ratios against that target gives p <= 1 - ``level``, so it
    needs no assumption on their distribution (neither symmetry nor a large sample), and the
    probability that it misses the true median is at most 1 - ``level`` at any number of
    rounds (``python3 bench/common.py`` simulates it)."""
    if len(base) != len(other) or not base:
        raise ValueError(f"paired rounds needed: {len(base)} baseline, {len(other)} other")
    ratios = sorted(o / b for b, o in zip(base, other))
    n = len(ratios)
    k, coverage = order_rank(n, level)
    low, high = (ratios[k - 1], ratios[n - k]) if k else (0.0, math.inf)
    lower = sum(o < b for b, o in zip(base, other))
    higher = sum(o > b for b, o in zip(base, other))
    return PairedRatio(statistics.median(ratios), low, high, coverage, lower, higher, n, sign_test(lower, higher))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` out of ``wins + losses`` fair coin flips."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def verdict(ratio: float, target: float, paired: Optional[PairedRatio] = None, better: str = "lower") -> str:
    """"met", "NOT met" (the medians miss the target), or "not shown (...)": the medians meet
    the target but the evidence does not show it, because no paired rounds were given, there
    were fewer than :data:`MIN_ROUNDS` of them, or their interval reaches past the target."""
    ok = ratio <= target if better == "lower" else ratio >= target
    if not ok:
        return "NOT met"
    if paired is None:
        return "not shown (no paired rounds)"
    if paired.rounds < MIN_ROUNDS:
        return f"not shown (too few rounds: {paired.rounds} < {MIN_ROUNDS})"
    if not paired.has_interval:  # a level above 95% asked of paired_ratio
        return f"not shown (no interval at that level from {paired.rounds} rounds)"
    if paired.high > target if better == "lower" else paired.low < target:
        return f"not shown (interval [{paired.low:.3f}, {paired.high:.3f}])"
    return "met"


def round_orders(names: Sequence[str], rounds: int, seed: int) -> List[List[str]]:
    """The order to run ``names`` in, for each of ``rounds`` rounds: a random order (drawn from
    ``seed``) in each even round and the same reversed in the round after it, so that over
    every two rounds each variant runs once before and once after each other one, and all
    have the same mean position: what ran just before (warm caches, pages to zero, the
    machine's load) favours none of them."""
    rng = random.Random(seed)
    orders: List[List[str]] = []
    for r in range(rounds):
        if r % 2:
            orders.append(orders[-1][::-1])
        else:
            order = list(names)
            rng.shuffle(order)
            orders.append(order)
    return orders


def new_seed() -> int:
    """A seed for :func:`round_orders`, to print and record so that a run's order can be told."""
    return random.SystemRandom().randrange(2 ** 32)


def report(title: str, baseline_name: str, results: Dict[str, float], unit: str,
           targets: Dict[str, float], extra: Optional[dict] = None, json_path: Optional[str] = None,
           paired: Optional[Dict[str, PairedRatio]] = None) -> dict:
    """Print each result, its ratio to the baseline (of the medians) and whether its target (max
    ratio) is met: only with ``paired`` rounds for that row, at least :data:`MIN_ROUNDS` of
    them, and their interval within the target too (:func:`verdict`)."""
    base = results[baseline_name]
    print(title)
    out = {"title": title, "unit": unit, "baseline": baseline_name, "results": {}, **(extra or {})}
    width = max(30, *(len(name) + 2 for name in results))
    for name, value in results.items():
        ratio = value / base
        target = targets.get(name)
        pr = (paired or {}).get(name)
        said = None if target is None else verdict(ratio, target, pr)
        tail = "" if said is None else f"  target <= {target:.2f}x: {said}"
        print(f"  {name:<{width}}{value:>10.2f} {unit}  {ratio:>6.3f}x{tail}")
        out["results"][name] = {"value": value, "ratio": ratio, "target": target,
                                "met": None if said is None else said == "met", "verdict": said,
                                "paired": None if pr is None else pr.as_dict()}
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


NULL_MODELS = ("round effect", "no round effect", "round effect dominant", "heavy tails", "spikes",
               "unequal spread", "skewed")


def null_rounds(model: str, rng, n: int):
    """``(base, other)``: n simulated paired rounds in which both variants are drawn alike, so
    their true ratio is 1 (``rng``: a numpy Generator). Times are 1 times lognormal noise of
    the spread given, unless said otherwise."""
    import numpy as np

    if model == "round effect":  # the review's model: a slowdown shared by the round (10%), each run's own 5%
        r = rng.lognormal(0, 0.1, n)
        return r * rng.lognormal(0, 0.05, n), r * rng.lognormal(0, 0.05, n)
    if model == "no round effect":  # 10% noise per run, nothing shared
        return rng.lognormal(0, 0.1, n), rng.lognormal(0, 0.1, n)
    if model == "round effect dominant":  # the round's 30% swamps each run's 2%
        r = rng.lognormal(0, 0.3, n)
        return r * rng.lognormal(0, 0.02, n), r * rng.lognormal(0, 0.02, n)
    if model == "heavy tails":  # each run's noise from Student's t with 2 degrees of freedom
        r = rng.lognormal(0, 0.1, n)
        return r * np.exp(0.05 * rng.standard_t(2, n)), r * np.exp(0.05 * rng.standard_t(2, n))
    if model == "spikes":  # 3% noise, and 15% of runs 30% slower (the decompressor's bad rounds)
        r = rng.lognormal(0, 0.05, n)
        return tuple(r * rng.lognormal(0, 0.03, n) * np.where(rng.random(n) < 0.15, 1.3, 1.0) for _ in range(2))
    if model == "unequal spread":  # the same median, one variant much noisier (15%) than the other (2%)
        r = rng.lognormal(0, 0.1, n)
        return r * rng.lognormal(0, 0.02, n), r * rng.lognormal(0, 0.15, n)
    if model == "skewed":  # 1 + an exponential delay of mean 10%
        r = rng.lognormal(0, 0.1, n)
        return r * (1 + rng.exponential(0.1, n)), r * (1 + rng.exponential(0.1, n))
    raise ValueError(f"unknown model {model!r}: one of {', '.join(NULL_MODELS)}")


def null_met_rate(n: int, model: str, trials: int, seed: int = 0, level: float = 0.95) -> float:
    """The fraction of ``trials`` simulated runs of ``n`` paired rounds (:func:`null_rounds`; the true
    ratio is 1) in which :func:`verdict` calls a target of 1 "met" (lower is better): a false
    "met" at the edge of the target, which should happen in at most (1 - ``level``) / 2 of them.
    Deterministic for a given ``seed``."""
    import numpy as np

    rng = np.random.default_rng([seed, n, NULL_MODELS.index(model)])
    met = 0
    for _ in range(trials):
        base, other = null_rounds(model, rng, n)
        pr = paired_ratio(list(base), list(other), level)
        met += verdict(float(np.median(other) / np.median(base)), 1.0, pr) == "met"
    return met / trials


def main() -> None:
    """``python3 bench/common.py``: how often verdict() says "met" on noise, per number of rounds."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--trials", type=int, default=4000)
    p.add_argument("--rounds", default="2,3,4,5,6,7,8,9,10,12,15,20,30")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ns = [int(x) for x in args.rounds.split(",")]
    print(f"false 'met' at the target, {args.trials} null trials each (at most {(1 - 0.95) / 2:.1%} expected):")
    print(f"{'rounds':>6}  {'coverage':>8}  " + "  ".join(f"{m:>{max(len(m), 6)}}" for m in NULL_MODELS))
    for n in ns:
        cov = order_rank(n)[1]
        print(f"{n:>6}  {cov:>8.1%}  " + "  ".join(f"{null_met_rate(n, m, args.trials, args.seed):>{max(len(m), 6)}.1%}"
                                                  for m in NULL_MODELS), flush=True)


if __name__ == "__main__":
    main()
