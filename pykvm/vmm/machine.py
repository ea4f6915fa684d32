"""The machine: a VM with RAM, a boot plan, legacy PC devices, PCI bus 0 and one thread per vCPU.

``Machine(config)`` reads and checks everything first (kernel, initrd,
command line, memory size, CPU count): any mistake raises a ``ValueError``
subclass that says what to change, before a VM or vCPU exists. The kernel file
is mapped rather than read (only the pages a boot uses are), and with
``config.direct`` a bzImage's kernel comes decompressed from pykvm's vmlinux cache
(pykvm.vmm.boot.vmlinux_cache: the guest skips its decompressor). ``start()``
builds the VM and starts the vCPUs, ``wait()`` returns how the run ended
(a :class:`MachineExit`), ``close()`` tears it down; ``run()`` does all
three.

What the guest sees (a PC without ACPI, like kvmtool's and Firecracker's):

- RAM below the 32-bit PCI hole and the rest above 4 GiB (pykvm.vmm.layout),
  the kernel, zero page, command line and initrd as the boot plan says, and
  an MP table listing every vCPU, the I/O APIC, the ISA IRQs and PCI INTx.
- KVM's in-kernel irqchip (two 8259 PICs, an I/O APIC, a LAPIC per vCPU)
  and i8254 PIT (with the port 0x61 speaker/gate handled in the kernel too).
- COM1: a 16550A at 0x3F8, IRQ 4, wired to the console; the i8042 at
  0x60/0x64 (only its reset line matters); the CMOS RTC at 0x70; port 0x80
  (POST codes / Linux's I/O delay) and the ports of absent legacy devices
  (COM2-4, LPT, Super I/O, DMA pages: all ones) answered in C; PCI configuration
  mechanism #1 at 0xCF8/0xCFC with a host bridge at 00:00.0.

How a run ends (``MachineExit.reason`` and the exit ``status``):

- ``reset`` (0): the guest pulsed the i8042 reset line (Linux ``reboot`` with
  ``reboot=k``, and a panic with ``panic=-1``) or KVM reported a
  SYSTEM_EVENT reset.
- ``poweroff`` (0): Linux without ACPI cannot switch itself off: its
  ``poweroff`` becomes "halt" and leaves every CPU in HLT with interrupts
  disabled. A vCPU that may be in that state (pykvm.vmm.halt_watch: it slept
  a whole 0.25 s without an exit; or, without KVM's statistics, every 0.25 s)
  is kicked and checks itself (KVM_GET_MP_STATE and RFLAGS.IF). When every
  vCPU has been found in it (or never started) on two checks in a row, the
  machine confirms in one round: every vCPU thread leaves KVM_RUN, and only
  once all are out does each look at its vCPU again. Only if every one of
  these fresh verdicts says halted has the machine powered off; a vCPU found
  running loses its earlier verdicts (a vote from boot, when an AP waited for
  its SIPI, cannot end a guest that started the AP since). A SYSTEM_EVENT
  shutdown counts the same.
- ``triple-fault`` (4): KVM_EXIT_SHUTDOWN.
- ``crash`` (3): SYSTEM_EVENT crash, or a reset after the console printed
  ``Kernel panic`` (so a panicking Linux with ``panic=-1`` is not a success).
- ``timeout`` (124, counted from ``run()``'s start), ``stopped`` (0, ``stop()`` or the
  console's escape key), ``error`` (1: KVM_RUN failed, the entry failed, an exit nobody
  handles).

A configuration the machine cannot run raises :class:`MachineError` (from ``Machine()``
or, for what only building finds out, such as guest RAM the host cannot allocate, from
``build()``/``start()``/``run()``); ``pykvm run`` exits 2 for it, as for a usage error.

PCI passthrough plugs in through :attr:`Machine.pci` (bus 0, BAR ranges on
:attr:`mmio`/:attr:`pio`), :attr:`vm`, :attr:`memory` and :attr:`gsi`;
``config.vfio`` devices (pykvm.vmm.pci.passthrough.VfioPciDevice) are opened
and put on the bus between building the VM and writing the MP table (which
then routes their INTx), and closed, with their VFIO container, before guest
RAM goes away.
"""
from __future__ import annotations

import enum
import errno
import math
import mmap
import os
import stat
import threading
import time
from typing import Any, Callable, List, NamedTuple, Optional, Tuple, Union

