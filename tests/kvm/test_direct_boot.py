"""Direct boot (``--direct``) on the real /dev/kvm: a synthetic bzImage whose compressed payload
is a tiny ELF "kernel". pykvm decompresses it (once: the vmlinux cache), loads the ELF's data
extents and enters it at e_entry in long mode with the bzImage's own setup header in the zero
page. The guest prints what it finds there and resets. Every run is bounded by a timeout."""
from __future__ import annotations

import gc
import os
import struct
import subprocess
import sys

import pytest

from pykvm.vmm import machine as machine_module
from pykvm.vmm.boot import BootError
from pykvm.vmm.console import BufferConsole
from pykvm.vmm.machine import EXIT_STATUS, ExitReason, Machine, MachineConfig
from tests.conftest import fd_targets
from tests.kvm.test_machine_lifecycle import (
    JMP_SELF, MOV_DX_COM1, OUT_DX_AL, RESET, ROOT, RUN_TIMEOUT, pykvm_run,
)
from tests.unit.kernel_images import make_elf
from tests.unit.test_vmlinux_cache import reports_holes
from tests.unit.test_payload import (
    STDLIB_FORMATS, bzimage_with_payload, compress, corrupt_middle, tiny_elf, xz_stream,
)

pytestmark = pytest.mark.kvm

KERNEL = 0x100_0000  # the ELF's entry and first segment (a vmlinux's LOAD_PHYSICAL_ADDR)
MARK = KERNEL + 0x3000  # 'K', after two zero pages (holes in the cached file)
HOLE = KERNEL + 0x1800  # in a zero page the VMM does not write
BSS = KERNEL + 0x3001  # the first byte past the segment's filesz; the file has 0xAA there
CMDLINE_SIZE = 123  # the bzImage header's (a vmlinux without one gets 2047)
CMDLINE = "direct ok"
EXPECTED = f"{CMDLINE_SIZE}:K00:{CMDLINE}".encode()

ADD_AL_0 = b"\x04\x30"  # add al, '0'


def load_al(addr: int) -> bytes:
    return b"\x8a\x04\x25" + struct.pack("<I", addr)  # mov al, [addr]


# Long mode, rsi = boot_params. Prints hdr.cmdline_size as three digits, ':', the byte at MARK,
# the bytes at HOLE and BSS as digits ('0' for zero), ':', the command line (hdr.cmd_line_ptr).
GUEST = (
    b"\x0f\xb6\x86\x38\x02\x00\x00"                # movzx eax, byte [rsi + 0x238] (cmdline_size)
    + b"\xb1\x64\xf6\xf1\x88\xe7"                  # mov cl, 100 ; div cl ; mov bh, ah
    + ADD_AL_0 + MOV_DX_COM1 + OUT_DX_AL           # hundreds
    + b"\x0f\xb6\xc7\xb1\x0a\xf6\xf1\x88\xe7"      # movzx eax, bh ; mov cl, 10 ; div cl ; mov bh, ah
    + ADD_AL_0 + OUT_DX_AL                         # tens
    + b"\x88\xf8" + ADD_AL_0 + OUT_DX_AL           # mov al, bh: ones
    + b"\xb0:" + OUT_DX_AL
    + load_al(MARK) + OUT_DX_AL
    + load_al(HOLE) + ADD_AL_0 + OUT_DX_AL
    + load_al(BSS) + ADD_AL_0 + OUT_DX_AL
    + b"\xb0:" + OUT_DX_AL
    + b"\x8b\xb6\x28\x02\x00\x00"                  # mov esi, [rsi + 0x228] (cmd_line_ptr)
    + b"\xac\x84\xc0\x74\x03" + OUT_DX_AL + b"\xeb\xf8"  # again: lodsb ; test al, al ; jz done ; out ; jmp again
    + RESET + JMP_SELF                             # done:
)
# The first segment: code, zeros to MARK, 'K'; then .bss (memsz > filesz). The second segment's
# bytes (0xAA) follow the first in the file, so a loader that copied past filesz would put them in .bss.
GUEST_ELF = make_elf(((KERNEL, GUEST.ljust(MARK - KERNEL, b"\0") + b"K", 0x6000),
                      (KERNEL + 0x40_0000, b"\xaa" * 0x100, 0x100)), entry=KERNEL)
assert GUEST_ELF[GUEST_ELF.index(b"K\xaa") + 1] == 0xAA
GUEST_ELF_B = GUEST_ELF.replace(b"K\xaa", b"B\xaa")  # another kernel: prints B where this one prints K


def guest_bzimage(tmp_path, fmt: str = "xz", name: str = "bzImage") -> str:
    path = tmp_path / name
    path.write_bytes(bzimage_with_payload(compress(fmt, GUEST_ELF), cmdline_size=CMDLINE_SIZE))
    return str(path)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "kernel-cache"
    monkeypatch.setenv("PYKVM_KERNEL_CACHE", str(directory))
    return directory


def boot(kernel: str, **config):
    con = BufferConsole()
    m = Machine(MachineConfig(kernel=kernel, direct=True, memory="64M", cmdline=CMDLINE, timeout=RUN_TIMEOUT,
                              **config), console=con)
    plan, notes = m.plan, m.notes
    result = m.run()
    return plan, result, con.output, notes


