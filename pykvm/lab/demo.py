"""``pykvm lab demo``: the whole story of PCI passthrough in one command, on any machine.

On the host it boots the lab (L1: QEMU with an emulated Intel IOMMU and an NVMe
controller) and runs :func:`inside` there, streaming its output. In L1, :func:`inside`

1. moves the NVMe controller (0000:00:05.0) from L1's ``nvme`` driver to ``vfio-pci``;
2. boots a Linux guest (L2) with ``pykvm run --vfio 0000:00:05.0 --stats``: the guest's
   own ``nvme`` driver finds the controller on pykvm's PCI bus, its DMA goes through
   the IOMMU straight into guest RAM (IOVA = guest physical address) and its MSI-X
   interrupts arrive through irqfds; the guest reads the disk's known first blocks and
   writes a fresh pattern with O_DIRECT, reading it back;
3. prints pykvm's boot timing and exit statistics;
4. gives the controller back to L1's ``nvme`` driver, which reads the guest's pattern.

The exit status is 0 only when every step was seen to work. The guest's /init
(:func:`guest_script`) and the parser of what it prints (:class:`GuestReport`) are
shared with the lab tests.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import mmap
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from pykvm.lab.devices import NVME_BDF, NVME_SERIAL, nvme_sector

if TYPE_CHECKING:
    from pykvm.lab.l2 import GuestRun

BLOCK = 4096                       # bytes the guest reads and writes at a time (8 sectors)
WRITE_LBA = (63 << 20) // 512      # where the guest writes: 1 MiB before the end, read by no other test
GUEST_DONE = "[guest] done"
GUEST_MARKER = "[guest] init started"
PATTERN_SHOWN = 40                 # bytes of the pattern shown on the console
EDU_INVERT_PROBE = 0x12345678      # edu's register 0x04 reads back the bitwise NOT of what was written

Say = Callable[[str], None]


def guest_script(nvme: bool = True, edu: bool = False, write_lba: int = WRITE_LBA) -> str:
    """The body of the guest's /init: list PCI functions, exercise edu and/or the NVMe
    controller, print what it saw (one ``[guest] ...`` line per fact), power off."""
    parts = [r'''
say() { echo "[guest] $*"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
say "init started: Linux $(uname -r), $(nproc) vCPU, $(awk '/MemTotal/ {print $2}' /proc/meminfo) KiB RAM"
say "PCI functions the guest sees:"
for d in /sys/bus/pci/devices/*; do
  drv=$(basename "$(readlink $d/driver)" 2>/dev/null)
  say "  pci ${d##*/} $(cut -c3- $d/vendor):$(cut -c3- $d/device) class $(cut -c3- $d/class) driver ${drv:-none} bar0 $(head -1 $d/resource | cut -d' ' -f1)"
done
find_fn() { for d in /sys/bus/pci/devices/*; do [ "$(cat $d/vendor):$(cat $d/device)" = "$1" ] && echo $d; done; }
''']
    if edu:
        parts.append(rf'''
E=$(find_fn 0x1234:0x11e8)
if [ -n "$E" ]; then
  echo 1 > $E/enable
  B=$(head -1 $E/resource | cut -d' ' -f1)
  devmem $((B + 4)) 32 {EDU_INVERT_PROBE:#x}
  say "edu ${{E##*/}} BAR0 at $B: id $(devmem $B 32), register 0x04 inverts {EDU_INVERT_PROBE:#x} to $(devmem $((B + 4)) 32)"
else
  say "FAILED: no edu (1234:11e8) on the guest's PCI bus"
fi
''')
    if nvme:
        parts.append(rf'''
N=$(find_fn 0x1b36:0x0010)
if [ -n "$N" ]; then
  say "NVMe controller 1b36:0010 at ${{N##*/}}: waiting for the nvme driver"
  i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
fi
if [ -n "$N" ] && [ -b /dev/nvme0n1 ]; then
  say "nvme: driver $(basename $(readlink $N/driver)) bound to ${{N##*/}}, /dev/nvme0n1 $(cat /sys/block/nvme0n1/size) sectors, serial $(cat /sys/class/nvme/nvme0/serial)"
  dd if=/dev/nvme0n1 of=/tmp/first bs={BLOCK} count=1 iflag=direct 2>/dev/null
  say "read LBA 0-7 with O_DIRECT: \"$(head -c 14 /tmp/first)\" sha256 $(sha /tmp/first)"
  dd if=/dev/nvme0n1 of=/tmp/before bs={BLOCK} count=1 skip={write_lba * 512 // BLOCK} iflag=direct 2>/dev/null
  say "LBA {write_lba} before writing: \"$(head -c 14 /tmp/before)\" sha256 $(sha /tmp/before)"
  dd if=/pattern.bin of=/dev/nvme0n1 bs={BLOCK} count=1 seek={write_lba * 512 // BLOCK} oflag=direct 2>/dev/null || say "FAILED: dd write"
  dd if=/dev/nvme0n1 of=/tmp/after bs={BLOCK} count=1 skip={write_lba * 512 // BLOCK} iflag=direct 2>/dev/null
  say "wrote {BLOCK} bytes \"$(head -c {PATTERN_SHOWN} /pattern.bin)\" at LBA {write_lba} with O_DIRECT (sha256 $(sha /pattern.bin)), read back with O_DIRECT: sha256 $(sha /tmp/after)"
  say "interrupts of the NVMe controller (from /proc/interrupts):"
  for f in $N/msi_irqs/*; do
    irq=${{f##*/}}
    say "  irq $irq $(cat $f) $(grep "^ *$irq:" /proc/interrupts | awk '{{n = 0; for (k = 2; k <= NF; k++) {{ if ($k ~ /^[0-9]+$/) n += $k; else break }}; print n " interrupts " $NF}}')"
  done
  say "kernel messages about nvme:"
  dmesg | grep -i nvme | sed 's/^/[guest]   dmesg: /'
else
  say "FAILED: no NVMe namespace (controller: ${{N:-not found}})"
fi
''')
    parts.append(f'say "{GUEST_DONE[len("[guest] "):]}: powering off"\npoweroff -f\n')
    return "".join(parts)


def make_pattern(tag: str) -> bytes:
    """``BLOCK`` bytes that name this run, so a stale block cannot pass for a fresh write."""
    unit = f"pykvm passthrough {tag}. ".encode()
    return (unit * (BLOCK // len(unit) + 1))[:BLOCK]


def first_block() -> bytes:
    """The disk's first ``BLOCK`` bytes as the lab wrote them."""
    return b"".join(nvme_sector(lba) for lba in range(BLOCK // 512))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class GuestReport:
    """What the guest's /init printed, parsed (see :func:`guest_script`)."""

    pci: List[Tuple[str, str, str, str, str]] = field(default_factory=list)  # bdf, vendor:device, class, driver, bar0
    nvme: Optional[Tuple[str, str, int, str]] = None                          # driver, bdf, sectors, serial
    first_block: Optional[Tuple[str, str]] = None                             # text, sha256
    before_write: Optional[str] = None                                        # sha256
    write: Optional[Tuple[str, str]] = None                                   # pattern sha256, read-back sha256
    irqs: List[Tuple[int, str, int, str]] = field(default_factory=list)       # irq, msi/msix, count, name
    edu: Optional[Tuple[str, int, int]] = None                                # bar0, id, inverted probe
    failures: List[str] = field(default_factory=list)
    done: bool = False

    @classmethod
    def parse(cls, console: str) -> "GuestReport":
        r = cls()
        for line in console.splitlines():
            if m := re.search(r"\[guest\]   pci (\S+) ([0-9a-f]{4}:[0-9a-f]{4}) class (\S+) driver (\S+) bar0 (\S+)", line):
                r.pci.append(m.groups())  # type: ignore[arg-type]
            elif m := re.search(r"\[guest\] nvme: driver (\S+) bound to (\S+), /dev/nvme0n1 (\d+) sectors, serial (\S+)", line):
                r.nvme = (m[1], m[2], int(m[3]), m[4])
            elif m := re.search(r'\[guest\] read LBA 0-7 with O_DIRECT: "(.*)" sha256 ([0-9a-f]{64})', line):
                r.first_block = (m[1], m[2])
            elif m := re.search(r"\[guest\] LBA \d+ before writing: .* sha256 ([0-9a-f]{64})", line):
                r.before_write = m[1]
            elif m := re.search(r"\[guest\] wrote .* \(sha256 ([0-9a-f]{64})\), read back with O_DIRECT: sha256 ([0-9a-f]{64})", line):
                r.write = (m[1], m[2])
            elif m := re.search(r"\[guest\]   irq (\d+) (msix?) (\d+) interrupts (\S+)", line):
                r.irqs.append((int(m[1]), m[2], int(m[3]), m[4]))
            elif m := re.search(r"\[guest\] edu \S+ BAR0 at (\S+): id (0x[0-9a-fA-F]+), register 0x04 inverts \S+ to (0x[0-9a-fA-F]+)", line):
                r.edu = (m[1], int(m[2], 16), int(m[3], 16))
            elif "[guest] FAILED" in line:
                r.failures.append(line.strip())
            elif GUEST_DONE in line:
                r.done = True
        return r

    def ids(self) -> List[str]:
        return [ids for _, ids, *_ in self.pci]


def nvme_checks(report: GuestReport, pattern: bytes) -> List[Tuple[str, bool]]:
    """What the guest must have shown for the NVMe controller, each with its verdict."""
    msix = [i for i in report.irqs if i[3].startswith("nvme")]
    return [
        ("the guest lists the NVMe controller 1b36:0010 on its PCI bus", "1b36:0010" in report.ids()),
        ("the guest's nvme driver binds and finds the namespace",
         report.nvme is not None and report.nvme[0] == "nvme" and report.nvme[3] == NVME_SERIAL),
        ("the controller's MSI-X vectors fire in the guest",
         bool(msix) and all(mode == "msix" and count > 0 for _, mode, count, _ in msix)),
        ("the guest reads the disk's known first 4 KiB (O_DIRECT)",
         report.first_block is not None and report.first_block[1] == sha256(first_block())),
        (f"the guest writes a fresh pattern at LBA {WRITE_LBA} and reads it back (O_DIRECT)",
         report.write == (sha256(pattern), sha256(pattern))),
        ("the guest finished its script", report.done and not report.failures),
    ]


def namespace_of(bdf: str, timeout: float = 20.0) -> Optional[str]:
    """``/dev/nvmeXnY`` of the controller at ``bdf`` once its (host) driver has probed it."""
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(glob.glob(f"/sys/bus/pci/devices/{bdf}/nvme/nvme*/nvme*n*"))
        if found and os.path.exists(f"/dev/{os.path.basename(found[0])}"):
            return f"/dev/{os.path.basename(found[0])}"
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def read_direct(path: str, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` with O_DIRECT (an mmap'd, so page-aligned, buffer): the
    device's content, not the page cache's."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, size) as buf:
            n = os.preadv(fd, [buf], offset)
            return bytes(buf[:n])
    finally:
        os.close(fd)


def host_reads_block(bdf: str, lba: int) -> Optional[bytes]:
    """The ``BLOCK`` at ``lba`` as L1's own nvme driver reads it (None if no namespace)."""
    dev = namespace_of(bdf)
    return None if dev is None else read_direct(dev, lba * 512, BLOCK)


def _banner(say: Say, text: str) -> None:
    say("")
    say(f"== {text}")


@dataclass
class DemoResult:
    """What :func:`story` saw: the guest run, its parsed report and L1's view afterwards."""

    run: "GuestRun"
    report: GuestReport
    pattern: bytes                 # what the guest wrote at WRITE_LBA
    driver_after: Optional[str]    # the controller's driver in L1 after the run
    l1_block: Optional[bytes]      # WRITE_LBA as L1's own driver reads it afterwards
    checks: List[Tuple[str, bool]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok in self.checks)


def story(say: Say = print, bdf: str = NVME_BDF) -> DemoResult:
    """The demo proper, in L1 (or on a host with an IOMMU and a spare NVMe at ``bdf``):
    bind, boot the guest (console streamed to ``say``), print pykvm's report, give the
    controller back and read the guest's pattern with L1's driver."""
    from pykvm.lab.l2 import build_guest_initramfs, driver_of, guest_kernel, run_guest, vfio_bound
    from pykvm.vfio.group import group_of_device

    group = group_of_device(bdf)
    _banner(say, f"L1: Linux {os.uname().release}; NVMe controller {bdf} on driver {driver_of(bdf)}, IOMMU group {group}")
    kernel, modules = guest_kernel()
    pattern = make_pattern(f"demo {time.strftime('%H:%M:%S')} pid {os.getpid()}")
    with tempfile.TemporaryDirectory(prefix="pykvm-demo-") as tmp:
        initrd = build_guest_initramfs(Path(tmp) / "guest.img", guest_script(), ["nvme"],
                                       {"/pattern.bin": pattern}, modules_dir=modules)
        say(f"guest: {kernel.name} with a busybox initramfs carrying the nvme module")
        with vfio_bound([bdf]):
            _banner(say, f"{bdf} moved to vfio-pci (/dev/vfio/{group}); booting the guest:")
            run = run_guest(kernel, initrd, vfio=[bdf], timeout=300, marker=GUEST_MARKER,
                            stream=lambda line: say(f"  | {line}"))
            _banner(say, f"pykvm run ended (exit status {run.returncode}, {run.seconds:.1f} s); its report:")
            for line in run.log.splitlines():
                say(f"  {line}")
    after = driver_of(bdf)
    _banner(say, f"{bdf} given back to L1: driver {after}")
    block = host_reads_block(bdf, WRITE_LBA) if after == "nvme" else None
    say(f"L1 reads LBA {WRITE_LBA} with O_DIRECT: {block[:PATTERN_SHOWN] if block else None!r}")
    report = GuestReport.parse(run.console)
    checks = nvme_checks(report, pattern) + [
        ("the guest powered off and pykvm exited with status 0", run.returncode == 0),
        ("pykvm printed its exit statistics", "exits by reason" in run.log),
        ("L1's own nvme driver has the controller back", after == "nvme"),
        ("L1 reads the guest's pattern from the device", block == pattern),
    ]
    return DemoResult(run, report, pattern, after, block, checks)


def inside(say: Say = print) -> int:
    """:func:`story`, then the verdict: 0 when every step was seen to work."""
    result = story(say)
    _banner(say, "verdict")
    for text, ok in result.checks:
        say(f"  [{'ok' if ok else 'FAILED'}] {text}")
    say("demo: passthrough works end to end" if result.ok else "demo: something did not work (see above)")
    return 0 if result.ok else 1


def run_in_lab(args: argparse.Namespace) -> int:
    """Boot the lab and run :func:`inside` there, streaming its lines."""
    from pykvm.lab.image import LabUnavailable
    from pykvm.lab.run import Lab, LabError

    say = lambda line: print(line, flush=True)  # noqa: E731
    try:
        lab = Lab.prepare(install=args.install, progress=lambda m: say(f"lab: {m}"))
        say(f"lab: booting L1 ({lab.image.qemu.name} TCG, Intel IOMMU, NVMe {NVME_BDF}); the demo runs there")
        with tempfile.TemporaryDirectory(prefix="pykvm-demo-") as out:  # L1's share, removed after
            result = lab.run([sys.executable, "-m", "pykvm", "lab", "demo", "--inside"], timeout=args.timeout,
                             stream=say, out_dir=Path(out))
    except LabUnavailable as exc:
        print(f"pykvm lab demo: {exc}", file=sys.stderr)
        return 2
    except LabError as exc:
        print(f"pykvm lab demo: {exc}", file=sys.stderr)
        return 1
    t = result.timings
    say(f"lab: L1 boot {t['boot']:.1f} s, demo {t['command']:.1f} s, total {t['total']:.1f} s; exit status {result.returncode}")
    return result.returncode


def cmd_demo(args: argparse.Namespace) -> int:
    if args.inside:
        return inside(lambda line: print(line, flush=True))
    return run_in_lab(args)
