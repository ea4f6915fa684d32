"""``Vcpu``: a vCPU fd, its shared kvm_run page, registers and state.

``run()`` issues KVM_RUN (cffi drops the GIL for the call) and returns a
typed exit. ``kick()`` makes a ``run()`` in another thread return: it sets
``kvm_run.immediate_exit`` (covers the window before the ioctl) and sends the
kick signal to the thread inside KVM_RUN (covers a guest that never exits);
the interrupted run comes back as ``InterruptedExit``.
"""
from __future__ import annotations

import enum
import errno
import mmap
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

from pykvm._fdobject import FdObject
from pykvm._log import get_logger
from pykvm._native import ffi, lib
from pykvm.errors import ClosedError, KvmError, ioctl_error
from pykvm.kvm import exits
from pykvm.kvm.watchdog import WATCHDOG
from pykvm.kvm.regs import (CpuidEntry, DebugRegs, Fpu, Lapic, Regs, Sregs, Sregs2, VcpuEvents, Xcrs, Xsave,
                            cpuid_from_c, cpuid_to_c)

if TYPE_CHECKING:
    from pykvm.kvm.dirty_ring import DirtyRing
    from pykvm.kvm.nested import NestedState
    from pykvm.kvm.stats import KvmStats

if lib.pykvm_install_kick_handler() != 0:  # pragma: no cover - sigaction cannot fail for a valid signal
    raise OSError(ffi.errno, "cannot install the vCPU kick signal handler")
KICK_SIGNAL = lib.pykvm_kick_signal()
CLOSE_WAIT = 2.0  # seconds close() kicks a run in another thread before it gives up waiting
log = get_logger(__name__)
MCG_STATUS_MCIP_RIPV = 0b101  # McgStatus.MCIP | McgStatus.RIPV (pykvm.kvm.mce, not loaded by the run path)
_SIGSET_BYTES = 8  # the kernel's sigset_t on x86-64 (64 signals); KVM_SET_SIGNAL_MASK wants exactly this


class MpState(enum.IntEnum):
    """KVM_MP_STATE_*: whether a vCPU runs, waits for INIT/SIPI, or is halted."""

    RUNNABLE = lib.KVM_MP_STATE_RUNNABLE
    UNINITIALIZED = lib.KVM_MP_STATE_UNINITIALIZED
    INIT_RECEIVED = lib.KVM_MP_STATE_INIT_RECEIVED
    HALTED = lib.KVM_MP_STATE_HALTED
    SIPI_RECEIVED = lib.KVM_MP_STATE_SIPI_RECEIVED


class CoalescedWrite(NamedTuple):
    """One guest write KVM queued in the coalesced MMIO/PIO ring instead of exiting."""

    address: int
    length: int
    pio: bool
    data: bytes


class GuestDebug(enum.IntFlag):
    """KVM_GUESTDBG_* control bits for ``set_guest_debug``."""

    ENABLE = lib.KVM_GUESTDBG_ENABLE
    SINGLESTEP = lib.KVM_GUESTDBG_SINGLESTEP
    USE_SW_BP = lib.KVM_GUESTDBG_USE_SW_BP
    USE_HW_BP = lib.KVM_GUESTDBG_USE_HW_BP
    INJECT_DB = lib.KVM_GUESTDBG_INJECT_DB
    INJECT_BP = lib.KVM_GUESTDBG_INJECT_BP
    BLOCKIRQ = lib.KVM_GUESTDBG_BLOCKIRQ


def _kvm_signal_mask(signals: Iterable[int]) -> Any:
    """A ``struct kvm_signal_mask`` blocking ``signals`` (numbers 1..64, never the kick signal)."""
    bits = 0
    for sig in signals:
        if not 1 <= sig <= _SIGSET_BYTES * 8:
            raise ValueError(f"signal {sig} is outside 1..{_SIGSET_BYTES * 8}")
        if sig == KICK_SIGNAL:
            raise ValueError(f"signal {sig} is pykvm's kick signal: blocked in KVM_RUN, kick() and "
                             "run(timeout=...) could not stop a guest that never exits")
        bits |= 1 << (sig - 1)
    return ffi.new("struct kvm_signal_mask *", {"len": _SIGSET_BYTES,
                                                 "sigset": list(bits.to_bytes(_SIGSET_BYTES, "little"))})


