"""Passthrough DMA: sequential O_DIRECT reads of the lab's NVMe by L1, by a pykvm guest, by a QEMU guest.

All in ONE lab run (L1 = QEMU TCG with an emulated Intel IOMMU), the same static reader
(``bench/c/direct_read.c``: reads of ``--bs`` bytes with O_DIRECT over the whole 64 MiB
disk, timed with CLOCK_MONOTONIC, with its own CPU time from getrusage; busybox's dd here
prints no timing) ``--reps`` times per boot and per mode, over ``--rounds`` interleaved rounds:

- (a) ``L1``: L1's own nvme driver (the device in the IOMMU's pass-through domain, iommu=pt);
- (a') ``L1-DMA``: the same with the device's IOMMU group switched to a translated DMA domain
  (``/sys/kernel/iommu_groups/N/type``), a control: a passed-through device's DMA is
  always translated (by the emulated VT-d here), L1's own is not with iommu=pt;
- (b) ``pykvm``: an L2 Linux under ``pykvm run --vfio`` (guest RAM mapped at IOVA = GPA,
  BAR0 mmap'd except the MSI-X table page, MSI-X through irqfds);
- (c) ``QEMU``: the same L2 kernel and initramfs under ``qemu-system-x86_64 -accel kvm
  -device vfio-pci,host=...`` in L1.

Modes (``--modes``, each run by all four in the same way; default ``sync``): ``sync`` is
issue 5's workload, one ``pread`` at a time, each completed by an NVMe interrupt;
``irq:N`` keeps N reads in flight with io_uring, still completed by interrupts; ``poll:N``
keeps N in flight with io_uring IOPOLL on an NVMe poll queue: no interrupt at all, so what
remains is the DMA path itself (IOMMU translation, doorbells, guest execution). Polled
reads are capped at the largest power of two the device takes unsplit (256 KiB here: 127
segments, just short of the 512 KiB limit; the kernel does not poll a read it splits, and
1 MiB polled reads hung in every try), so ``poll:4`` has as many bytes in flight as a
1 MiB ``sync`` read (two 512 KiB commands). When a poll mode is asked for, every nvme
driver (L1's and the guests') is re-probed with ``poll_queues=1`` before the first read,
so all variants read from the same queue layout. Any mode may end in ``+huge`` (``sync+huge``,
``irq+huge:4``): the reader's buffer then sits on 2 MiB transparent huge pages, so the kernel
pins and releases one page head per 2 MiB for each read instead of a struct page per 4 KiB (the
bench prints how much of the buffer each machine got on huge pages). ``--guest-append`` adds
kernel parameters to both L2 guests, (b) and (c) alike. The lab's emulated NVMe (QEMU 7.2 in L0)
sometimes leaves commands pending until the driver's 30 s timeout, L1's own driver
included, and more often with the io_uring modes: reads of one mode that do not finish
within 90 s are cut off and reported as failures (with L1's nvme messages), and a guest's
later modes are not counted (its driver resets the controller meanwhile).

MB/s (10^6 bytes/s, each machine's own clock) are medians over all reads; the ratios
(b)/(a) (target >= 0.9) and (b)/(c) (target >= 1.0) are printed per mode with whether the
target was met: only when, over the rounds both finished (at least ``common.MIN_ROUNDS``),
the per-round ratios' 95% interval (``common.paired_ratio``) clears the target too. For (b) and (c) the bench samples KVM's exit counters
(``/sys/kernel/debug/kvm``, summed over L1's VMs; only one runs at a time) when the guest
announces the start and end of each mode's reads; the guest sleeps 1 s after the start
line and before the end line (console lines reach L1 late), and a 2 s idle window measured
the same way is subtracted, so "per MB" covers the reads only: all VM exits (most handled
in L1's kernel: interrupt delivery, EOI, HLT), those that reached the VMM in user space
(``io_exits`` + ``mmio_exits``), interrupts injected, and the guest's NVMe interrupts.
pykvm's whole-run ``--stats`` table is printed too.

Runs in the lab by default (it boots it), on the lab's NVMe. ``--here`` runs it on this
machine instead, a host with VT-x/AMD-V, an IOMMU and an NVMe to spare (``--device BDF``,
its namespaces unmounted; it is read, never written, then bound to vfio-pci for the guests
and given back), with QEMU installed for (c); ``--span`` bounds each pass (default: the
whole disk, which in the lab is 64 MiB). ``--json PATH`` lands on the host.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from common import paired_ratio, parser, rerun_in_lab, verdict  # puts the checkout on sys.path
from pykvm.lab import NVME_BDF as LAB_NVME  # noqa: E402 (after common puts the checkout on sys.path)
from pykvm.pci_address import canonical_bdf  # noqa: E402
from pykvm.vmm.layout import parse_size  # noqa: E402

DEBUGFS = "/sys/kernel/debug"
KVM_STATS = ("exits", "io_exits", "mmio_exits", "irq_injections", "halt_exits", "halt_successful_poll")
BEGIN, END = "BENCH-BEGIN", "BENCH-END"
IDLE = "idle"
READ_RE = re.compile(r"BENCH-READ (\S+) (\d+) ([\d.]+) ([\d.]+)")  # mode, bytes, seconds, reader's CPU seconds
TARGETS = {"pykvm/L1": 0.9, "pykvm/QEMU": 1.0}
RATIOS = {"pykvm/L1": ("L1", "pykvm"), "pykvm/QEMU": ("QEMU", "pykvm"), "pykvm/L1-DMA": ("L1-DMA", "pykvm")}
VARIANTS = ("L1", "L1-DMA", "pykvm", "QEMU")
POLL_QUEUES = "/sys/module/nvme/parameters/poll_queues"
THP = "/sys/kernel/mm/transparent_hugepage/enabled"
READ_TIMEOUT = 90  # seconds for one mode's reads (~3 s when the device keeps up)
HUGE_NOTE = re.compile(r"direct_read: (-?\d+) kB of the (\d+) kB buffer on huge pages")

GUEST_SCRIPT = """
wait_disk() {{ i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done; }}
wait_disk
if [ {poll_queues} -gt 0 ]; then
    bdf=$(basename $(readlink /sys/block/nvme0n1/device/device))
    echo {poll_queues} > {poll_param}
    echo $bdf > /sys/bus/pci/drivers/nvme/unbind
    echo $bdf > /sys/bus/pci/drivers/nvme/bind
    wait_disk
