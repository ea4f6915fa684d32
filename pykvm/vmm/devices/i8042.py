"""Just enough of the i8042 keyboard controller for Linux to probe it and to reboot through it.

Port 0x64 reads the status register and takes controller commands; port 0x60
is the data port. No keyboard or mouse is attached: bytes written for the
devices get no answer, which Linux reads as "no device" after its timeout.
Linux's ``reboot=k`` (the x86 default fallback) writes 0xFE to port 0x64,
which pulses the CPU reset line: that, or writing an output port value with
bit 0 clear (command 0xD1), calls ``reset()``.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

DATA_PORT = 0x60
COMMAND_PORT = 0x64  # status on read

STATUS_OBF = 0x01  # output buffer full: data waits at 0x60
STATUS_SYS = 0x04  # system flag: self-test passed
STATUS_CMD = 0x08  # last write was to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited
STATUS_AUXDATA = 0x20  # the byte at 0x60 comes from the aux (mouse) port

CMD_READ_CTR, CMD_WRITE_CTR = 0x20, 0x60
CMD_SELF_TEST, CMD_KBD_TEST, CMD_AUX_TEST = 0xAA, 0xAB, 0xA9
CMD_AUX_DISABLE, CMD_AUX_ENABLE, CMD_KBD_DISABLE, CMD_KBD_ENABLE = 0xA7, 0xA8, 0xAD, 0xAE
CMD_READ_OUTPUT_PORT, CMD_WRITE_OUTPUT_PORT = 0xD0, 0xD1
CMD_KBD_LOOP, CMD_AUX_LOOP = 0xD2, 0xD3  # echo the next data byte as if the device sent it
CMD_PULSE_RESET = 0xFE  # 0xF0-0xFF pulse output port bits; bit 0 is the CPU reset line
SELF_TEST_OK = 0x55
OUTPUT_PORT_RESET_HIGH = 0x01  # bit 0 low asserts reset
OUTPUT_PORT_DEFAULT = 0x03  # reset line high, A20 enabled

CTR_DEFAULT = 0x61  # translation on, aux disabled, keyboard IRQ enabled (what firmware leaves)
CTR_SYS = 0x04
_MAX_OUTPUT = 16


class I8042:
    """The controller; register it with :meth:`ports` at 0x60 and 0x64 (one byte each)."""

    def __init__(self, reset: Callable[[], None]):
        self._reset = reset
        self._ctr = CTR_DEFAULT | CTR_SYS
        self._output_port = OUTPUT_PORT_DEFAULT
        self._out: deque = deque(maxlen=_MAX_OUTPUT)  # (byte, from_aux)
        self._pending_cmd = 0  # a command waiting for its data byte at 0x60
        self._last_was_cmd = False

    def ports(self):
        """[(port, length, device)] to register on the PIO bus."""
        return [(DATA_PORT, 1, _Port(self, DATA_PORT)), (COMMAND_PORT, 1, _Port(self, COMMAND_PORT))]

    def status(self) -> int:
        aux = STATUS_AUXDATA if self._out and self._out[0][1] else 0
        return (STATUS_OBF if self._out else 0) | aux | STATUS_SYS | STATUS_UNLOCKED | (STATUS_CMD if self._last_was_cmd else 0)

    def _reply(self, value: int, aux: bool = False) -> None:
        self._out.append((value & 0xFF, aux))

    def read_data(self) -> int:
        return self._out.popleft()[0] if self._out else 0

    def write_command(self, cmd: int) -> None:
        self._last_was_cmd = True
        self._pending_cmd = 0
        if cmd == CMD_READ_CTR:
            self._reply(self._ctr)
        elif cmd in (CMD_WRITE_CTR, CMD_WRITE_OUTPUT_PORT, CMD_KBD_LOOP, CMD_AUX_LOOP):
            self._pending_cmd = cmd
        elif cmd == CMD_SELF_TEST:
            self._reply(SELF_TEST_OK)
        elif cmd in (CMD_KBD_TEST, CMD_AUX_TEST):
            self._reply(0x00)  # interface test passed
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._reply(self._output_port)
        elif cmd in (CMD_KBD_DISABLE, CMD_KBD_ENABLE):
            self._ctr = self._ctr | 0x10 if cmd == CMD_KBD_DISABLE else self._ctr & ~0x10
        elif cmd in (CMD_AUX_DISABLE, CMD_AUX_ENABLE):
            self._ctr = self._ctr | 0x20 if cmd == CMD_AUX_DISABLE else self._ctr & ~0x20
        elif cmd >= 0xF0 and not cmd & 0x01:
            self._reset()  # pulse with bit 0 clear: the CPU reset line (0xFE is the usual one)

    def write_data(self, value: int) -> None:
        self._last_was_cmd = False
        cmd, self._pending_cmd = self._pending_cmd, 0
        if cmd == CMD_WRITE_CTR:
            self._ctr = value
        elif cmd == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            if not value & OUTPUT_PORT_RESET_HIGH:
                self._reset()
        elif cmd in (CMD_KBD_LOOP, CMD_AUX_LOOP):
            self._reply(value, aux=cmd == CMD_AUX_LOOP)  # Linux's AUX port probe (i8042_check_aux)
        # Otherwise the byte is for a keyboard that is not there: no reply.


class _Port:
    """One of the controller's two ports as a bus device."""

    def __init__(self, ctl: I8042, port: int):
        self._ctl, self._port = ctl, port

    def read(self, offset: int, size: int) -> bytes:
        first = self._ctl.read_data() if self._port == DATA_PORT else self._ctl.status()
        return bytes((first,)) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if data:
            (self._ctl.write_data if self._port == DATA_PORT else self._ctl.write_command)(data[0])
