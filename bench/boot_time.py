"""Boot time in the lab: pykvm against QEMU (``-accel kvm``), same kernel, initrd and memory.

Run inside L1 (one lab run holds both):

    python3 -m pykvm lab run [--timeout S] -- python3 bench/boot_time.py [--cpus N] [--rounds R] [--phases]
        [--variants qemu64,pykvm,cold,nosite,debian,direct,debian-direct,qemu-vmlinux] [--append ARGS]
        [--seed N] [--json PATH]

Both VMMs boot Debian's stock kernel (the lab's) with the busybox initramfs of
tests/lab/test_boot_linux.py, whose /init prints a marker and powers off. The
measure is wall time from starting the VMM process to the marker line on its
console (so interpreter start-up counts for pykvm, and firmware for QEMU);
variants are interleaved over the rounds (each round runs every variant once, in an order
drawn from a recorded seed, ``--seed``: ``common.round_orders``; QEMU no longer always goes
first) and the median is reported. QEMU
runs the default ``pc`` machine with SeaBIOS and a serial console, once with
``-cpu host`` (the baseline: the same CPUID pykvm gives, KVM_GET_SUPPORTED_CPUID)
and once with QEMU's default CPU model (qemu64: fewer features, e.g. no LA57, so
the guest runs 4-level paging). Target (issue 4): pykvm faster than QEMU -cpu host.

pykvm runs with its modules byte-compiled beforehand into a private cache
(``PYTHONPYCACHEPREFIX``), as a pip-installed package is; the checkout is
read-only in L1, so without a cache every run would compile pykvm from source.
"pykvm run (no bytecode)" is that cold case (PYTHONDONTWRITEBYTECODE, no prefix).
"pykvm run (python -S)" is the byte-compiled case without ``site``'s start-up hooks (the
same modules through PYTHONPATH): every Python start here runs the ``.pth`` hooks found
in site-packages, among them one this sandbox adds (it imports certifi), which a user's
machine does not have; the row shows what they cost.
"pykvm run (Debian's python3)" is the same checkout, byte-compiled, run by the distribution's
own interpreter (``/usr/bin/python3``, with ``_cffi_backend`` from python3-cffi-backend) instead
of the one running this script (here a pyenv build: a shared libpython, no PGO/LTO, the
sandbox's ``.pth`` hook): what ``apt install python3`` gives a Debian user. The row is left
out, with a note, where that interpreter cannot load pykvm's extension.
Every row's ratio to the baseline also comes per round: the median of the per-round ratios
with its exact 95% interval (``common.paired_ratio``); a target counts as met only with at
least ``common.MIN_ROUNDS`` rounds and the interval clearing it too. Many rounds of a few
rows (``--variants``) make that interval narrow (the default, 9 rounds of all nine rows,
takes ~15 min in L1: give ``lab run`` the ``--timeout``); ``--append`` adds kernel
parameters for both VMMs (``nokaslr``: the kernel decompresses where it was loaded).
"pykvm run --direct" (and its Debian's-python3 twin) boots the same bzImage with ``--direct``:
pykvm decompresses the kernel itself, once, into its kernel cache, and enters it without the
guest's decompressor (and without KASLR). The first such boot, which fills the cache, runs
before the rounds and is printed on its own; the rounds then start from the cache, as every
boot after a user's first does. "qemu -cpu host, vmlinux (PVH)" gives QEMU that same cached
vmlinux (QEMU boots an ELF through its PVH note): against it the report shows what is left
when both VMMs skip the decompressor, i.e. how much of --direct's gain is the kernel format
rather than the VMM.
For pykvm the report also gives the median time from process start to the first
vCPU entry (its --stats), i.e. how the time splits into VMM start-up and guest.

``--phases`` splits every variant's time the same way from L1's own trace of KVM exits
(:mod:`pykvm.lab.ktrace`): from starting the process to the guest's first exit (VMM
start-up), then the guest in firmware (RIP below 1 MiB), in the bzImage decompressor
(other physical RIPs) and in the kernel until the marker, each with the part L1 spent
handling exits (in its kernel or the VMM) rather than running the guest.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from common import (ROOT, median, new_seed, paired_ratio, parser, report, round_orders,  # puts the checkout on sys.path
                    temp_dir)

from tests.lab.test_boot_linux import CMDLINE, MARKER, MEMORY, l2_initramfs, lab_kernel

TIMEOUT = 300.0


def time_to_marker(argv: List[str], env: Optional[Dict[str, str]] = None, stderr_path: Optional[str] = None,
                   on_marker: Callable[[], None] = lambda: None) -> float:
    """Seconds from starting ``argv`` to ``MARKER`` on its stdout (``on_marker`` is called then);
    the process is then left to power off (and killed if it does not within 60 s). Its stderr
    goes to ``stderr_path``."""
    t0 = time.monotonic()
    err = open(stderr_path, "wb") if stderr_path else None
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env)
    seen = threading.Event()
    found: List[float] = []
    tail: List[bytes] = []

    def read() -> None:
        for line in proc.stdout:
            if not found and MARKER.encode() in line:
                found.append(time.monotonic() - t0)
                on_marker()
                seen.set()
            tail[:] = (tail + [line])[-20:]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not seen.wait(TIMEOUT):
            raise SystemExit(f"bench: {argv[0]} showed no marker in {TIMEOUT:g} s; last lines:\n"
                             + b"".join(tail).decode(errors="replace"))
        proc.wait(60)
    except subprocess.TimeoutExpired:
        pass
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(5)
        if err is not None:
            err.close()
    return found[0]


def first_entry(stderr_path: str) -> Optional[float]:
    """Seconds from process start to the first vCPU entry, from pykvm's --stats output."""
    with open(stderr_path, errors="replace") as f:
        m = re.search(r"first vCPU entry\s+([\d.]+) ms", f.read())
    return float(m.group(1)) / 1e3 if m else None


