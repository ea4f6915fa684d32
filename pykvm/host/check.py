"""``pykvm host check``: is this machine ready to pass a PCI device through to a guest?

Each requirement becomes one :class:`CheckItem` with PASS, WARN or FAIL and, when
not PASS, the fix.  FAIL means a passthrough run cannot work; WARN means it may
work but something is slower, less safe or unknown.  Every probe reads files
under a :class:`Root`, so a machine without KVM or an IOMMU gets a report, not an
exception.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from pykvm.host.groups import list_groups
from pykvm.host.kernel import Cmdline, KernelConfig, Modules, kernel_log, read_kernel_config
from pykvm.host.pci import VFIO_DRIVER
from pykvm.host.sysfs import Root
from pykvm.vmm.layout import human_size, parse_size  # the sizes `pykvm run --memory` takes, and its words for them

__all__ = ["CheckItem", "CheckReport", "run_checks", "parse_size", "KVM_CAPS"]

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

# Capabilities the VMM uses to boot Linux with a passed-through device: guest RAM,
# in-kernel APIC/IOAPIC/PIT, device interrupts injected by eventfd (irqfd) with MSI
# routing, doorbells by eventfd (ioeventfd).  (x86 does not report KVM_CAP_DEVICE_CTRL
# although KVM_CREATE_DEVICE works there, so the KVM-VFIO device is not asked for.)
KVM_CAPS = (
    "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR", "KVM_CAP_EXT_CPUID", "KVM_CAP_IRQCHIP",
    "KVM_CAP_PIT2", "KVM_CAP_IRQ_ROUTING", "KVM_CAP_IRQFD", "KVM_CAP_IOEVENTFD",
    "KVM_CAP_SIGNAL_MSI", "KVM_CAP_IMMEDIATE_EXIT",
)
# (module, its Kconfig symbol): what vfio-pci needs, and how each is built.
VFIO_MODULES = (
    ("vfio", "CONFIG_VFIO"),
    ("vfio_iommu_type1", "CONFIG_VFIO_IOMMU_TYPE1"),
    ("vfio_pci", "CONFIG_VFIO_PCI"),
)
KCONFIG_OPTIONS = (
    ("CONFIG_IOMMU_IOVA", "IOVA allocator used by the IOMMU DMA layer"),
    ("CONFIG_VFIO", "VFIO core (/dev/vfio/vfio)"),
    ("CONFIG_VFIO_PCI", "vfio-pci driver"),
    ("CONFIG_VFIO_IOMMU_TYPE1", "type1 IOMMU backend (VFIO_SET_IOMMU)"),
    ("CONFIG_VFIO_VIRQFD", "eventfd-driven INTx unmask"),
)
_IOMMU_LOG = re.compile(r"DMAR: IOMMU enabled|DMAR: Intel\(R\) Virtualization Technology|AMD-Vi: Found IOMMU|"
                        r"AMD-Vi: AMD IOMMUv2|AMD-Vi: Interrupt remapping|DMAR-IR:")
_IR_ON_LOG = re.compile(r"DMAR-IR: Enabled IRQ remapping|AMD-Vi: Interrupt remapping enabled")
_CAP_IPC_LOCK = 14


@dataclass
class CheckItem:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass
class CheckReport:
    root: str
    memory: int
    items: List[CheckItem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing a passthrough run needs has failed (WARNs allowed)."""
        return all(item.status != FAIL for item in self.items)

    def to_json(self) -> dict:
        return {"root": self.root, "memory": self.memory, "ok": self.ok, "items": [asdict(i) for i in self.items]}


