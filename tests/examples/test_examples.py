"""Every example runs as its own process on the real /dev/kvm and prints what it teaches.

Each example is checked for the observable result it claims (the sum, the RIP
sequence, the dirty pages, the eventfd count, the interrupt vector, ...). An
example exits with status 77 when this KVM cannot show its mechanism (PVM has
no 32-bit paging); that is a skip carrying the example's own explanation, and a
failure under PYKVM_REQUIRE_KVM=1 unless tests/lab/test_kvm_in_lab.py re-runs the
test in L1 (example 03). A second test assembles each listing's comments with GNU as
(binutils, which gcc brings with scripts/build-deps; a failure under
PYKVM_REQUIRE_KVM=1 when missing) and checks they match the hand-written bytes, so
the listings cannot drift.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from tests.conftest import require_or_skip

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
UNSUPPORTED = 77
TIMEOUT = 60


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    __tracebackhide__ = True  # a skip shows the test's line
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=TIMEOUT)
    if proc.returncode == UNSUPPORTED:
        require_or_skip("PYKVM_REQUIRE_KVM", f"{name}: {proc.stdout.strip().splitlines()[-1]}")
    return proc


def output_of(name: str, *args: str) -> str:
    proc = run_example(name, *args)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr == ""
    return proc.stdout


def lines_in_order(out: str, *expected: str) -> None:
    """Each expected line appears, in this order, as a whole output line."""
    lines = out.splitlines()
    pos = 0
    for want in expected:
        assert want in lines[pos:], f"missing {want!r} after line {pos} in:\n{out}"
        pos = lines.index(want, pos) + 1


@pytest.mark.kvm
@pytest.mark.parametrize("a, b, digits", [(19, 23, "42"), (40, 2, "42"), (0, 0, "00"), (50, 49, "99"), (3, 4, "07")])
def test_01_real_mode_hello_prints_the_sum(kvm, a, b, digits):
    out = output_of("01_real_mode_hello.py", str(a), str(b))
    lines_in_order(out,
                   f"guest: 20 bytes at 0x1000, real mode, AX={a} BX={b}",
                   f"exit IO: out port 0x3f8 size 1 value b'{digits[0]}'",
                   f"exit IO: out port 0x3f8 size 1 value b'{digits[1]}'",
                   "exit IO: out port 0x3f8 size 1 value b'\\n'",
                   "exit HLT at rip=0x1014",
                   f"guest printed: {digits}")


@pytest.mark.kvm
def test_01_default_numbers_and_bad_input(kvm):
    assert output_of("01_real_mode_hello.py").splitlines()[-1] == "guest printed: 42"
    proc = run_example("01_real_mode_hello.py", "60", "40")
    assert proc.returncode != 0 and "sum is below 100" in proc.stderr


@pytest.mark.kvm
def test_02_protected_mode_switch_loads_flat_segments(kvm):
    out = output_of("02_protected_mode.py")
    lines_in_order(out,
                   "GDT[1] code: ff ff 00 00 00 9b cf 00",
                   "GDT[2] data: ff ff 00 00 00 93 cf 00",
                   "cs: selector=0x8 base=0x0 limit=0xffffffff db=1",
                   "ds: selector=0x10 base=0x0 limit=0xffffffff",
                   "exit IO: out port 0x10 size 4 value 0xcafef00e",
                   "guest read 0xcafef00d at 0x1ffff0 and sent back 0xcafef00e")
    assert re.search(r"^after the switch: cr0=0x[0-9a-f]*1 \(PE=1\)$", out, re.M)


@pytest.mark.kvm
def test_03_paging32_maps_higher_half_and_sets_dirty_bit(kvm):
    out = output_of("03_paging32.py")
    lines_in_order(out,
                   "PTE for 0xc0000000 before: 0x00008003 (P|W)",
                   "KVM_TRANSLATE 0xc0000000 -> physical 0x8000 valid=1",
                   "exit IO: out port 0x10 value 0x600dcafe",
                   "guest wrote 0x600dcafe at virtual 0xc0000000; host reads 0x600dcafe at physical 0x8000",
                   "PTE for 0xc0000000 after: 0x00008063 (P|W|A|D)")


@pytest.mark.kvm
def test_04_long_mode_computes_64_bits_through_4_levels(kvm):
    out = output_of("04_long_mode.py")
    lines_in_order(out,
                   "page tables: PML4 at 0x2000, 6 more tables at 0x3000",
                   "KVM_TRANSLATE 0xffff800000000000 -> physical 0xf000 valid=1",
                   "exit IO: out port 0x10 values 0xaaccef10, 0x22446688",
                   "64-bit result: 0x22446688aaccef10",
                   "host reads 0x1122334455667788 at physical 0xf000 "
                   "(the guest wrote it at virtual 0xffff800000000000)")
    assert re.search(r"^sregs: cr0=0x8000001[13] cr3=0x2000 cr4=0x20 efer=0x5\d\d cs.l=1 cs.db=0$", out, re.M)


@pytest.mark.kvm
def test_05_mmio_read_answered_by_host(kvm):
    out = output_of("05_mmio.py")
    lines_in_order(out,
                   "exit MMIO read  0xd0000 len 4: host answers 0x1234abcd",
                   "exit MMIO write 0xd0004 len 4: guest stored 0x1234abce",
                   "exit HLT",
                   "guest EAX = 0x1234abce; device register 4 = 0x1234abce")


@pytest.mark.kvm
def test_06_readonly_memslot_turns_writes_into_mmio(kvm):
    out = output_of("06_readonly_memslot.py")
    lines_in_order(out,
                   "memslot 1: 0x20000+0x1000 READONLY, holds b'PYKVM ROM'",
                   "exit IO: guest read b'P' from the ROM",
                   "exit MMIO write 0x20000 len 1 data b'X' (is_write=True)",
                   "exit IO: guest read b'P' from the ROM",
                   "exit HLT",
                   "ROM still holds b'PYKVM ROM'")


@pytest.mark.kvm
def test_07_single_step_rip_sequence(kvm):
    out = output_of("07_single_step.py")
    lines_in_order(out,
                   "exit DEBUG #1 pc=0x1003 dr6.BS=1 ax=0 cx=3",
                   "exit DEBUG #1 pc=0x1009 dr6.BS=1 ax=6 cx=0",
                   "exit IO: out port 0x10 value 6 (the sum)",
                   "RIP sequence: 0x1000 0x1003 0x1005 0x1007 0x1005 0x1007 0x1005 0x1007 0x1009")
    assert len(re.findall(r"^exit DEBUG", out, re.M)) == 8
    assert re.search(r"^debug off: ran to HLT, rip=0x100c$", out, re.M)


@pytest.mark.kvm
def test_08_dirty_log_reports_written_pages_per_round(kvm):
    out = output_of("08_dirty_log.py")
    lines_in_order(out,
                   "before running: dirty pages []",
                   "round 1: dirty pages [1, 4, 9]",
                   "round 2: dirty pages [4, 15]",
                   "asked again: dirty pages []")


@pytest.mark.kvm
def test_09_ioeventfd_counts_writes_without_exits(kvm):
    out = output_of("09_ioeventfd.py")
    assert re.search(r"^without ioeventfd: 1000 guest writes, 1000 IO exits to userspace", out, re.M)
    assert re.search(r"^with ioeventfd: +1000 guest writes, 0 IO exits to userspace", out, re.M)
    assert "eventfd count: 1000" in out.splitlines()


@pytest.mark.kvm
def test_10_irqfd_and_irq_line_reach_the_guest_handler(kvm):
    out = output_of("10_irqfd.py")
    lines_in_order(out,
                   "exit IO: port 0x11: guest set up its IVT and PIC, now sti; hlt",
                   "run(timeout=0.3) -> INTR: no exit while halted; mp_state=HALTED")
    assert re.search(r"^eventfd write \(irqfd\): the handler reported vector 0x25 on port 0x10 0\.[2-9]\d s", out, re.M)
    assert re.search(r"^KVM_IRQ_LINE pulse: the handler reported vector 0x25 on port 0x10 0\.[2-9]\d s", out, re.M)


@pytest.mark.kvm
def test_11_msr_filter_sends_denied_accesses_to_the_host(kvm):
    out = output_of("11_msr_filter.py")
    lines_in_order(out,
                   "exit RDMSR of 0x174: answered by the host with 0x1234abcd",
                   "guest read 0x174 = 0x1234abcd",
                   "guest read 0x175 = 0x5555 (KVM, no exit)",
                   "exit WRMSR of 0x174: the guest wrote 0xcafe",
                   "guest halted")


@pytest.mark.kvm
def test_12_dirty_ring_harvests_the_pages_written_per_round(kvm):
    out = output_of("12_dirty_ring.py")
    lines_in_order(out,
                   "before running: harvested []",
                   "round 1: harvested pages [1, 4, 9]",
                   "round 1: KVM_RESET_DIRTY_RINGS reset 3 entries",
                   "round 2: harvested pages [4, 15]",
                   "round 2: KVM_RESET_DIRTY_RINGS reset 2 entries",
                   "asked again: harvested []")


@pytest.mark.kvm
def test_13_machine_check_reaches_the_guest_handler(kvm):
    out = output_of("13_machine_check.py")
    assert re.search(r"^KVM_X86_SETUP_MCE: IA32_MCG_CAP 0x[0-9a-f]+ \(\d+ banks\)$", out, re.M)
    lines_in_order(out,
                   "corrected error: no #MC (the guest ran on to its next hlt, rip 0x1002); "
                   "KVM_GET_MSRS: MC0_STATUS ADDRV|EN|VAL code 0x0005",
                   "uncorrected error: the guest's #MC handler read MC0_STATUS ADDRV|EN|UC|OVER|VAL code 0x0134, "
                   "MC0_ADDR 0x7f000, MCG_STATUS 0x5 (MCIP|RIPV)")


def example_files() -> List[Path]:
    return sorted(EXAMPLES.glob("[01][0-9]_*.py"))  # 2x: VFIO examples, tested with the lab


def test_every_example_has_a_test_and_a_docstring():
    tested = {m.group(1) for m in re.finditer(r"^def test_(\d\d)_", Path(__file__).read_text(), re.M)}
    for path in example_files():
        assert path.name[:2] in tested, f"{path.name} has no test here"
        text = path.read_text()
        assert text.startswith('"""') and "Run: python3 examples/" in text, f"{path.name}: docstring missing"


