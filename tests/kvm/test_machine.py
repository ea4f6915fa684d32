"""The Machine on the real /dev/kvm, with tiny guests instead of Linux.

Each guest is a hand-assembled x86-64 "kernel" in an ELF file: the machine
loads it like a vmlinux and enters it in long mode through the 64-bit boot
protocol, so these runs go through the same path as a Linux boot (boot plan,
CPUID/MSR/LAPIC setup, irqchip, devices, vCPU threads, C run loop). Linux
itself boots only in the lab (tests/lab/test_boot_linux.py).
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from typing import List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.vmm.console import BufferConsole
from pykvm.vmm.cpu import LEAF_BRAND, host_cpu_brand
from pykvm.vmm.machine import ExitReason, Machine, MachineConfig, MachineError
from pykvm.vmm.boot import BootError
from pykvm.vmm.layout import LayoutError
from tests.conftest import fd_targets
from tests.unit.kernel_images import make_bzimage, make_elf

pytestmark = pytest.mark.kvm

LOAD = 0x10_0000  # 1 MiB
RUN_TIMEOUT = 20.0

# 64-bit snippets
MOV_DX_COM1 = b"\x66\xba\xf8\x03"  # mov dx, 0x3f8
OUT_DX_AL = b"\xee"
RESET = b"\xb0\xfe\xe6\x64"  # mov al, 0xfe ; out 0x64, al  (i8042: pulse the reset line)
JMP_SELF = b"\xeb\xfe"
CLI_HLT = b"\xfa\xf4\xeb\xfd"  # cli ; hlt ; jmp back to hlt


def mov_al(v: int) -> bytes:
    return bytes([0xB0, v & 0xFF])


def print_bytes(text: bytes) -> bytes:
    return b"".join(MOV_DX_COM1 + mov_al(c) + OUT_DX_AL for c in text)


@pytest.fixture
def kernel_file(tmp_path, kvm):
    """Write a tiny guest as an ELF kernel; returns its path."""
    def write(code: bytes, name: str = "guest.elf") -> str:
        path = tmp_path / name
        path.write_bytes(make_elf(((LOAD, code, max(len(code), 0x1000)),), entry=LOAD))
        return str(path)
    return write


def run(kernel: str, console: BufferConsole = None, **config) -> Tuple[Machine, BufferConsole]:
    console = console or BufferConsole()
    config.setdefault("memory", "16M")
    config.setdefault("timeout", RUN_TIMEOUT)
    m = Machine(MachineConfig(kernel=kernel, **config), console=console)
    m.run()
    return m, console


def test_uart_output_reaches_the_console_through_the_c_loop(kernel_file):
    m, con = run(kernel_file(print_bytes(b"hello, pykvm\n") + RESET + JMP_SELF))
    assert con.output == b"hello, pykvm\n"
    assert m.exit.reason is ExitReason.RESET and m.exit.status == 0
    (stats,) = m.exit_stats()
    assert stats.c_handled["IO"] >= len(b"hello, pykvm\n")  # THR writes answered in C
    assert stats.python_handled["IO"] >= 1  # the i8042 reset went to Python


def test_console_input_reaches_a_guest_reading_the_uart(kernel_file):
    # Echo every received byte; reset after 'q'. LSR polling exercises the C loop's cached LSR.
    code = (
        b"\x66\xba\xfd\x03"  # 0: mov dx, 0x3fd (LSR)
        b"\xec"              # 4: in al, dx
        b"\xa8\x01"          # 5: test al, 1 (DR)
        b"\x74\xfb"          # 7: jz 4
        b"\x66\xba\xf8\x03"  # 9: mov dx, 0x3f8
        b"\xec"              # 13: in al, dx (RBR)
        b"\xee"              # 14: out dx, al (THR)
        b"\x3c\x71"          # 15: cmp al, 'q'
        b"\x75\xed"          # 17: jne 0
    ) + RESET + JMP_SELF
    con = BufferConsole()
    con.send(b"typed 40 bytes, more than the FIFO holds q")
    m, _ = run(kernel_file(code), console=con)
    assert con.output == b"typed 40 bytes, more than the FIFO holds q"
    assert m.exit.reason is ExitReason.RESET


def test_absent_legacy_ports_read_all_ones_answered_in_c(kernel_file):
    # COM2's LSR and the Super I/O index port: nothing is there, so both read 0xFF (an empty
    # ISA bus); the guest echoes what it read to COM1, then resets.
    echo = MOV_DX_COM1 + OUT_DX_AL
    code = b"\x66\xba\xfd\x02\xec" + echo + b"\xe4\x2e" + echo + RESET + JMP_SELF  # in al, 0x2fd / in al, 0x2e
    m, con = run(kernel_file(code))
    assert con.output == b"\xff\xff"
    (stats,) = m.exit_stats()
    assert stats.c_handled["IO"] == 4  # two absent-port reads and two THR writes, all in C
    assert stats.python_handled["IO"] == 1  # only the i8042 reset went to Python


def test_c_and_python_loops_agree(kernel_file):
    path = kernel_file(print_bytes(b"same\n") + RESET + JMP_SELF)
    results = []
    for loop in ("c", "python"):
        m, con = run(path, loop=loop)
        (stats,) = m.exit_stats()
        results.append((con.output, m.exit.reason, dict(stats.exits)))
    assert results[0] == results[1]
    assert results[0][2]["IO"] == 6  # five THR writes and the reset


def test_halt_with_interrupts_off_is_a_power_off(kernel_file):
    m, con = run(kernel_file(print_bytes(b"bye\n") + CLI_HLT), cpus=2)
    assert con.output == b"bye\n"
    assert m.exit.reason is ExitReason.POWEROFF and m.exit.status == 0


def test_timeout_ends_a_spinning_guest(kernel_file):
    m, _ = run(kernel_file(JMP_SELF), timeout=1.0)
    assert m.exit.reason is ExitReason.TIMEOUT and m.exit.status == 124


def test_guest_starts_an_ap_with_init_sipi_and_each_cpu_sees_its_apic_id(kernel_file):
    ap = (  # real mode at 0x8000 (SIPI vector 8): print CPUID.1:EBX[31:24] + '0', set a flag, halt
        b"\x66\xb8\x01\x00\x00\x00"  # mov eax, 1
        b"\x0f\xa2"                  # cpuid
        b"\x66\xc1\xeb\x18"          # shr ebx, 24
        b"\x88\xd8\x04\x30"          # mov al, bl ; add al, '0'
        b"\xba\xf8\x03\xee"          # mov dx, 0x3f8 ; out dx, al
        b"\xc6\x06\x00\x81\x01"      # mov byte [0x8100], 1
    ) + CLI_HLT
    bsp = (
        b"\xbb\x00\x03\xe0\xfe"          # mov ebx, 0xfee00300 (LAPIC ICR low)
        b"\xc7\x43\x10\x00\x00\x00\x01"  # mov dword [rbx+0x10], 1 << 24 (ICR high: APIC ID 1)
        b"\xc7\x03\x00\x45\x00\x00"      # mov dword [rbx], 0x4500 (INIT)
        b"\xc7\x03\x08\x46\x00\x00"      # mov dword [rbx], 0x4608 (SIPI, vector 8)
        b"\x80\x3c\x25\x00\x81\x00\x00\x00"  # wait: cmp byte [0x8100], 0
        b"\x74\xf6"                      # je wait
        b"\xb8\x01\x00\x00\x00\x0f\xa2"  # mov eax, 1 ; cpuid
        b"\xc1\xeb\x18\x88\xd8\x04\x30"  # shr ebx, 24 ; mov al, bl ; add al, '0'
    ) + MOV_DX_COM1 + OUT_DX_AL + RESET + JMP_SELF
    con = BufferConsole()
    m = Machine(MachineConfig(kernel=kernel_file(bsp), memory="16M", cpus=2, timeout=RUN_TIMEOUT), console=con)
    try:
        m.build()
        m.memory.write(0x8000, ap)
        m.start()
        result = m.wait(RUN_TIMEOUT)
    finally:
        m.close()
    assert con.output == b"10"  # the AP (APIC ID 1) printed first, then the BSP (0)
    assert result.reason is ExitReason.RESET


def test_guest_reads_the_host_cpu_brand_string(kernel_file):
    """KVM leaves CPUID 0x80000002-4 zero; pykvm fills them with the host's brand, as QEMU's
    -cpu host does, so the guest's /proc/cpuinfo names a model."""
    code = b""
    for i, leaf in enumerate(LEAF_BRAND):
        code += b"\xb8" + struct.pack("<I", leaf) + b"\x0f\xa2"  # mov eax, leaf ; cpuid
        for j, modrm in enumerate((0x04, 0x1C, 0x0C, 0x14)):  # mov [0x8000 + 16i + 4j], eax/ebx/ecx/edx
            code += bytes([0x89, modrm, 0x25]) + struct.pack("<I", 0x8000 + 16 * i + 4 * j)
    m = Machine(MachineConfig(kernel=kernel_file(code + RESET + JMP_SELF), memory="16M", timeout=RUN_TIMEOUT),
                console=BufferConsole())
    try:
        m.start()
        result = m.wait(RUN_TIMEOUT)
        brand = m.memory.read(0x8000, 48)
    finally:
        m.close()
    assert result.reason is ExitReason.RESET
    assert brand.split(b"\0")[0].decode() == host_cpu_brand()[:47] != ""


