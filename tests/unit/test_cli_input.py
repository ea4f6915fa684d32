"""`pykvm run`'s input before any VM exists: --timeout, the kernel and initrd files, TOML
config files, --[no-]stats, and the exit statuses that tell a configuration error from what
the guest did. Nothing here needs /dev/kvm: Machine() reads and checks everything first."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.cli import build_parser
from pykvm.vmm import cli as run_cli
from pykvm.vmm.boot import BootError
from pykvm.vmm.config import load_config
from pykvm.vmm.machine import EXIT_STATUS, ExitReason, Machine, MachineConfig, MachineError, check_timeout
from tests.unit.kernel_images import make_elf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def kernel(tmp_path) -> str:
    path = tmp_path / "k.elf"
    path.write_bytes(make_elf())
    return str(path)


def pykvm_run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pykvm", "run", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL)


# -- --timeout (review finding 4) ---------------------------------------------------------------
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(1 << 70), 1 << 70)))
def test_a_timeout_is_a_positive_finite_number_event_wait_accepts(value):
    ok = math.isfinite(value) and 0 < value <= threading.TIMEOUT_MAX
    if ok:
        assert check_timeout(value) == float(value)
    else:
        with pytest.raises(MachineError, match="positive, finite number of seconds"):
            check_timeout(value)


@pytest.mark.parametrize("value", [True, "10", [1]])
def test_a_timeout_that_is_not_a_number_is_refused(value):
    with pytest.raises(MachineError, match="number of seconds"):
        check_timeout(value)
    assert check_timeout(None) is None


@pytest.mark.parametrize("value", ["inf", "1e300", "nan", "-1", "0"])
def test_the_cli_refuses_an_unusable_timeout_with_status_2_and_no_traceback(kernel, value):
    """inf and 1e300 crashed in Event.wait (OverflowError, status 1); -1, 0 and nan 'timed out'
    at once with status 124."""
    p = pykvm_run("--kernel", kernel, "--console", "none", f"--timeout={value}")
    assert p.returncode == 2, p.stderr
    assert "--timeout must be a positive, finite number" in p.stderr and "Traceback" not in p.stderr


def test_a_config_file_timeout_is_checked_the_same(kernel, tmp_path):
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'kernel = "{kernel}"\ntimeout = inf\n')
    p = pykvm_run("--config", str(cfg), "--console", "none")
    assert p.returncode == 2 and "--timeout must be" in p.stderr, p.stderr


# -- the kernel and initrd files (review finding 5) -----------------------------------------------
def test_a_character_device_is_refused_before_reading(kernel):
    """/dev/zero was read to the end of memory (a MemoryError, or the OOM killer)."""
    with pytest.raises(MachineError, match="'/dev/zero' is a character device, not a regular file"):
        Machine(MachineConfig(kernel="/dev/zero", console="none"))
    with pytest.raises(MachineError, match="initrd '/dev/zero' is a character device"):
        Machine(MachineConfig(kernel=kernel, initrd="/dev/zero", console="none"))


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path, kernel):
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    errors: list = []

    def build() -> None:
        try:
            Machine(MachineConfig(kernel=kernel, initrd=fifo, console="none"))
        except MachineError as exc:
            errors.append(exc)

    t = threading.Thread(target=build, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # blocked in open(): let it go, then fail
        open(fifo, "wb").close()
        t.join(10)
        pytest.fail("opening the FIFO blocked")
    assert errors and "is a FIFO, not a regular file" in str(errors[0])


def test_a_file_larger_than_guest_ram_is_refused_before_reading(tmp_path, kernel):
    """An initrd larger than RAM is refused by its size; a kernel is mapped, not read (a vmlinux
    with debug information is larger than the RAM it needs), and judged by its first bytes."""
    big = tmp_path / "huge.img"
    with open(big, "wb") as f:
        f.truncate(1 << 40)  # sparse: 1 TiB that would take minutes and all memory to read
    with pytest.raises(BootError, match=r"initrd .* of 1 TiB does not fit in the guest's 16 MiB of RAM"):
        Machine(MachineConfig(kernel=kernel, initrd=str(big), memory="16M", console="none"))
    with pytest.raises(BootError, match="kernel is neither a bzImage"):
        Machine(MachineConfig(kernel=str(big), memory="16M", console="none"))


def test_a_pseudo_file_of_size_0_is_still_read(kernel):
    """/proc files report size 0: they are read (in bounded pieces) and judged by their bytes."""
    with pytest.raises(BootError, match="neither a bzImage"):
        Machine(MachineConfig(kernel="/proc/version", console="none"))


def test_a_machine_without_a_kernel_is_refused():
    with pytest.raises(MachineError, match="no kernel: pass --kernel"):
        Machine(MachineConfig(kernel=None, console="none"))


@pytest.mark.parametrize("field", ["kernel", "initrd"])
def test_an_empty_path_or_an_empty_initrd_is_refused(tmp_path, kernel, field):
    with pytest.raises(MachineError, match=f"the {field} path is empty"):
        Machine(MachineConfig(**{"kernel": kernel, field: ""}, console="none"))
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(MachineError, match="is empty: pass an initramfs"):
        Machine(MachineConfig(kernel=kernel, initrd=str(empty), console="none"))


# -- config files (review finding 12) -------------------------------------------------------------
def test_a_config_file_that_is_not_utf8_or_a_directory_is_named(tmp_path):
    binary = tmp_path / "vm.toml"
    binary.write_bytes(b'kernel = "k"\n\xff\xfe')
    with pytest.raises(MachineError, match=r"config file '.*vm.toml' is not UTF-8 text \(byte 0xff at offset 13\)"):
        load_config(str(binary))
    with pytest.raises(MachineError, match="is a directory: give the path of a TOML file"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("key", ["kernel", "initrd"])
def test_an_empty_path_in_a_config_file_is_refused(tmp_path, key):
    """initrd = "" used to become the config file's directory ("... is a directory")."""
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'{key} = ""\n' if key == "kernel" else f'kernel = "k"\n{key} = ""\n')
    with pytest.raises(MachineError, match=f"{key} is empty"):
        load_config(str(cfg))


