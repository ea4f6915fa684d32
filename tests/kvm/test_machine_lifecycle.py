"""How a Machine's run ends, on the real /dev/kvm with tiny guests (see test_machine.py for
how they are built): power-off only on fresh verdicts, --timeout with many vCPUs, SIGTERM and
SIGHUP on a terminal, the exit statuses, guest RAM the host cannot give, an initrd above
4 GiB and a command line that is not UTF-8. Every run is bounded by a timeout."""
from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Callable

import pytest

from pykvm.vmm import machine as machine_module
from pykvm.vmm.console import BufferConsole
from pykvm.vmm.halt_watch import HaltWatch
from pykvm.vmm.machine import HALT_CHECKS, ExitReason, Machine, MachineConfig, MachineError
from tests.conftest import fd_targets, require_or_skip
from tests.kvm.pty_run import pykvm_on_a_pty
from tests.unit.kernel_images import make_bzimage, make_elf

pytestmark = pytest.mark.kvm

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOAD = 0x10_0000
RUN_TIMEOUT = 20.0

MOV_DX_COM1 = b"\x66\xba\xf8\x03"  # mov dx, 0x3f8
OUT_DX_AL = b"\xee"
RESET = b"\xb0\xfe\xe6\x64"  # i8042: pulse the reset line
JMP_SELF = b"\xeb\xfe"
CLI_HLT = b"\xfa\xf4\xeb\xfd"  # cli ; hlt ; jmp back to hlt

AP_CODE = 0x8000  # SIPI vector 8
AP_STARTED = 0x8100  # the AP sets this byte once it runs
GO = 0x8200  # the test sets this byte to let the BSP go on


def print_byte(c: int) -> bytes:
    return MOV_DX_COM1 + bytes([0xB0, c]) + OUT_DX_AL


def wait_for_byte(addr: int) -> bytes:
    """64-bit: spin until the byte at ``addr`` is non-zero (no exits: plain memory reads)."""
    return b"\x80\x3c\x25" + struct.pack("<I", addr) + b"\x00" + b"\x74\xf6"  # cmp byte [addr], 0 ; je back


START_AP_1 = (
    b"\xbb\x00\x03\xe0\xfe"          # mov ebx, 0xfee00300 (LAPIC ICR low)
    b"\xc7\x43\x10\x00\x00\x00\x01"  # mov dword [rbx+0x10], 1 << 24 (ICR high: APIC ID 1)
    b"\xc7\x03\x00\x45\x00\x00"      # mov dword [rbx], 0x4500 (INIT)
    b"\xc7\x03\x08\x46\x00\x00"      # mov dword [rbx], 0x4608 (SIPI, vector 8)
)


def ap_code(then: bytes) -> bytes:
    """Real mode at 0x8000: print 'A', set the AP_STARTED byte, then ``then``."""
    return b"\xba\xf8\x03\xb0\x41\xee" + b"\xc6\x06" + struct.pack("<H", AP_STARTED) + b"\x01" + then


def elf_file(tmp_path, code: bytes, name: str = "guest.elf") -> str:
    path = tmp_path / name
    path.write_bytes(make_elf(((LOAD, code, max(len(code), 0x1000)),), entry=LOAD))
    return str(path)


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(params=["stats", "timer"])
def halt_checks(request, monkeypatch, kvm):
    """Both ways the machine looks for halted vCPUs: KVM's statistics (HaltWatch) or a timer."""
    if request.param == "timer":
        monkeypatch.setattr(HaltWatch, "open", classmethod(lambda cls, *args: None))
    return request.param


# -- power-off only on fresh verdicts (review finding 1) -------------------------------------------
def run_ap_then_halt(tmp_path, loop: str, ap_then: bytes, timeout: float):
    """The AP waits for its SIPI until it has HALT_CHECKS 'halted' verdicts; then the BSP starts
    it, waits until it runs, prints 'S' and halts with interrupts off."""
    bsp = wait_for_byte(GO) + START_AP_1 + wait_for_byte(AP_STARTED) + print_byte(ord("S")) + CLI_HLT
    con = BufferConsole()
    m = Machine(MachineConfig(kernel=elf_file(tmp_path, bsp), memory="16M", cpus=2, loop=loop), console=con)
    try:
        m.build()
        m.memory.write(AP_CODE, ap_code(ap_then))
        m.start()
        assert wait_until(lambda: m._halt_votes[1] >= HALT_CHECKS, 10.0), m._halt_votes
        assert m.exit is None
        m.memory.write(GO, b"\x01")
        result = m.wait(timeout)
    finally:
        m.close()
    return result, con.output, m


