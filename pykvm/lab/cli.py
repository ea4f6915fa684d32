"""``pykvm lab prepare | run | shell | info``: the lab by hand."""
from __future__ import annotations

import argparse
import shutil
import sys

from pykvm.lab.image import LabUnavailable, cache_root
from pykvm.lab.run import Lab, LabError, LabTimeout


def _lab(args: argparse.Namespace, install: bool = False) -> Lab:
    options = {}
    if getattr(args, "memory", None):
        options["memory_mb"] = args.memory
    if getattr(args, "cpus", None):
        options["cpus"] = args.cpus
    return Lab.prepare(install=install, **options)


def cmd_prepare(args: argparse.Namespace) -> int:
    try:
        lab = _lab(args, install=not args.no_install)
    except LabUnavailable as exc:
        print(f"pykvm lab: {exc}", file=sys.stderr)
        return 2
    _print_image(lab)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("pykvm lab run: give a command, e.g. `pykvm lab run -- uname -a`", file=sys.stderr)
        return 2
    try:
        lab = _lab(args)
        result = lab.run(
            argv, timeout=args.timeout, stream=lambda line: print(line, flush=True),
            console=(lambda line: print(f"[L1] {line}", file=sys.stderr, flush=True)) if args.verbose else None,
        )
    except LabUnavailable as exc:
        print(f"pykvm lab: {exc}", file=sys.stderr)
        return 2
    except LabError as exc:
        print(f"pykvm lab: {exc}", file=sys.stderr)
        return 124 if isinstance(exc, LabTimeout) else 125
    t = result.timings
    print(
        f"pykvm lab: exit status {result.returncode} (boot {t['boot']:.1f} s, "
        f"command {t['command']:.1f} s, total {t['total']:.1f} s)",
        file=sys.stderr,
    )
    if args.keep_out:
        print(f"pykvm lab: outputs in {result.out_dir}", file=sys.stderr)
    else:
        shutil.rmtree(result.out_dir, ignore_errors=True)
    return result.returncode


def cmd_shell(args: argparse.Namespace) -> int:
    try:
        lab = _lab(args)
    except LabUnavailable as exc:
        print(f"pykvm lab: {exc}", file=sys.stderr)
        return 2
    print("pykvm lab: booting L1; `exit` or Ctrl-A X leaves", file=sys.stderr)
    return lab.shell()


def _print_image(lab: Lab) -> None:
    image = lab.image
    print(f"kernel:      {image.kernel_version} ({image.kernel_path})")
    print(f"modules:     {image.modules_dir}")
    print(f"initramfs:   {image.initrd_path}")
    print(f"nvme disk:   {image.disk_path}")
    if image.group_disk_path:
        print(f"group disk:  {image.group_disk_path} (the NVMe behind the bridge)")
    print(f"qemu:        {image.qemu}")
    print(f"busybox:     {image.busybox}")
    print(f"memory/cpus: {lab.memory_mb} MiB / {lab.cpus}")


def cmd_info(args: argparse.Namespace) -> int:
    root = cache_root()
    print(f"cache:       {root}")
    if root.is_dir():
        for entry in sorted(root.iterdir()):
            size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else entry.stat().st_size
            print(f"  {entry.name:<24} {size / 2**20:8.1f} MiB")
    try:
        _print_image(_lab(args))
    except LabUnavailable as exc:
        print(f"not prepared: {exc}")
        return 1
    return 0


def _machine_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory", type=int, metavar="MIB", help="L1 memory (default $PYKVM_LAB_MEMORY_MB or 3072)")
    parser.add_argument("--cpus", type=int, help="L1 vCPUs (default $PYKVM_LAB_CPUS or 1)")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``lab`` and its subcommands; returns the ``lab`` subparsers' parent for more."""
    lab = subparsers.add_parser("lab", help="prepare and use the lab machine (QEMU with IOMMU, VFIO, KVM)")
    sub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND")
    sub.required = True

    p = sub.add_parser("prepare", help="install tools, fetch the kernel, build the initramfs (cached)")
    p.add_argument("--no-install", action="store_true", help="do not apt-get install missing tools")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "run", help="boot L1 and run a command there: pykvm lab run -- CMD...",
        description="Exit status: the command's; 2 if the lab is unavailable, 124 on a "
        "timeout, 125 if L1 or QEMU crashed.",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the command (default 600)")
    p.add_argument("--keep-out", action="store_true", help="keep the $PYKVM_LAB_OUT directory and print its path")
    p.add_argument("-v", "--verbose", action="store_true", help="also show L1's console on stderr")
    _machine_options(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("shell", help="an interactive shell in L1")
    _machine_options(p)
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("info", help="what is cached and which kernel/QEMU the lab uses")
    p.set_defaults(func=cmd_info)

    from pykvm.lab.demo import cmd_demo

    p = sub.add_parser(
        "demo", help="PCI passthrough end to end: a Linux guest under pykvm drives the lab's NVMe",
        description="Boots the lab, moves its NVMe controller to vfio-pci, boots a Linux guest with "
        "`pykvm run --vfio` and shows the guest finding, reading and writing the disk; then the "
        "run's exit statistics, and L1 reading the guest's data with its own driver. Exit status 0 "
        "only when every step worked; 2 if the lab is unavailable.",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the demo inside L1 (default 900)")
    p.add_argument("--install", action="store_true", help="apt-get install missing lab tools (as root)")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)  # the part that runs in L1
    p.set_defaults(func=cmd_demo)
    lab.set_defaults(lab_subparsers=sub)
    return sub