def warm_bytecode_env(cache: str) -> Dict[str, str]:
    """An environment whose Python finds pykvm byte-compiled in ``cache`` (compiled now)."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=cache)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "pykvm")], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return env


def no_site_env(warm: Dict[str, str]) -> Dict[str, str]:
    """``warm`` for ``python3 -S``: the same modules on ``PYTHONPATH`` (the checkout and
    site-packages), without site's start-up hooks (``.pth`` files)."""
    import site

    return dict(warm, PYTHONPATH=os.pathsep.join([ROOT, *site.getsitepackages()]))


def distribution_python(warm: Dict[str, str]) -> Optional[Tuple[str, Dict[str, str]]]:
    """The distribution's own ``/usr/bin/python3`` and an environment in which it runs this
    checkout byte-compiled, if it is another interpreter that can load pykvm's extension
    (same Python version, ``_cffi_backend`` from python3-cffi-backend); else None."""
    python = "/usr/bin/python3"
    if not os.path.exists(python) or os.path.realpath(python) == os.path.realpath(sys.executable):
        return None
    env = dict(warm, PYTHONPATH=ROOT)
    if subprocess.run([python, "-c", "import pykvm._native"], env=env, cwd="/", capture_output=True).returncode:
        return None
    subprocess.run([python, "-m", "compileall", "-q", os.path.join(ROOT, "pykvm")], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return python, env


def cold_bytecode_env() -> Dict[str, str]:
    """An environment whose Python compiles pykvm from source on every start."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPYCACHEPREFIX", None)
    return env


PHASES = ("firmware", "decompressor", "kernel")
DISTRO_ROW = "pykvm run (Debian's python3)"


def traced_time_to_marker(argv: List[str], env: Optional[Dict[str, str]], stderr_path: str) -> Tuple[float, dict]:
    """:func:`time_to_marker` under L1's exit trace: the time and the phases (seconds): ``start-up``
    (to the guest's first exit), each of :data:`PHASES` (wall) and ``L1 handling`` (all phases);
    ``top``: each phase's costliest exit reasons (reason, count, seconds)."""
    from pykvm.lab.ktrace import ExitTrace, boot_phase, summarize

    with ExitTrace() as trace:
        seconds = time_to_marker(argv, env, stderr_path, on_marker=lambda: trace.mark("marker"))
    if trace.overflowed:
        print("bench: the trace buffer overflowed: phases are incomplete", file=sys.stderr)
    summary = summarize(trace.events(), classify=boot_phase, until="marker")
    totals = summary.by_name()
    phases: dict = {"start-up": summary.first_exit or 0.0}
    phases.update({name: totals[name].wall if name in totals else 0.0 for name in PHASES})
    phases["L1 handling"] = sum(w.handling for w in totals.values())
    phases["top"] = {name: totals[name].top(5) for name in PHASES if name in totals}
    return seconds, phases


def print_phases(phases: Dict[str, List[dict]]) -> None:
    columns = ["start-up", *PHASES, "L1 handling"]
    print("Phases (median seconds; from L1's kvm_exit trace; L1 handling is part of the phases):")
    print(f"  {'':<28}" + "".join(f"{c:>14}" for c in columns))
    for name, runs in phases.items():
        print(f"  {name:<28}" + "".join(f"{median([r[c] for r in runs]):>14.2f}" for c in columns))
    print("L1's costliest exits per phase, last round (reason count seconds):")
    for name, runs in phases.items():
        for phase, top in runs[-1]["top"].items():
            print(f"  {name:<28}{phase:<14}" + ", ".join(f"{r} {n} {sec:.3f}" for r, n, sec in top))


BASELINE = "qemu -accel kvm -cpu host"
DIRECT_ROW = "pykvm run --direct"
DISTRO_DIRECT_ROW = "pykvm run --direct (Debian's python3)"
QEMU_VMLINUX_ROW = "qemu -cpu host, vmlinux (PVH)"
VARIANTS = {  # --variants key: row name (the baseline always runs)
    "qemu64": "qemu -accel kvm (qemu64)",
    "pykvm": "pykvm run",
    "cold": "pykvm run (no bytecode)",
    "nosite": "pykvm run (python -S)",
    "debian": DISTRO_ROW,
    "direct": DIRECT_ROW,
    "debian-direct": DISTRO_DIRECT_ROW,
    "qemu-vmlinux": QEMU_VMLINUX_ROW,
}
TARGETS = ("pykvm run", DISTRO_ROW, DIRECT_ROW, DISTRO_DIRECT_ROW)  # issue 4: faster than the baseline
DIRECT_ROWS = (DIRECT_ROW, DISTRO_DIRECT_ROW)


def prepare_direct(argv: List[str], env: Dict[str, str], stderr_path: str, cache: str) -> str:
    """Run ``argv`` (a ``pykvm run --direct``) once with an empty kernel cache, untimed as a
    round: it decompresses the kernel into ``cache``. Prints that first boot's time; returns
    the cached vmlinux (what QEMU's vmlinux row boots)."""
    seconds = time_to_marker(argv, env, stderr_path)
    with open(stderr_path, errors="replace") as f:
        note = next((line.strip() for line in f if "decompressed the kernel" in line), "no decompression reported")
    print(f"first --direct boot, which fills the kernel cache: {seconds:.2f} s ({note})", flush=True)
    found = sorted(Path(cache).glob("*.vmlinux"))
    if len(found) != 1:
        raise SystemExit(f"bench: expected one vmlinux in {cache} after the first --direct boot, found {len(found)}")
    return str(found[0])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    p.add_argument("--phases", action="store_true", help="split each run into phases from L1's KVM exit trace (root)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"rows to run besides the baseline, comma-separated (default: all of {','.join(VARIANTS)})")
    p.add_argument("--append", default="", metavar="ARGS",
                   help="added to both VMMs' kernel command line (e.g. nokaslr)")
    p.add_argument("--seed", type=int, help="seed of the variants' order in each round (default: a new one, printed)")
    args = p.parse_args()
    keys = [k for k in args.variants.split(",") if k]
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise SystemExit(f"bench: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    chosen = {VARIANTS[k] for k in keys}
    if not os.path.exists("/dev/kvm"):
        raise SystemExit("bench: no /dev/kvm: run inside the lab (python3 -m pykvm lab run -- python3 bench/boot_time.py)")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("bench: qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    kernel_path, _ = lab_kernel()
    kernel = str(kernel_path)
    cmdline = f"{CMDLINE} {args.append}".strip()
    with temp_dir() as tmp:
        initrd = l2_initramfs(Path(tmp) / "l2.img")
        mem_mb = MEMORY.rstrip("M")
        qemu_argv = [qemu, "-accel", "kvm", "-m", mem_mb, "-smp", str(args.cpus), "-nodefaults", "-no-user-config",
                     "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", kernel, "-initrd", str(initrd),
                     "-append", cmdline]
        pykvm_argv = [sys.executable, "-m", "pykvm", "run", "--kernel", kernel, "--initrd", str(initrd),
                      "--memory", MEMORY, "--cpus", str(args.cpus), "--cmdline", cmdline, "--console", "stdio",
                      "--stats", "--marker", MARKER]
        warm = warm_bytecode_env(os.path.join(tmp, "pycache"))
        variants = {  # name: (argv, environment)
            BASELINE: (qemu_argv[:3] + ["-cpu", "host"] + qemu_argv[3:], None),
            "qemu -accel kvm (qemu64)": (qemu_argv, None),
            "pykvm run": (pykvm_argv, warm),
            "pykvm run (no bytecode)": (pykvm_argv, cold_bytecode_env()),
            "pykvm run (python -S)": ([pykvm_argv[0], "-S", *pykvm_argv[1:]], no_site_env(warm)),
        }
        distro_rows = {DISTRO_ROW, DISTRO_DIRECT_ROW} & chosen
        distro = distribution_python(warm) if distro_rows else None
        if distro is not None:
            variants[DISTRO_ROW] = ([distro[0], *pykvm_argv[1:]], distro[1])
        elif distro_rows:
            print(f"bench: no {' or '.join(sorted(distro_rows))} row: /usr/bin/python3 is this interpreter, or cannot "
                  "load pykvm's extension (another Python version, or no python3-cffi-backend)", flush=True)
        stderr_path = os.path.join(tmp, "stderr")
        if chosen & {DIRECT_ROW, DISTRO_DIRECT_ROW, QEMU_VMLINUX_ROW}:
            cache = os.path.join(tmp, "kernels")
            variants[DIRECT_ROW] = (pykvm_argv + ["--direct"], dict(warm, PYKVM_KERNEL_CACHE=cache))
            if distro is not None:
                variants[DISTRO_DIRECT_ROW] = ([distro[0], *pykvm_argv[1:], "--direct"],
                                               dict(distro[1], PYKVM_KERNEL_CACHE=cache))
            vmlinux = prepare_direct(*variants[DIRECT_ROW], stderr_path, cache)
            qemu_pvh = variants[BASELINE][0][:]
            qemu_pvh[qemu_pvh.index("-kernel") + 1] = vmlinux
            variants[QEMU_VMLINUX_ROW] = (qemu_pvh, None)
        variants = {name: v for name, v in variants.items() if name == BASELINE or name in chosen}
        times: Dict[str, List[float]] = {name: [] for name in variants}
        entries: Dict[str, List[float]] = {}
        phases: Dict[str, List[dict]] = {name: [] for name in variants}
        seed = new_seed() if args.seed is None else args.seed
        orders = round_orders(list(variants), args.rounds, seed)
        print(f"order of the variants in each round from seed {seed} (--seed {seed} repeats it)", flush=True)
        for r, order in enumerate(orders):
            for name in order:
                argv, env = variants[name]
                if args.phases:
                    seconds, split = traced_time_to_marker(argv, env, stderr_path)
                    phases[name].append(split)
                else:
                    seconds = time_to_marker(argv, env, stderr_path)
                times[name].append(seconds)
                entry = first_entry(stderr_path) if name.startswith("pykvm") else None
                if entry is not None:
                    entries.setdefault(name, []).append(entry)
                split = f" (first vCPU entry at {entry:.2f} s)" if entry is not None else ""
                print(f"round {r + 1}: {name}: {times[name][-1]:.2f} s{split}", flush=True)
    results = {name: median(ts) for name, ts in times.items()}
    for name, es in entries.items():
        print(f"{name}: median start-up to first vCPU entry {median(es):.2f} s, "
              f"then {results[name] - median(es):.2f} s to the marker")
    if args.phases:
        print_phases(phases)
    paired = {name: paired_ratio(times[BASELINE], ts) for name, ts in times.items() if name != BASELINE}
    print(f"Per round against {BASELINE} (median of the per-round ratios, exact interval, sign test):")
    for name, pr in paired.items():
        print(f"  {name:<38}{pr.describe('lower')}")
    same_vmlinux = {name: paired_ratio(times[QEMU_VMLINUX_ROW], times[name])
                    for name in DIRECT_ROWS if name in times and QEMU_VMLINUX_ROW in times}
    if same_vmlinux:  # the same kernel file in both VMMs: what is left is the VMMs' own cost
        print(f"Per round against {QEMU_VMLINUX_ROW} (both boot the same vmlinux, without a decompressor):")
        for name, pr in same_vmlinux.items():
            print(f"  {name:<38}{pr.describe('lower')}")
    report(f"Boot to the guest marker in L2 (Debian {os.uname().release}, {MEMORY}, {args.cpus} vCPU, "
           f"median of {args.rounds}; load {os.getloadavg()[0]:.2f})",
           BASELINE, results, "s", {name: 1.0 for name in TARGETS if name in results},
           extra={"rounds": times, "first_vcpu_entry": entries, "phases": phases if args.phases else None,
                  "paired": {name: pr.as_dict() for name, pr in paired.items()}, "cmdline": cmdline,
                  "paired_vs_same_vmlinux": {name: pr.as_dict() for name, pr in same_vmlinux.items()},
                  "seed": seed, "orders": orders},
           json_path=args.json, paired=paired)


if __name__ == "__main__":
    main()
