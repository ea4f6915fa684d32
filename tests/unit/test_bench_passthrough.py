"""bench/passthrough_dma.py's pure parts: its read-mode specs and the reader's output lines
(the lab run itself is the bench, not a test)."""
from __future__ import annotations

import os
import sys

import pytest
from hypothesis import given, strategies as st

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
from passthrough_dma import mode_list, parse_cpu, parse_reads, reader_args  # noqa: E402

kinds = st.sampled_from(["sync", "irq", "poll"])
huge = st.sampled_from(["", "+huge"])
depths = st.integers(1, 256)


@given(kinds, huge, depths)
def test_a_mode_spec_becomes_the_readers_arguments(kind, suffix, depth):
    spec = f"{kind}{suffix}" if kind == "sync" else f"{kind}{suffix}:{depth}"
    assert mode_list(f" {spec} ,") == [spec]
    assert reader_args(spec) == [kind + suffix, "1" if kind == "sync" else str(depth)]


@pytest.mark.parametrize("bad", ["sync:2", "irq:x", "dd", "poll+small:4", "huge", "sync+huge+huge", "irq:-1",
                                 "irq:0", "poll:257"])
def test_a_malformed_mode_spec_is_refused(bad):
    with pytest.raises(ValueError, match="use sync, irq:N or poll:N"):
        mode_list(bad)


@given(st.lists(st.tuples(st.sampled_from(["sync", "sync+huge", "irq:4"]), st.integers(1, 1 << 30),
                          st.floats(1e-3, 100), st.floats(0, 100)), max_size=20))
def test_read_lines_give_mb_per_second_and_cpu_ms_per_mb_by_mode(passes):
    text = "".join(f"noise\nBENCH-READ {mode} {size} {secs:.6f} {cpu:.6f}\n" for mode, size, secs, cpu in passes)
    reads, cpu = parse_reads(text), parse_cpu(text)
    for mode in {m for m, *_ in passes}:
        mine = [(size, float(f"{secs:.6f}"), float(f"{c:.6f}")) for m, size, secs, c in passes if m == mode]
        assert reads[mode] == pytest.approx([size / secs / 1e6 for size, secs, _ in mine])
        assert cpu[mode] == pytest.approx([c * 1e3 / (size / 1e6) for size, _, c in mine])
    assert set(reads) == set(cpu) == {m for m, *_ in passes}
