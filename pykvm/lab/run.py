"""Running a command in L1 and getting its output and exit status back.

Each run boots a fresh L1 (a few seconds), runs one command, and powers off. The command
runs as root in a chroot of the host's root, in the host's current directory, with the
environment of :func:`pykvm.lab.guest.lab_env`; what it writes to ``$PYKVM_LAB_OUT`` is in
``LabResult.out_dir`` on the host afterwards.

Every phase has a deadline (boot, command, shutdown); QEMU is killed on any way out,
including KeyboardInterrupt. Failures raise :class:`LabError` subclasses carrying the last
console lines.
"""
from __future__ import annotations

import os
import secrets
import shutil
import sys
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from pykvm.lab import guest
from pykvm.lab.image import LabImage, Progress, cache_root, prepare, stderr_progress
from pykvm.lab.initramfs import FileContent, build_initramfs
from pykvm.lab.monitor import Monitor, lost_wakeup
from pykvm.lab.qemu import QemuProcess, qemu_argv

LineSink = Callable[[str], None]


class LabError(RuntimeError):
    """L1 did not run the command to completion; ``console_tail`` shows why."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.console_tail = console_tail
        self.cpu_state = ""  # L1's CPU and APIC state from QEMU's monitor, on a timeout

    def __str__(self) -> str:
        text = self.message
        if self.console_tail:
            text += f"\n--- last console lines ---\n{self.console_tail}"
        if self.cpu_state:
            text += f"\n--- L1's CPU when it was stopped ---\n{self.cpu_state}"
        return text


class LabTimeout(LabError):
    """A deadline passed (boot, command or shutdown); QEMU was killed."""


class LabCrash(LabError):
    """QEMU exited (L1 panic, QEMU abort) or L1's init failed before the command ended."""


@dataclass
class LabResult:
    returncode: int
    output: str                 # the command's stdout+stderr, as the console showed it
    console: str                # the whole console, boot messages included
    out_dir: Path               # host path of $PYKVM_LAB_OUT after the run
    timings: Dict[str, float] = field(default_factory=dict)  # boot, command, total (s)
    wakeups: int = 0            # lost L1 wakeups the harness repaired (see pykvm.lab.monitor)


class StallGuard:
    """Repairs QEMU TCG's lost wakeup (see :mod:`pykvm.lab.monitor`): once QEMU has used
    no CPU for ``idle_after`` seconds, asks the monitor for L1's state and, if the CPU sits
    halted with a deliverable interrupt pending, wakes it with a key press."""

    def __init__(self, qemu: QemuProcess, monitor: Monitor, idle_after: float = 15.0,
                 report: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)) -> None:
        self.qemu, self.monitor, self.idle_after, self.report = qemu, monitor, idle_after, report
        self.wakeups = 0
        self._cpu = qemu.cpu_seconds()
        self._since = time.monotonic()

    def check(self) -> None:
        cpu, now = self.qemu.cpu_seconds(), time.monotonic()
        if cpu != self._cpu:
            self._cpu, self._since = cpu, now
            return
        if now - self._since < self.idle_after:
            return
        self._since = now  # look again only after another idle period
        vector = lost_wakeup(self.monitor.cpu_state())
        if vector is None:
            return
        try:
            self.monitor.press_key()
        except OSError as exc:
            self.report(f"pykvm lab: L1 sits halted with interrupt {vector} pending, and the wake-up failed: {exc}")
            return
        self.wakeups += 1
        self.report(f"pykvm lab: L1 sat halted for {self.idle_after:g} s with interrupt {vector} pending "
                    "(QEMU's TCG lost the wakeup); woke it with a key press")


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