@pytest.mark.parametrize("loop", ["c", "python"])
def test_a_vote_from_boot_does_not_power_off_a_guest_whose_ap_runs(tmp_path, loop, halt_checks):
    """The reviewer's t_votes.py: the AP collected 'halted' votes while it waited for its SIPI;
    after the guest started it, it spins (never checked again, it is busy). The BSP then halts
    with interrupts off. The run used to end as 'poweroff' (status 0) with the AP running; now
    the confirming round finds the AP running, and the run goes on to its timeout."""
    result, output, m = run_ap_then_halt(tmp_path, loop, JMP_SELF, timeout=3.0)
    assert output == b"AS"
    assert result.reason is ExitReason.TIMEOUT, result
    assert m._halt_votes[1] == 0  # the round's fresh verdict replaced the stale ones


@pytest.mark.parametrize("loop", ["c", "python"])
def test_when_every_vcpu_halts_after_all_the_confirming_round_powers_off(tmp_path, loop, halt_checks):
    result, output, _ = run_ap_then_halt(tmp_path, loop, CLI_HLT, timeout=RUN_TIMEOUT)
    assert output == b"AS"
    assert result.reason is ExitReason.POWEROFF and result.status == 0, result


def test_a_power_off_with_many_vcpus_is_confirmed_in_one_round(tmp_path, kvm):
    """Eight vCPUs, seven never started, the BSP halts: one round, all verdicts 'halted'."""
    con = BufferConsole()
    m = Machine(MachineConfig(kernel=elf_file(tmp_path, print_byte(ord("x")) + CLI_HLT), memory="16M", cpus=8,
                              timeout=RUN_TIMEOUT), console=con)
    result = m.run()
    assert result.reason is ExitReason.POWEROFF and con.output == b"x", result


# -- --timeout with many vCPUs (review finding 2) ----------------------------------------------------
def test_kvm_statistics_are_open_before_any_vcpu_runs(tmp_path, kvm):
    """KVM_GET_STATS_FD takes the vCPU's mutex, which a thread in KVM_RUN holds: the machine
    opens every vCPU's statistics in build(), before a vCPU thread exists."""
    m = Machine(MachineConfig(kernel=elf_file(tmp_path, JMP_SELF), memory="16M", cpus=4), console=BufferConsole())
    try:
        m.build()
        if m._halt_watch is None:
            require_or_skip("PYKVM_REQUIRE_KVM", "this kernel has no KVM_GET_STATS_FD 'exits'/'blocking' statistics")
        assert len(m._halt_watch.stats) == 4 and m._threads == []
    finally:
        m.close()


def test_the_timeout_holds_with_many_vcpus(tmp_path, kvm):
    """64 vCPUs, the APs waiting for a SIPI that never comes: opening the statistics after the
    threads started took up to 0.25 s per vCPU (the reviewer: 49 s for --timeout 0.5 with 254;
    here about 9 s before the fix, 0.5 s after), and the timeout only started counting after that."""
    m = Machine(MachineConfig(kernel=elf_file(tmp_path, JMP_SELF), memory="16M", cpus=64, timeout=0.5),
                console=BufferConsole())
    t0 = time.monotonic()
    result = m.run()
    elapsed = time.monotonic() - t0
    assert result.reason is ExitReason.TIMEOUT and result.status == 124
    assert elapsed < 1.5, f"run() took {elapsed:.2f} s for --timeout 0.5"
    assert m.times.get("end") - m.times.get("vm built") < 1.0, m.times.table()


# -- the exit statuses (review finding 9) --------------------------------------------------------------
def pykvm_run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pykvm", "run", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL)


def test_a_triple_fault_has_its_own_exit_status(tmp_path, kvm):
    """2 was both 'triple fault' and 'configuration error' (and argparse's usage error)."""
    p = pykvm_run("--kernel", elf_file(tmp_path, b"\x0f\x0b" + JMP_SELF), "--memory", "16M", "--console", "none",
                  "--timeout", "20")  # ud2 with an empty IDT: #UD, #GP, #DF, shutdown
    assert p.returncode == 4, p.stderr
    assert "guest triple-fault" in p.stderr and "(exit status 4)" in p.stderr
    bad = pykvm_run("--kernel", str(tmp_path / "missing"), "--console", "none")
    assert bad.returncode == 2 and "does not exist" in bad.stderr


# -- guest RAM the host cannot give (review finding 8) -------------------------------------------------
def test_guest_ram_that_cannot_be_allocated_is_a_clear_configuration_error(tmp_path, monkeypatch, kvm):
    def no_memory(*args, **kwargs):
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(machine_module, "MemoryRegion", no_memory)
    m = Machine(MachineConfig(kernel=elf_file(tmp_path, JMP_SELF), memory="64M", console="none"))
    with pytest.raises(MachineError, match=r"cannot allocate 64 MiB of guest RAM: this host has .* of memory, "
                                           r".* available; lower --memory"):
        m.run()