class _Host:
    """Facts read once and shared by the checks."""

    def __init__(self, root: Root):
        self.root = root
        self.cpuinfo = root.read_text("/proc/cpuinfo") or ""
        flags = re.search(r"^flags\s*:(.*)$", self.cpuinfo, re.MULTILINE)
        self.cpu_flags = set(flags.group(1).split()) if flags else set()
        vendor = re.search(r"^vendor_id\s*:\s*(\S+)", self.cpuinfo, re.MULTILINE)
        self.cpu_vendor = vendor.group(1) if vendor else None
        self.cmdline = Cmdline.read(root)
        self.config: Optional[KernelConfig] = read_kernel_config(root)
        self.log = kernel_log(root)
        self.modules = Modules.read(root)
        self.groups = root.listdir("/sys/kernel/iommu_groups")

    @property
    def intel(self) -> bool:
        """An Intel CPU (kvm_intel)."""
        return self.cpu_vendor == "GenuineIntel" or "vmx" in self.cpu_flags

    @property
    def intel_iommu(self) -> bool:
        """Is the IOMMU Intel VT-d (DMAR) rather than AMD-Vi?  The kernel's own evidence
        (/sys/class/iommu/dmar* or ivhd*, DMAR/AMD-Vi log lines, intel_iommu=) wins over the
        CPU vendor: an emulated machine can pair an AMD CPU with an Intel IOMMU."""
        units = self.root.listdir("/sys/class/iommu")
        if any(u.startswith("dmar") for u in units) or self.log_lines(re.compile(r"^DMAR")):
            return True
        if any(u.startswith("ivhd") for u in units) or self.log_lines(re.compile(r"^AMD-Vi")):
            return False
        if self.cmdline and self.cmdline.get("intel_iommu") is not None:
            return True
        return self.intel

    def log_lines(self, pattern: "re.Pattern[str]") -> List[str]:
        return [m for m in self.log or () if pattern.search(m)]


def check_cpu(h: _Host) -> CheckItem:
    virt = sorted(h.cpu_flags & {"vmx", "svm"})
    if virt:
        return CheckItem("cpu virtualization", PASS, f"CPU flag {virt[0]}")
    if h.root.exists("/dev/kvm"):
        pvm = h.config and h.config.value("CONFIG_KVM_PVM") in ("y", "m")
        how = "PVM (CONFIG_KVM_PVM), which runs guests without hardware virtualization" if pvm else "a KVM without vmx/svm"
        return CheckItem("cpu virtualization", WARN, f"no vmx/svm flag in /proc/cpuinfo; /dev/kvm comes from {how}",
                         "guests run, but a full Linux guest is slow here; use a machine (or the lab) with VT-x/AMD-V")
    return CheckItem("cpu virtualization", FAIL, "no vmx/svm flag in /proc/cpuinfo and no /dev/kvm",
                     "enable VT-x (Intel) or AMD-V/SVM in the firmware setup; in a VM, enable nested virtualization")


def check_kvm_device(h: _Host) -> CheckItem:
    path = "/dev/kvm"
    if not h.root.exists(path):
        module = "kvm_intel" if h.intel else "kvm_amd"
        return CheckItem("/dev/kvm", FAIL, "/dev/kvm does not exist",
                         f"load the KVM module (modprobe {module}); check `dmesg | grep -i kvm` for why it refused")
    if not os.access(h.root(path), os.R_OK | os.W_OK):
        return CheckItem("/dev/kvm", FAIL, "/dev/kvm exists but this user cannot open it read-write",
                         "add the user to the device's group (usually `kvm`: usermod -aG kvm USER) and log in again")
    return CheckItem("/dev/kvm", PASS, "present and read-write for this user")


def check_kvm_caps(h: _Host) -> CheckItem:
    """Ask /dev/kvm (through pykvm.kvm) for the API version and the capabilities in :data:`KVM_CAPS`."""
    name = "KVM capabilities"
    if not h.root.exists("/dev/kvm"):
        return CheckItem(name, FAIL, "not queried: no /dev/kvm", "fix the /dev/kvm item first")
    try:
        from pykvm.kvm import Kvm
    except ImportError as exc:
        return CheckItem(name, WARN, f"not queried: the KVM layer cannot be imported ({exc})",
                         "build the extension (python3 pykvm/_build/build.py) and check that `import pykvm.kvm` works")
    try:
        with Kvm(str(h.root("/dev/kvm"))) as kvm:
            version = kvm.api_version
            missing = [cap for cap in KVM_CAPS if kvm.check_extension(cap) <= 0]
    except (OSError, ValueError) as exc:
        return CheckItem(name, FAIL, f"cannot query {h.root('/dev/kvm')}: {exc}",
                         "fix the /dev/kvm item first; pykvm needs KVM API version 12")
    if missing:
        return CheckItem(name, FAIL, f"API {version}; missing {', '.join(missing)}",
                         "use a kernel with a full in-kernel irqchip and irqfd support (x86 KVM with kvm_intel/kvm_amd)")
    return CheckItem(name, PASS, f"API {version}; all {len(KVM_CAPS)} capabilities the VMM uses are present")


