"""The ``pykvm`` command: ``pykvm run | host | lab | bench``.

Thin over the library: each subsystem registers its own subcommands from its
``cli`` module, so this file only wires them together.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# (subcommand, module with register(subparsers)), in the order --help shows them.
_SUBSYSTEMS = [
    ("run", "pykvm.vmm.cli"),
    ("host", "pykvm.host.cli"),
    ("lab", "pykvm.lab.cli"),
]


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    """The parser; when ``argv`` starts with a known subcommand only its module is imported
    (``pykvm run`` should not pay for the lab's and the host checks' imports)."""
    chosen = [(n, m) for n, m in _SUBSYSTEMS if argv and argv[0] == n]
    parser = argparse.ArgumentParser(
        prog="pykvm",
        description="KVM and VFIO from Python: a small VMM with PCI passthrough, host checks and a lab.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _name, modname in chosen or _SUBSYSTEMS:
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name != modname:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("pykvm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
