"""The stats-file parser (pykvm.kvm.stats) over synthetic files laid out with the sizes and
offsets cffi reports for struct kvm_stats_header / kvm_stats_desc: pure computation, no kernel."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from typing import List, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm._native import ffi, lib
from pykvm.errors import KvmError
from pykvm.kvm.stats import KvmStats, StatBase, StatDesc, StatsLayout, StatType, StatUnit, pread_exact

HEADER = "struct kvm_stats_header"
DESC = "struct kvm_stats_desc"
U64 = ffi.sizeof("__u64")

Spec = Tuple[str, int, int, int, int, int]  # name, flags, exponent, size, offset, bucket_size


def header_bytes(**fields: int) -> bytes:
    return bytes(ffi.buffer(ffi.new(HEADER + " *", fields)))


def desc_bytes(spec: Spec, name_size: int) -> bytes:
    """One descriptor as the kernel writes it: the struct, its name at offsetof(name), padded."""
    name, flags, exponent, size, offset, bucket_size = spec
    buf = ffi.new("char[]", ffi.sizeof(DESC) + name_size)
    d = ffi.cast(DESC + " *", buf)
    d.flags, d.exponent, d.size, d.offset, d.bucket_size = flags, exponent, size, offset, bucket_size
    raw = name.encode()
    ffi.memmove(buf + ffi.offsetof(DESC, "name"), raw, len(raw))
    return bytes(ffi.buffer(buf))


def stats_file(ident: str, specs: List[Spec], name_size: int, block: bytes, gaps=(0, 0, 0), flags: int = 0) -> bytes:
    """header | gap | id | gap | descriptors | gap | data block, with the header's offsets."""
    id_offset = ffi.sizeof(HEADER) + gaps[0]
    desc_offset = id_offset + name_size + gaps[1]
    data_offset = desc_offset + len(specs) * (ffi.sizeof(DESC) + name_size) + gaps[2]
    head = header_bytes(flags=flags, name_size=name_size, num_desc=len(specs), id_offset=id_offset,
                        desc_offset=desc_offset, data_offset=data_offset)
    image = bytearray(data_offset + len(block))
    image[:len(head)] = head
    image[id_offset:id_offset + len(ident)] = ident.encode()
    for i, spec in enumerate(specs):
        at = desc_offset + i * (ffi.sizeof(DESC) + name_size)
        image[at:at + ffi.sizeof(DESC) + name_size] = desc_bytes(spec, name_size)
    image[data_offset:] = block
    return bytes(image)


def pread_over(image: bytes, chunk: int = 1 << 30):
    """A pread(size, offset) on bytes that returns at most ``chunk`` bytes per call."""
    return lambda size, offset: image[offset:offset + min(size, chunk)]


def expected_values(specs: List[Spec], block: bytes) -> dict:
    out = {}
    for name, _, _, size, offset, _ in specs:
        values = tuple(int.from_bytes(block[offset + U64 * k:offset + U64 * (k + 1)], sys.byteorder)
                       for k in range(size))
        out[name] = values[0] if size == 1 else values
    return out


