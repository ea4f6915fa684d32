"""L1's init script, the job script, and reading L1's console (pure logic)."""
from __future__ import annotations

import subprocess

from hypothesis import given, strategies as st

from pykvm.lab.devices import LAB_OUT_GUEST
from pykvm.lab.guest import (
    ConsoleParser, L1_MODULES, job_script, l1_init_script, lab_env, tmp_keep,
)


def test_init_script_mounts_loads_and_frames_the_command():
    init = l1_init_script()
    assert init.startswith("#!/bin/sh\n")
    assert "__" not in init.replace("__OUT__", "")  # every placeholder filled
    for needed in ("/bin/pykvm-load-modules", "mount -t 9p", "hostroot", "labout",
                   f"/host{LAB_OUT_GUEST}", "chroot /host", "-END rc=$rc", "poweroff -f"):
        assert needed in init
    assert init.index("-BEGIN") < init.index("chroot /host") < init.index("-END")
    assert {"kvm_amd", "vfio_pci", "vfio_iommu_type1", "9p", "nvme"} <= set(L1_MODULES)


def test_init_script_is_valid_shell():
    subprocess.run(["sh", "-n"], input=l1_init_script(), text=True, check=True)


@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=12),
                min_size=1, max_size=5))
def test_job_script_passes_any_argv_verbatim(argv):
    script = job_script(["printf", "%s\\0", *argv], "/", {"PATH": "/usr/bin:/bin"})
    done = subprocess.run(["sh", "-c", script], capture_output=True, check=True)
    assert done.stdout == "".join(a + "\0" for a in argv).encode()


def test_job_script_sets_exact_environment_and_cwd(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path / "home"), "X": "a b'c"}
    script = job_script(["sh", "-c", 'pwd; echo "$X"; env | sort'], str(tmp_path), env)
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == str(tmp_path) and out[1] == "a b'c"
    assert sorted(line.split("=", 1)[0] for line in out[2:]) == ["HOME", "PATH", "PWD", "X"]
    assert (tmp_path / "home").is_dir()


def test_job_script_reports_missing_cwd():
    script = job_script(["true"], "/nonexistent/dir", {"PATH": "/bin"})
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True)
    assert done.returncode == 125 and "/nonexistent/dir" in done.stderr


def test_tmp_keep_lists_top_level_tmp_entries():
    assert tmp_keep(["/tmp/ci/checkout", "/tmp/x", "/work/main", "/tmp", "/tmp/ci/y"]) == ["ci", "x"]


def test_lab_env():
    env = lab_env({"PATH": "/p", "PYKVM_REQUIRE_KVM": "1", "SECRET": "no", "TERM": "xterm"}, {"EXTRA": "1"})
    assert env["PATH"] == "/p" and env["PYKVM_REQUIRE_KVM"] == "1" and "SECRET" not in env
    assert env["PYKVM_IN_LAB"] == "1" and env["PYKVM_LAB_OUT"] == LAB_OUT_GUEST
    assert env["PYTHONPYCACHEPREFIX"] == "/tmp/pycache" and env["EXTRA"] == "1" and env["TERM"] == "dumb"


def _feed(parser, lines):
    return [line.rstrip("\r") for line in lines if parser.feed(line)]


def test_console_parser_frames_output_and_status():
    p = ConsoleParser("abc")
    lines = ["[    0.1] booting", "PYKVM-LAB-FAIL not yet", "PYKVM-LAB-abc-BEGIN\r",
             "hello\r", "PYKVM-LAB-abc-END rc=0 (fake)", "last-no-newlinePYKVM-LAB-abc-END rc=3",
             "[    2.9] reboot: Power down"]
    assert _feed(p, lines) == ["hello", "PYKVM-LAB-abc-END rc=0 (fake)"]
    assert p.output == ["hello", "PYKVM-LAB-abc-END rc=0 (fake)", "last-no-newline"]
    assert p.returncode == 3 and p.done
    assert p.failure == "not yet"
    assert len(p.console) == len(lines)


def test_console_parser_ignores_other_tokens_and_late_fail_lines():
    p = ConsoleParser("abc")
    _feed(p, ["PYKVM-LAB-abc-BEGIN", "PYKVM-LAB-xyz-END rc=1", "PYKVM-LAB-FAIL from the command"])
    assert not p.done and p.failure is None
    assert p.output == ["PYKVM-LAB-xyz-END rc=1", "PYKVM-LAB-FAIL from the command"]


@given(st.lists(st.text(st.characters(blacklist_characters="\r\n"), max_size=30), max_size=10), st.integers(0, 255))
def test_console_parser_roundtrip(output, status):
    token = "0123abcd"
    p = ConsoleParser(token)
    _feed(p, ["noise", f"PYKVM-LAB-{token}-BEGIN", *output, f"PYKVM-LAB-{token}-END rc={status}"])
    assert p.returncode == status
    assert p.output == output