def check_kconfig(h: _Host) -> List[CheckItem]:
    if h.config is None:
        return [CheckItem("kernel config", WARN, "no /proc/config.gz and no /boot/config-RELEASE",
                          "modprobe configs (for /proc/config.gz) or install the kernel's config file; "
                          "the module and /dev checks below still tell what works")]
    items = []
    for symbol, what in KCONFIG_OPTIONS:
        value = h.config.value(symbol)
        if value in ("y", "m"):
            items.append(CheckItem(symbol, PASS, f"{'built in' if value == 'y' else 'module'}: {what}"))
        else:
            items.append(CheckItem(symbol, FAIL, f"not set in {h.config.source}: {what}",
                                   f"use a kernel built with {symbol}=y or =m (distribution kernels have it)"))
    symbol = "CONFIG_INTEL_IOMMU" if h.intel_iommu else "CONFIG_AMD_IOMMU"
    value = h.config.value(symbol)
    if value in ("y", "m"):
        items.append(CheckItem(symbol, PASS, "IOMMU driver built in"))
    else:
        items.append(CheckItem(symbol, FAIL, f"not set in {h.config.source}: no driver for this machine's IOMMU",
                               f"use a kernel built with {symbol}=y"))
    return items


def check_iommu_cmdline(h: _Host) -> CheckItem:
    name = "IOMMU on the command line"
    if h.cmdline is None:
        return CheckItem(name, WARN, "/proc/cmdline unreadable", "")
    if "off" in h.cmdline.options("iommu"):
        return CheckItem(name, FAIL, "iommu=off", "remove iommu=off from the kernel command line")
    if h.intel_iommu:
        opts = h.cmdline.options("intel_iommu")
        if "on" in opts:
            return CheckItem(name, PASS, f"intel_iommu={h.cmdline.get('intel_iommu')}")
        if "off" in opts:
            return CheckItem(name, FAIL, "intel_iommu=off", "boot with intel_iommu=on (add iommu=pt to keep host DMA fast)")
        if h.config and h.config.value("CONFIG_INTEL_IOMMU_DEFAULT_ON") == "y":
            return CheckItem(name, PASS, "on by default (CONFIG_INTEL_IOMMU_DEFAULT_ON=y)")
        return CheckItem(name, WARN, "intel_iommu=on not given and the kernel may not enable the IOMMU by default",
                         "add intel_iommu=on iommu=pt to the kernel command line (GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub)")
    if "off" in h.cmdline.options("amd_iommu"):
        return CheckItem(name, FAIL, "amd_iommu=off", "remove amd_iommu=off (AMD-Vi is on by default); add iommu=pt")
    return CheckItem(name, PASS, "no amd_iommu=off (AMD-Vi is on by default)")


def check_iommu_log(h: _Host) -> CheckItem:
    name = "IOMMU in kernel log"
    if h.log is None:
        return CheckItem(name, WARN, "cannot read /dev/kmsg", "run as root (or sysctl kernel.dmesg_restrict=0) to read the kernel log")
    lines = h.log_lines(_IOMMU_LOG)
    if lines:
        return CheckItem(name, PASS, lines[0].strip())
    return CheckItem(name, WARN if h.groups else FAIL, "no DMAR or AMD-Vi lines in the kernel log",
                     "enable VT-d / AMD-Vi (IOMMU) in the firmware setup and boot with intel_iommu=on or amd_iommu=on"
                     + ("; the log may also have wrapped since boot" if h.groups else ""))


def check_iommu_groups(h: _Host) -> CheckItem:
    name = "IOMMU groups"
    if h.groups:
        return CheckItem(name, PASS, f"{len(h.groups)} groups in /sys/kernel/iommu_groups")
    return CheckItem(name, FAIL, "/sys/kernel/iommu_groups is empty or missing: no IOMMU is translating DMA",
                     "enable VT-d / AMD-Vi in the firmware setup, boot with intel_iommu=on (Intel) or without amd_iommu=off (AMD), "
                     "and check the kernel has CONFIG_INTEL_IOMMU / CONFIG_AMD_IOMMU")


