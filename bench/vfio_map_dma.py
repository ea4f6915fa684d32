"""VFIO DMA map/unmap rate: pykvm's per-call map_dma/unmap_dma and map_dma_batch against the same ioctls in C.

Per call: each iteration maps one anonymous buffer (4 KiB or 2 MiB) at IOVA 0x100000
for the edu device's container and unmaps it again; the kernel pins and unpins the
pages and updates the (emulated) IOMMU's page tables each time. "floor" is pykvm's two
C helpers called straight from a Python loop: the cost of crossing from Python into C
twice, which no per-call Python API can undercut.

Batch: one ``map_dma_batch`` maps the same buffer at N consecutive IOVAs (N = the number
of pairs), one ``DmaBatch.unmap()`` unmaps them; its baseline is the C program issuing
the same N maps, then the same N unmaps ("C batch").

Both sides allocate the buffer the same way (``dma_buffer`` here, ``dma_buffer()`` in C):
4 KiB is one plain page (MADV_NOHUGEPAGE); 2 MiB is one transparent huge page (2 MiB
aligned, MADV_HUGEPAGE, touched). With plain pages, a 2 MiB map cost 0.4-1.8 ms depending
on how physically scattered the process's pages happened to be (most likely because type1
maps each physically contiguous run with one IOMMU call, and with caching-mode every call
is an IOTLB invalidation the emulated IOMMU processes), so C and Python differed by up to
3x from one process to the next.

Variants interleave over the rounds (C and pykvm take turns going first); the median per
map+unmap pair is reported. Target: pykvm within 1.2x of C, counted as met only when the
per-round ratios' 95% interval (``common.paired_ratio``, at least ``common.MIN_ROUNDS``
rounds) lies within it too.

Needs real VFIO: with no /dev/vfio/vfio here it boots the lab and runs itself in L1
(binding edu to vfio-pci there, and back afterwards). ``--json PATH`` lands on the
host either way.
"""
from __future__ import annotations

import json
import mmap
import os
import sys

import numpy as np

from common import (compile_c, median, paired_ratio, parser, report, rerun_in_lab, run_c, temp_dir,
                    time_ns)  # puts the checkout on sys.path

IOVA = 0x100000
SIZES = {"4 KiB": 4096, "2 MiB": 2 << 20}
TARGET = 1.2
VARIANTS = ("C", "pykvm", "floor", "C batch", "pykvm batch")


HUGE = 2 << 20