from pykvm._log import get_logger
from pykvm._native import lib
from pykvm._record import record_eq, record_repr
from pykvm.kvm import Kvm, Vcpu, Vm
from pykvm.kvm.exits import Exit, SystemEventExit
from pykvm.memory import GuestMemory, MemoryRegion
from pykvm.vmm import cpu
from pykvm.vmm.boot import BootError, BootPlan, plan_boot
from pykvm.vmm.boot.bzimage import is_bzimage, parse_bzimage
from pykvm.vmm.bus import Bus
from pykvm.vmm.console import Console, ConsoleUart, open_console
from pykvm.vmm.devices.i8042 import I8042
from pykvm.vmm.devices.misc import CMOS_PORT, POST_PORT, Cmos
from pykvm.vmm.devices.serial import COM1_IRQ, COM1_PORT, REGISTER_COUNT
from pykvm.vmm.halt_watch import HaltWatch
from pykvm.vmm.layout import MPTABLE_ADDR, Layout, human_size, memory_layout
from pykvm.vmm.pci.allocator import BarAllocator
from pykvm.vmm.pci.bus import PciBus
from pykvm.vmm.pci.config import INTERRUPT_PIN
from pykvm.vmm.pci.gsi import GsiRouter
from pykvm.vmm.runloop import ConstantDevice, CRunLoop, PyRunLoop, RunLoop, RunStats, Status
from pykvm.vmm.stats import BootTimes, TextWatch
from pykvm.vmm.tables.mptable import MAX_CPUS, build_mptable

log = get_logger(__name__)

# The serial console; reboot through the i8042 (the reset this machine has) and at once on a
# panic. pci=noearly: no early type-1 scans, which on AMD family 0xF CPUs (the lab's TCG CPU)
# probe for a GART with ~65536 config reads, 2 exits each. i8042.noaux: no PS/2 mouse port;
# the AUX loopback probe otherwise polls the status port ~10000 times (one exit each).
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=noearly i8042.noaux"
# Guest-physical pages KVM needs on Intel (VMX real-mode TSS, 3 pages; EPT identity map,
# 1 page), where QEMU and Firecracker put them: just below the BIOS ROM at the top of 4 GiB.
TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
MARKER_PORT = 0x3F0  # a byte written here marks "guest reached its marker" (free on a PC without floppy)
HALT_CHECK_INTERVAL = 0.25  # seconds between a vCPU's checks for "halted with interrupts off"
HALT_CHECKS = 2  # consecutive checks that must agree before the machine confirms a power-off in one round
HALT_ROUND_WAIT = 2.0  # seconds the vCPU threads wait for each other in a confirming round before giving it up
PANIC_TEXT = b"Kernel panic - not syncing"
JOIN_TIMEOUT = 5.0
KERNEL_HINT = "pass --kernel with a bzImage (e.g. /boot/vmlinuz-*) or an ELF vmlinux"
# Legacy ports Linux probes on a PC but this machine has nothing behind: (base, length, name).
# They read as all ones (an empty ISA bus), answered in C (ConstantDevice) instead of one Python
# exit each (~180 us in nested KVM): COM2-4, which the 8250 driver probes; the Super I/O config
# ports at 0x2E and 0x4E, which drivers probe by writing an unlock key; the DMA page registers
# around the POST port; the LPT ports.
ABSENT_PORTS = (
    (0x2E, 2, "superio-2e"), (0x4E, 2, "superio-4e"), (0x81, 15, "dma-page"),
    (0x278, 3, "lpt2"), (0x2E8, 8, "com4"), (0x2F8, 8, "com2"), (0x378, 3, "lpt1"), (0x3BC, 3, "lpt3"),
    (0x3E8, 8, "com3"),
)


class MachineError(ValueError):
    """The configuration cannot make a machine; the message says what to change."""


class ExitReason(enum.Enum):
    RESET = "reset"
    POWEROFF = "poweroff"
    TRIPLE_FAULT = "triple-fault"
    CRASH = "crash"
    TIMEOUT = "timeout"
    STOPPED = "stopped"
    ERROR = "error"


EXIT_STATUS = {
    ExitReason.RESET: 0, ExitReason.POWEROFF: 0, ExitReason.STOPPED: 0, ExitReason.ERROR: 1,
    ExitReason.TRIPLE_FAULT: 4, ExitReason.CRASH: 3, ExitReason.TIMEOUT: 124,
}