@pytest.mark.parametrize("fmt", STDLIB_FORMATS)
def test_a_direct_boot_runs_the_decompressed_kernel_then_boots_from_the_cache(tmp_path, kvm, cache, fmt):
    kernel = guest_bzimage(tmp_path, fmt)
    plan, result, output, notes = boot(kernel)
    assert plan.kind == "direct" and plan.entry == KERNEL
    assert result.reason is ExitReason.RESET, result
    assert output == EXPECTED
    assert len(notes) == 1 and "--direct: decompressed the kernel" in notes[0] and str(cache) in notes[0]
    entries = sorted(cache.glob("*.vmlinux"))
    assert len(entries) == 1 and entries[0].read_bytes() == GUEST_ELF
    # the second boot: from the cache, the same guest
    plan, result, output, notes = boot(kernel)
    assert plan.kind == "direct"
    assert result.reason is ExitReason.RESET, result
    assert output == EXPECTED
    assert notes == []
    assert sorted(cache.glob("*.vmlinux")) == entries


def test_bss_reads_zero_and_data_after_holes_is_where_it_belongs(tmp_path, kvm, cache):
    """The output's 'K00': the byte after two zero pages (holes in the cached file, not written)
    is at its address, the zero page reads zero, and .bss, which the VMM does not write and
    whose file bytes would be 0xAA, reads zero. Checked on the guest's RAM after the run too."""
    con = BufferConsole()
    m = Machine(MachineConfig(kernel=guest_bzimage(tmp_path), direct=True, memory="64M", cmdline=CMDLINE),
                console=con)
    try:
        written = [(a, len(d)) for a, d in m.plan.writes if KERNEL <= a < KERNEL + 0x6000]
        assert not any(a < KERNEL + 0x6000 and BSS < a + n for a, n in written), written  # .bss untouched
        if reports_holes(cache):  # nor the zero pages: holes in the cache (where the file system keeps holes)
            assert not any(a <= HOLE < a + n for a, n in written), written
        m.start()
        result = m.wait(RUN_TIMEOUT)
        assert m.memory.read(MARK, 2) == b"K\0" and m.memory.read(HOLE, 16) == bytes(16)
        assert m.memory.read(BSS, KERNEL + 0x6000 - BSS) == bytes(KERNEL + 0x6000 - BSS)
    finally:
        m.close()
    assert result.reason is ExitReason.RESET, result
    assert con.output[4:7] == b"K00" and con.output == EXPECTED


def test_without_direct_the_same_bzimage_is_booted_as_a_bzimage(tmp_path, cache):
    """Its protected-mode part is the payload, not code: only the plan is checked, nothing runs."""
    m = Machine(MachineConfig(kernel=guest_bzimage(tmp_path), memory="64M"), console=BufferConsole())
    try:
        assert m.plan.kind == "bzimage" and m.plan.entry == 0x100_0000 + 0x200
    finally:
        m.close()
    assert not cache.exists()  # nothing decompressed, nothing cached


def test_the_cli_boots_direct_and_says_it_decompressed_only_the_first_time(tmp_path, kvm, cache):
    kernel = guest_bzimage(tmp_path)
    args = ("--kernel", kernel, "--direct", "--memory", "64M", "--timeout", "20", "--cmdline", CMDLINE)
    first = pykvm_run(*args)
    assert first.returncode == EXIT_STATUS[ExitReason.RESET] == 0, first.stderr
    assert first.stdout == EXPECTED.decode()
    assert "decompressed the kernel" in first.stderr and "guest reset" in first.stderr
    second = pykvm_run(*args)
    assert second.returncode == 0, second.stderr
    assert second.stdout == EXPECTED.decode()
    assert "decompressed" not in second.stderr and "guest reset" in second.stderr
    assert len(list(cache.glob("*.vmlinux"))) == 1


ELF = tiny_elf()


@pytest.mark.parametrize("payload,message", [
    pytest.param(xz_stream(ELF) + struct.pack("<I", len(ELF) + 1),
                 f"xz payload decompressed to {len(ELF)} bytes, not the {len(ELF) + 1} its trailer", id="trailer"),
    pytest.param(b"\x00" * 64 + struct.pack("<I", len(ELF)), "which is no compression Linux uses", id="magic"),
    pytest.param(corrupt_middle(xz_stream(ELF)) + struct.pack("<I", len(ELF)), "xz payload does not decompress",
                 id="corrupt-xz-stream"),
])
def test_a_corrupt_payload_with_direct_is_a_configuration_error(tmp_path, kvm, cache, payload, message):
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(bzimage_with_payload(payload))
    p = pykvm_run("--kernel", str(kernel), "--direct", "--memory", "64M", "--timeout", "20")
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 2, p.stderr
    assert "pykvm run: the bzImage's " in p.stderr and message in p.stderr and "corrupt image" in p.stderr
    assert p.stdout == "" and "guest" not in p.stderr  # no vCPU ran
    assert not cache.exists() or not list(cache.iterdir())