def test_the_cli_reports_ram_the_host_cannot_give_and_leaves_no_console_file(tmp_path, kvm):
    """The reviewer's --memory 64G: '[Errno 12] Cannot allocate memory', status 1, and an empty
    console file left behind. 1 TiB is more than this host's RAM and swap under either
    heuristic (0) or strict (2) overcommit."""
    with open("/proc/sys/vm/overcommit_memory") as f:
        if f.read().strip() == "1":
            require_or_skip("PYKVM_REQUIRE_KVM", "vm.overcommit_memory=1: the kernel grants any mapping")
    log = tmp_path / "console.log"
    p = pykvm_run("--kernel", elf_file(tmp_path, JMP_SELF), "--memory", "1T", "--console", f"file:{log}",
                  "--timeout", "5")
    assert p.returncode == 2, p.stderr
    assert "cannot allocate 1 TiB of guest RAM" in p.stderr and "this host has" in p.stderr
    assert "lower --memory" in p.stderr and "Traceback" not in p.stderr
    assert not log.exists()


# -- SIGTERM and SIGHUP on a terminal (review finding 3) ---------------------------------------------
@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_end_the_run_and_restore_the_terminal(tmp_path, kvm, signo):
    """`kill`, `timeout`, systemd or a closed ssh session: the process used to die with the
    terminal still raw (no echo, no line editing)."""
    path = elf_file(tmp_path, print_byte(ord("r")) + print_byte(ord("\n")) + JMP_SELF)
    with pykvm_on_a_pty(["--kernel", path, "--memory", "16M", "--timeout", "30"], b"r\n") as run:
        run.process.send_signal(signo)
        assert run.process.wait(20) == 128 + signo
        err = run.process.stderr.read().decode()
        assert f"stopped by {signal.Signals(signo).name} (exit status {128 + signo})" in err, err
        assert termios.tcgetattr(run.slave) == run.before


# -- an initrd above 4 GiB (review finding 6) ----------------------------------------------------------
def test_an_initrd_that_fits_only_above_4g_is_loaded_there(tmp_path, kvm):
    """A bzImage with XLF_CAN_BE_LOADED_ABOVE_4G whose initrd_addr_max (32 MiB here) leaves no
    room below: the initrd goes to the top of RAM above 4 GiB, and the guest reads the high half
    of its address from the zero page's ext_ramdisk_image (it prints it as a digit)."""
    image = bytearray(make_bzimage(initrd_addr_max=0x1FF_FFFF, xloadflags=0x3))
    code = (b"\x8b\x86\xc0\x00\x00\x00"  # mov eax, [rsi + 0xc0] (ext_ramdisk_image)
            b"\x04\x30"                  # add al, '0'
            ) + MOV_DX_COM1 + OUT_DX_AL + RESET + JMP_SELF
    entry = (image[0x1F1] + 1) * 512 + 0x200  # the protected-mode kernel's 64-bit entry
    image[entry:entry + len(code)] = code
    (tmp_path / "bz").write_bytes(bytes(image))
    initrd = bytes(range(256)) * (16 << 12)  # 16 MiB
    (tmp_path / "initrd").write_bytes(initrd)
    con = BufferConsole()
    m = Machine(MachineConfig(kernel=str(tmp_path / "bz"), initrd=str(tmp_path / "initrd"), memory="3136M"),
                console=con)
    try:
        addr, size = m.plan.initrd
        assert addr >= 1 << 32 and size == len(initrd)
        m.start()
        result = m.wait(RUN_TIMEOUT)
        assert m.memory.read(addr, 4096) == initrd[:4096] and m.memory.read(addr + size - 4096, 4096) == initrd[-4096:]
    finally:
        m.close()
    assert result.reason is ExitReason.RESET, result
    assert con.output == b"1"


# -- what a closed machine leaves behind ---------------------------------------------------------------
def test_a_closed_machine_leaves_no_drain_thread_or_eventfd(tmp_path, kvm):
    """The C loop's UART drain thread and its eventfd went IDLE_EXIT (1 s) after the run, so a
    closed machine still held an fd for a while; close() ends them (a test that counts fds right
    after a machine's run saw one vanish under it)."""
    def eventfds() -> int:
        return fd_targets().count("anon_inode:[eventfd]")

    before = eventfds()
    con = BufferConsole()
    m = Machine(MachineConfig(kernel=elf_file(tmp_path, MOV_DX_COM1 + b"\xb0\x44" + OUT_DX_AL + RESET + JMP_SELF),
                              memory="16M", timeout=RUN_TIMEOUT), console=con)
    result = m.run()  # builds, runs in the C loop, closes
    assert result.reason is ExitReason.RESET and con.output == b"D", result
    assert eventfds() == before
    assert not [t for t in threading.enumerate() if t.name == "pykvm-uart-drain"]