class MachineExit(NamedTuple):
    """How a run ended: the reason, the process exit status for it, and details."""

    reason: ExitReason
    detail: str = ""
    vcpu: Optional[int] = None

    @property
    def status(self) -> int:
        return EXIT_STATUS[self.reason]

    def __str__(self) -> str:
        where = f" (vcpu{self.vcpu})" if self.vcpu is not None else ""
        return f"{self.reason.value}{where}{': ' + self.detail if self.detail else ''}"


REQUIRED: Any = object()  # the default of a field that has none (the kernel)


class ConfigField(NamedTuple):
    """One field of :class:`MachineConfig`, as a config file may give it."""

    name: str
    types: Tuple[type, ...]  # what a config file's value may be (bool only where listed)
    default: Any  # or REQUIRED


# MachineConfig's fields in constructor order, with the value types a TOML config file may give
# and their defaults: MachineConfig's attributes, defaults, repr and == and pykvm.vmm.config's keys
# and type checks all come from here.
CONFIG_FIELDS: Tuple[ConfigField, ...] = (
    ConfigField("kernel", (str,), REQUIRED),
    ConfigField("initrd", (str,), None),
    ConfigField("cmdline", (str,), DEFAULT_CMDLINE),
    ConfigField("memory", (str, int), "512M"),
    ConfigField("cpus", (int,), 1),
    ConfigField("console", (str,), "stdio"),  # stdio | file:PATH | none
    ConfigField("stats", (bool,), False),
    ConfigField("marker", (str,), None),  # console text whose first appearance is the boot marker
    ConfigField("timeout", (int, float), None),  # seconds; the run ends with status 124 after it
    ConfigField("vfio", (list,), ()),  # PCI devices to pass through (BDF or sysfs path); a new list each
    ConfigField("loop", (str,), "c"),  # "c": the C run loop; "python": the pure-Python loop
    ConfigField("direct", (bool,), False),  # a bzImage's kernel decompressed by the VMM (cached), no guest decompressor
)
_DEFAULT = {f.name: f.default for f in CONFIG_FIELDS}


class MachineConfig:
    """Everything ``pykvm run`` and a VM config file can say about a machine (fields: CONFIG_FIELDS)."""

    __slots__ = tuple(f.name for f in CONFIG_FIELDS)
    kernel: str
    initrd: Optional[str]
    cmdline: str
    memory: Union[str, int]
    cpus: int
    console: str
    stats: bool
    marker: Optional[str]
    timeout: Optional[float]
    vfio: List[str]
    loop: str
    direct: bool

    _repr_fields = _eq_fields = __slots__

    def __init__(self, kernel: str, initrd: Optional[str] = _DEFAULT["initrd"], cmdline: str = _DEFAULT["cmdline"],
                 memory: Union[str, int] = _DEFAULT["memory"], cpus: int = _DEFAULT["cpus"],
                 console: str = _DEFAULT["console"], stats: bool = _DEFAULT["stats"],
                 marker: Optional[str] = _DEFAULT["marker"], timeout: Optional[float] = _DEFAULT["timeout"],
                 vfio: Optional[List[str]] = None, loop: str = _DEFAULT["loop"],
                 direct: bool = _DEFAULT["direct"]) -> None:
        self.kernel = kernel
        self.initrd = initrd
        self.cmdline = cmdline
        self.memory = memory
        self.cpus = cpus
        self.console = console
        self.stats = stats
        self.marker = marker
        self.timeout = timeout
        self.vfio = list(_DEFAULT["vfio"]) if vfio is None else vfio
        self.loop = loop
        self.direct = direct

    __repr__ = record_repr
    __eq__ = record_eq