def check_irq_remapping(h: _Host) -> CheckItem:
    name = "interrupt remapping"
    unsafe = (h.root.read_text("/sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts") or "").strip() == "Y"
    if not h.groups:
        return CheckItem(name, FAIL, "no IOMMU, so no interrupt remapping", "enable the IOMMU first (see above)")
    if h.log is not None and h.log_lines(_IR_ON_LOG):
        return CheckItem(name, PASS, h.log_lines(_IR_ON_LOG)[0].strip())
    why = ("a device could write any MSI and inject interrupts into the host or other guests; "
           "vfio_iommu_type1 refuses such groups unless allow_unsafe_interrupts=1")
    if unsafe:
        return CheckItem(name, WARN, "not seen in the kernel log; vfio_iommu_type1 allow_unsafe_interrupts=Y", why)
    if h.log is None:
        return CheckItem(name, WARN, "unknown: cannot read the kernel log", "run as root to read /dev/kmsg")
    return CheckItem(name, FAIL, "no 'Enabled IRQ remapping' / 'Interrupt remapping enabled' in the kernel log",
                     "enable interrupt remapping (x2APIC/IR in firmware; not intremap=off), or accept the risk with "
                     "`options vfio_iommu_type1 allow_unsafe_interrupts=1`: " + why)


def check_vfio_modules(h: _Host) -> List[CheckItem]:
    items = []
    for module, symbol in VFIO_MODULES:
        state = h.modules.state(module, h.config, symbol)
        if state == "builtin" or (state != "loaded" and h.root.exists(f"/sys/module/{module}")):
            items.append(CheckItem(f"module {module}", PASS, "built into the kernel"))
        elif state == "loaded":
            items.append(CheckItem(f"module {module}", PASS, "loaded"))
        elif state == "module":
            extra = " (vfio_pci does not load it)" if module == "vfio_iommu_type1" else ""
            items.append(CheckItem(f"module {module}", WARN, f"available as a module, not loaded{extra}", f"modprobe {module}"))
        else:
            items.append(CheckItem(f"module {module}", FAIL, "neither loaded nor built in, and the kernel config does not offer it",
                                   f"use a kernel with {symbol}; on Debian/Ubuntu the stock kernel has it (modprobe {module})"))
    return items


def check_vfio_device(h: _Host) -> CheckItem:
    path = "/dev/vfio/vfio"
    if not h.root.exists(path):
        return CheckItem(path, FAIL, "missing: the VFIO core is not loaded",
                         "modprobe vfio-pci vfio_iommu_type1 (or build them into the kernel)")
    if not os.access(h.root(path), os.R_OK | os.W_OK):
        return CheckItem(path, FAIL, "exists but this user cannot open it read-write", "run as root or chmod/chown /dev/vfio/*")
    return CheckItem(path, PASS, "present")


def check_split_groups(h: _Host) -> CheckItem:
    """A group with a device on vfio-pci while another stays on a host driver that does DMA
    is not viable: the kernel lets no VFIO user attach it (usually a half-done bind)."""
    name = "VFIO groups viable"
    split = [g for g in list_groups(h.root) if g.blockers and any(d.driver == VFIO_DRIVER for d in g.devices)]
    if not split:
        return CheckItem(name, PASS, "no IOMMU group has devices on vfio-pci and on host drivers at once")
    detail = "; ".join(
        f"group {g.number}: {', '.join(d.bdf for d in g.devices if d.driver == VFIO_DRIVER)} on vfio-pci, "
        f"{', '.join(f'{d.bdf} on {d.driver}' for d in g.blockers)}" for g in split)
    first = [next(d.bdf for d in g.devices if d.driver == VFIO_DRIVER) for g in split]
    return CheckItem(name, WARN, f"not viable, VFIO cannot open them: {detail}",
                     " or ".join(f"`pykvm host bind --group {b}`" for b in first) + " (all of a group to vfio-pci), or "
                     + " and ".join(f"`pykvm host restore --group {b}`" for b in first) + " (all back to the host)")


def check_acs_override(h: _Host) -> CheckItem:
    name = "pci_acs_override"
    value = h.cmdline.get("pci_acs_override") if h.cmdline else None
    if value is None:
        return CheckItem(name, PASS, "not set: IOMMU groups reflect the hardware's real isolation")
    return CheckItem(name, WARN, f"pci_acs_override={value}: the kernel splits groups the hardware does not isolate",
                     "devices in such a split group can still reach each other by peer-to-peer DMA that bypasses the "
                     "IOMMU, so the guest is not isolated from them; remove the option unless you accept that")