def msrs_get(obj: FdObject, indices: Iterable[int]) -> Dict[int, int]:
    """KVM_GET_MSRS on a vCPU (or, for feature MSRs, the system fd)."""
    indices = list(indices)
    c = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
    for i, idx in enumerate(indices):
        c.entries[i].index = idx
    n = obj._ioctl("KVM_GET_MSRS", c)
    if n != len(indices):
        raise ioctl_error(KvmError, errno.EINVAL, "KVM_GET_MSRS", f"MSR {indices[n]:#x} cannot be read")
    return {c.entries[i].index: c.entries[i].data for i in range(n)}


class Vcpu(FdObject):
    """One virtual CPU. Created by ``Vm.create_vcpu()``."""

    _error_family = KvmError
    _what = "Vcpu"
    _dirty_ring: Optional["DirtyRing"] = None  # made by dirty_ring()

    def __init__(self, fd: int, vm, vcpu_id: int):
        super().__init__(fd, vm)
        self.vm = vm
        self.id = vcpu_id
        self._thread: Optional[int] = None  # the thread inside run() (or a run loop), if any
        self._closing = False
        self._mask_thread: Optional[int] = None  # the thread whose signal mask was last checked
        self._user_mask = False  # set_signal_mask() gave KVM a mask
        self._auto_mask = False  # pykvm gave KVM a mask that unblocks the kick signal
        try:
            size = vm.kvm.vcpu_mmap_size
            self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.close()
            raise
        # Every view of the page (this one, the exits' data, the struct) is an export of the
        # mapping, so the page stays mapped while any of them lives, even past close().
        self._page = memoryview(self._mm)
        self._run_c = ffi.from_buffer("struct kvm_run *", self._page)

    # -- the kvm_run page -------------------------------------------------
    @property
    def kvm_run(self) -> Any:
        """The raw ``struct kvm_run *`` shared with the kernel."""
        self.fileno()
        return self._run_c

    @property
    def kvm_run_address(self) -> int:
        return int(ffi.cast("uintptr_t", self.kvm_run))

    @property
    def immediate_exit(self) -> bool:
        return bool(self.kvm_run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.kvm_run.immediate_exit = 1 if value else 0

    # -- running ------------------------------------------------------------
    def run(self, timeout: Optional[float] = None) -> exits.Exit:
        """KVM_RUN until the guest exits to userspace; returns the decoded exit.

        ``timeout`` (seconds) bounds the call: a guest that stays in the kernel
        is kicked and the call returns ``InterruptedExit``. A kick from this
        deadline is cleared before returning; a ``kick()`` from elsewhere stays
        set until the caller clears ``immediate_exit``. ``close()`` from another
        thread kicks the run, waits for it and makes it raise ClosedError.
        """
        fd, run_c, page = self._enter_run()
        token = None if timeout is None else WATCHDOG.arm(timeout, self.kick)
        try:
            while True:
                ret = lib.pykvm_ioctl_int(fd, lib.KVM_RUN, 0)
                err = ffi.errno
                if ret >= 0 or err != errno.EAGAIN:
                    break  # EAGAIN: an AP left wait-for-SIPI and KVM asks to be entered again
        finally:
            if token is not None and not WATCHDOG.disarm(token):
                run_c.immediate_exit = 0  # our own deadline fired
            self._leave_run()
        if self._closing:
            raise ClosedError(self._what)
        if ret < 0:
            if err == errno.EINTR:
                return exits.InterruptedExit(lib.KVM_EXIT_INTR)
            raise ioctl_error(KvmError, err, "KVM_RUN")
        return exits.decode(run_c, page)

    def _enter_run(self) -> Tuple[int, Any, memoryview]:
        """Register the calling thread as the one in KVM_RUN (``kick`` signals it, ``close``
        waits for it); returns the fd, the kvm_run struct and the page, which the caller
        keeps until the run is decoded: they hold the mapping even if the vCPU closes."""
        tid = threading.get_ident()
        if self._thread is not None:
            raise RuntimeError(f"vCPU {self.id} is already running in another thread")
        # Set the thread, then look for close(); close() sets _closing, then looks for a
        # thread: one of the two always sees the other (the GIL orders them).
        self._thread = tid
        if self._closing or self._fd < 0:
            self._thread = None
            raise ClosedError(self._what)
        try:
            if tid != self._mask_thread:
                self._unblock_kick_in_kvm_run(tid)
        except BaseException:
            self._leave_run()
            raise
        return self._fd, self._run_c, self._page

    def _leave_run(self) -> None:
        if self._auto_mask:  # a kick that came after KVM_RUN stays pending (blocked): take it
            while signal.sigtimedwait([KICK_SIGNAL], 0) is not None:
                pass
        self._thread = None

    def _unblock_kick_in_kvm_run(self, tid: int) -> None:
        """A thread that blocks the kick signal (VMMs often block every signal in their
        vCPU threads) would never be interrupted in KVM_RUN: give KVM its mask minus the
        kick signal for the duration of KVM_RUN (KVM_SET_SIGNAL_MASK), as QEMU does with
        its SIG_IPI; a kick left pending after the run is consumed. A mask the user set
        with ``set_signal_mask`` already leaves the kick signal unblocked."""
        self._mask_thread = tid
        if self._user_mask:
            return
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        if KICK_SIGNAL in blocked:
            mask = [int(s) for s in blocked if s != KICK_SIGNAL and 1 <= s <= _SIGSET_BYTES * 8]
            self._ioctl("KVM_SET_SIGNAL_MASK", _kvm_signal_mask(mask))
            self._auto_mask = True
        elif self._auto_mask:
            self._ioctl("KVM_SET_SIGNAL_MASK", None)
            self._auto_mask = False

    def kick(self) -> None:
        """Make a current or imminent ``run()`` return ``InterruptedExit``.

        Sets immediate_exit (the next KVM_RUN returns at once) and signals the
        thread inside KVM_RUN. Clear it with ``vcpu.immediate_exit = False``."""
        run_c = self._run_c  # this reference keeps the page mapped even if close() runs now
        if run_c is None:
            return
        run_c.immediate_exit = 1
        tid = self._thread
        if tid is not None:
            try:
                signal.pthread_kill(tid, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Close the vCPU. A run in another thread is kicked first and waited for (up to
        CLOSE_WAIT seconds); it then raises ClosedError instead of returning an exit."""
        self._closing = True
        if self._thread not in (None, threading.get_ident()):
            deadline = time.monotonic() + CLOSE_WAIT
            while self._thread is not None:
                if time.monotonic() > deadline:
                    log.warning("vCPU %d: a run in another thread did not return within %.0f s of close(); "
                                "its kvm_run page stays mapped until it does", self.id, CLOSE_WAIT)
                    break
                self.kick()
                time.sleep(0.002)
        super().close()

    def set_signal_mask(self, signals: Optional[Iterable[int]]) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU's thread is inside KVM_RUN.

        KVM puts this mask in place of the thread's own for the duration of KVM_RUN, so
        a VMM can keep signals meant for its own loop from cutting a run short: a
        signal the mask leaves unblocked makes KVM_RUN return (``InterruptedExit``), a
        blocked one stays pending until the run ends and the thread's own mask is back.
        ``None`` drops the mask (the thread's own mask applies in KVM_RUN too); an
        empty iterable unblocks every signal while in KVM_RUN. The kick signal cannot
        be blocked (ValueError); KVM never blocks SIGKILL or SIGSTOP.
        """
        self._ioctl("KVM_SET_SIGNAL_MASK", None if signals is None else _kvm_signal_mask(signals))
        self._user_mask = signals is not None
        self._auto_mask = False
        self._mask_thread = None  # without a user mask, the next run checks its thread's mask again

    def drain_coalesced_mmio(self) -> List[CoalescedWrite]:
        """Writes KVM queued in the VM's coalesced MMIO/PIO ring (mapped at page
        KVM_COALESCED_MMIO_PAGE_OFFSET of every vCPU fd), oldest first; consumes them."""
        self.fileno()
        page = mmap.PAGESIZE
        base = lib.KVM_COALESCED_MMIO_PAGE_OFFSET * page
        ring = ffi.cast("struct kvm_coalesced_mmio_ring *", ffi.cast("char *", self._run_c) + base)
        header = ffi.offsetof("struct kvm_coalesced_mmio_ring", "coalesced_mmio")
        slots = (page - header) // ffi.sizeof("struct kvm_coalesced_mmio")
        out: List[CoalescedWrite] = []
        while ring.first != ring.last:
            e = ring.coalesced_mmio[ring.first % slots]
            n = min(e.len, 8)
            out.append(CoalescedWrite(e.phys_addr, n, bool(e.pio), bytes(e.data[0:n])))
            ring.first = (ring.first + 1) % slots
        return out

    # -- registers ----------------------------------------------------------
    def _get(self, name: str, struct: Any) -> Any:
        self._ioctl(name, struct.ptr)
        return struct

    def get_regs(self) -> Regs:
        """KVM_GET_REGS: rax..r15, rip, rflags."""
        return self._get("KVM_GET_REGS", Regs())

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS: load rax..r15, rip and rflags (rflags bit 1 must be set)."""
        self._ioctl("KVM_SET_REGS", regs.ptr)

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS: segments, GDT/IDT, CR0-4/8, EFER, APIC base."""
        return self._get("KVM_GET_SREGS", Sregs())

    def set_sregs(self, sregs: Sregs) -> None:
        """KVM_SET_SREGS: load segments, descriptor tables, control registers, EFER and the
        APIC base; KVM checks them as an entry would (EINVAL for, e.g., CR0.PG without PE)."""
        self._ioctl("KVM_SET_SREGS", sregs.ptr)

    def get_sregs2(self) -> Sregs2:
        """KVM_GET_SREGS2: ``get_sregs()``'s registers plus, under PAE paging, the four
        PDPTRs the CPU holds (``flags`` has ``Sregs2.PDPTRS_VALID``), which guest memory
        at CR3 may no longer match; no interrupt bitmap (that is in the vCPU events)."""
        return self._get("KVM_GET_SREGS2", Sregs2())

    def set_sregs2(self, sregs: Sregs2) -> None:
        """KVM_SET_SREGS2: with ``PDPTRS_VALID`` KVM loads ``pdptrs`` as given instead of
        reading them at CR3; EINVAL for it outside PAE paging or for unknown flags."""
        self._ioctl("KVM_SET_SREGS2", sregs.ptr)

    def get_fpu(self) -> Fpu:
        """KVM_GET_FPU: x87 and SSE state (FXSAVE layout: fpr, fcw, fsw, xmm, mxcsr)."""
        return self._get("KVM_GET_FPU", Fpu())

    def set_fpu(self, fpu: Fpu) -> None:
        """KVM_SET_FPU: load x87 and SSE state (what ``get_fpu`` returns)."""
        self._ioctl("KVM_SET_FPU", fpu.ptr)

    def get_xsave(self) -> Xsave:
        """KVM_GET_XSAVE: the 4 KiB XSAVE area (EINVAL once the guest's area is larger)."""
        return self._get("KVM_GET_XSAVE", Xsave())

    def get_xsave2(self) -> Xsave:
        """KVM_GET_XSAVE2: the whole XSAVE area, of the size KVM_CAP_XSAVE2 reports on the
        VM: larger than KVM_GET_XSAVE's 4 KiB once dynamic features (AMX) are enabled."""
        return self._get("KVM_GET_XSAVE2", Xsave(self.vm.check_extension(lib.KVM_CAP_XSAVE2)))

    def set_xsave(self, xsave: Xsave) -> None:
        """KVM_SET_XSAVE: KVM reads as many bytes as the guest's area has (KVM_CAP_XSAVE2 on
        the VM), so pass what ``get_xsave2()`` (or, for a 4 KiB area, ``get_xsave()``)
        returned; a smaller Xsave is refused (ValueError) before KVM reads past it."""
        need = self.vm.check_extension(lib.KVM_CAP_XSAVE2)
        if need > xsave.size:
            raise ValueError(f"this guest's XSAVE area is {need} bytes (KVM_CAP_XSAVE2) and KVM_SET_XSAVE reads "
                             f"all of them, but the Xsave given has {xsave.size}: use get_xsave2()")
        self._ioctl("KVM_SET_XSAVE", xsave.ptr)

    def get_xcrs(self) -> Xcrs:
        """KVM_GET_XCRS: the extended control registers (XCR0: which XSAVE features are on)."""
        return self._get("KVM_GET_XCRS", Xcrs())

    def set_xcrs(self, xcrs: Xcrs) -> None:
        """KVM_SET_XCRS: load XCR0 (EINVAL for features the guest's CPUID does not offer)."""
        self._ioctl("KVM_SET_XCRS", xcrs.ptr)

    def get_msrs(self, indices: Iterable[int]) -> Dict[int, int]:
        """KVM_GET_MSRS: {index: value}; an MSR KVM refuses raises KvmError naming it."""
        return msrs_get(self, indices)

    def set_msrs(self, values: Dict[int, int]) -> None:
        """KVM_SET_MSRS; raises if KVM accepted fewer than all of them."""
        items = list(values.items())
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (idx, val) in enumerate(items):
            c.entries[i].index = idx
            c.entries[i].data = val
        n = self._ioctl("KVM_SET_MSRS", c)
        if n != len(items):
            raise ioctl_error(KvmError, errno.EINVAL, "KVM_SET_MSRS",
                              f"MSR {items[n][0]:#x} was refused (value {items[n][1]:#x})")

    def get_cpuid2(self, max_entries: int = 256) -> List[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID table this vCPU was given."""
        c = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        self._ioctl("KVM_GET_CPUID2", c)
        return cpuid_from_c(c)

    def set_cpuid2(self, entries: Iterable[CpuidEntry]) -> None:
        """KVM_SET_CPUID2: what the guest's CPUID instruction returns."""
        self._ioctl("KVM_SET_CPUID2", cpuid_to_c(entries))

    def get_lapic(self) -> Lapic:
        """KVM_GET_LAPIC: the in-kernel local APIC's register page."""
        return self._get("KVM_GET_LAPIC", Lapic())

    def set_lapic(self, lapic: Lapic) -> None:
        """KVM_SET_LAPIC: load the in-kernel local APIC's register page."""
        self._ioctl("KVM_SET_LAPIC", lapic.ptr)

    def get_vcpu_events(self) -> VcpuEvents:
        """KVM_GET_VCPU_EVENTS: pending or injected exception, interrupt, NMI and SMI
        state, and interrupt shadow: what no register shows between two instructions."""
        return self._get("KVM_GET_VCPU_EVENTS", VcpuEvents())

    def set_vcpu_events(self, events: VcpuEvents) -> None:
        """KVM_SET_VCPU_EVENTS: load that state; ``flags`` (KVM_VCPUEVENT_VALID_*) says
        which optional parts (NMI pending, SIPI vector, SMM, shadow) KVM takes."""
        self._ioctl("KVM_SET_VCPU_EVENTS", events.ptr)

    def get_mp_state(self) -> MpState:
        """KVM_GET_MP_STATE: runnable, halted, or waiting for INIT/SIPI (in-kernel LAPIC);
        a state this enum lacks comes back as the raw int."""
        c = ffi.new("struct kvm_mp_state *")
        self._ioctl("KVM_GET_MP_STATE", c)
        try:
            return MpState(c.mp_state)
        except ValueError:
            return c.mp_state

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE: e.g. put an AP in UNINITIALIZED to wait for INIT/SIPI."""
        self._ioctl("KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": int(state)}))

    def get_debugregs(self) -> DebugRegs:
        """KVM_GET_DEBUGREGS: the guest's DR0-DR3, DR6 and DR7."""
        return self._get("KVM_GET_DEBUGREGS", DebugRegs())

    def set_debugregs(self, dregs: DebugRegs) -> None:
        """KVM_SET_DEBUGREGS: load the guest's DR0-DR3, DR6 and DR7 (EINVAL for reserved
        bits set in the upper halves of DR6/DR7)."""
        self._ioctl("KVM_SET_DEBUGREGS", dregs.ptr)

    def set_guest_debug(self, control: int, hw_breakpoints: Iterable[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: single-step (SINGLESTEP) or up to 4 execute breakpoints
        (USE_HW_BP, addresses in ``hw_breakpoints``); each hit is a DebugExit."""
        c = ffi.new("struct kvm_guest_debug *", {"control": int(control)})
        bps = list(hw_breakpoints)
        if len(bps) > 4:
            raise ValueError(f"x86 has 4 debug address registers, not {len(bps)}")
        dr7 = 0
        for i, addr in enumerate(bps):
            c.arch.debugreg[i] = addr
            dr7 |= 1 << (2 * i)  # local enable, R/W=00 (execute), LEN=00
        if bps:
            c.arch.debugreg[7] = dr7 | 0x400
        self._ioctl("KVM_SET_GUEST_DEBUG", c)

    def translate(self, linear_address: int) -> Dict[str, int]:
        """KVM_TRANSLATE: walk the guest's page tables for a linear address."""
        c = ffi.new("struct kvm_translation *", {"linear_address": linear_address})
        self._ioctl("KVM_TRANSLATE", c)
        return {"physical_address": c.physical_address, "valid": c.valid,
                "writeable": c.writeable, "usermode": c.usermode}

    def nmi(self) -> None:
        """KVM_NMI: queue an NMI for this vCPU (with or without the in-kernel irqchip)."""
        self._ioctl("KVM_NMI")

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: inject an external interrupt vector (userspace irqchip only)."""
        self._ioctl("KVM_INTERRUPT", ffi.new("struct kvm_interrupt *", {"irq": vector}))

    def smi(self) -> None:
        """KVM_SMI: queue a System Management Interrupt; the vCPU enters SMM at its next
        entry. Needs KVM_CAP_X86_SMM (a KVM built without SMM answers ENOTTY)."""
        self._ioctl("KVM_SMI")

    def setup_mce(self, mcg_cap: int) -> None:
        """KVM_X86_SETUP_MCE: emulate machine-check banks with IA32_MCG_CAP = ``mcg_cap``.

        The low byte is the bank count (1..KVM_CAP_MCE), the other bits must be among
        ``Kvm.mce_cap_supported()`` (EINVAL otherwise). KVM sets MCG_CTL and every
        MCi_CTL to all ones, so each bank reports the errors ``set_mce`` injects."""
        self._ioctl("KVM_X86_SETUP_MCE", ffi.new("__u64 *", mcg_cap))

    def set_mce(self, bank: int, status: int, addr: int = 0, misc: int = 0,
                mcg_status: int = MCG_STATUS_MCIP_RIPV) -> None:
        """KVM_X86_SET_MCE: report a machine-check error in ``bank`` as the hardware would.

        ``status`` and ``mcg_status`` take the bits of pykvm.kvm.mce (``MciStatus``,
        ``McgStatus``); the default says a #MC is in progress and the guest may resume.
        An uncorrected error (``MciStatus.UC``) fills MCi_STATUS/ADDR/MISC, sets
        IA32_MCG_STATUS to ``mcg_status`` and queues #MC; a guest with CR4.MCE clear or
        already handling one (MCG_STATUS.MCIP) is shut down instead, as on hardware. A
        corrected error is only recorded in the bank, for the guest to find by polling.
        EINVAL if ``bank`` is not below ``setup_mce``'s count or ``status`` lacks VAL."""
        self._ioctl("KVM_X86_SET_MCE", ffi.new("struct kvm_x86_mce *", {
            "bank": bank, "status": status, "addr": addr, "misc": misc, "mcg_status": mcg_status}))

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell the guest the host paused it (e.g. stopped the VM).

        KVM sets PVCLOCK_GUEST_STOPPED in the guest's kvmclock page at the next entry,
        so the guest's lockup detectors do not fire over the time it did not run.
        EINVAL until the guest has enabled kvmclock (MSR_KVM_SYSTEM_TIME_NEW)."""
        self._ioctl("KVM_KVMCLOCK_CTRL")

    def get_nested_state(self) -> "NestedState":
        """KVM_GET_NESTED_STATE: the VMX/SVM state of a guest that is itself a hypervisor, which
        no register or MSR ioctl shows (see pykvm.kvm.nested), for saving with the rest.

        The buffer has the KVM_CAP_NESTED_STATE bytes the VM reports, the most KVM ever
        writes; KVM sets ``size`` to what it wrote. EINVAL where KVM has no nested support
        (the capability is 0)."""
        from pykvm.kvm.nested import NestedState

        state = NestedState(self.vm.check_extension(lib.KVM_CAP_NESTED_STATE))
        state.size = state.capacity
        return self._get("KVM_GET_NESTED_STATE", state)

    def set_nested_state(self, state: "NestedState") -> None:
        """KVM_SET_NESTED_STATE: give back what ``get_nested_state()`` returned, after the
        registers, MSRs and CPUID. KVM checks it against them: EINVAL for another vendor's
        format, a ``size`` below the header, flags the vCPU cannot have (on SVM with EFER.SVME
        clear, anything but GIF_SET) or GUEST_MODE without the VMCB12/VMCS12 it needs."""
        if state.size > state.capacity:  # KVM would read past the buffer
            raise ValueError(f"size {state.size} is larger than the state's {state.capacity}-byte buffer")
        self._ioctl("KVM_SET_NESTED_STATE", state.ptr)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest TSC frequency."""
        return self._ioctl("KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        """KVM_SET_TSC_KHZ: the guest TSC frequency. With TSC scaling (KVM_CAP_TSC_CONTROL)
        any rate KVM supports; without it, only rates within KVM's tolerance of the host's
        or faster ones (KVM catches the guest TSC up in software), others are EINVAL (and
        KVM_GET_TSC_KHZ then reports the refused rate all the same). Rates of 2^31 kHz and
        up are refused here: KVM_GET_TSC_KHZ returns the rate as the ioctl's int result."""
        if not 0 <= khz < 1 << 31:
            raise ValueError(f"TSC rate {khz} kHz is outside 0..2^31-1 kHz")
        self._ioctl("KVM_SET_TSC_KHZ", khz)

    def stats(self) -> "KvmStats":
        """KVM_GET_STATS_FD: the kernel's counters for this vCPU (exits by kind, halts, page
        faults, ...), read with pread without stopping the vCPU; this vCPU closes the fd first."""
        from pykvm.kvm.stats import KvmStats

        return KvmStats(self._ioctl("KVM_GET_STATS_FD"), self)

    def _release(self) -> None:
        self._run_c = None
        self._page = None
        mm = getattr(self, "_mm", None)
        self._mm = None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # an exit (or a run's locals) still views the page: it is unmapped with the last one

    def dirty_ring(self) -> "DirtyRing":
        """This vCPU's dirty-page ring (``Vm.enable_dirty_ring`` first): mapped from page
        KVM_DIRTY_LOG_PAGE_OFFSET of the vCPU fd on the first call, the same object afterwards
        (it keeps the harvest position), unmapped before this vCPU closes."""
        from pykvm.kvm.dirty_ring import DirtyRing

        if self._dirty_ring is None:
            self._dirty_ring = DirtyRing(self)
        return self._dirty_ring