# -- a misbehaving guest -------------------------------------------------------------
IN_SIZES = {1: b"\xec", 2: b"\x66\xed", 4: b"\xed"}  # in al/ax/eax, dx
OUT_SIZES = {1: b"\xee", 2: b"\x66\xef", 4: b"\xef"}  # out dx, al/ax/eax
# Unbacked guest-physical space below 4 GiB (the guest's identity map ends there):
# above RAM up to the I/O APIC (the APIC pages are in-kernel devices, left alone).
MMIO_SPACE = (16 << 20, 0xFEC0_0000)

port_access = st.tuples(st.just("pio"), st.booleans(), st.integers(0, 0xFFFF), st.sampled_from([1, 2, 4]),
                        st.integers(0, 0xFFFF_FFFF))
mmio_access = st.tuples(st.just("mmio"), st.booleans(), st.integers(*MMIO_SPACE).map(lambda a: a & ~3),
                        st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF))


def access_code(kind: str, write: bool, addr: int, size: int, value: int) -> bytes:
    load_eax = b"\xb8" + struct.pack("<I", value)  # mov eax, imm32
    if kind == "pio":
        code = b"\x66\xba" + struct.pack("<H", addr) + load_eax  # mov dx, port
        return code + (OUT_SIZES if write else IN_SIZES)[size]
    code = b"\xbb" + struct.pack("<I", addr) + load_eax  # mov ebx, addr
    op = {1: b"\x88\x03" if write else b"\x8a\x03", 2: b"\x66\x89\x03" if write else b"\x66\x8b\x03",
          4: b"\x89\x03" if write else b"\x8b\x03"}[size]  # mov [rbx], al/ax/eax (or the load)
    return code + op


