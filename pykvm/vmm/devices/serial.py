"""A 16550A UART: the guest's console (COM1 is 8 registers at 0x3F8, IRQ 4).

Registers by offset (DLAB is LCR bit 7):

    0  RBR (read) / THR (write); DLL when DLAB=1
    1  IER; DLM when DLAB=1
    2  IIR (read) / FCR (write)
    3  LCR   4  MCR   5  LSR   6  MSR   7  SCR

Transmission is instantaneous: a THR write goes straight to the ``output``
sink (or, in loopback, back into the receive FIFO), so THR is always empty.
Received bytes come from :meth:`Serial16550.feed` (any thread); the FIFO holds
16 bytes (1 with FIFOs off), like the chip, and ``feed`` takes only what fits
and returns how many it took: the console keeps the rest and retries when
``on_rx_space`` tells it the guest has read. The interrupt output is the
pending condition gated by MCR.OUT2, as PC boards wire it, and is reported to
``irq(level)`` on every change.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Optional

COM1_PORT, COM1_IRQ = 0x3F8, 4
COM2_PORT, COM2_IRQ = 0x2F8, 3
REGISTER_COUNT = 8
FIFO_SIZE = 16

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)

IER_RDA, IER_THRE, IER_RLS, IER_MSI = 1, 2, 4, 8
IIR_NONE, IIR_MSI, IIR_THRE, IIR_RDA, IIR_RLS = 0x1, 0x0, 0x2, 0x4, 0x6
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 1, 2, 4
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 1, 2, 4, 8, 16
LSR_DR, LSR_OE, LSR_BI, LSR_THRE, LSR_TEMT = 1, 2, 0x10, 0x20, 0x40
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD = 1, 2, 4, 8
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MSR_IDLE = MSR_CTS | MSR_DSR | MSR_DCD  # a connected terminal, as QEMU reports


class Serial16550:
    """The UART model. ``read``/``write`` take offsets 0-7 within its 8 ports."""

    def __init__(
        self,
        output: Callable[[bytes], None],
        irq: Optional[Callable[[bool], None]] = None,
        on_rx_space: Optional[Callable[[], None]] = None,
    ):
        self._output = output
        self._irq = irq
        self._on_rx_space = on_rx_space
        self._lock = threading.RLock()
        self._rx: deque = deque()
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._lsr = LSR_THRE | LSR_TEMT
        self._msr_deltas = 0  # MSR bits 0-3; bits 4-7 follow the lines
        self._scr = 0
        self._fcr = 0
        self._divisor = 12  # 9600 baud from the 1.8432 MHz clock
        self._thr_pending = False  # THRE interrupt latched until IIR read or THR write
        self._level = False

    # --- bus interface -------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            out = bytes(self._read_reg(offset + i) for i in range(size))
            self._update_irq()
        return out

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            for i, value in enumerate(data):
                self._write_reg(offset + i, value)
            self._update_irq()

    # --- host side -------------------------------------------------------------
    def feed(self, data: bytes) -> int:
        """Queue received bytes; returns how many fit (the rest must be fed again later)."""
        with self._lock:
            if self._mcr & MCR_LOOP:
                return 0  # in loopback the receiver is disconnected from the line
            taken = min(len(data), self.rx_space())
            self._rx.extend(data[:taken])
            if taken:
                self._lsr |= LSR_DR
                self._update_irq()
        return taken

    def rx_space(self) -> int:
        with self._lock:
            return max(0, self._fifo_size() - len(self._rx))

    @property
    def irq_level(self) -> bool:
        return self._level

    @property
    def divisor(self) -> int:
        return self._divisor

    # --- registers -------------------------------------------------------------
    def _fifo_size(self) -> int:
        return FIFO_SIZE if self._fcr & FCR_ENABLE else 1

    def _read_reg(self, reg: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if reg == RBR_THR:
            return self._divisor & 0xFF if dlab else self._pop_rx()
        if reg == IER:
            return self._divisor >> 8 if dlab else self._ier
        if reg == IIR_FCR:
            iir = self._pending()
            if iir == IIR_THRE:
                self._thr_pending = False  # reading IIR acknowledges THRE
            return iir | (IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0)
        if reg == LCR:
            return self._lcr
        if reg == MCR:
            return self._mcr
        if reg == LSR:
            lsr = self._lsr
            self._lsr &= ~(LSR_OE | LSR_BI)  # error bits clear on read
            return lsr
        if reg == MSR:
            msr = self._modem_status()
            self._msr_deltas = 0
            return msr
        if reg == SCR:
            return self._scr
        return 0xFF

    def _write_reg(self, reg: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if reg == RBR_THR:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif reg == IER:
            if dlab:
                self._divisor = (self._divisor & 0xFF) | value << 8
            else:
                if value & IER_THRE and not self._ier & IER_THRE:
                    self._thr_pending = True  # enabling THRE with THR empty interrupts at once
                self._ier = value & 0x0F
        elif reg == IIR_FCR:
            if value & FCR_CLEAR_RX or (value ^ self._fcr) & FCR_ENABLE:
                self._clear_rx()
            self._fcr = value & (FCR_ENABLE | 0xC0)
        elif reg == LCR:
            self._lcr = value
        elif reg == MCR:
            self._set_mcr(value & 0x1F)
        elif reg == SCR:
            self._scr = value
        # LSR and MSR are read-only (factory test writes are ignored).

    def _transmit(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            if len(self._rx) < self._fifo_size():
                self._rx.append(value)
            else:
                self._lsr |= LSR_OE
            self._lsr |= LSR_DR
        else:
            self._output(bytes((value,)))
        self._thr_pending = True

    def _pop_rx(self) -> int:
        if not self._rx:
            return 0
        value = self._rx.popleft()
        if not self._rx:
            self._lsr &= ~LSR_DR
        if self._on_rx_space is not None and not self._mcr & MCR_LOOP:
            self._on_rx_space()
        return value

    def _clear_rx(self) -> None:
        self._rx.clear()
        self._lsr &= ~LSR_DR

    def _set_mcr(self, value: int) -> None:
        before = self._modem_status()
        self._mcr = value
        after = self._modem_status()
        changed = (before ^ after) & (MSR_CTS | MSR_DSR | MSR_DCD)
        self._msr_deltas |= changed >> 4  # DCTS, DDSR and DDCD flag changes of CTS, DSR and DCD
        if before & MSR_RI and not after & MSR_RI:
            self._msr_deltas |= MSR_TERI  # trailing edge of RI
        if (before ^ value) & MCR_LOOP and value & MCR_LOOP:
            self._clear_rx()

    def _modem_status(self) -> int:
        if self._mcr & MCR_LOOP:  # outputs looped to inputs: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD
            m = self._mcr
            lines = (m & MCR_RTS) << 3 | (m & MCR_DTR) << 5 | (m & MCR_OUT1) << 4 | (m & MCR_OUT2) << 4
        else:
            lines = MSR_IDLE
        return lines | self._msr_deltas

    def _pending(self) -> int:
        """IIR identification of the highest-priority pending interrupt."""
        other = self._pending_other()
        if other in (IIR_RLS, IIR_RDA):
            return other
        if self._ier & IER_THRE and self._thr_pending:
            return IIR_THRE
        return other

    def _other_sources(self) -> int:
        """The IER bits (RLS, RDA, MSI) whose condition holds, enabled or not: a line
        error (overrun, break), received data, a modem status delta."""
        return ((IER_RLS if self._lsr & (LSR_OE | LSR_BI) else 0) | (IER_RDA if self._lsr & LSR_DR else 0)
                | (IER_MSI if self._msr_deltas else 0))

    def _pending_other(self) -> int:
        """IIR identification of the highest-priority pending interrupt other than THRE."""
        active = self._ier & self._other_sources()
        if active & IER_RLS:
            return IIR_RLS
        if active & IER_RDA:
            return IIR_RDA
        if active & IER_MSI:
            return IIR_MSI
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._pending() != IIR_NONE and bool(self._mcr & MCR_OUT2) and not self._mcr & MCR_LOOP
        if level != self._level:
            self._level = level
            if self._irq is not None:
                self._irq(level)