# -- the listings: hex bytes and the assembly in their comments agree ------------------
LISTING_LINE = re.compile(r'^\s*(?:\w+ = bytes\.fromhex\()?"([0-9a-f ]*)"\s*#\s*([^;]*)')
MODE_LINE = re.compile(r"^# (\.code(?:16|32|64))$")


def listings(path: Path):
    """(mode, bytes, assembly lines) for each ``# .codeNN`` listing in an example."""
    block = None
    for line in path.read_text().splitlines() + [""]:
        mode = MODE_LINE.match(line)
        code = LISTING_LINE.match(line)
        if mode:
            block = (mode.group(1), [], [])
        elif block and code:
            block[1].append(code.group(1))
            block[2].append(code.group(2).strip())
        elif block and block[2]:
            yield block[0], bytes.fromhex("".join(block[1])), block[2]
            block = None


def assemble(mode: str, lines: List[str], tmp: Path) -> bytes:
    src = tmp / "listing.s"
    src.write_text(".intel_syntax noprefix\n" + mode + "\n" + "\n".join(lines) + "\n")
    arch = "--64" if mode == ".code64" else "--32"
    subprocess.run(["as", arch, "-o", str(tmp / "l.o"), str(src)], check=True, capture_output=True, text=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp / "l.o"), str(tmp / "l.bin")], check=True)
    return (tmp / "l.bin").read_bytes()


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_listing_bytes_match_their_assembly(path, tmp_path):
    if not (shutil.which("as") and shutil.which("objcopy")):
        require_or_skip("PYKVM_REQUIRE_KVM", "GNU as/objcopy (binutils) not installed: listings not cross-checked")
    found = list(listings(path))
    assert found, f"{path.name} has no '# .codeNN' listing"
    for mode, code, asm in found:
        assert assemble(mode, asm, tmp_path) == code, f"{path.name} {mode}: bytes differ from:\n" + "\n".join(asm)