def dma_buffer(size: int):
    """``(mapping, buffer)``: a plain anonymous page for 4 KiB, a THP-backed 2 MiB-aligned
    region for multiples of 2 MiB, touched; as ``dma_buffer()`` in c/vfio_map_dma.c."""
    from pykvm._native import ffi

    thp = size % HUGE == 0
    mapping = mmap.mmap(-1, size + HUGE if thp else size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with ffi.from_buffer(mapping) as p:
        offset = -int(ffi.cast("uintptr_t", p)) % HUGE if thp else 0
    mapping.madvise(mmap.MADV_HUGEPAGE if thp else mmap.MADV_NOHUGEPAGE, offset, size)
    buffer = memoryview(mapping)[offset:offset + size]
    buffer[:] = bytes(size)
    return mapping, buffer


def thp_kib() -> int:
    """AnonHugePages of this process (kB): says whether the 2 MiB buffer got its huge page."""
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


def pykvm_pair_ns(container, buffer, n: int) -> float:
    """Mean ns per map_dma + unmap_dma of ``buffer`` through pykvm."""
    map_dma, unmap_dma, size = container.map_dma, container.unmap_dma, len(buffer)

    def body():
        for _ in range(n):
            map_dma(buffer, IOVA)
            unmap_dma(IOVA, size)
    return time_ns(body) / n


def floor_pair_ns(container, buffer, n: int) -> float:
    """The same pairs with pykvm's C helpers called straight from a Python loop: what any
    Python API pays (two cffi calls, each releasing the GIL) before doing anything of its own."""
    from pykvm._native import ffi, lib

    fd, map_c, unmap_c, size = container.fileno(), lib.pykvm_vfio_map_dma, lib.pykvm_vfio_unmap_dma, len(buffer)
    flags = lib.VFIO_DMA_MAP_FLAG_READ | lib.VFIO_DMA_MAP_FLAG_WRITE
    pin = ffi.from_buffer(buffer)

    def body():
        for _ in range(n):
            map_c(fd, flags, pin, IOVA, size)
            unmap_c(fd, IOVA, size)
    return time_ns(body) / n  # pin goes with this frame, so the buffer can be closed


def batch_pair_ns(container, buffer, n: int) -> float:
    """Mean ns per map+unmap of ``buffer`` at n consecutive IOVAs through one map_dma_batch and
    its unmap (building the argument arrays included)."""
    size = len(buffer)

    def body():
        container.map_dma_batch(buffer, IOVA + size * np.arange(n, dtype=np.uint64), size,
                                np.zeros(n, dtype=np.uint64)).unmap()
    return time_ns(body) / n


def pykvm_run(group_number: int, size: int, n: int) -> dict:
    """Open the group like the C program does, then time n pairs on a private anonymous buffer
    (as in C) through the API, through the bare helpers, and as one batch."""
    from pykvm.vfio import Container, Group

    with Container() as c, Group(group_number) as g:
        g.set_container(c)
        c.set_iommu()
        thp_before = thp_kib()
        mapping, buffer = dma_buffer(size)
        if size % HUGE == 0 and thp_kib() - thp_before < size // 1024:
            print(f"warning: the {size >> 20} MiB buffer did not get transparent huge pages", file=sys.stderr)
        pykvm_pair_ns(c, buffer, 10)  # warm up: fault the pages in, and let TCG translate the code paths
        batch_pair_ns(c, buffer, 10)  # (a first call through numpy costs milliseconds of translation in L1)
        out = {"pykvm": pykvm_pair_ns(c, buffer, n), "floor": floor_pair_ns(c, buffer, n),
               "pykvm batch": batch_pair_ns(c, buffer, n)}
    buffer.release()
    mapping.close()
    return out


def measure(args) -> dict:
    from pykvm.lab import EDU_BDF
    from pykvm.lab.l2 import vfio_bound
    from pykvm.vfio.group import group_of_device

    with vfio_bound([EDU_BDF]):
        samples = {f"{kind} {label}": [] for label in SIZES for kind in VARIANTS}
        with temp_dir() as tmp:
            binary = compile_c("c/vfio_map_dma.c", tmp)
            group_number = group_of_device(EDU_BDF)
            for round_ in range(args.rounds):
                for label, size in SIZES.items():
                    n = args.iterations if size == 4096 else max(1, args.iterations // 4)
                    # alternate who goes first, so a change of load does not favour one side
                    for kind in (("C", "pykvm") if round_ % 2 == 0 else ("pykvm", "C")):
                        if kind == "C":
                            for mode in ("pairs", "batch"):
                                ns = float(run_c(binary, group_number, size, n, hex(IOVA), mode))
                                samples[f"C {label}" if mode == "pairs" else f"C batch {label}"].append(ns)
                        else:
                            for variant, ns in pykvm_run(group_number, size, n).items():
                                samples[f"{variant} {label}"].append(ns)
    return samples


def in_lab(args) -> int:
    """Run this script inside L1 and bring its JSON back."""
    return rerun_in_lab(__file__, ["-n", str(args.iterations), "--rounds", str(args.rounds)], "vfio_map_dma.json", args.json, timeout=1200)


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("-n", "--iterations", type=int, default=2000, help="4 KiB map+unmap pairs per measurement "
                                                                       "(2 MiB: a quarter of it)")
    p.add_argument("--rounds", type=int, default=25, help="interleaved rounds (median reported; default 25)")
    args = p.parse_args()
    if not os.path.exists("/dev/vfio/vfio") and os.environ.get("PYKVM_IN_LAB") != "1":
        return in_lab(args)
    json_path = os.path.join(os.environ["PYKVM_LAB_OUT"], "vfio_map_dma.json") if args.json == "@lab" else args.json
    samples = measure(args)
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} on {os.cpu_count()} CPUs; fastest round: "
          + ", ".join(f"{k} {min(v) / 1000:.1f}" for k, v in samples.items()) + " us/pair")
    out = {}
    for label in SIZES:
        us = {kind: median(samples[f"{kind} {label}"]) / 1000 for kind in VARIANTS}
        # each round ran C and pykvm back to back (pykvm, floor and pykvm batch in one process)
        paired = {f"{k} {label}": paired_ratio(samples[f"{base} {label}"], samples[f"{k} {label}"])
                  for base, k in (("C", "pykvm"), ("C", "floor"), ("C batch", "pykvm batch"))}
        print(f"Per round, {label} (median of the per-round ratios, exact interval, sign test):")
        for name, pr in paired.items():
            print(f"  {name:<30}{pr.describe('lower')}")
        out[label] = report(f"VFIO map_dma+unmap_dma of {label}, per call ({args.rounds} rounds, median)",
                            f"C {label}", {f"{k} {label}": us[k] for k in ("C", "pykvm", "floor")}, "us/pair",
                            {f"pykvm {label}": TARGET}, paired=paired)
        out[f"{label} batch"] = report(f"VFIO map_dma_batch + DmaBatch.unmap of {label}, per entry",
                                       f"C batch {label}", {f"{k} {label}": us[k] for k in ("C batch", "pykvm batch")},
                                       "us/pair", {f"pykvm batch {label}": TARGET}, paired=paired)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"iterations": args.iterations, "rounds": args.rounds, "loadavg": load, "reports": out,
                       "samples_us": {k: [x / 1000 for x in v] for k, v in samples.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