def check_timeout(timeout: Any) -> Optional[float]:
    """``timeout`` as seconds (None: no timeout), or MachineError unless it is a positive,
    finite number no larger than threading.TIMEOUT_MAX (what Event.wait accepts)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise MachineError(f"--timeout must be a number of seconds, not {timeout!r}")
    if not (math.isfinite(timeout) and 0 < timeout <= threading.TIMEOUT_MAX):
        raise MachineError(f"--timeout must be a positive, finite number of seconds up to "
                           f"{threading.TIMEOUT_MAX:.0f} (got {timeout!r}); leave it out for no timeout")
    return float(timeout)


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _read_file(path: Optional[str], what: str, hint: str, limit: int, limit_hint: str, mapped: bool = False,
               stat_out: Optional[List[os.stat_result]] = None) -> Optional["bytes | mmap.mmap"]:
    """The contents of the regular file ``path``, refused before reading when it is anything
    else (MachineError: a FIFO or /dev/stdin could block forever, /dev/zero never ends) or
    larger than ``limit`` bytes (BootError: it could not fit in guest RAM anyway). ``mapped``:
    a read-only mapping instead, whatever its size (a vmlinux with debug information is
    larger than the RAM its loaded segments need; only the pages used are ever read), where
    the file system can map it. ``stat_out`` receives the opened file's status."""
    if path is None:
        return None
    if path == "":
        raise MachineError(f"the {what} path is empty: {hint}")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it changes nothing for a file.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MachineError(f"{what} {path!r} does not exist: {hint}") from None
    except OSError as exc:
        raise MachineError(f"cannot read {what} {path!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat_out is not None:
            stat_out.append(st)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
            raise MachineError(f"{what} {path!r} is {kind}, not a regular file: {hint}")
        if mapped and st.st_size:
            try:
                return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            except OSError:  # a file system that cannot map files (FUSE direct_io, sysfs): read it
                pass
        if st.st_size > limit:
            raise BootError(f"{what} {path!r} of {human_size(st.st_size)} does not fit in the guest's "
                            f"{human_size(limit)} of RAM: {limit_hint}")
        try:
            os.set_blocking(fd, True)
            if st.st_size:
                data = f.read()
            else:  # files like those in /proc report size 0: read them in bounded pieces
                data = b""
                while len(data) <= limit:
                    piece = f.read(min(1 << 20, limit + 1 - len(data)))
                    if not piece:
                        break
                    data += piece
        except OSError as exc:
            raise MachineError(f"cannot read {what} {path!r}: {exc.strerror}") from None
    if len(data) > limit:
        raise BootError(f"{what} {path!r} does not fit in the guest's {human_size(limit)} of RAM: {limit_hint}")
    return data


def _owned(plan: BootPlan) -> BootPlan:
    """``plan`` with bytes of its own in place of views of a mapped file."""
    return plan._replace(writes=tuple((addr, data if isinstance(data, bytes) else bytes(data))
                                      for addr, data in plan.writes))


def _unmap(image: "bytes | mmap.mmap | None") -> None:
    """Unmap a mapped kernel file now (its views are gone); left to the collector if one is not."""
    if isinstance(image, mmap.mmap):
        try:
            image.close()
        except BufferError:
            pass


def _host_memory() -> str:
    """'N GiB of memory, M GiB available' from /proc/meminfo, for a message ('' if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            info = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)}
        return f"this host has {human_size(info['MemTotal'])} of memory, {human_size(info['MemAvailable'])} available"
    except (OSError, KeyError, ValueError):
        return ""


class _HaltRound:
    """One confirming round for a power-off: every vCPU thread comes out of KVM_RUN (``out``),
    then each checks its own vCPU and records the verdict (``checked``, whose action decides
    before any thread goes back into the guest). The barriers break if a thread does not
    come within HALT_ROUND_WAIT seconds or the run ends (``abort``)."""

    def __init__(self, n: int, decide: Callable[["_HaltRound"], None]) -> None:
        self.dead = [False] * n
        self.out = threading.Barrier(n, timeout=HALT_ROUND_WAIT)
        self.checked = threading.Barrier(n, action=lambda: decide(self), timeout=HALT_ROUND_WAIT)

    def abort(self) -> None:
        self.out.abort()
        self.checked.abort()


class Machine:
    """A VM built from a :class:`MachineConfig`; see the module documentation."""

    def __init__(self, config: MachineConfig, console: Optional[Console] = None):
        self.config = config
        self.times = BootTimes()
        self.times.mark("machine init")  # since process start: interpreter start-up and imports
        if not isinstance(config.cpus, int) or not 1 <= config.cpus <= MAX_CPUS:
            raise MachineError(f"--cpus must be between 1 and {MAX_CPUS} (got {config.cpus!r})")
        if config.loop not in ("c", "python"):
            raise MachineError(f"run loop {config.loop!r} is neither 'c' nor 'python'")
        self.timeout = check_timeout(config.timeout)
        self.notes: List[str] = []  # what a user should hear about how the machine was built
        self.layout: Layout = memory_layout(config.memory)
        ram = self.layout.memory
        kernel_stat: List[os.stat_result] = []
        kernel = _read_file(config.kernel, "kernel", KERNEL_HINT,
                            ram, "is it the kernel? (a bzImage or vmlinux), or give the guest more memory (--memory)",
                            mapped=True, stat_out=kernel_stat)
        if kernel is None:
            raise MachineError(f"no kernel: {KERNEL_HINT}")
        initrd = _read_file(config.initrd, "initrd", "pass --initrd with an initramfs (cpio, optionally compressed)",
                            ram, "give the guest more memory (--memory) or use a smaller initrd")
        if initrd is not None and not initrd:
            raise MachineError(f"initrd {config.initrd!r} is empty: pass an initramfs, or leave --initrd out")
        if config.vfio:  # one function twice would sit on two slots: refused before anything is opened
            from pykvm.vmm.pci.preflight import check_unique

            check_unique(config.vfio)
        try:
            self.plan: BootPlan = self._plan(kernel, initrd, kernel_stat[0])
        except BaseException as exc:
            import traceback

            traceback.clear_frames(exc.__traceback__)  # their views of the mapped files go with their locals
            raise
        finally:
            _unmap(kernel)
        self.times.mark("boot plan ready")
        self.console = console if console is not None else open_console(config.console)
        self.console.on_quit = lambda: self.stop(ExitReason.STOPPED, "console escape key")

        self.kvm: Optional[Kvm] = None
        self.vm: Optional[Vm] = None
        self.memory: Optional[GuestMemory] = None
        self.vcpus: List[Vcpu] = []
        self.pio = Bus("pio", 1 << 16)
        self.mmio: Optional[Bus] = None
        self.pci: Optional[PciBus] = None
        self.gsi: Optional[GsiRouter] = None
        self.uart: Optional[ConsoleUart] = None
        self.loops: List[Union[CRunLoop, PyRunLoop]] = []
        self._threads: List[threading.Thread] = []
        self._halt_watch: Optional[HaltWatch] = None  # finds halted vCPUs from KVM's stats
        self.kernel_stats: List[dict] = []  # each vCPU's KVM statistics when the machine closed
        self._closers: List[Callable[[], None]] = []  # devices to close before memory goes, last first
        self._exit: Optional[MachineExit] = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._halt_votes: List[int] = []
        self._round: Optional[_HaltRound] = None  # a confirming round for a power-off, while one runs
        self._panicked = False
        self._watches: List[TextWatch] = [TextWatch(PANIC_TEXT, self._on_panic)]
        if config.marker:
            self._watches.append(TextWatch(config.marker.encode(), lambda: self.times.mark("guest marker")))

    def _plan(self, kernel: "bytes | mmap.mmap", initrd: Optional[bytes], kernel_stat: os.stat_result) -> BootPlan:
        """The boot plan, holding its own copy of the bytes it loads (not views of the mapped
        kernel file: a file truncated later would kill the process with SIGBUS when read).
        With ``direct`` a bzImage's kernel comes decompressed from the vmlinux cache (and is
        decompressed and cached now on the first boot of that image), under the key of the
        file that was opened (``kernel_stat``), whatever the path names by now."""
        cfg = self.config
        if not (cfg.direct and is_bzimage(kernel)):
            return _owned(plan_boot(kernel, self.layout, cfg.cmdline, initrd))
        from pykvm.vmm.boot.vmlinux_cache import direct_kernel  # only here: its imports cost start-up

        bz = parse_bzimage(kernel)
        t0 = time.monotonic()
        vmlinux = direct_kernel(cfg.kernel, bz, st=kernel_stat)
        header, bz = bz.header, None  # the header is a copy; the BzImage holds a view of the file
        if vmlinux.extracted:
            after = (f" into {vmlinux.path} in {time.monotonic() - t0:.1f} s; later boots of this image start "
                     "from there" if vmlinux.path else f" in {time.monotonic() - t0:.1f} s (not cached)")
            self.notes.append(f"--direct: decompressed the kernel ({human_size(len(vmlinux.image))}){after}")
        try:
            return _owned(plan_boot(vmlinux.image, self.layout, cfg.cmdline, initrd,
                                    setup_header=header, extents=vmlinux.extents))
        finally:
            _unmap(vmlinux.image)

    # -- building ------------------------------------------------------------------------
    def build(self) -> None:
        """Create the VM, its memory, devices and vCPUs (no vCPU runs yet)."""
        if self.vm is not None:
            return
        cfg = self.config
        self.kvm = Kvm()
        if cfg.cpus > self.kvm.max_vcpus:
            raise MachineError(f"this KVM allows at most {self.kvm.max_vcpus} vCPUs per VM (asked for {cfg.cpus})")
        supported = self.kvm.supported_cpuid()
        phys_bits = next((e.eax & 0xFF for e in supported if e.function == cpu.LEAF_EXT_ADDRESS), 36)
        self.vm = vm = self.kvm.create_vm()
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        vm.set_tss_addr(TSS_ADDR)
        vm.create_irqchip()
        vm.create_pit2(lib.KVM_PIT_SPEAKER_DUMMY)
        self.gsi = GsiRouter(vm)
        self.memory = self._allocate_ram()
        vm.map_memory(self.memory)
        for addr, data in self.plan.writes:
            self.memory.write(addr, data)
        self.mmio = Bus("mmio", 1 << phys_bits)
        self._legacy_devices()
        allocator = BarAllocator.for_layout(*self.layout.mmio32, self.layout.mmio64_base, phys_bits)
        self.pci = PciBus(allocator, mmio=self.mmio, pio=self.pio)
        self.pci.register_ports(self.pio)
        self._attach_passthrough()
        self.memory.write(MPTABLE_ADDR, build_mptable(MPTABLE_ADDR, cfg.cpus, self.pci.intx_routes()))
        desc = RunLoop(self.pio, self.mmio, handlers={
            lib.KVM_EXIT_SHUTDOWN: self._on_shutdown,
            lib.KVM_EXIT_SYSTEM_EVENT: self._on_system_event,
        }, on_unhandled=self._on_unhandled)
        for i in range(cfg.cpus):
            vcpu = vm.create_vcpu(i)
            self.vcpus.append(vcpu)
            cpu.configure_vcpu(vcpu, self.kvm, supported, cfg.cpus)
            if i == 0:
                cpu.set_boot_state(vcpu, self.plan)
            self.loops.append(self._make_loop(desc, vcpu))
        self._halt_votes = [0] * cfg.cpus
        # Here, while no vCPU runs: KVM_GET_STATS_FD takes the vCPU's mutex, which a thread in
        # KVM_RUN holds (a vCPU waiting for its SIPI never lets go by itself).
        self._halt_watch = HaltWatch.open(self.vcpus, lambda i: self.loops[i].kick(), HALT_CHECK_INTERVAL)
        self.times.mark("vm built")

    def _allocate_ram(self) -> GuestMemory:
        """Guest RAM, or MachineError naming the size and the host's memory when it cannot be had."""
        regions: List[MemoryRegion] = []
        try:
            for i, r in enumerate(self.layout.ram):
                regions.append(MemoryRegion(r.gpa, r.size, name=f"ram{i}"))
        except OSError as exc:
            for region in regions:
                region.close()
            host = _host_memory()
            why = "" if exc.errno == errno.ENOMEM else f" ({exc.strerror})"
            raise MachineError(f"cannot allocate {human_size(self.layout.memory)} of guest RAM{why}"
                               f"{': ' + host if host else ''}; lower --memory") from None
        return GuestMemory(regions)

    def _make_loop(self, desc: RunLoop, vcpu: Vcpu) -> Union[CRunLoop, PyRunLoop]:
        if self.config.loop == "c":
            try:
                return CRunLoop(desc, vcpu)
            except ValueError as exc:
                log.warning("C run loop unavailable (%s): using the Python loop", exc)
        return PyRunLoop(desc, vcpu)

    def _legacy_devices(self) -> None:
        vm = self.vm
        self.uart = ConsoleUart(self._console_output, irq_line=(vm, COM1_IRQ),
                                on_rx_space=self.console.rx_space)
        self.pio.register(COM1_PORT, REGISTER_COUNT, self.uart, "com1")
        i8042 = I8042(reset=lambda: self._finish_reset("i8042 reset line (reboot=k)"))
        for port, length, dev in i8042.ports():
            self.pio.register(port, length, dev, f"i8042-{port:#x}")
        self.pio.register(CMOS_PORT, 2, Cmos(), "cmos")
        self.pio.register(POST_PORT, 1, ConstantDevice(), "post-code")
        for base, length, name in ABSENT_PORTS:
            self.pio.register(base, length, ConstantDevice(), name)
        self.pio.register(MARKER_PORT, 1, _MarkerPort(lambda: self.times.mark("guest marker")), "boot-marker")

    def _attach_passthrough(self) -> None:
        """Open each ``config.vfio`` device (checks first), put it on PCI bus 0 and give it its
        INTx line; all share one VFIO container with guest RAM mapped at IOVA = GPA."""
        if not self.config.vfio:
            return
        from pykvm.vmm.pci.passthrough import VfioContext, VfioPciDevice  # VFIO only when asked for

        context = VfioContext(self.vm, self.memory)
        self._closers.append(context.close)
        for device in self.config.vfio:
            dev = VfioPciDevice.open(device, vm=self.vm, memory=self.memory, gsi_router=self.gsi, context=context)
            self._closers.append(dev.close)
            slot = self.pci.add(dev)
            intx = dev.config.get(INTERRUPT_PIN, 1)
            dev.plugged(slot, self.pci.ioapic_pin(slot, intx - 1) if 1 <= intx <= 4 else None)

    # -- guest events ------------------------------------------------------------------
    def _console_output(self, data: bytes) -> None:
        self.console.write(data)
        for w in self._watches:
            w.feed(data)

    def _on_panic(self) -> None:
        self._panicked = True

    def _finish_reset(self, detail: str) -> None:
        if self._panicked:
            self._finish(MachineExit(ExitReason.CRASH, f"kernel panic, then {detail}"))
        else:
            self._finish(MachineExit(ExitReason.RESET, detail))

    def _on_shutdown(self, ex: Exit) -> bool:
        self._finish(MachineExit(ExitReason.TRIPLE_FAULT, "KVM_EXIT_SHUTDOWN (triple fault)"))
        return True

    def _on_system_event(self, ex: Exit) -> bool:
        assert isinstance(ex, SystemEventExit)
        kind = ex.type_name
        if ex.type == lib.KVM_SYSTEM_EVENT_RESET:
            self._finish_reset("SYSTEM_EVENT reset")
        elif ex.type == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
            self._finish(MachineExit(ExitReason.POWEROFF, "SYSTEM_EVENT shutdown"))
        elif ex.type == lib.KVM_SYSTEM_EVENT_CRASH:
            self._finish(MachineExit(ExitReason.CRASH, "SYSTEM_EVENT crash"))
        else:
            self._finish(MachineExit(ExitReason.ERROR, f"SYSTEM_EVENT {kind}"))
        return True

    def _on_unhandled(self, ex: Exit) -> bool:
        self._finish(MachineExit(ExitReason.ERROR, f"unhandled exit {ex.name}: {ex!r}"))
        return True

    def _finish(self, result: MachineExit) -> None:
        """Record how the run ended (the first caller wins) and stop every vCPU."""
        with self._lock:
            if self._exit is None:
                self._exit = result
                self.times.mark("end")
            rnd = self._round
        for loop in self.loops:
            loop.stop()
        self._done.set()
        if rnd is not None:
            rnd.abort()  # threads waiting for each other in a round go and see the run ended

    def stop(self, reason: ExitReason = ExitReason.STOPPED, detail: str = "") -> None:
        """End the run from any thread: every vCPU is kicked out of KVM_RUN."""
        self._finish(MachineExit(reason, detail))

    # -- running -----------------------------------------------------------------------
    def start(self) -> None:
        """Build (if needed), connect the console and start one thread per vCPU."""
        self.build()
        self.console.connect(self.uart.feed)
        for i in range(len(self.vcpus)):
            t = threading.Thread(target=self._vcpu_thread, args=(i,), name=f"pykvm-vcpu{i}", daemon=True)
            self._threads.append(t)
            t.start()
        if self._halt_watch is not None:
            self._halt_watch.start()

    def _vcpu_thread(self, index: int) -> None:
        loop, vcpu = self.loops[index], self.vcpus[index]
        if index == 0:
            self.times.mark("first vCPU entry")
        try:
            while not self._done.is_set():
                # Without KVM's statistics the check runs on a timer.
                result = loop.run_until(timeout=None if self._halt_watch is not None else HALT_CHECK_INTERVAL)
                if result.status in (Status.EXIT, Status.STOPPED):
                    return
                if result.status is Status.ERROR:
                    self._finish(MachineExit(ExitReason.ERROR, f"KVM_RUN failed: {result.error}", index))
                    return
                if result.status in (Status.DEADLINE, Status.INTERRUPTED):
                    rnd = self._round or self._check_halted(index, vcpu)
                    if rnd is not None:
                        self._halt_round(rnd, index, vcpu)
        except Exception as exc:  # a VMM bug must end the run, not leave a dead thread
            log.exception("vcpu%d thread failed", index)
            self._finish(MachineExit(ExitReason.ERROR, f"vCPU thread failed: {exc!r}", index))

    @staticmethod
    def _halted(index: int, vcpu: Vcpu) -> bool:
        return cpu.halted_for_good(vcpu) or (index > 0 and cpu.waiting_for_sipi(vcpu))

    def _check_halted(self, index: int, vcpu: Vcpu) -> Optional[_HaltRound]:
        """Count this vCPU's verdict; when every vCPU's verdicts agree it is halted, start a
        confirming round (or return the one already started) for this thread to join."""
        dead = self._halted(index, vcpu)
        with self._lock:
            self._halt_votes[index] = self._halt_votes[index] + 1 if dead else 0
            if not (dead and all(v >= HALT_CHECKS for v in self._halt_votes)):
                return None
            if self._round is not None or self._done.is_set():
                return self._round
            rnd = self._round = _HaltRound(len(self.vcpus), self._decide_round)
        for i, loop in enumerate(self.loops):  # the others leave KVM_RUN and join (this thread is out)
            if i != index:
                loop.kick()
        return rnd

    def _halt_round(self, rnd: _HaltRound, index: int, vcpu: Vcpu) -> None:
        """This thread's part of a confirming round: wait until every vCPU is out of KVM_RUN, so
        none can wake another meanwhile, then give a fresh verdict on this vCPU."""
        try:
            rnd.out.wait()
            rnd.dead[index] = dead = self._halted(index, vcpu)
            if not dead:
                with self._lock:
                    self._halt_votes[index] = 0  # its older verdicts are stale: it runs
            rnd.checked.wait()  # the last to arrive runs _decide_round before anyone goes on
        except threading.BrokenBarrierError:  # a thread did not come in time, or the run ended
            with self._lock:
                if self._round is rnd:
                    self._round = None

    def _decide_round(self, rnd: _HaltRound) -> None:
        with self._lock:
            if self._round is rnd:
                self._round = None
        if all(rnd.dead):
            self._finish(MachineExit(ExitReason.POWEROFF, "every vCPU halted with interrupts disabled"))

    def wait(self, timeout: Optional[float] = None) -> MachineExit:
        """Block until the run ends (or ``timeout`` seconds pass: then it ends as ``timeout``)."""
        timeout = check_timeout(timeout)
        return self._wait(None if timeout is None else time.monotonic() + timeout, timeout)

    def _wait(self, deadline: Optional[float], timeout: Optional[float]) -> MachineExit:
        if not self._done.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
            self._finish(MachineExit(ExitReason.TIMEOUT, f"no end after {timeout:g} s"))
        for t in self._threads:
            t.join(JOIN_TIMEOUT)
            if t.is_alive():
                log.error("%s did not stop within %.0f s", t.name, JOIN_TIMEOUT)
        assert self._exit is not None
        return self._exit

    def run(self) -> MachineExit:
        """start(), wait(config.timeout), close(): the whole life of the machine. The timeout
        counts from here, so building the VM and starting its vCPUs are inside it."""
        timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self.start()
            return self._wait(deadline, timeout)
        finally:
            self.close()

    @property
    def exit(self) -> Optional[MachineExit]:
        return self._exit

    def exit_stats(self) -> List[RunStats]:
        """Each vCPU's exit statistics (exits by reason, time in the guest and in the VMM)."""
        return [loop.stats for loop in self.loops]

    # -- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the vCPUs, then release in dependency order: console, devices, vCPUs, VM, RAM."""
        if self._threads and not self._done.is_set():
            self.stop(ExitReason.STOPPED, "machine closed")
        for t in self._threads:
            t.join(JOIN_TIMEOUT)
        self._threads = [t for t in self._threads if t.is_alive()]
        if self._halt_watch is not None:
            self.kernel_stats = self._halt_watch.snapshot()
            self._halt_watch.close()
            self._halt_watch = None
        self.console.close()
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:
                log.exception("closing a device failed")
        if self._threads:
            log.error("vCPU threads still running; leaving the VM open")
            return
        for loop in self.loops:
            loop.release()
        for vcpu in self.vcpus:
            vcpu.close()
        if self.vm is not None:
            self.vm.close()
        if self.memory is not None:
            self.memory.close()
        if self.kvm is not None:
            self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _MarkerPort:
    """Port device: any byte written marks the guest's boot marker; reads as 0xFF."""

    def __init__(self, on_mark: Callable[[], None]):
        self._on_mark = on_mark

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        self._on_mark()


__all__ = ["Machine", "MachineConfig", "MachineExit", "ExitReason", "MachineError", "DEFAULT_CMDLINE",
           "MARKER_PORT", "EXIT_STATUS", "CONFIG_FIELDS", "ConfigField", "check_timeout"]