@st.composite
def stats_files(draw):
    name_size = draw(st.integers(8, 64))
    names = draw(st.lists(st.text("abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=name_size - 1),
                          max_size=12, unique=True))
    specs = [(name, draw(st.integers(0, 2**32 - 1)), draw(st.integers(-(2**15), 2**15 - 1)),
              draw(st.integers(0, 8)), draw(st.integers(0, 256)), draw(st.integers(0, 2**32 - 1)))
             for name in names]
    end = max((off + U64 * size for _, _, _, size, off, _ in specs), default=0)
    block = draw(st.binary(min_size=end, max_size=end + 16))
    ident = draw(st.text("kvm-0123456789/cpu", max_size=name_size - 1))
    gaps = draw(st.tuples(st.integers(0, 40), st.integers(0, 40), st.integers(0, 40)))
    return ident, specs, name_size, block, gaps, draw(st.integers(0, 2**32 - 1))


@given(stats_files(), st.integers(1, 64))
def test_values_come_back_by_name(case, chunk):
    ident, specs, name_size, block, gaps, flags = case
    image = stats_file(ident, specs, name_size, block, gaps, flags)
    layout = StatsLayout.read(pread_over(image, chunk))  # short reads are continued
    h = layout.header
    assert (h.flags, h.name_size, h.num_desc) == (flags, name_size, len(specs))
    assert layout.id == ident
    assert [(d.name, d.flags, d.exponent, d.size, d.offset, d.bucket_size) for d in layout.descriptors] == specs
    want = expected_values(specs, block)
    assert layout.read_data(pread_over(image, chunk)) == want
    assert layout.decode(block) == want
    for d in layout.descriptors:
        own = block[d.offset:d.offset + U64 * d.size]
        assert layout.decode_one(d, own) == want[d.name]


@given(st.integers(0, 2**32 - 1), st.integers(-(2**15), 2**15 - 1))
def test_any_flags_decode_without_raising(flags, exponent):
    d = StatDesc("x", flags, exponent, 1, 0, 0)
    for field, enum_type, mask in ((d.type, StatType, lib.KVM_STATS_TYPE_MASK),
                                   (d.unit, StatUnit, lib.KVM_STATS_UNIT_MASK),
                                   (d.base, StatBase, lib.KVM_STATS_BASE_MASK)):
        assert field == flags & mask  # the raw number is always kept
        assert isinstance(field, enum_type) == (flags & mask in set(enum_type))
    assert isinstance(d.unit_label, str)
    assert (d.scale is None) == (not isinstance(d.base, StatBase))
    assert d.is_histogram == (d.type in (StatType.LINEAR_HIST, StatType.LOG_HIST))


def test_the_enums_hold_what_the_header_defines():
    assert {"CUMULATIVE", "INSTANT", "PEAK", "LINEAR_HIST", "LOG_HIST"} <= set(StatType.__members__)
    assert {"NONE", "BYTES", "SECONDS", "CYCLES", "BOOLEAN"} <= set(StatUnit.__members__)
    assert {"POW10", "POW2"} <= set(StatBase.__members__)
    assert StatType.LOG_HIST == lib.KVM_STATS_TYPE_LOG_HIST and StatUnit.SECONDS == lib.KVM_STATS_UNIT_SECONDS
    assert not {"SHIFT", "MASK", "MAX"} & set(StatType.__members__)


@pytest.mark.parametrize("unit, base, exponent, label, scale", [
    ("SECONDS", "POW10", -9, "ns", 1e-9),
    ("SECONDS", "POW10", -7, "10^-7 s", 1e-7),
    ("BYTES", "POW2", 10, "KiB", 1024.0),
    ("BYTES", "POW2", 0, "B", 1.0),
    ("CYCLES", "POW10", 0, "cycles", 1.0),
    ("BOOLEAN", "POW10", 0, "", 1.0),
    ("NONE", "POW10", 0, "", 1.0),
])
def test_units_read_as_people_write_them(unit, base, exponent, label, scale):
    d = StatDesc("s", StatUnit[unit] | StatBase[base], exponent, 1, 0, 0)
    assert d.unit_label == label and d.scale == pytest.approx(scale)
    assert d.in_unit(2000) == pytest.approx(2000 * scale)


def test_unknown_unit_and_base_keep_their_numbers():
    unknown_unit = lib.KVM_STATS_UNIT_MASK  # 0xF << shift: past any unit defined so far
    d = StatDesc("s", unknown_unit | lib.KVM_STATS_BASE_MASK, 3, 1, 0, 0)
    assert d.unit == unknown_unit and not isinstance(d.unit, StatUnit)
    assert d.unit_label == f"unit {unknown_unit:#x}"
    assert d.scale is None and d.in_unit(5) is None


def test_truncated_files_and_blocks_are_errors_not_garbage():
    spec = ("exits", 0, 0, 1, 0, 0)
    image = stats_file("kvm-1", [spec], 16, (7).to_bytes(U64, sys.byteorder))
    assert StatsLayout.read(pread_over(image)).read_data(pread_over(image)) == {"exits": 7}
    with pytest.raises(ValueError, match="ends at"):
        StatsLayout.read(pread_over(image[:-U64])).read_data(pread_over(image[:-U64]))
    with pytest.raises(ValueError, match="ends at"):
        StatsLayout.read(pread_over(image[:ffi.sizeof(HEADER) + 4]))
    with pytest.raises(ValueError, match="data block"):
        StatsLayout.read(pread_over(image)).decode(b"\0" * (U64 - 1))
    with pytest.raises(ValueError):
        pread_exact(pread_over(b""), 1, 0)


def test_import_pykvm_kvm_leaves_stats_and_numpy_unloaded():
    code = ("import sys, pykvm.kvm; a = [m for m in ('pykvm.kvm.stats', 'numpy') if m in sys.modules]; "
            "from pykvm.kvm import KvmStats; print(a, KvmStats.__module__, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["[]", "pykvm.kvm.stats", "False"]


def test_a_stats_fd_shorter_than_its_header_is_a_kvm_error_and_is_closed(tmp_path):
    """KvmStats reads its layout at creation: a short file raises KvmError(EIO), not ValueError,
    so callers that fall back on PykvmError (the halt watch) do, and the fd is not leaked."""
    short = tmp_path / "stats"
    short.write_bytes(b"\0" * (ffi.sizeof(HEADER) - 1))
    fd = os.open(short, os.O_RDONLY)
    with pytest.raises(KvmError) as info:
        KvmStats(fd, None)
    assert info.value.errno == errno.EIO and "KVM_GET_STATS_FD" in str(info.value)
    with pytest.raises(OSError) as closed:
        os.fstat(fd)
    assert closed.value.errno == errno.EBADF