fi
echo "BENCH-IOPOLL $(cat /sys/block/nvme0n1/queue/io_poll)"
# Linux turns THP off in machines under 512 MiB, as these guests are: +huge modes madvise them.
echo madvise > /sys/kernel/mm/transparent_hugepage/enabled
nvirqs() {{ grep nvme /proc/interrupts | awk '{{n = 0; for (k = 2; k <= NF; k++) {{ if ($k ~ /^[0-9]+$/) n += $k; else break }}; s += n}} END {{print s + 0}}'; }}
dd if=/dev/nvme0n1 of=/dev/null bs=1M count=8 iflag=direct 2>/dev/null
echo "{begin} {idle}"; sleep 2; echo "{end} {idle}"
for spec in {modes}; do
    kind=${{spec%%:*}}; depth=${{spec#*:}}; [ "$kind" = "$spec" ] && depth=1
    before=$(nvirqs)
    echo "{begin} $spec"
    sleep 1
    timeout {read_timeout} /bin/direct_read /dev/nvme0n1 {bs} {reps} $kind $depth {span} > /tmp/reads.log 2> /tmp/reads.err
    sleep 1
    echo "{end} $spec"
    cat /tmp/reads.err
    # a stall's account (quiet hides it): "aborting" is a command the device kept, "polled" a lost interrupt
    dmesg -c | grep -E "nvme.*(timeout|abort|reset|polled)" | tail -5
    echo "BENCH-IRQS $spec $(( $(nvirqs) - before ))"
    sed "s/^BENCH-READ /BENCH-READ $spec /" /tmp/reads.log
done
poweroff -f
"""


def reader_args(mode: str) -> List[str]:
    """direct_read's MODE and DEPTH for a mode spec (``sync``, ``irq:N``, ``poll:N``)."""
    kind, _, depth = mode.partition(":")
    return [kind, depth or "1"]


def kvm_counters() -> Dict[str, int]:
    return {name: int(Path(DEBUGFS, "kvm", name).read_text()) for name in KVM_STATS}


class Windows:
    """Samples KVM's counters when the guest prints ``BEGIN tag`` and ``END tag`` (called
    from the console reader), one window per tag (a mode, or the idle window); and marks
    ``trace`` (an ExitTrace, with --trace) there."""

    def __init__(self, trace=None) -> None:
        self.begin: Dict[str, Dict[str, int]] = {}
        self.end: Dict[str, Dict[str, int]] = {}
        self.trace = trace

    def __call__(self, line: str) -> None:
        word, _, tag = line.strip().partition(" ")
        if self.trace is not None and word in (BEGIN, END):
            self.trace.mark(f"{word} {tag}")
        if word == BEGIN:
            self.begin[tag] = kvm_counters()
        elif word == END:
            self.end[tag] = kvm_counters()

    def delta(self, tag: str) -> Dict[str, int]:
        """Counts over window ``tag`` minus those over the idle window (same sleeps, no reads)."""
        missing = [t for t in (tag, IDLE) if t not in self.begin or t not in self.end]
        if missing:
            raise RuntimeError(f"the guest did not print its BEGIN/END lines for {missing}")
        return {k: (self.end[tag][k] - self.begin[tag][k]) - (self.end[IDLE][k] - self.begin[IDLE][k])
                for k in KVM_STATS}


def parse_reads(text: str) -> Dict[str, List[float]]:
    """MB/s of each ``BENCH-READ mode bytes seconds cpu`` line in ``text``, by mode."""
    out: Dict[str, List[float]] = {}
    for m in READ_RE.finditer(text):
        out.setdefault(m[1], []).append(int(m[2]) / float(m[3]) / 1e6)
    return out


def parse_cpu(text: str) -> Dict[str, List[float]]:
    """The reader's CPU milliseconds per MB of each ``BENCH-READ`` line in ``text``, by mode."""
    out: Dict[str, List[float]] = {}
    for m in READ_RE.finditer(text):
        out.setdefault(m[1], []).append(float(m[4]) * 1e3 / (int(m[2]) / 1e6))
    return out


def build_reader(workdir: str) -> str:
    """bench/c/direct_read.c, static: it runs in L1 and in the guests' busybox initramfs."""
    out = os.path.join(workdir, "direct_read")
    cc = os.environ.get("CC") or shutil.which("cc") or "cc"
    subprocess.run([cc, "-O2", "-Wall", "-static", "-o", out, os.path.join(os.path.dirname(__file__), "c", "direct_read.c")],
                   check=True)
    return out


def l1_reads(reader: str, bdf: str, bs: int, reps: int, mode: str, variant: str,
             span: int) -> Tuple[List[float], List[float], str]:
    """L1's reads of ``mode`` (MB/s each, and the reader's CPU ms per MB) and, if they did not
    all finish within READ_TIMEOUT seconds, what the reader and L1's nvme driver said."""
    from pykvm.lab.demo import namespace_of

    device = namespace_of(bdf)
    if device is None:
        raise RuntimeError(f"L1 has no namespace for {bdf}")
    try:
        run = subprocess.run([reader, device, str(bs), str(reps), *reader_args(mode), str(span)], capture_output=True,
                             text=True, timeout=READ_TIMEOUT)
        text, error = run.stdout, run.stderr
        print_huge_notes(variant, [mode], error)
    except subprocess.TimeoutExpired as exc:
        text, error = (exc.stdout or b"").decode(), f"no end after {READ_TIMEOUT} s"
    text = text.replace("BENCH-READ ", f"BENCH-READ {mode} ")
    reads = parse_reads(text).get(mode, [])
    if len(reads) == reps:
        return reads, parse_cpu(text)[mode], ""
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    return [], [], error + "\n" + "\n".join(line for line in dmesg[-200:] if "nvme" in line)[-1000:]


def print_huge_notes(variant: str, modes: List[str], text: str) -> None:
    """Say how much of each +huge mode's read buffer the reader got on huge pages (a mode that
    asked for them and did not get them measures something else); ``text`` has the reader's
    notes in the order of ``modes``."""
    for mode, (got, size) in zip([m for m in modes if "+huge" in m], HUGE_NOTE.findall(text)):
        print(f"  {variant} {mode}: {got} of {size} kB of the read buffer on huge pages", flush=True)


def reprobe_nvme(bdf: str, domain: Optional[str] = None, poll_queues: Optional[int] = None) -> Tuple[str, int]:
    """Unbind ``bdf`` from L1's nvme driver, set its IOMMU group's default domain type
    (identity, DMA, DMA-FQ) and/or nvme's ``poll_queues``, bind it again: the kernel takes a
    domain change only while no driver is bound, and nvme sizes its queues when it probes.
    Returns the (domain, poll_queues) it had."""
    from pykvm.vfio.group import group_of_device

    group = group_of_device(bdf)
    type_file = Path(f"/sys/kernel/iommu_groups/{group}/type")
    before = type_file.read_text().strip(), int(Path(POLL_QUEUES).read_text())
    Path("/sys/bus/pci/drivers/nvme/unbind").write_text(bdf)
    try:
        if domain is not None:
            type_file.write_text(domain)
        if poll_queues is not None:
            Path(POLL_QUEUES).write_text(str(poll_queues))
    finally:
        Path("/sys/bus/pci/drivers/nvme/bind").write_text(bdf)
    return before


def guest_result(run, windows: Windows, name: str, modes: List[str], reps: int) -> Tuple[dict, Dict[str, str]]:
    """Per mode, the guest's reads and counts; and the modes whose reads did not all finish,
    with what the guest printed meanwhile, and those after them (a guest that did not get
    through raises)."""
    if run.returncode != 0 or f"{END} {modes[-1]}" not in run.console:
        raise RuntimeError(f"{name} guest failed:\n{run.detail()}")
    reads, cpu = parse_reads(run.console), parse_cpu(run.console)
    irqs = dict(re.findall(r"BENCH-IRQS (\S+) (-?\d+)", run.console))
    iopoll = re.search(r"BENCH-IOPOLL (\d)", run.console)
    done: Dict[str, dict] = {}
    failed: Dict[str, str] = {}
    for mode in modes:
        if failed:  # the guest's nvme driver resets the controller after a stall: later windows count that
            failed[mode] = f"not counted: after the stall of {next(iter(failed))}"
        elif len(reads.get(mode, [])) == reps:
            done[mode] = {"mbps": reads[mode], "cpu_ms": cpu[mode], "kvm": windows.delta(mode),
                          "guest_nvme_irqs": int(irqs[mode]), "io_poll": iopoll and int(iopoll[1]),
                          "seconds": run.seconds}
        else:
            start = run.console.find(f"{BEGIN} {mode}")
            end = run.console.find(BEGIN, start + 1)  # the reader's stderr follows its END line
            failed[mode] = run.console[start:end if end > 0 else None][-1000:]
    return done, failed


def traced_windows(trace, modes: List[str]) -> Dict[str, dict]:
    """Per mode (and the idle window), from L1's exit trace of one guest run: the guest's running
    time, L1's handling time and the reasons that cost most (reason, count, seconds)."""
    from pykvm.lab.ktrace import summarize

    windows = summarize(trace.events()).by_name()
    out = {}
    for tag in (IDLE, *modes):
        w = windows.get(f"{BEGIN} {tag}")
        if w is not None:
            out[tag] = {"wall": w.wall, "running": w.running, "handling": w.handling, "top": w.top(6)}
    return out


def qemu_argv(kernel: Path, initrd: Path, bdf: str, cmdline: str) -> List[str]:
    return [shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host",
            "-M", "pc", "-m", "256M", "-smp", "1", "-nodefaults", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
            "-device", f"vfio-pci,host={bdf}"]


def measure(args) -> dict:
    """All rounds, with L1's THP set to ``--l1-thp`` for the run (and put back)."""
    if not os.path.exists(f"{DEBUGFS}/kvm"):
        subprocess.run(["mount", "-t", "debugfs", "none", DEBUGFS], check=True)
    thp = Path(THP).read_text().split("[")[1].split("]")[0]
    if args.l1_thp:
        Path(THP).write_text(args.l1_thp)
    try:
        return measure_modes(args, args.modes)
    finally:
        Path(THP).write_text(thp)


def pass_bytes(bdf: str, span: int) -> int:
    """Bytes each pass reads: ``span`` (0: all) of the namespace of ``bdf``'s (host-driven) NVMe."""
    from pykvm.lab.demo import namespace_of

    device = namespace_of(bdf)
    if device is None:
        raise RuntimeError(f"{bdf} has no NVMe namespace here: is it an NVMe controller, on the nvme driver?")
    size = int(Path(f"/sys/block/{os.path.basename(device)}/size").read_text()) * 512
    return min(span, size) if span else size


def measure_modes(args, modes: List[str]) -> dict:
    from pykvm.host.bind import disks_in_use
    from pykvm.host.sysfs import Root
    from pykvm.lab.ktrace import ExitTrace
    from pykvm.lab.l2 import build_guest_initramfs, guest_cmdline, guest_kernel, run_guest, run_streaming, vfio_bound

    bdf = args.device
    busy = disks_in_use(Root(), bdf)
    if busy:  # checked before the first unbind of the host's driver, not only when binding to vfio-pci
        raise SystemExit(f"passthrough_dma: {bdf} carries disks this machine uses: {', '.join(busy)}; "
                         "give it an NVMe that nothing mounts")
    poll_queues = 1 if any(m.startswith("poll") for m in modes) else 0
    kernel, modules = guest_kernel()
    disk_bytes = pass_bytes(bdf, args.span)
    disk_bytes -= disk_bytes % args.bs  # whole reads, as the reader does
    samples: Dict[str, Dict[str, list]] = {v: {m: [] for m in modes} for v in VARIANTS}
    by_round: Dict[str, Dict[str, Dict[int, float]]] = {v: {m: {} for m in modes} for v in VARIANTS}  # median MB/s
    cpu_ms: Dict[str, Dict[str, list]] = {v: {m: [] for m in modes} for v in VARIANTS}  # reader's CPU ms per MB
    windows: Dict[str, Dict[str, list]] = {v: {m: [] for m in modes} for v in ("pykvm", "QEMU")}
    stats_tables: List[str] = []
    failures: List[dict] = []
    domain, old_poll = reprobe_nvme(bdf, poll_queues=poll_queues) if poll_queues else (None, None)
    try:
        with tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp:
            reader = build_reader(tmp)
            script = GUEST_SCRIPT.format(bs=args.bs, reps=args.reps, begin=BEGIN, end=END, idle=IDLE,
                                         modes=" ".join(modes), poll_queues=poll_queues, poll_param=POLL_QUEUES,
                                         read_timeout=READ_TIMEOUT, span=disk_bytes)
            cmdline = " ".join([guest_cmdline(), *args.guest_append])
            initrd = build_guest_initramfs(Path(tmp) / "bench.img", script, ["nvme"],
                                           {"/bin/direct_read": Path(reader)}, modules_dir=modules)
            for round_ in range(args.rounds):
                for variant, domain_type in (("L1", None), ("L1-DMA", "DMA")):
                    original = reprobe_nvme(bdf, domain=domain_type)[0] if domain_type else None
                    try:
                        for mode in modes:
                            reads, cpu, error = l1_reads(reader, bdf, args.bs, args.reps, mode, variant,
                                                         disk_bytes)
                            samples[variant][mode] += reads
                            cpu_ms[variant][mode] += cpu
                            if reads:
                                by_round[variant][mode][round_] = statistics.median(reads)
                            if error:
                                print(f"round {round_ + 1} {mode}: {variant}'s reads did not finish: {error}", flush=True)
                                failures.append({"round": round_ + 1, "variant": variant, "mode": mode,
                                                 "console": error})
                    finally:
                        if original is not None:
                            reprobe_nvme(bdf, domain=original)
                for mode in modes:
                    print(f"round {round_ + 1} {mode}: L1 {median_of_last(samples['L1'][mode], args.reps)} MB/s, "
                          f"L1 with a DMA domain {median_of_last(samples['L1-DMA'][mode], args.reps)} MB/s", flush=True)
                with vfio_bound([bdf]):
                    for name in (("pykvm", "QEMU") if round_ % 2 == 0 else ("QEMU", "pykvm")):
                        with (ExitTrace() if args.trace else contextlib.nullcontext()) as trace:
                            seen = Windows(trace)
                            if name == "pykvm":
                                run = run_guest(kernel, initrd, vfio=[bdf], cmdline=cmdline, timeout=600, stream=seen)
                                stats_tables.append(run.log)
                            else:
                                run = run_streaming(qemu_argv(kernel, initrd, bdf, cmdline), 660, seen)
                        done, failed = guest_result(run, seen, name, modes, args.reps)
                        print_huge_notes(name, modes, run.console)
                        traced = traced_windows(trace, modes) if trace is not None else {}
                        for tag, t in traced.items():
                            print(f"round {round_ + 1} {tag}: {name} L1 trace: wall {t['wall']:.2f} s, guest running "
                                  f"{t['running']:.2f} s, L1 handling {t['handling']:.2f} s: "
                                  + ", ".join(f"{r} {n} ({sec:.3f} s)" for r, n, sec in t["top"]), flush=True)
                        for mode, text in failed.items():
                            print(f"round {round_ + 1} {mode}: {name}'s reads did not finish:\n{text}", flush=True)
                            failures.append({"round": round_ + 1, "variant": name, "mode": mode, "console": text})
                        for mode, got in done.items():
                            got["trace"] = traced.get(mode)
                            reads = got.pop("mbps")
                            samples[name][mode] += reads
                            cpu_ms[name][mode] += got.pop("cpu_ms")
                            if reads:
                                by_round[name][mode][round_] = statistics.median(reads)
                            windows[name][mode].append(got)
                            print(f"round {round_ + 1} {mode}: {name} {median_of_last(samples[name][mode], args.reps)} MB/s, "
                                  f"guest io_poll {got['io_poll']}, KVM counts in the read window {got['kvm']}", flush=True)
    finally:
        if poll_queues:
            reprobe_nvme(bdf, domain=domain, poll_queues=old_poll)
    return {"mbps": samples, "by_round": by_round, "cpu_ms_per_mb": cpu_ms, "windows": windows,
            "pykvm_stats": stats_tables[-1], "failures": failures, "l1_thp": Path(THP).read_text().strip(),
            "disk_bytes": disk_bytes}


def median_of_last(values: List[float], n: int) -> str:
    return f"{statistics.median(values[-n:]):.0f}" if values else "-"


def per_mb(windows: List[dict], reps: int, disk_bytes: int) -> Dict[str, float]:
    """Exits and interrupts per MB read, over all of a variant's windows of one mode."""
    mb = len(windows) * reps * disk_bytes / 1e6
    total = {k: sum(w["kvm"][k] for w in windows) for k in KVM_STATS}
    return {"all VM exits": total["exits"] / mb,
            "exits to the VMM (io+mmio)": (total["io_exits"] + total["mmio_exits"]) / mb,
            "HLT exits": total["halt_exits"] / mb,
            "interrupts injected": total["irq_injections"] / mb,
            "guest nvme interrupts": sum(w["guest_nvme_irqs"] for w in windows) / mb}


def summarize(measured: dict, args) -> dict:
    samples, disk_bytes = measured["mbps"], measured["disk_bytes"]
    out: Dict[str, dict] = {}
    where = "L1" if os.environ.get("PYKVM_IN_LAB") == "1" else "the host"
    print(f"\nsequential O_DIRECT reads of the NVMe at {args.device} ({disk_bytes >> 20} MiB per pass, bs={args.bs}, "
          f"{args.reps} reads x {args.rounds} rounds per mode; {where}'s THP: {measured['l1_thp']}; "
          f"median MB/s, fastest in brackets; (a) is {where}'s own driver)")
    for mode in args.modes:
        missing = [name for name in VARIANTS if not samples[name][mode]]
        if missing:
            print(f"mode {mode}: no reads from {', '.join(missing)}")
            continue
        mbps = {name: statistics.median(samples[name][mode]) for name in VARIANTS}
        ratios = {name: mbps[other] / mbps[base] for name, (base, other) in RATIOS.items()}
        print(f"mode {mode}:")
        for name, label in (("L1", "(a) L1's nvme driver"), ("L1-DMA", "(a') L1, translated DMA domain"),
                            ("pykvm", "(b) L2 under pykvm --vfio"), ("QEMU", "(c) L2 under QEMU vfio-pci")):
            print(f"  {label:<30}{mbps[name]:>8.0f} MB/s  [{max(samples[name][mode]):.0f}]")
        paired = {}
        for name, (base_name, other_name) in RATIOS.items():
            base, other = measured["by_round"][base_name][mode], measured["by_round"][other_name][mode]
            rounds = sorted(set(base) & set(other))
            if rounds:  # verdict() says "not shown (too few rounds ...)" below common.MIN_ROUNDS
                paired[name] = paired_ratio([base[r] for r in rounds], [other[r] for r in rounds])
        said = {name: verdict(ratios[name], target, paired.get(name), "higher") for name, target in TARGETS.items()}
        for name, value in ratios.items():
            tail = f"target >= {TARGETS[name]:.2f}x: {said[name]}" if name in TARGETS else "(control: both translated)"
            print(f"  {name:<30}{value:>8.3f}x  {tail}")
        for name, pr in paired.items():
            print(f"  {name:<30}per round: {pr.describe('higher')}")
        cpu = {name: statistics.median(measured["cpu_ms_per_mb"][name][mode]) for name in VARIANTS}
        print("  the reader's own CPU time (user + system, each machine's accounting), ms per MB: "
              + ", ".join(f"{name} {cpu[name]:.3f} ({cpu[name] * mbps[name] / 10:.0f}% of the read time)"
                          for name in VARIANTS))
        exits = {name: per_mb(measured["windows"][name][mode], args.reps, disk_bytes)
                 for name in ("pykvm", "QEMU")}
        print("  per MB read (read windows only, idle subtracted):")
        for name, values in exits.items():
            print(f"    {name:<8}" + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
        out[mode] = {"mbps_median": mbps, "ratios": ratios, "met": {k: v == "met" for k, v in said.items()},
                     "paired": {k: v.as_dict() for k, v in paired.items()}, "per_mb": exits, "reader_cpu_ms_per_mb": cpu}
    if measured["failures"]:
        print(f"{len(measured['failures'])} read sets of a mode did not finish (JSON: failures): "
              + ", ".join(f"round {f['round']} {f['variant']} {f['mode']}" for f in measured["failures"]))
    print(f"pykvm's --stats for its last run (whole run: boot, reads, power-off):\n{measured['pykvm_stats'].strip()}")
    return {"bs": args.bs, "reps": args.reps, "rounds": args.rounds, "modes": args.modes, "l1_thp": measured["l1_thp"],
            "disk_bytes": disk_bytes, "device": args.device, "targets": TARGETS, "results": out, "samples": samples,
            "windows": measured["windows"], "failures": measured["failures"], "loadavg_l1": os.getloadavg()[0]}


def in_lab(args) -> int:
    """Run this script inside L1 and bring its JSON back."""
    return rerun_in_lab(__file__, ["--bs", str(args.bs), "--reps", str(args.reps), "--rounds", str(args.rounds),
                                   "--device", args.device, "--span", f"{args.span}B",
                                   "--modes", ",".join(args.modes), *(["--l1-thp", args.l1_thp] if args.l1_thp else []),
                                   *(["--trace"] if args.trace else []),
                                   *(f"--guest-append={a}" for a in args.guest_append)], "passthrough_dma.json", args.json, timeout=2400)


def here_missing() -> List[str]:
    """What this machine lacks to run the bench itself (--here)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (it binds the device and reads KVM's debugfs)")
    if not os.path.exists("/dev/vfio/vfio"):
        missing.append("/dev/vfio (an IOMMU, enabled: intel_iommu=on or amd_iommu=on; modprobe vfio-pci)")
    if not os.path.exists("/dev/kvm"):
        missing.append("/dev/kvm")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 for (c) (apt-get install qemu-system-x86)")
    return missing


def mode_list(text: str) -> List[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for m in modes:
        kind, _, depth = m.partition(":")
        kind = kind.removesuffix("+huge")
        if kind not in ("sync", "irq", "poll") or (kind == "sync" and depth) or \
                (depth and not (depth.isdigit() and 1 <= int(depth) <= 256)):  # the reader's range
            raise ValueError(f"mode {m!r}: use sync, irq:N or poll:N (N 1-256), each optionally +huge (sync+huge, "
                             "irq+huge:N)")
    return modes


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--bs", type=int, default=1 << 20, help="bytes per read (default 1 MiB)")
    p.add_argument("--reps", type=int, default=20, help="whole-disk reads per boot and mode (default 20)")
    p.add_argument("--rounds", type=int, default=9, help="interleaved rounds of (a), (b), (c) (default 9)")
    p.add_argument("--modes", type=mode_list, default=mode_list("sync"),
                   help="comma-separated read modes: sync (issue 5's), irq:N, poll:N (default sync; e.g. sync,irq:4,poll:4)")
    p.add_argument("--l1-thp", choices=("always", "madvise", "never"),
                   help="L1's transparent huge pages for the whole run (default: leave as booted, always); "
                        "never puts the guests' RAM on 4 KiB pages: in the IOMMU and in KVM's nested page tables")
    p.add_argument("--trace", action="store_true",
                   help="also trace L1's KVM exits during each guest's read windows: guest running vs L1 handling "
                        "time and the costliest exit reasons (pykvm.lab.ktrace)")
    p.add_argument("--guest-append", action="append", default=[], metavar="PARAMS",
                   help="kernel parameters added to both L2 guests' command lines, (b) and (c) alike (repeatable; "
                        "e.g. idle=poll)")
    p.add_argument("--device", default=LAB_NVME,
                   help=f"the NVMe controller's PCI address (default {LAB_NVME}, the lab's)")
    p.add_argument("--span", type=parse_size, default=0, metavar="SIZE",
                   help="how much each pass reads from the start of the disk (e.g. 1G, 4096B; a bare number is MiB, "
                        "as for pykvm run --memory; default: the whole disk)")
    p.add_argument("--here", action="store_true",
                   help="run on this machine, not in the lab: a host with /dev/vfio, KVM and QEMU, as root")
    args = p.parse_args()
    if args.span and args.span < args.bs:
        p.error(f"--span {args.span} is less than one read of --bs {args.bs} bytes")
    args.device = canonical_bdf(args.device)
    if os.environ.get("PYKVM_IN_LAB") != "1" and not args.here:
        return in_lab(args)
    if args.here:
        missing = here_missing()
        if missing:
            print(f"passthrough_dma: --here needs {'; '.join(missing)}", file=sys.stderr)
            return 2
    json_path = os.path.join(os.environ["PYKVM_LAB_OUT"], "passthrough_dma.json") if args.json == "@lab" else args.json
    out = summarize(measure(args), args)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
