"""``pykvm run``: boot a kernel in a new VM, in the style of kvmtool and Cloud Hypervisor.

    pykvm run --kernel bzImage [--initrd I] [--cmdline C] [--memory 512M] [--cpus N]
              [--console stdio|file:PATH|none] [--stats] [--config vm.toml]
              [--marker TEXT] [--timeout S] [--vfio BDF ...] [--loop c|python]

The exit status is the machine's (pykvm.vmm.machine): 0 when the guest
powered off or rebooted, 2 for a triple fault, 3 for a guest crash/panic,
124 for --timeout, 1 for a VMM error, and 2 (before any vCPU runs) for a
configuration error, which is printed with what to change.
"""
from __future__ import annotations

import argparse
import sys

from pykvm.errors import FixableError, KvmError
from pykvm.vmm.config import load_config, merge
from pykvm.vmm.machine import DEFAULT_CMDLINE, Machine
from pykvm.vmm.stats import exit_report, kernel_report

CONFIG_ERROR = 2


def cmd_run(args: argparse.Namespace) -> int:
    overrides = {
        "kernel": args.kernel, "initrd": args.initrd, "cmdline": args.cmdline, "memory": args.memory,
        "cpus": args.cpus, "console": args.console, "stats": args.stats or None, "marker": args.marker,
        "timeout": args.timeout, "vfio": args.vfio, "loop": args.loop,
    }
    try:
        config = merge(load_config(args.config) if args.config else {}, overrides)
        machine = Machine(config)
    except (ValueError, OSError) as exc:
        print(f"pykvm run: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    try:
        result = machine.run()
    except KeyboardInterrupt:
        machine.close()
        print("pykvm run: interrupted", file=sys.stderr)
        return 130
    except FixableError as exc:  # a --vfio device failed its checks while the machine was built
        print(f"pykvm run: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    except (KvmError, ValueError, OSError, RuntimeError) as exc:
        print(f"pykvm run: {exc}", file=sys.stderr)
        return 1
    print(f"pykvm run: guest {result} (exit status {result.status})", file=sys.stderr)
    if config.stats:
        print(machine.times.table(), file=sys.stderr)
        print(exit_report(machine.exit_stats()), file=sys.stderr)
        kernel = kernel_report(machine.kernel_stats)
        if kernel:
            print(kernel, file=sys.stderr)
    return result.status


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "run", help="boot a Linux kernel in a new VM",
        description="Boot a Linux kernel (bzImage or ELF vmlinux) with an optional initrd. "
                    "Options override a --config file's values.",
    )
    p.add_argument("--kernel", help="bzImage (e.g. /boot/vmlinuz-*) or ELF vmlinux")
    p.add_argument("--initrd", help="initramfs image")
    p.add_argument("--cmdline", help=f"kernel command line (default: {DEFAULT_CMDLINE!r})")
    p.add_argument("--memory", "-m", help="guest RAM, e.g. 512M or 2G (default 512M)")
    p.add_argument("--cpus", "-c", type=int, help="vCPUs (default 1)")
    p.add_argument("--console", help="stdio (default; Ctrl-A x quits), file:PATH or none")
    p.add_argument("--stats", action="store_true", help="print boot timing and exits by reason at the end")
    p.add_argument("--config", help="TOML file with the same fields as these options")
    p.add_argument("--marker", help="console text whose first appearance marks the end of boot (for --stats)")
    p.add_argument("--timeout", type=float, help="end the run after this many seconds (exit status 124)")
    p.add_argument("--vfio", action="append", default=[], metavar="BDF",
                   help="pass this PCI device through (bound to vfio-pci); repeatable")
    p.add_argument("--loop", choices=("c", "python"), help="vCPU run loop (default c)")
    p.set_defaults(func=cmd_run)
    return p
