"""``pykvm host check | groups | bind | restore | show``: thin over the library functions.

Exit status: 0 done/ready, 1 a check failed or a step could not be done
(the message says why and what to do), 2 bad usage (argparse).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pykvm.host.bind import DEFAULT_STATE_DIR, BindResult, bind, persist_lines, restore
from pykvm.host.check import format_report, parse_size, run_checks
from pykvm.host.groups import format_groups, list_groups
from pykvm.host.pci import VFIO_DRIVER
from pykvm.host.show import format_device, show_device
from pykvm.host.sysfs import HostError, Root


def _root(args: argparse.Namespace) -> Root:
    return Root(args.root, dry_run=getattr(args, "dry_run", False))


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def _error(exc: HostError) -> int:
    print(f"pykvm host: error: {exc}", file=sys.stderr)
    return 1


def cmd_check(args: argparse.Namespace) -> int:
    report = run_checks(_root(args), args.memory)
    if args.json:
        _print_json(report.to_json())
    else:
        print(format_report(report))
    return 0 if report.ok else 1


def cmd_groups(args: argparse.Namespace) -> int:
    try:
        groups = list_groups(_root(args))
    except HostError as exc:
        return _error(exc)
    if args.json:
        _print_json([g.to_json() for g in groups])
    else:
        print(format_groups(groups))
    return 0


def _report_moves(result: BindResult, want: str, dry_run: bool) -> int:
    """Print each device's move; 1 when a device did not end up on ``want`` (None: the kernel's choice)."""
    status = 0
    if dry_run:
        print("dry run: these writes would be made")
        for path, text in result.writes:
            print(f"  {text.strip() or '(newline)'!s:>14} > {path}")
        return 0
    for c in result.changes:
        if c.skipped:
            print(f"{c.bdf}: {c.skipped}")
            continue
        print(f"{c.bdf}: {c.before or 'no driver'} -> {c.after or 'no driver'}")
        if want and c.after != want:
            print(f"pykvm host: error: {c.bdf} is not on {want} after the probe; see `dmesg | tail`", file=sys.stderr)
            status = 1
    for note in result.notes:
        print(f"note: {note}")
    return status


def cmd_bind(args: argparse.Namespace) -> int:
    root = _root(args)
    try:
        if args.persist:
            print("\n".join(persist_lines(root, args.bdf, whole_group=args.group, state_dir=args.state_dir)))
            return 0
        result = bind(root, args.bdf, whole_group=args.group, allow_split=args.allow_split, state_dir=args.state_dir)
    except HostError as exc:
        return _error(exc)
    if args.json:
        _print_json(result.to_json())
        return 0
    status = _report_moves(result, VFIO_DRIVER, root.dry_run)
    if not status and not root.dry_run and result.group is not None:
        print(f"VFIO group device: /dev/vfio/{result.group}")
    return status


def cmd_restore(args: argparse.Namespace) -> int:
    root = _root(args)
    try:
        result = restore(root, args.bdf, whole_group=args.group, state_dir=args.state_dir)
    except HostError as exc:
        return _error(exc)
    if args.json:
        _print_json(result.to_json())
        return 0
    return _report_moves(result, "", root.dry_run)


def cmd_show(args: argparse.Namespace) -> int:
    try:
        view = show_device(_root(args), args.bdf)
    except HostError as exc:
        return _error(exc)
    if args.json:
        _print_json(view.to_json())
    else:
        print(format_device(view))
    return 0


def _memory(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    host = subparsers.add_parser("host", help="check and prepare this host for PCI passthrough",
                                 description="Check and prepare this host for PCI passthrough with VFIO.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", default="/", metavar="DIR",
                        help="directory that holds sys/, proc/, dev/, boot/ (default /; a synthetic tree for tests)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    changes = argparse.ArgumentParser(add_help=False)
    changes.add_argument("bdf", metavar="BDF", help="PCI address, e.g. 0000:00:05.0")
    changes.add_argument("--group", action="store_true", help="act on every device in BDF's IOMMU group")
    changes.add_argument("--state-dir", metavar="DIR",
                         help=f"where the original drivers are remembered (default ROOT{DEFAULT_STATE_DIR})")
    changes.add_argument("--dry-run", action="store_true", help="print the sysfs writes instead of making them")

    sub = host.add_subparsers(dest="host_command", metavar="SUBCOMMAND")
    sub.required = True
    p = sub.add_parser("check", parents=[common], help="PASS/WARN/FAIL for each passthrough requirement, with fixes")
    p.add_argument("--memory", type=_memory, default=1 << 30, metavar="SIZE",
                   help="guest RAM to check locked-memory and hugepage limits against (default 1G)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("groups", parents=[common], help="IOMMU groups, their devices and drivers")
    p.set_defaults(func=cmd_groups)

    p = sub.add_parser("bind", parents=[common, changes], help="bind a device (or its group) to vfio-pci")
    p.add_argument("--allow-split", action="store_true",
                   help="bind only BDF even if other devices in its group stay on host drivers")
    p.add_argument("--persist", action="store_true",
                   help="print the modprobe.d and initramfs lines that bind it at boot; change nothing")
    p.set_defaults(func=cmd_bind)

    p = sub.add_parser("restore", parents=[common, changes], help="give a device back to its original driver")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("show", parents=[common], help="one device as lspci -k -v shows it, plus its VFIO regions")
    p.add_argument("bdf", metavar="BDF", help="PCI address, e.g. 0000:00:05.0")
    p.set_defaults(func=cmd_show)
