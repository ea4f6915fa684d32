"""Synthetic /sys, /proc and /dev trees for pykvm.host's logic.

The layout copies the kernel's: device directories under
``sys/devices/pci0000:00/BDF``, linked from ``sys/bus/pci/devices``; ``driver``
and ``iommu_group`` are relative symlinks like the real ones, so path handling
is exercised as on a real machine.  Nothing here imitates the kernel's reaction
to a write: tests check the decisions and the writes.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Dict, Optional

from pykvm.host.sysfs import Root

INTEL_READY_CONFIG = {
    "CONFIG_IOMMU_IOVA": "y", "CONFIG_INTEL_IOMMU": "y", "CONFIG_VFIO": "m", "CONFIG_VFIO_PCI": "m",
    "CONFIG_VFIO_IOMMU_TYPE1": "m", "CONFIG_VFIO_VIRQFD": "m", "CONFIG_KVM": "m", "CONFIG_KVM_INTEL": "m",
}


def kconfig_text(options: Dict[str, str]) -> str:
    return "".join(f"# {k} is not set\n" if v == "n" else f"{k}={v}\n" for k, v in options.items())


def config_space(vendor: int, device: int, class_code: int, caps: bytes = b"", size: int = 256) -> bytes:
    """A type-0 header; ``caps`` is placed at 0x40 with the capability-list bit set."""
    cfg = bytearray(size)
    struct.pack_into("<HH", cfg, 0, vendor, device)
    struct.pack_into("<I", cfg, 8, class_code << 8 | 0x02)
    if caps:
        struct.pack_into("<H", cfg, 6, 0x10)
        cfg[0x34] = 0x40
        cfg[0x40 : 0x40 + len(caps)] = caps
    return bytes(cfg)


class SysTree:
    """Builds a fake root; ``root`` is a :class:`Root` over it."""

    READY_CONFIG = INTEL_READY_CONFIG

    def __init__(self, base: Path):
        self.base = base
        self.root = Root(base)
        self.release = "6.1.0-test-amd64"
        self.file("/proc/sys/kernel/osrelease", self.release + "\n")
        self.file("/proc/cmdline", "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro quiet\n")
        self.file("/proc/modules", "")
        self.file("/proc/self/status", "Name:\tpython3\nCapEff:\t0000000000000000\n")
        self.file("/proc/self/limits", "Limit                     Soft Limit           Hard Limit           Units\n"
                                       "Max locked memory         8388608              8388608              bytes\n")
        self.dir("/sys/bus/pci/devices")
        self.file("/sys/bus/pci/drivers_probe", "")

    def path(self, rel: str) -> Path:
        return self.base / rel.lstrip("/")

    def dir(self, rel: str) -> Path:
        p = self.path(rel)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def file(self, rel: str, content) -> Path:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return p

    def link(self, rel: str, target: str) -> None:
        p = self.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink():
            p.unlink()
        os.symlink(target, p)

    def read(self, rel: str) -> str:
        return self.path(rel).read_text()

    def cpu(self, vendor: str = "GenuineIntel", flags: str = "fpu vme msr vmx lm") -> None:
        self.file("/proc/cpuinfo", f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n\n")

    def kconfig(self, options: Dict[str, str], where: str = "proc") -> None:
        text = kconfig_text(options)
        if where == "proc":
            self.file("/proc/config.gz", gzip.compress(text.encode()))
        else:
            self.file(f"/boot/config-{self.release}", text)

    def kmsg(self, *messages: str) -> None:
        self.file("/dev/kmsg", "".join(f"6,{i},{i * 1000},-;{m}\n" for i, m in enumerate(messages)))

    def driver(self, name: str) -> None:
        for f in ("bind", "unbind", "new_id"):
            self.file(f"/sys/bus/pci/drivers/{name}/{f}", "")

    def device(self, bdf: str, vendor: int, device: int, class_code: int, driver: Optional[str] = None,
               group: Optional[int] = None, caps: bytes = b"", resource: str = "", override: str = "(null)") -> None:
        real = f"/sys/devices/pci0000:00/{bdf}"
        attrs = {"vendor": f"0x{vendor:04x}", "device": f"0x{device:04x}", "class": f"0x{class_code:06x}",
                 "revision": "0x02", "subsystem_vendor": "0x1af4", "subsystem_device": "0x1100",
                 "irq": "11", "numa_node": "-1", "driver_override": override}
        for name, value in attrs.items():
            self.file(f"{real}/{name}", value + "\n")
        self.file(f"{real}/config", config_space(vendor, device, class_code, caps))
        self.file(f"{real}/resource", resource or "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 7)
        self.link(f"/sys/bus/pci/devices/{bdf}", f"../../../devices/pci0000:00/{bdf}")
        if driver:
            self.driver(driver)
            self.link(f"{real}/driver", f"../../../bus/pci/drivers/{driver}")
        if group is not None:
            self.dir(f"/sys/kernel/iommu_groups/{group}/devices")
            self.link(f"/sys/kernel/iommu_groups/{group}/devices/{bdf}", f"../../../../devices/pci0000:00/{bdf}")
            self.link(f"{real}/iommu_group", f"../../../kernel/iommu_groups/{group}")

    # -- whole machines --------------------------------------------------
    def lab_like(self) -> "SysTree":
        """An Intel machine ready for passthrough: the lab's L1 (q35, intel-iommu, edu, nvme)."""
        self.cpu()
        self.kconfig(INTEL_READY_CONFIG)
        self.file("/proc/cmdline", "console=ttyS0 quiet intel_iommu=on iommu=pt\n")
        self.kmsg("Linux version 6.1.0-test-amd64", "DMAR: IOMMU enabled",
                  "DMAR-IR: Enabled IRQ remapping in x2apic mode", "iommu: Default domain type: Passthrough")
        self.file("/proc/modules", "vfio_pci 16384 0 - Live 0x0\nvfio_iommu_type1 45056 0 - Live 0x0\n"
                                   "vfio 45056 2 vfio_pci,vfio_iommu_type1, Live 0x0\nnvme 53248 0 - Live 0x0\n")
        self.file("/proc/self/status", "Name:\tpython3\nCapEff:\t000001ffffffffff\n")
        self.file("/dev/vfio/vfio", "")
        self.file("/dev/kvm", "")
        self.file("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "1024\n")
        self.file("/sys/kernel/mm/transparent_hugepage/enabled", "always [madvise] never\n")
        self.driver("vfio-pci")
        self.device("0000:00:00.0", 0x8086, 0x29C0, 0x060000, group=0)
        self.device("0000:00:04.0", 0x1234, 0x11E8, 0x00FF00, group=3)
        self.device("0000:00:05.0", 0x1B36, 0x0010, 0x010802, driver="nvme", group=4,
                    resource="0x00000000febf0000 0x00000000febf3fff 0x0000000000140204\n"
                    + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 6)
        return self

    def no_iommu(self) -> "SysTree":
        """Like these development machines: KVM without vmx/svm, no IOMMU, no VFIO."""
        self.cpu("AuthenticAMD", "fpu vme msr lm hypervisor")
        self.kconfig({"CONFIG_KVM": "y", "CONFIG_KVM_PVM": "y", "CONFIG_IOMMU_IOVA": "y", "CONFIG_VFIO": "n",
                      "CONFIG_AMD_IOMMU": "n", "CONFIG_INTEL_IOMMU": "n"})
        self.kmsg("Linux version 6.18", "iommu: Default domain type: Translated")
        self.file("/dev/kvm", "")
        self.device("0000:00:05.0", 0x1AF4, 0x1044, 0xFFFF00, driver="virtio-pci")
        return self


# A slice of pci.ids in its real format: vendors, devices, a subsystem line, classes.
PCI_IDS = """# pci.ids sample
1234  Technical Corp.
\t11e8  Edu device
1b36  Red Hat, Inc.
\t0010  QEMU NVM Express Controller
\t\t1af4 1100  QEMU Virtual Machine
C 00  Unclassified device
\tff  Unclassified device
C 01  Mass storage controller
\t08  Non-Volatile memory controller
\t\t01  NVMHCI
\t\t02  NVM Express
"""
