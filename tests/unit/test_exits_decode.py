"""Exit decoding over arbitrary kvm_run contents (no KVM needed: pure decoding)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pykvm._native import ffi, lib
from pykvm.kvm import exits

RUN_SIZE = 3 * 4096


def _run_from(raw: bytes):
    buf = bytearray(RUN_SIZE)
    buf[: len(raw)] = raw
    run = ffi.from_buffer("struct kvm_run *", buf)
    return buf, run, memoryview(buf)


known_reasons = st.sampled_from([int(r) for r in exits.ExitReason])


@given(st.binary(min_size=0, max_size=512), st.one_of(known_reasons, st.integers(0, 2**32 - 1)))
def test_decode_never_crashes_and_keeps_the_reason(raw, reason):
    buf, run, page = _run_from(raw)
    run.exit_reason = reason
    e = exits.decode(run, page)
    assert isinstance(e, exits.Exit)
    assert e.reason == reason
    assert isinstance(e.name, str)
    if reason not in {int(r) for r in exits.ExitReason}:
        assert e.name.startswith("UNKNOWN")


@given(port=st.integers(0, 0xFFFF), size=st.sampled_from([1, 2, 4]), count=st.integers(1, 16),
       direction=st.sampled_from([0, 1]), data=st.binary(min_size=64, max_size=64))
def test_io_exit_round_trips_what_it_reads(port, size, count, direction, data):
    buf, run, page = _run_from(b"")
    run.exit_reason = lib.KVM_EXIT_IO
    run.io.port, run.io.size, run.io.count, run.io.direction = port, size, count, direction
    run.io.data_offset = 4096
    buf[4096:4096 + 64] = data
    e = exits.decode(run, page)
    assert isinstance(e, exits.IoExit)
    assert (e.port, e.size, e.count, e.is_in) == (port, size, count, direction == lib.KVM_EXIT_IO_IN)
    assert bytes(e.data) == data[: size * count]
    if e.is_in:  # the live view answers the guest
        e.value = 0xA5A5A5A5
        assert buf[4096:4096 + size] == (0xA5A5A5A5 & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    else:  # what the guest wrote is a snapshot that outlives the page
        buf[4096:4096 + 64] = bytes(64)
        assert bytes(e.data) == data[: size * count]


@given(offset=st.integers(0, 2**64 - 1), size=st.integers(0, 255), count=st.integers(0, 2**32 - 1))
def test_io_exit_with_hostile_offsets_does_not_read_outside_the_page(offset, size, count):
    buf, run, page = _run_from(b"")
    run.exit_reason = lib.KVM_EXIT_IO
    run.io.size, run.io.count, run.io.data_offset = size, count, offset
    e = exits.decode(run, page)
    if size * count and offset + size * count <= RUN_SIZE:
        assert len(e.data) == size * count
    else:
        assert len(e.data) == 0
        e.value = 1  # answering an exit without a data area is a no-op, not a crash


@given(addr=st.integers(0, 2**64 - 1), length=st.integers(0, 2**32 - 1), is_write=st.booleans(),
       data=st.binary(min_size=8, max_size=8))
def test_mmio_exit_round_trips(addr, length, is_write, data):
    buf, run, page = _run_from(b"")
    run.exit_reason = lib.KVM_EXIT_MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = addr, length, int(is_write)
    run.mmio.data = list(data)
    e = exits.decode(run, page)
    assert isinstance(e, exits.MmioExit)
    assert e.address == addr and e.is_write == is_write and e.length == min(length, 8)
    assert bytes(e.data) == data[: e.length]
    if e.length and not is_write:  # answering a read writes the page
        e.value = 0
        assert bytes(run.mmio.data[0:e.length]) == bytes(e.length)
    elif is_write:  # a write's bytes are a snapshot
        run.mmio.data = list(bytes(8))
        assert bytes(e.data) == data[: e.length]


@given(reason=st.sampled_from([lib.KVM_EXIT_UNKNOWN, lib.KVM_EXIT_EXCEPTION, lib.KVM_EXIT_TPR_ACCESS, 0x7FFF]),
       raw=st.integers(1, 2**64 - 1))
def test_hardware_exit_reason_is_read_only_for_unknown_exits(reason, raw):
    """kvm_run.hw is KVM_EXIT_UNKNOWN's union member; other reasons put other data there."""
    buf, run, page = _run_from(b"")
    run.exit_reason = reason
    run.hw.hardware_exit_reason = raw
    e = exits.decode(run, page)
    assert e.reason == reason
    if isinstance(e, exits.UnknownExit):
        assert e.hardware_exit_reason == (raw if reason == lib.KVM_EXIT_UNKNOWN else 0)
