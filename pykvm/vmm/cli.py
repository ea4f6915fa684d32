"""``pykvm run``: boot a kernel in a new VM, in the style of kvmtool and Cloud Hypervisor.

    pykvm run --kernel bzImage [--initrd I] [--cmdline C] [--memory 512M] [--cpus N]
              [--console stdio|file:PATH|none] [--[no-]stats] [--config vm.toml]
              [--marker TEXT] [--timeout S] [--vfio BDF ...] [--loop c|python]

The exit status:

- the machine's (pykvm.vmm.machine.EXIT_STATUS): 0 when the guest powered off or
  rebooted (or Ctrl-A x stopped it), 3 for a guest crash/panic, 4 for a triple
  fault, 124 for --timeout, 1 for a VMM error;
- 2 for a configuration error, found before any vCPU runs and printed with what
  to change (argparse's usage errors are 2 as well);
- 128 + the signal's number when SIGTERM (143) or SIGHUP (129) stopped the run, after
  the same teardown as any other end (the terminal leaves raw mode); 130 for SIGINT.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any, Dict, Optional

from pykvm.errors import FixableError, KvmError
from pykvm.vmm.config import load_config, merge
from pykvm.vmm.machine import DEFAULT_CMDLINE, ExitReason, Machine, MachineConfig, MachineError
from pykvm.vmm.stats import exit_report, kernel_report

CONFIG_ERROR = 2
VMM_ERROR = 1
INTERRUPTED = 128 + signal.SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _say(text: str) -> None:
    """A line on stderr; a terminal that hung up (SIGHUP) cannot take it, and that is fine."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass


class SignalStop:
    """While active, SIGTERM and SIGHUP stop ``machine`` like Ctrl-A x does, so its normal
    teardown runs (the console leaves raw mode); ``signo`` is the first one that came.

    Python's handler for them does nothing; the signal's number reaches a thread through
    ``signal.set_wakeup_fd``, and that thread calls ``machine.stop``, which takes locks: a
    handler that ran in the main thread could find one of them held by that same thread."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.signo: Optional[int] = None
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # set_wakeup_fd needs it non-blocking
        os.set_blocking(self._r, True)
        self._old_handlers: Dict[int, Any] = {}
        self._old_fd = -1
        self._active = False
        self._thread = threading.Thread(target=self._watch, name="pykvm-signals", daemon=True)

    def __enter__(self) -> "SignalStop":
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers: the caller handles signals
        for s in STOP_SIGNALS:
            self._old_handlers[s] = signal.signal(s, lambda signo, frame: None)
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._active = True
        self._thread.start()
        return self

    def _watch(self) -> None:
        while True:
            try:
                data = os.read(self._r, 64)
            except OSError:
                return
            for signo in data:
                if signo == 0:  # __exit__'s wake-up
                    return
                if signo in STOP_SIGNALS and self.signo is None:
                    self.signo = signo
                    self.machine.stop(ExitReason.STOPPED, signal.Signals(signo).name)
            if not data:
                return

    def __exit__(self, *exc: Any) -> None:
        if self._active:
            self._active = False
            signal.set_wakeup_fd(self._old_fd)
            for s, handler in self._old_handlers.items():
                signal.signal(s, handler)
            os.write(self._w, b"\0")
            self._thread.join(1.0)
        os.close(self._w)
        os.close(self._r)


def config_from_args(args: argparse.Namespace) -> MachineConfig:
    """The machine's configuration: the --config file's fields, then the options given."""
    overrides = {
        "kernel": args.kernel, "initrd": args.initrd, "cmdline": args.cmdline, "memory": args.memory,
        "cpus": args.cpus, "console": args.console, "stats": args.stats, "marker": args.marker,
        "timeout": args.timeout, "vfio": args.vfio, "loop": args.loop, "direct": args.direct,
    }
    return merge(load_config(args.config) if args.config else {}, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        machine = Machine(config)
    except (ValueError, OSError, FixableError) as exc:
        _say(f"pykvm run: {exc}")
        return CONFIG_ERROR
    for note in machine.notes:
        _say(f"pykvm run: {note}")
    try:
        with SignalStop(machine) as signals:
            result = machine.run()
    except KeyboardInterrupt:
        machine.close()
        _say("pykvm run: interrupted")
        return INTERRUPTED
    except (FixableError, MachineError) as exc:  # found while building: a --vfio device's checks, guest RAM
        _say(f"pykvm run: {exc}")
        return CONFIG_ERROR
    except (KvmError, ValueError, OSError, RuntimeError) as exc:
        _say(f"pykvm run: {exc}")
        return VMM_ERROR
    if signals.signo is not None:
        _say(f"pykvm run: stopped by {signal.Signals(signals.signo).name} (exit status {128 + signals.signo})")
        return 128 + signals.signo
    _say(f"pykvm run: guest {result} (exit status {result.status})")
    if config.stats:
        _say(machine.times.table())
        _say(exit_report(machine.exit_stats()))
        kernel = kernel_report(machine.kernel_stats)
        if kernel:
            _say(kernel)
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
    p.add_argument("--memory", "-m", help="guest RAM, e.g. 512M or 2G; a bare number is MiB, 4096B bytes (default 512M)")
    p.add_argument("--cpus", "-c", type=int, help="vCPUs (default 1)")
    p.add_argument("--console", help="stdio (default; Ctrl-A x quits), file:PATH or none")
    p.add_argument("--stats", action=argparse.BooleanOptionalAction, default=None,
                   help="print boot timing and exits by reason at the end (--no-stats: not even if the config file says so)")
    p.add_argument("--config", help="TOML file with the same fields as these options")
    p.add_argument("--marker", help="console text whose first appearance marks the end of boot (for --stats)")
    p.add_argument("--timeout", type=float, help="end the run after this many seconds (exit status 124)")
    p.add_argument("--vfio", action="append", default=[], metavar="BDF",
                   help="pass this PCI device through (bound to vfio-pci); repeatable")
    p.add_argument("--loop", choices=("c", "python"), help="vCPU run loop (default c)")
    p.add_argument("--direct", action=argparse.BooleanOptionalAction, default=None,
                   help="boot a bzImage's kernel directly: pykvm decompresses it once (kept in ~/.cache/pykvm/kernels) "
                        "and enters it at startup_64, so the guest skips its decompressor (and KASLR: the kernel "
                        "runs where it was linked); an ELF vmlinux boots directly anyway")
    p.set_defaults(func=cmd_run)
    return p