@dataclass
class Lab:
    """A prepared lab. ``Lab.prepare()`` builds/locates everything, ``run()`` boots L1."""

    image: LabImage
    memory_mb: int = field(default_factory=lambda: _env_int("PYKVM_LAB_MEMORY_MB", 3072))
    cpus: int = field(default_factory=lambda: _env_int("PYKVM_LAB_CPUS", 1))
    boot_timeout: float = 120.0
    shutdown_timeout: float = 30.0
    # QEMU's monitor of the L1 that run() is running (None between runs): diagnostics, tests.
    monitor: Optional[Monitor] = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def prepare(cls, *, install: bool = False, progress: Progress = stderr_progress, **options) -> "Lab":
        return cls(prepare(install=install, progress=progress), **options)

    @property
    def kernel_path(self) -> Path:
        return self.image.kernel_path

    @property
    def modules_dir(self) -> Path:
        return self.image.modules_dir

    @property
    def kernel_version(self) -> str:
        return self.image.kernel_version

    def build_initramfs(
        self, path: Path, init_script: str, modules: Sequence[str],
        extra_files: Optional[Mapping[str, FileContent]] = None,
    ) -> List[str]:
        """An initramfs for a guest of this kernel (e.g. L2); see pykvm.lab.initramfs."""
        return build_initramfs(
            Path(path), init_script, modules, extra_files,
            modules_dir=self.modules_dir, busybox=self.image.busybox,
        )

    def _env(self, extra: Optional[Mapping[str, str]], interactive: bool = False) -> Dict[str, str]:
        """The command's environment; PYKVM_LAB_CACHE lets ``Lab.prepare()`` inside L1
        find this (read-only) cache, e.g. for the kernel an L2 guest boots;
        PYKVM_LAB_MODULES_DIR is the running kernel's lib/modules/<release>."""
        extra = {"PYKVM_LAB_CACHE": str(cache_root()), "PYKVM_LAB_MODULES_DIR": str(self.modules_dir), **(extra or {})}
        return guest.lab_env(os.environ, extra, interactive=interactive)

    def _write_job(self, out_dir: Path, argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> str:
        token = secrets.token_hex(8)
        job = out_dir / guest.JOB_DIR
        job.mkdir(parents=True, exist_ok=True)
        (job / "token").write_text(token + "\n")
        (job / "job.sh").write_text(guest.job_script(argv, cwd, env))
        (job / "kernel-modules").write_text(f"{self.modules_dir}\n")
        config = self.kernel_path.with_name(f"config-{self.kernel_version}")
        if config.exists():
            (job / "kernel-config").write_text(f"{config}\n")
        keep = guest.tmp_keep([cwd, *argv[:1], str(cache_root())])
        (job / "tmp-keep").write_text("\n".join(keep) + "\n")
        return token

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = 600.0,
        stream: Optional[LineSink] = None,
        console: Optional[LineSink] = None,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        out_dir: Optional[Path] = None,
    ) -> LabResult:
        """Boot L1, run ``argv`` there, return its status and output.

        ``stream`` gets each line of the command's output as it arrives, ``console`` every
        console line (boot included). ``timeout`` bounds the command (boot and shutdown
        have their own deadlines). ``out_dir`` (default: a new temp dir, left for the
        caller) becomes ``$PYKVM_LAB_OUT`` inside.
        """
        started = time.monotonic()
        out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="pykvm-lab-out-"))
        out.mkdir(parents=True, exist_ok=True)
        token = self._write_job(out, argv, cwd or os.getcwd(), self._env(env))
        parser = guest.ConsoleParser(token)
        lock = threading.Lock()
        began = threading.Event()
        ended = threading.Event()

        def on_line(line: str) -> None:
            with lock:
                is_output = parser.feed(line)
                if parser.began:
                    began.set()
                if parser.done or parser.failure:
                    ended.set()
            if console:
                console(line)
            if is_output and stream:
                stream(line)

        monitor_dir = tempfile.mkdtemp(prefix="pykvm-lab-qmp-")  # host-only: not in the shared out dir
        qmp = Path(monitor_dir) / "qmp.sock"
        qemu = QemuProcess(qemu_argv(self.image, out, memory_mb=self.memory_mb, cpus=self.cpus, qmp=qmp), on_line)
        self.monitor = monitor = Monitor(qmp)
        guard = StallGuard(qemu, monitor)
        timings: Dict[str, float] = {}
        try:
            self._await(qemu, began, self.boot_timeout, parser, "L1 to boot and start the command", guard)
            timings["boot"] = time.monotonic() - started
            self._await(qemu, ended, timeout, parser, "the command", guard)
            timings["command"] = time.monotonic() - started - timings["boot"]
            if qemu.wait(self.shutdown_timeout) is None:
                raise LabTimeout(f"L1 did not power off within {self.shutdown_timeout:g} s", guest.tail(parser.console))
            qemu.finish_reading()
        except LabError as exc:
            if isinstance(exc, LabTimeout) and qemu.poll() is None:
                exc.cpu_state = monitor.cpu_state()
            qemu.kill()  # drains the console, including a last line without newline
            with lock:
                exc.console_tail = guest.tail(parser.console)
            raise
        finally:
            qemu.kill()
            self.monitor = None
            shutil.rmtree(monitor_dir, ignore_errors=True)
        timings["total"] = time.monotonic() - started
        with lock:
            if parser.failure and not parser.done:
                raise LabCrash(f"L1's init failed: {parser.failure}", guest.tail(parser.console))
            return LabResult(parser.returncode, "\n".join(parser.output), "\n".join(parser.console), out, timings,  # type: ignore[arg-type]
                             guard.wakeups)

    @staticmethod
    def _await(qemu: QemuProcess, event: threading.Event, seconds: float, parser: guest.ConsoleParser, what: str,
               guard: StallGuard) -> None:
        deadline = time.monotonic() + seconds
        while not event.wait(0.1):
            guard.check()
            status = qemu.poll()
            if status is not None:
                qemu.finish_reading()
                if event.is_set():
                    return
                stderr = "\n".join(qemu.stderr_tail)
                detail = f" (QEMU said: {stderr.strip()})" if stderr.strip() else ""
                raise LabCrash(
                    f"QEMU exited (status {status}) while waiting for {what}: L1 panicked, "
                    f"powered off or QEMU failed{detail}",
                    guest.tail(parser.console),
                )
            if time.monotonic() > deadline:
                raise LabTimeout(f"timed out after {seconds:g} s waiting for {what}", guest.tail(parser.console))

    def shell(self, *, cwd: Optional[str] = None, env: Optional[Mapping[str, str]] = None) -> int:
        """An interactive shell in L1 on this terminal (Ctrl-A X quits QEMU)."""
        out = Path(tempfile.mkdtemp(prefix="pykvm-lab-out-"))
        shell = os.environ.get("SHELL") or "/bin/sh"
        self._write_job(out, [shell, "-i"], cwd or os.getcwd(), self._env(env, interactive=True))
        argv = qemu_argv(self.image, out, memory_mb=self.memory_mb, cpus=self.cpus, interactive=True)
        proc = subprocess.Popen(argv)
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
