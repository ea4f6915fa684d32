"""Passthrough DMA: sequential O_DIRECT reads of the lab's NVMe by L1, by a pykvm guest, by a QEMU guest.

All in ONE lab run (L1 = QEMU TCG with an emulated Intel IOMMU), the same static reader
(``bench/c/direct_read.c``: ``pread`` of ``--bs`` bytes at a time with O_DIRECT over the
whole 64 MiB disk, timed with CLOCK_MONOTONIC; busybox's dd here prints no timing)
``--reps`` times per boot, over ``--rounds`` interleaved rounds:

- (a) ``L1``: L1's own nvme driver (the device in the IOMMU's pass-through domain, iommu=pt);
- (a') ``L1-DMA``: the same with the device's IOMMU group switched to a translated DMA domain
  (``/sys/kernel/iommu_groups/N/type``), a control: a passed-through device's DMA is
  always translated (by the emulated VT-d here), L1's own is not with iommu=pt;
- (b) ``pykvm``: an L2 Linux under ``pykvm run --vfio`` (guest RAM mapped at IOVA = GPA,
  BAR0 mmap'd except the MSI-X table page, MSI-X through irqfds);
- (c) ``QEMU``: the same L2 kernel and initramfs under ``qemu-system-x86_64 -accel kvm
  -device vfio-pci,host=...`` in L1.

MB/s (10^6 bytes/s, each machine's own clock) are medians over all reads; the
ratios (b)/(a) (target >= 0.9) and (b)/(c) (target >= 1.0) are printed with whether the
target was met. For (b) and (c) the bench samples KVM's exit counters
(``/sys/kernel/debug/kvm``, summed over L1's VMs; only one runs at a time) when the guest
announces the start and end of its reads, so "exits per MB" cover the reads only: all
VM exits (most handled in L1's kernel: interrupt delivery, EOI, HLT), and those that
reached the VMM in user space (``io_exits`` + ``mmio_exits``). pykvm's whole-run
``--stats`` table is printed too.

Needs the lab (boots it when there is no /dev/vfio here). ``--json PATH`` lands on the host.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from common import parser, rerun_in_lab  # puts the checkout on sys.path

DEBUGFS = "/sys/kernel/debug"
KVM_STATS = ("exits", "io_exits", "mmio_exits", "irq_injections", "halt_exits")
BEGIN, END = "BENCH-BEGIN", "BENCH-END"
READ_RE = re.compile(r"BENCH-READ (\d+) ([\d.]+)")
TARGETS = {"pykvm/L1": 0.9, "pykvm/QEMU": 1.0}

GUEST_SCRIPT = """
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
nvirqs() {{ grep nvme /proc/interrupts | awk '{{n = 0; for (k = 2; k <= NF; k++) {{ if ($k ~ /^[0-9]+$/) n += $k; else break }}; s += n}} END {{print s}}'; }}
dd if=/dev/nvme0n1 of=/dev/null bs=1M count=8 iflag=direct 2>/dev/null
before=$(nvirqs)
sleep 0.5
echo {begin}
/bin/direct_read /dev/nvme0n1 {bs} {reps} > /tmp/reads.log
echo {end}
sleep 0.5
echo "BENCH-IRQS $(( $(nvirqs) - before ))"
cat /tmp/reads.log
poweroff -f
"""


def kvm_counters() -> Dict[str, int]:
    return {name: int(Path(DEBUGFS, "kvm", name).read_text()) for name in KVM_STATS}


class Window:
    """Samples KVM's counters when the guest prints BEGIN and END (called from the console reader)."""

    def __init__(self) -> None:
        self.begin: Optional[Dict[str, int]] = None
        self.end: Optional[Dict[str, int]] = None

    def __call__(self, line: str) -> None:
        if line.strip() == BEGIN:
            self.begin = kvm_counters()
        elif line.strip() == END:
            self.end = kvm_counters()

    def delta(self) -> Dict[str, int]:
        if self.begin is None or self.end is None:
            raise RuntimeError("the guest did not print its BEGIN/END lines")
        return {k: self.end[k] - self.begin[k] for k in KVM_STATS}


def parse_reads(text: str) -> List[float]:
    """MB/s of each ``BENCH-READ bytes seconds`` line in ``text``."""
    return [int(m[1]) / float(m[2]) / 1e6 for m in READ_RE.finditer(text)]