def touches_console_or_reset(accesses: List[tuple]) -> bool:
    return any(kind == "pio" and write and (0x60 <= addr + size - 1 and addr <= 0x64 or 0x3F8 <= addr + size - 1 and addr <= 0x3FF)
               for kind, write, addr, size, _ in accesses)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the file is rewritten per example
@given(st.lists(st.one_of(port_access, mmio_access), min_size=1, max_size=12))
def test_random_port_and_mmio_accesses_never_crash_the_vmm(kernel_file, accesses):
    code = b"".join(access_code(*a) for a in accesses) + print_bytes(b"D") + RESET + JMP_SELF
    m, con = run(kernel_file(code), timeout=RUN_TIMEOUT)
    assert m.exit.reason in (ExitReason.RESET, ExitReason.TRIPLE_FAULT, ExitReason.POWEROFF), m.exit
    if not touches_console_or_reset(accesses):
        assert con.output == b"D" and m.exit.reason is ExitReason.RESET


def test_triple_fault_ends_the_run_without_crashing_the_vmm(kernel_file):
    code = b"\x0f\x0b" + JMP_SELF  # ud2 with the boot IDT (limit 0): #UD -> #GP -> #DF -> shutdown
    m, _ = run(kernel_file(code), timeout=3.0)
    assert m.exit.reason is ExitReason.TRIPLE_FAULT and m.exit.status == 4, m.exit