def test_a_console_file_in_a_config_file_is_relative_to_it_like_kernel_and_initrd(tmp_path):
    sub = tmp_path / "vms"
    sub.mkdir()
    cfg = sub / "vm.toml"
    cfg.write_text('kernel = "k.elf"\ninitrd = "i.img"\nconsole = "file:logs/console.log"\n')
    data = load_config(str(cfg))
    assert data["kernel"] == str(sub / "k.elf") and data["initrd"] == str(sub / "i.img")
    assert data["console"] == f"file:{sub / 'logs/console.log'}"
    cfg.write_text(f'kernel = "k"\nconsole = "file:{tmp_path}/abs.log"\n')
    assert load_config(str(cfg))["console"] == f"file:{tmp_path}/abs.log"
    for spec in ("stdio", "none"):
        cfg.write_text(f'kernel = "k"\nconsole = "{spec}"\n')
        assert load_config(str(cfg))["console"] == spec


def test_an_integer_memory_in_a_config_file_explains_it_counts_bytes(tmp_path):
    cfg = tmp_path / "vm.toml"
    cfg.write_text('kernel = "k"\nmemory = 512\n')
    with pytest.raises(MachineError, match=r'memory = 512 is 512 bytes .*write memory = "512M"'):
        load_config(str(cfg))
    cfg.write_text(f'kernel = "k"\nmemory = {256 << 20}\n')
    assert load_config(str(cfg))["memory"] == 256 << 20


# -- --stats / --no-stats (review finding 12), --direct / --no-direct -------------------------------
@pytest.mark.parametrize("option", ["stats", "direct"])
@pytest.mark.parametrize("given,expected", [(None, True), ("--{}", True), ("--no-{}", False)])
def test_a_boolean_option_overrides_the_config_files_value(tmp_path, option, given, expected):
    """--stats/--no-stats and --direct/--no-direct over a config file that says true; alone they
    give what they say (nothing: false); a value that is not a boolean is refused."""
    flags = [given.format(option)] if given else []
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'kernel = "k"\n{option} = true\n')
    args = build_parser(["run"]).parse_args(["run", "--config", str(cfg), *flags])
    assert getattr(run_cli.config_from_args(args), option) is expected
    args = build_parser(["run"]).parse_args(["run", "--kernel", "k", *flags])
    assert getattr(run_cli.config_from_args(args), option) is (expected and flags != [])
    cfg.write_text(f'kernel = "k"\n{option} = "yes"\n')
    with pytest.raises(MachineError, match=option):
        run_cli.config_from_args(build_parser(["run"]).parse_args(["run", "--config", str(cfg)]))


# -- --memory (review finding 7) --------------------------------------------------------------------
def test_memory_in_bytes_is_bytes(kernel):
    p = pykvm_run("--kernel", kernel, "--console", "none", "--memory", "4096B")
    assert p.returncode == 2 and "below the minimum" in p.stderr, p.stderr


# -- exit statuses (review finding 9) ---------------------------------------------------------------
def test_a_configuration_error_and_every_guest_outcome_have_their_own_status():
    assert EXIT_STATUS[ExitReason.TRIPLE_FAULT] == 4 and EXIT_STATUS[ExitReason.CRASH] == 3
    assert EXIT_STATUS[ExitReason.TIMEOUT] == 124 and EXIT_STATUS[ExitReason.ERROR] == run_cli.VMM_ERROR == 1
    failures = [s for s in EXIT_STATUS.values() if s]
    assert len(failures) == len(set(failures))
    assert run_cli.CONFIG_ERROR == 2 not in EXIT_STATUS.values()
    assert run_cli.INTERRUPTED == 130


def test_a_machine_error_while_building_is_a_configuration_error(monkeypatch, kernel, capsys):
    """MachineError from build() (cpus above KVM's limit, guest RAM the host cannot give) was
    reported with status 1, like a VMM bug."""
    def fail(self):
        raise MachineError("this KVM allows at most 8 vCPUs per VM (asked for 9)")

    monkeypatch.setattr(Machine, "run", fail)
    args = build_parser(["run"]).parse_args(["run", "--kernel", kernel, "--console", "none"])
    assert run_cli.cmd_run(args) == run_cli.CONFIG_ERROR
    assert "at most 8 vCPUs" in capsys.readouterr().err


def test_a_device_given_twice_is_a_configuration_error_before_anything_opens(kernel):
    p = pykvm_run("--kernel", kernel, "--console", "none", "--vfio", "0000:00:05.0", "--vfio", "00:05.0")
    assert p.returncode == 2, p.stderr
    assert "0000:00:05.0 is given more than once" in p.stderr and "Traceback" not in p.stderr
