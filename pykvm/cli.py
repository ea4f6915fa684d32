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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pykvm",
        description="KVM and VFIO from Python: a small VMM with PCI passthrough, host checks and a lab.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _name, modname in _SUBSYSTEMS:
        try:
            module = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name != modname:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("pykvm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