def check_memlock(h: _Host, memory: int) -> CheckItem:
    """vfio_iommu_type1 pins all guest RAM and charges it to RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK."""
    name = "locked memory"
    status = h.root.read_text("/proc/self/status") or ""
    cap = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", status, re.MULTILINE)
    if cap and int(cap.group(1), 16) >> _CAP_IPC_LOCK & 1:
        return CheckItem(name, PASS, "CAP_IPC_LOCK: VFIO may pin any amount of guest RAM")
    limits = h.root.read_text("/proc/self/limits") or ""
    m = re.search(r"^Max locked memory\s+(\S+)", limits, re.MULTILINE)
    if not m:
        return CheckItem(name, WARN, "cannot read /proc/self/limits", "")
    if m.group(1) == "unlimited":
        return CheckItem(name, PASS, "RLIMIT_MEMLOCK unlimited")
    limit = int(m.group(1))
    if limit >= memory:
        return CheckItem(name, PASS, f"RLIMIT_MEMLOCK {human_size(limit)} >= guest RAM {human_size(memory)}")
    return CheckItem(name, FAIL, f"RLIMIT_MEMLOCK {human_size(limit)} < guest RAM {human_size(memory)}: VFIO_IOMMU_MAP_DMA will fail with ENOMEM",
                     f"ulimit -l {memory >> 10} (or `USER hard memlock unlimited` in /etc/security/limits.conf), or run as root")


def check_hugepages(h: _Host, memory: int) -> CheckItem:
    name = "hugepages"
    best = None
    for entry in h.root.listdir("/sys/kernel/mm/hugepages"):
        m = re.fullmatch(r"hugepages-(\d+)kB", entry)
        free = h.root.read_text(f"/sys/kernel/mm/hugepages/{entry}/free_hugepages")
        if m and free and free.strip().isdigit():
            size = int(m.group(1)) << 10
            if int(free) * size >= memory:
                return CheckItem(name, PASS, f"{int(free)} free {human_size(size)} pages cover guest RAM {human_size(memory)}")
            if size == 2 << 20:
                best = size
    thp = (h.root.read_text("/sys/kernel/mm/transparent_hugepage/enabled") or "").strip()
    pages = -(-memory // (best or 2 << 20))
    return CheckItem(name, WARN, f"not enough free hugepages for {human_size(memory)} (transparent hugepages: {thp or 'unknown'})",
                     f"guest RAM falls back to 4 KiB pages (more TLB and IOMMU misses); reserve them with "
                     f"`echo {pages} > /proc/sys/vm/nr_hugepages` (or hugepages={pages} on the command line)")


def run_checks(root: Optional[Root] = None, memory: int = 1 << 30) -> CheckReport:
    """Every check, in the order a user fixes them: CPU and KVM, kernel build, IOMMU, VFIO, limits."""
    root = root or Root()
    h = _Host(root)
    items = [
        check_cpu(h), check_kvm_device(h), check_kvm_caps(h), *check_kconfig(h),
        check_iommu_cmdline(h), check_iommu_log(h), check_iommu_groups(h), check_irq_remapping(h),
        *check_vfio_modules(h), check_vfio_device(h), check_split_groups(h), check_acs_override(h),
        check_memlock(h, memory), check_hugepages(h, memory),
    ]
    return CheckReport(str(root.path), memory, items)


def format_report(report: CheckReport) -> str:
    """One line per item, its fix indented below when it is not PASS, and a summary."""
    width = max(len(i.name) for i in report.items)
    lines = []
    for item in report.items:
        lines.append(f"{item.status}  {item.name:<{width}}  {item.detail}")
        if item.status != PASS and item.fix:
            lines.append(f"      {'':<{width}}  fix: {item.fix}")
    fails = sum(i.status == FAIL for i in report.items)
    warns = sum(i.status == WARN for i in report.items)
    verdict = "ready for passthrough" if report.ok else "NOT ready for passthrough"
    lines.append(f"\n{verdict}: {fails} FAIL, {warns} WARN, {len(report.items) - fails - warns} PASS")
    return "\n".join(lines)