def build_reader(workdir: str) -> str:
    """bench/c/direct_read.c, static: it runs in L1 and in the guests' busybox initramfs."""
    out = os.path.join(workdir, "direct_read")
    cc = os.environ.get("CC") or shutil.which("cc") or "cc"
    subprocess.run([cc, "-O2", "-Wall", "-static", "-o", out, os.path.join(os.path.dirname(__file__), "c", "direct_read.c")],
                   check=True)
    return out


def l1_reads(reader: str, bdf: str, bs: int, reps: int) -> List[float]:
    from pykvm.lab.demo import namespace_of

    device = namespace_of(bdf)
    if device is None:
        raise RuntimeError(f"L1 has no namespace for {bdf}")
    return parse_reads(subprocess.run([reader, device, str(bs), str(reps)], capture_output=True, text=True,
                                      check=True).stdout)


def set_domain_type(bdf: str, kind: str) -> str:
    """Rebind ``bdf``'s nvme driver with its IOMMU group's default domain set to ``kind``
    (identity, DMA, DMA-FQ); the kernel accepts the change only while no driver is bound.
    Returns the type it had."""
    group = os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group"))
    type_file = Path(f"/sys/kernel/iommu_groups/{group}/type")
    before = type_file.read_text().strip()
    Path("/sys/bus/pci/drivers/nvme/unbind").write_text(bdf)
    try:
        type_file.write_text(kind)
    finally:
        Path("/sys/bus/pci/drivers/nvme/bind").write_text(bdf)
    return before


def guest_result(run, window: Window, name: str) -> dict:
    if run.returncode != 0 or END not in run.console:
        raise RuntimeError(f"{name} guest failed:\n{run.detail()}")
    mbps = parse_reads(run.console)
    delta = window.delta()
    irqs = int(re.search(r"BENCH-IRQS (-?\d+)", run.console)[1])
    return {"mbps": mbps, "kvm": delta, "guest_nvme_irqs": irqs, "seconds": run.seconds}


def qemu_argv(kernel: Path, initrd: Path, bdf: str, cmdline: str) -> List[str]:
    return [shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-accel", "kvm", "-cpu", "host",
            "-M", "pc", "-m", "256M", "-smp", "1", "-nodefaults", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
            "-device", f"vfio-pci,host={bdf}"]


def measure(args) -> dict:
    from pykvm.lab import NVME_BDF
    from pykvm.lab.l2 import build_guest_initramfs, guest_cmdline, guest_kernel, run_guest, run_streaming, vfio_bound

    if not os.path.exists(f"{DEBUGFS}/kvm"):
        subprocess.run(["mount", "-t", "debugfs", "none", DEBUGFS], check=True)
    kernel, modules = guest_kernel()
    samples: Dict[str, dict] = {"L1": {"mbps": []}, "L1-DMA": {"mbps": []}, "pykvm": {"mbps": [], "windows": []},
                                "QEMU": {"mbps": [], "windows": []}}
    stats_tables: List[str] = []
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp:
        reader = build_reader(tmp)
        script = GUEST_SCRIPT.format(bs=args.bs, reps=args.reps, begin=BEGIN, end=END)
        initrd = build_guest_initramfs(Path(tmp) / "bench.img", script, ["nvme"],
                                       {"/bin/direct_read": Path(reader)}, modules_dir=modules)
        for round_ in range(args.rounds):
            samples["L1"]["mbps"] += l1_reads(reader, NVME_BDF, args.bs, args.reps)
            original = set_domain_type(NVME_BDF, "DMA")
            try:
                samples["L1-DMA"]["mbps"] += l1_reads(reader, NVME_BDF, args.bs, args.reps)
            finally:
                set_domain_type(NVME_BDF, original)
            print(f"round {round_ + 1}: L1 {statistics.median(samples['L1']['mbps'][-args.reps:]):.0f} MB/s, "
                  f"L1 with a DMA domain ({original} before) {statistics.median(samples['L1-DMA']['mbps'][-args.reps:]):.0f} MB/s",
                  flush=True)
            with vfio_bound([NVME_BDF]):
                for name in (("pykvm", "QEMU") if round_ % 2 == 0 else ("QEMU", "pykvm")):
                    window = Window()
                    if name == "pykvm":
                        run = run_guest(kernel, initrd, vfio=[NVME_BDF], timeout=300, stream=window)
                        stats_tables.append(run.log)
                    else:
                        run = run_streaming(qemu_argv(kernel, initrd, NVME_BDF, guest_cmdline()), 360, window)
                    got = guest_result(run, window, name)
                    samples[name]["mbps"] += got["mbps"]
                    samples[name]["windows"].append({k: v for k, v in got.items() if k != "mbps"})
                    print(f"round {round_ + 1}: {name} {statistics.median(got['mbps']):.0f} MB/s, "
                          f"boot+reads {got['seconds']:.1f} s, KVM exits in the read window {got['kvm']}", flush=True)
    samples["pykvm"]["stats"] = stats_tables[-1]
    return samples


