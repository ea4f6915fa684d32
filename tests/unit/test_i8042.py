"""i8042: the probe sequence Linux runs, and the two ways a guest resets the machine."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from pykvm.vmm.bus import Bus
from pykvm.vmm.devices.i8042 import COMMAND_PORT, DATA_PORT, I8042


@pytest.fixture
def kbc():
    resets = []
    bus = Bus("pio", 1 << 16)
    ctl = I8042(reset=lambda: resets.append(1))
    for port, length, dev in ctl.ports():
        bus.register(port, length, dev, "i8042")
    return bus, resets


def status(bus):
    return bus.read(COMMAND_PORT, 1)[0]


def test_idle_status_lets_linux_write(kbc):
    bus, _ = kbc
    s = status(bus)
    assert s != 0xFF and not s & 0x02 and not s & 0x01  # no input pending, output empty
    assert s & 0x04  # system flag: POST passed


def test_linux_probe_sequence(kbc):
    bus, resets = kbc
    # i8042_flush: read data while OBF is set; must end.
    for _ in range(20):
        if not status(bus) & 1:
            break
        bus.read(DATA_PORT, 1)
    assert not status(bus) & 1
    bus.write(COMMAND_PORT, b"\xaa")  # controller self test
    assert status(bus) & 1 and bus.read(DATA_PORT, 1) == b"\x55"
    bus.write(COMMAND_PORT, b"\x20")  # read CTR
    ctr = bus.read(DATA_PORT, 1)[0]
    bus.write(COMMAND_PORT, b"\x60")  # write CTR
    bus.write(DATA_PORT, bytes((ctr & ~0x03,)))
    bus.write(COMMAND_PORT, b"\x20")
    assert bus.read(DATA_PORT, 1)[0] == ctr & ~0x03
    bus.write(COMMAND_PORT, b"\xab")  # keyboard interface test
    assert bus.read(DATA_PORT, 1) == b"\x00"
    bus.write(DATA_PORT, b"\xf2")  # GETID for a keyboard that is not there: no reply
    assert not status(bus) & 1 and not resets


def test_pulse_reset_command(kbc):
    bus, resets = kbc
    bus.write(COMMAND_PORT, b"\xfe")
    assert resets == [1]


def test_output_port_write_with_reset_bit_clear(kbc):
    bus, resets = kbc
    bus.write(COMMAND_PORT, b"\xd1")
    bus.write(DATA_PORT, b"\x03")  # reset line high: nothing happens
    assert not resets
    bus.write(COMMAND_PORT, b"\xd0")
    assert bus.read(DATA_PORT, 1) == b"\x03"
    bus.write(COMMAND_PORT, b"\xd1")
    bus.write(DATA_PORT, b"\x02")
    assert resets == [1]


@given(st.lists(st.tuples(st.sampled_from([DATA_PORT, COMMAND_PORT]), st.booleans(), st.integers(0, 255)), max_size=50))
def test_random_accesses_never_block_a_writer(ops):
    resets = []
    ctl = I8042(reset=lambda: resets.append(1))
    devs = {port: dev for port, _, dev in ctl.ports()}
    for port, is_write, value in ops:
        if is_write:
            devs[port].write(0, bytes((value,)))
        else:
            assert len(devs[port].read(0, 1)) == 1
        assert not devs[COMMAND_PORT].read(0, 1)[0] & 0x02  # Linux's kb_wait would spin on IBF
    for _ in range(20):  # the output queue always drains
        devs[DATA_PORT].read(0, 1)
    assert not devs[COMMAND_PORT].read(0, 1)[0] & 0x01


def test_aux_loopback_echoes_with_the_auxdata_flag(kbc):
    """Linux's i8042_check_aux writes 0xD3 then 0x5A and expects 0x5A back from the aux port."""
    bus, _ = kbc
    bus.write(COMMAND_PORT, b"\xd3")
    bus.write(DATA_PORT, b"\x5a")
    assert status(bus) & 0x21 == 0x21  # output full, from the aux port
    assert bus.read(DATA_PORT, 1) == b"\x5a"
    assert not status(bus) & 0x21
    bus.write(COMMAND_PORT, b"\xd2")
    bus.write(DATA_PORT, b"\xa5")
    assert status(bus) & 0x21 == 0x01  # keyboard loopback: not aux data
    assert bus.read(DATA_PORT, 1) == b"\xa5"