# -- bad input: clear errors before any VM or vCPU exists -----------------------------
def kvm_fds() -> List[str]:
    return [t for t in fd_targets() if t.startswith(("anon_inode:kvm-vm", "anon_inode:kvm-vcpu"))]


@pytest.mark.parametrize("case", ["missing-kernel", "truncated-bzimage", "wrong-machine-elf", "initrd-too-large",
                                  "memory-0", "cmdline-too-long", "missing-initrd", "too-many-cpus"])
def test_bad_input_is_refused_before_any_vcpu_exists(tmp_path, case):
    elf = tmp_path / "k.elf"
    elf.write_bytes(make_elf())
    kwargs = dict(kernel=str(elf), memory="32M", console="none")
    error = MachineError
    if case == "missing-kernel":
        kwargs["kernel"], match = str(tmp_path / "nope"), "does not exist"
    elif case == "truncated-bzimage":
        (tmp_path / "bz").write_bytes(make_bzimage()[:0x400])
        kwargs["kernel"], error, match = str(tmp_path / "bz"), BootError, "truncated"
    elif case == "wrong-machine-elf":
        elf.write_bytes(make_elf(machine=183))
        error, match = BootError, "AArch64"
    elif case == "initrd-too-large":
        with open(tmp_path / "initrd", "wb") as f:
            f.truncate(64 << 20)
        kwargs["initrd"], error, match = str(tmp_path / "initrd"), BootError, "does not fit"
    elif case == "memory-0":
        kwargs["memory"], error, match = "0", LayoutError, "positive"
    elif case == "cmdline-too-long":
        kwargs["cmdline"], error, match = "x" * 3000, BootError, "command line"
    elif case == "missing-initrd":
        kwargs["initrd"], match = str(tmp_path / "nope.img"), "does not exist"
    else:
        kwargs["cpus"], match = 1000, "cpus"
    before = kvm_fds()
    with pytest.raises(error, match=match):
        Machine(MachineConfig(**kwargs))
    assert kvm_fds() == before == []