def per_mb(samples: dict, reps: int, disk_bytes: int) -> Dict[str, float]:
    """Exits and interrupts per MB read, over all of a variant's read windows."""
    windows = samples["windows"]
    mb = len(windows) * reps * disk_bytes / 1e6
    total = {k: sum(w["kvm"][k] for w in windows) for k in KVM_STATS}
    return {"all VM exits": total["exits"] / mb,
            "exits to the VMM (io+mmio)": (total["io_exits"] + total["mmio_exits"]) / mb,
            "guest nvme interrupts": sum(w["guest_nvme_irqs"] for w in windows) / mb}


def summarize(samples: dict, args) -> dict:
    from pykvm.lab import devices

    mbps = {name: statistics.median(s["mbps"]) for name, s in samples.items()}
    ratios = {"pykvm/L1": mbps["pykvm"] / mbps["L1"], "pykvm/QEMU": mbps["pykvm"] / mbps["QEMU"],
              "pykvm/L1-DMA": mbps["pykvm"] / mbps["L1-DMA"]}
    print(f"\nsequential O_DIRECT reads of the lab's NVMe ({devices.NVME_DISK_SIZE >> 20} MiB, bs={args.bs}, "
          f"{args.reps} reads x {args.rounds} rounds; median MB/s, fastest in brackets)")
    for name, label in (("L1", "(a) L1's nvme driver"), ("L1-DMA", "(a') L1, translated DMA domain"),
                        ("pykvm", "(b) L2 under pykvm --vfio"),
                        ("QEMU", "(c) L2 under QEMU vfio-pci")):
        print(f"  {label:<30}{mbps[name]:>8.0f} MB/s  [{max(samples[name]['mbps']):.0f}]")
    for name, value in ratios.items():
        verdict = (f"  target >= {TARGETS[name]:.2f}x: {'met' if value >= TARGETS[name] else 'NOT met'}"
                   if name in TARGETS else "  (control: both translated)")
        print(f"  {name:<30}{value:>8.3f}x{verdict}")
    exits = {name: per_mb(samples[name], args.reps, devices.NVME_DISK_SIZE) for name in ("pykvm", "QEMU")}
    print("per MB read (over the read windows only):")
    for name, values in exits.items():
        print(f"  {name:<8}" + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    print(f"pykvm's --stats for its last run (whole run: boot, reads, power-off):\n{samples['pykvm']['stats'].strip()}")
    return {"bs": args.bs, "reps": args.reps, "rounds": args.rounds, "disk_bytes": devices.NVME_DISK_SIZE,
            "mbps_median": mbps, "ratios": ratios, "targets": TARGETS,
            "met": {k: ratios[k] >= TARGETS[k] for k in TARGETS}, "per_mb": exits, "samples": samples,
            "loadavg_l1": os.getloadavg()[0]}


def in_lab(args) -> int:
    """Run this script inside L1 and bring its JSON back."""
    return rerun_in_lab(__file__, ["--bs", str(args.bs), "--reps", str(args.reps), "--rounds", str(args.rounds)], "passthrough_dma.json", args.json, timeout=1800)


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--bs", type=int, default=1 << 20, help="bytes per read (default 1 MiB)")
    p.add_argument("--reps", type=int, default=20, help="whole-disk reads per boot (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a), (b), (c) (default 3)")
    args = p.parse_args()
    if os.environ.get("PYKVM_IN_LAB") != "1":
        return in_lab(args)
    json_path = os.path.join(os.environ["PYKVM_LAB_OUT"], "passthrough_dma.json") if args.json == "@lab" else args.json
    out = summarize(measure(args), args)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