# -- the kernel file changing under pykvm (review of the direct boot) -----------------------------
def test_a_kernel_replaced_while_pykvm_starts_is_cached_under_the_file_it_read(tmp_path, kvm, cache, monkeypatch):
    """The bzImage is replaced (rename, as installkernel does) right after pykvm opened it: this
    boot runs the kernel it read, and its cache entry carries that file's identity, so the next
    boot decompresses and runs the new kernel instead of a cache hit on the old one."""
    kernel = guest_bzimage(tmp_path)
    incoming = tmp_path / "incoming"
    incoming.write_bytes(bzimage_with_payload(compress("xz", GUEST_ELF_B), cmdline_size=CMDLINE_SIZE))
    read_file = machine_module._read_file

    def read_then_replace(path, *args, **kwargs):
        data = read_file(path, *args, **kwargs)
        if path == kernel and incoming.exists():
            os.replace(incoming, kernel)
        return data

    monkeypatch.setattr(machine_module, "_read_file", read_then_replace)
    _, result, output, notes = boot(kernel)
    assert result.reason is ExitReason.RESET and output == EXPECTED and notes, (result, output)
    monkeypatch.setattr(machine_module, "_read_file", read_file)
    _, result, output, notes = boot(kernel)
    assert result.reason is ExitReason.RESET, result
    assert output == EXPECTED.replace(b"K", b"B") and notes, (output, notes)


TRUNCATE_AND_RUN = """
import os, sys
from pykvm.vmm.console import BufferConsole
from pykvm.vmm.machine import Machine, MachineConfig
kernel, direct, cache = sys.argv[1], sys.argv[2] == "direct", sys.argv[3]
con = BufferConsole()
m = Machine(MachineConfig(kernel=kernel, direct=direct, memory="64M", cmdline="direct ok", timeout=20), console=con)
for d, _, names in os.walk(cache):
    for name in names:
        os.truncate(os.path.join(d, name), 0)
os.truncate(kernel, 0)
result = m.run()
sys.stdout.write(f"{result.reason.value} {con.output.decode()}")
"""


@pytest.mark.parametrize("how", ["direct", "elf"])
def test_a_kernel_file_truncated_after_machine_init_does_not_kill_the_vmm(tmp_path, kvm, cache, how):
    """`cp` or a kernel build rewrites the file in place (O_TRUNC) between Machine() and run():
    the boot plan holds its own bytes, so the guest still boots what was read (a view of the
    mapped file would have been a SIGBUS). For --direct, the cache entry is truncated too."""
    if how == "direct":
        kernel = guest_bzimage(tmp_path)
        assert boot(kernel)[2] == EXPECTED  # fills the cache: the run below maps the entry
        expected = EXPECTED
    else:
        kernel = str(tmp_path / "vmlinux")
        (tmp_path / "vmlinux").write_bytes(GUEST_ELF)
        expected = b"255:K00:direct ok"  # a synthetic header: cmdline_size 2047, low byte 255
    p = subprocess.run([sys.executable, "-c", TRUNCATE_AND_RUN, kernel, how, str(cache)], capture_output=True,
                       timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert p.returncode == 0, (p.returncode, p.stderr.decode(errors="replace")[-2000:])
    assert p.stdout == b"reset " + expected


def files_in_use():
    """(what this process's fds point at, its /proc/self/maps text)."""
    with open("/proc/self/maps") as f:
        return set(fd_targets()), f.read()


def test_no_fd_or_mapping_of_the_kernel_or_its_cache_entry_outlives_the_plan(tmp_path, kvm, cache):
    kernel = guest_bzimage(tmp_path)
    boot(kernel)  # fills the cache
    entry = str(next(cache.glob("*.vmlinux")))
    for direct in (True, False):
        m = Machine(MachineConfig(kernel=kernel, direct=direct, memory="64M", cmdline=CMDLINE), console=BufferConsole())
        try:
            fds, maps = files_in_use()
            assert kernel not in fds and entry not in fds, fds
            assert kernel not in maps and entry not in maps
        finally:
            m.close()


@pytest.mark.parametrize("direct", [False, True])
def test_a_kernel_refused_by_the_boot_plan_leaves_no_fd_or_mapping(tmp_path, kvm, cache, direct):
    """The plan's error (a command line over the header's limit), held by the caller, must not
    keep the mapped kernel file or cache entry alive through its traceback's frames."""
    kernel = guest_bzimage(tmp_path)
    if direct:
        boot(kernel)  # fills the cache: the failing run maps the entry
    gc_was = gc.isenabled()
    gc.disable()
    try:
        with pytest.raises(BootError, match="command line") as held:  # the error stays alive below
            Machine(MachineConfig(kernel=kernel, direct=direct, memory="64M", cmdline="x" * 300),
                    console=BufferConsole())
        assert held.value.__traceback__ is not None
        fds, maps = files_in_use()
    finally:
        if gc_was:
            gc.enable()
    names = [kernel] + [str(p) for p in cache.glob("*.vmlinux")]
    assert not [n for n in names if n in fds or n in maps], (fds, names)