def test_cli_reports_a_bad_kernel_and_exits_2(tmp_path):
    (tmp_path / "bz").write_bytes(make_bzimage()[:0x300])
    p = subprocess.run([sys.executable, "-m", "pykvm", "run", "--kernel", str(tmp_path / "bz"), "--console", "none"],
                       capture_output=True, text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.returncode == 2
    assert "pykvm run:" in p.stderr and "truncated" in p.stderr


def test_cli_runs_a_tiny_guest_from_a_config_file(tmp_path, kernel_file):
    path = kernel_file(print_bytes(b"cfg\n") + RESET + JMP_SELF)
    out = tmp_path / "console.txt"
    cfg = tmp_path / "vm.toml"
    cfg.write_text(f'kernel = "{path}"\nmemory = "16M"\nconsole = "file:{out}"\nstats = true\nmarker = "cfg"\ntimeout = 20\n')
    p = subprocess.run([sys.executable, "-m", "pykvm", "run", "--config", str(cfg)], capture_output=True, text=True,
                       timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == b"cfg\n"
    assert "guest reset" in p.stderr and "guest marker" in p.stderr and "IO" in p.stderr


def test_stdio_console_raw_mode_escape_quits_and_restores_the_terminal(kernel_file):
    import termios

    from tests.kvm.pty_run import pykvm_on_a_pty

    path = kernel_file(print_bytes(b"ready\n") + JMP_SELF)  # spins until the user quits
    with pykvm_on_a_pty(["--kernel", path, "--memory", "16M", "--timeout", "30"], b"ready") as run:
        os.write(run.master, b"\x01x")  # Ctrl-A x
        assert run.process.wait(20) == 0
        assert "guest stopped" in run.process.stderr.read().decode()
        assert termios.tcgetattr(run.slave) == run.before


def test_boot_marker_from_a_port_write_and_from_console_text(kernel_file):
    code = print_bytes(b"booted\n") + b"\x66\xba\xf0\x03" + OUT_DX_AL + RESET + JMP_SELF  # out 0x3f0 (MARKER_PORT)
    m, _ = run(kernel_file(code))
    t = m.times
    assert t.get("first vCPU entry") <= t.get("guest marker") <= t.get("end")
    m2, _ = run(kernel_file(print_bytes(b"login: \n") + RESET + JMP_SELF, "b.elf"), marker="login:")
    assert m2.times.get("guest marker") is not None


def test_config_file_errors_name_the_key(tmp_path):
    from pykvm.vmm.config import load_config

    bad = tmp_path / "vm.toml"
    bad.write_text('kernel = "k"\nmemroy = "1G"\n')
    with pytest.raises(MachineError, match="memroy"):
        load_config(str(bad))
    bad.write_text('kernel = "k"\ncpus = "two"\n')
    with pytest.raises(MachineError, match="cpus must be int"):
        load_config(str(bad))


def test_a_busy_guest_is_not_kicked_to_look_for_a_power_off(kernel_file, kvm):
    """KVM's statistics (HaltWatch) tell a vCPU that works from one that sleeps: a guest that
    writes a port for a second and then halts with interrupts off gets kicked only
    to confirm the power-off (two checks), not four times a second while it works.

    The guest times its second with its TSC (which KVM runs at the rate KVM_GET_TSC_KHZ
    reports), so the loop lasts as long whatever a port exit costs on this host."""
    with kvm.create_vm() as vm:
        tsc_hz = vm.create_vcpu(0).get_tsc_khz() * 1000
    span = 1.0  # seconds
    code = (b"\x0f\x31"                              # rdtsc
            + b"\x48\xc1\xe2\x20\x48\x09\xd0"        # shl rdx, 32 ; or rax, rdx
            + b"\x48\x89\xc6"                        # mov rsi, rax (the start)
            + b"\x49\xb8" + struct.pack("<Q", int(span * tsc_hz))  # mov r8, span in TSC ticks
            + b"\xe6\x80"                            # again: out 0x80, al (the POST port, answered in C)
            + b"\x0f\x31\x48\xc1\xe2\x20\x48\x09\xd0"  # rdtsc ; shl rdx, 32 ; or rax, rdx
            + b"\x48\x29\xf0"                        # sub rax, rsi
            + b"\x4c\x39\xc0"                        # cmp rax, r8
            + b"\x72\xed"                            # jb again
            + CLI_HLT)
    m, _ = run(kernel_file(code))
    assert m.exit.reason is ExitReason.POWEROFF, m.exit
    (stats,) = m.exit_stats()
    busy = (stats.run_ns["IO"] + stats.handle_ns["IO"]) / 1e9  # in the guest and in the VMM, port by port
    assert stats.exits["IO"] >= 1000, stats.exits  # it worked by exiting, not by spinning in the guest
    assert busy > 0.75 * span, f"the port loop took only {busy:.2f} s: too short to tell"
    assert stats.exits.get("INTR", 0) <= 3, stats.exits  # a 4 Hz timer would have kicked ~4 per second


def test_stats_show_what_kvm_counted_in_the_kernel(kernel_file, tmp_path):
    """`pykvm run --stats` adds KVM's own counters (KVM_GET_STATS_FD): every exit the kernel
    saw, here at least the guest's port writes (answered in pykvm's C loop) and the halt."""
    writes = 50
    kernel = kernel_file(b"".join(b"\xe6\x80" for _ in range(writes)) + CLI_HLT)  # out 0x80, al
    m, _ = run(kernel)
    (kstats,) = m.kernel_stats
    assert kstats["exits"] >= writes
    proc = subprocess.run([sys.executable, "-m", "pykvm", "run", "--kernel", kernel, "--memory", "16M",
                           "--console", "none", "--stats", "--timeout", "20"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = next(l for l in proc.stderr.splitlines() if l.startswith("in KVM"))
    assert int(line.split("VM exits ")[1].split(",")[0]) >= writes, line