# -- a vmlinux larger than guest RAM ------------------------------------------------------------------
def test_a_vmlinux_larger_than_guest_ram_boots_when_its_segments_fit(tmp_path, kvm):
    """An ELF kernel with 1 GiB after its segments (as a vmlinux with debug information has)
    boots in 16 MiB: the file is mapped, and only its loaded segments are read."""
    path = elf_file(tmp_path, MOV_DX_COM1 + b"\xb0\x44" + OUT_DX_AL + RESET + JMP_SELF)  # mov al, 'D'
    os.truncate(path, 1 << 30)
    con = BufferConsole()
    m = Machine(MachineConfig(kernel=path, memory="16M", timeout=RUN_TIMEOUT), console=con)
    result = m.run()
    assert result.reason is ExitReason.RESET, result
    assert con.output == b"D"


# -- a command line that is not UTF-8 (review finding 12) ----------------------------------------------
def test_a_command_line_that_is_not_utf8_reaches_the_guest_byte_for_byte(tmp_path, kvm):
    """The guest prints the command line from the boot plan's address until its NUL."""
    from pykvm.vmm.layout import CMDLINE_ADDR

    code = (b"\xbe" + struct.pack("<I", CMDLINE_ADDR)  # mov esi, CMDLINE_ADDR
            + MOV_DX_COM1
            + b"\xac"                                  # again: lodsb
            + b"\x84\xc0"                              # test al, al
            + b"\x74\x03"                              # jz done
            + OUT_DX_AL                                # out dx, al
            + b"\xeb\xf8"                              # jmp again
            ) + RESET + JMP_SELF                       # done:
    arg = b"a=\xff b"  # argv bytes; Python's sys.argv holds the 0xff as the surrogate '\udcff'
    p = subprocess.run([os.fsencode(sys.executable), b"-m", b"pykvm", b"run", b"--kernel",
                        os.fsencode(elf_file(tmp_path, code)), b"--memory", b"16M", b"--timeout", b"20",
                        b"--cmdline", arg], capture_output=True, timeout=60, cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert p.stdout == b"a=\xff b"


# -- the C loop's UART lock under contention (review finding 12) ---------------------------------------
def test_several_vcpus_writing_the_uart_at_once_lose_no_byte(tmp_path, kvm):
    """Seven APs write THR at the same time (the C loop's transmit path takes uart_lock for
    each byte) on a host with fewer CPUs than vCPU threads, where a lock holder gets preempted:
    the lock now spins with pause and yields the CPU after a while. Every byte arrives and the
    run ends."""
    cpus, n = 8, 2000
    ap = (b"\xba\xf8\x03"                        # mov dx, 0x3f8
          + b"\xb9" + struct.pack("<H", n)        # mov cx, n
          + b"\xb0\x61\xee"                       # again: mov al, 'a' ; out dx, al
          + b"\xe2\xfb"                           # loop again
          + b"\xf0\xfe\x06" + struct.pack("<H", AP_STARTED)  # lock inc byte [AP_STARTED]
          ) + CLI_HLT
    bsp = (b"\xbb\x00\x03\xe0\xfe"               # mov ebx, 0xfee00300 (ICR low)
           b"\xc7\x03\x00\x45\x0c\x00"           # INIT to all but self
           b"\xc7\x03\x08\x46\x0c\x00"           # SIPI vector 8 to all but self
           + b"\x80\x3c\x25" + struct.pack("<I", AP_STARTED) + bytes([cpus - 1])  # wait: cmp byte [..], cpus-1
           + b"\x75\xf6"                          # jne wait
           + print_byte(ord("B")) + RESET + JMP_SELF)
    con = BufferConsole()
    m = Machine(MachineConfig(kernel=elf_file(tmp_path, bsp), memory="16M", cpus=cpus), console=con)
    try:
        m.build()
        m.memory.write(AP_CODE, ap)
        m.start()
        result = m.wait(60.0)
    finally:
        m.close()
    assert result.reason is ExitReason.RESET, result
    assert con.output == b"a" * (n * (cpus - 1)) + b"B"
    assert sum(s.c_handled["IO"] for s in m.exit_stats()) >= n * (cpus - 1)  # THR answered in C
