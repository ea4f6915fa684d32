"""Boot time in the lab: pykvm against QEMU (``-accel kvm``), same kernel, initrd and memory.

Run inside L1 (one lab run holds both):

    python3 -m pykvm lab run -- python3 bench/boot_time.py [--cpus N] [--rounds R] [--json PATH]

Both VMMs boot Debian's stock kernel (the lab's) with the busybox initramfs of
tests/lab/test_boot_linux.py, whose /init prints a marker and powers off. The
measure is wall time from starting the VMM process to the marker line on its
console (so interpreter start-up counts for pykvm, and firmware for QEMU);
variants are interleaved over the rounds and the median is reported. QEMU
runs the default ``pc`` machine with SeaBIOS, ``-cpu host``, serial console.
Target (issue 4): pykvm faster than QEMU (ratio < 1).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List

from common import median, parser, report, temp_dir  # puts the checkout on sys.path

from tests.lab.test_boot_linux import CMDLINE, MARKER, MEMORY, l2_initramfs, lab_kernel

TIMEOUT = 300.0


def time_to_marker(argv: List[str]) -> float:
    """Seconds from starting ``argv`` to ``MARKER`` on its stdout; the process is then left to
    power off (and killed if it does not within 60 s)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)  # stderr: pykvm's --stats
    seen = threading.Event()
    found: List[float] = []
    tail: List[bytes] = []

    def read() -> None:
        for line in proc.stdout:
            if not found and MARKER.encode() in line:
                found.append(time.monotonic() - t0)
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
    return found[0]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if not os.path.exists("/dev/kvm"):
        raise SystemExit("bench: no /dev/kvm: run inside the lab (python3 -m pykvm lab run -- python3 bench/boot_time.py)")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise SystemExit("bench: qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    kernel_path, _ = lab_kernel()
    kernel = str(kernel_path)
    with temp_dir() as tmp:
        initrd = l2_initramfs(Path(tmp) / "l2.img")
        mem_mb = MEMORY.rstrip("M")
        variants = {
            "qemu -accel kvm": [qemu, "-accel", "kvm", "-cpu", "host", "-m", mem_mb, "-smp", str(args.cpus),
                                "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                                "-no-reboot", "-kernel", kernel, "-initrd", str(initrd), "-append", CMDLINE],
            "pykvm run": [sys.executable, "-m", "pykvm", "run", "--kernel", kernel, "--initrd", str(initrd),
                          "--memory", MEMORY, "--cpus", str(args.cpus), "--cmdline", CMDLINE, "--console", "stdio", "--stats", "--marker", MARKER],
        }
        times = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, argv in variants.items():
                times[name].append(time_to_marker(argv))
                print(f"round {r + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    results = {name: median(ts) for name, ts in times.items()}
    report(f"Boot to the guest marker in L2 (Debian {os.uname().release}, {MEMORY}, {args.cpus} vCPU, "
           f"median of {args.rounds}; load {os.getloadavg()[0]:.2f})",
           "qemu -accel kvm", results, "s", {"pykvm run": 1.0},
           extra={"rounds": times, "cmdline": CMDLINE}, json_path=args.json)


if __name__ == "__main__":
    main()
