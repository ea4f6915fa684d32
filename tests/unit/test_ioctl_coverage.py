"""Which ioctls of <linux/kvm.h> and <linux/vfio.h> pykvm binds: every one that applies to x86
(a method naming it, tested elsewhere), except those listed here with the reason. The test reads
the headers the extension is built from, so a newer header's ioctls show up as failures until
they are bound or listed."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Set

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEADERS = {"KVM": Path("/usr/include/linux/kvm.h"), "VFIO": Path("/usr/include/linux/vfio.h")}

OTHER_ARCH = ("KVM_ARM_", "KVM_PPC_", "KVM_S390_", "KVM_CREATE_SPAPR_TCE", "VFIO_IOMMU_SPAPR_", "VFIO_EEH_")
NOT_BOUND: Dict[str, str] = {
    # removed from Linux long ago (device assignment before VFIO, memory before user memory)
    **{name: "removed from Linux (KVM device assignment, superseded by VFIO)" for name in (
        "KVM_ASSIGN_DEV_IRQ", "KVM_ASSIGN_PCI_DEVICE", "KVM_ASSIGN_SET_INTX_MASK", "KVM_ASSIGN_SET_MSIX_ENTRY",
        "KVM_ASSIGN_SET_MSIX_NR", "KVM_DEASSIGN_DEV_IRQ", "KVM_DEASSIGN_PCI_DEVICE")},
    "KVM_SET_MEMORY_REGION": "removed from Linux: KVM_SET_USER_MEMORY_REGION (bound) replaced it",
    "KVM_SET_MEMORY_ALIAS": "removed from Linux",
    # superseded on x86 by an ioctl pykvm binds
    "KVM_CREATE_PIT": "superseded by KVM_CREATE_PIT2 (Vm.create_pit2)",
    "KVM_GET_PIT": "superseded by KVM_GET_PIT2 (Vm.get_pit2)",
    "KVM_SET_PIT": "superseded by KVM_SET_PIT2 (Vm.set_pit2)",
    "KVM_SET_CPUID": "superseded by KVM_SET_CPUID2 (Vcpu.set_cpuid2)",
    "KVM_GET_NR_MMU_PAGES": "deprecated; sizes the shadow MMU, which NPT/EPT do not use",
    "KVM_SET_NR_MMU_PAGES": "sizes the shadow MMU only, unused with NPT/EPT",
    "KVM_SET_VAPIC_ADDR": "legacy TPR patching for 32-bit Windows guests on pre-FlexPriority CPUs",
    "KVM_TPR_ACCESS_REPORTING": "legacy TPR patching for 32-bit Windows guests on pre-FlexPriority CPUs",
    # paravirtual interfaces of other hypervisors, and encrypted guests
    **{name: "Xen HVM emulation: out of scope (a Xen guest interface, not KVM's)" for name in (
        "KVM_XEN_HVM_CONFIG", "KVM_XEN_HVM_EVTCHN_SEND", "KVM_XEN_HVM_GET_ATTR", "KVM_XEN_HVM_SET_ATTR",
        "KVM_XEN_VCPU_GET_ATTR", "KVM_XEN_VCPU_SET_ATTR")},
    "KVM_HYPERV_EVENTFD": "Hyper-V SynIC emulation: out of scope (Hyper-V CPUID leaves are bound)",
    **{name: "SEV/TDX encrypted guests: no such hardware here or in the lab" for name in (
        "KVM_MEMORY_ENCRYPT_OP", "KVM_MEMORY_ENCRYPT_REG_REGION", "KVM_MEMORY_ENCRYPT_UNREG_REGION")},
    # not x86 in these headers
    "KVM_GET_ONE_REG": "not implemented on x86 (ARM, RISC-V, s390, PPC)",
    "KVM_SET_ONE_REG": "not implemented on x86 (ARM, RISC-V, s390, PPC)",
    "KVM_GET_REG_LIST": "not implemented on x86 (ARM, RISC-V)",
    "KVM_ALLOCATE_RMA": "PowerPC",
    "KVM_DIRTY_TLB": "PowerPC BookE",
    "VFIO_IOMMU_ENABLE": "sPAPR (POWER) IOMMU only",
    "VFIO_IOMMU_DISABLE": "sPAPR (POWER) IOMMU only",
    "VFIO_DEVICE_QUERY_GFX_PLANE": "mediated vGPU devices (mdev display), not vfio-pci",
    "VFIO_DEVICE_GET_GFX_DMABUF": "mediated vGPU devices (mdev display), not vfio-pci",
}


def header_ioctls(prefix: str) -> Set[str]:
    text = HEADERS[prefix].read_text()
    return set(re.findall(rf"#define\s+({prefix}_\w+)\s+_IO[RW]*\(", text))


def named_in_pykvm() -> str:
    """The Python sources outside the cffi declarations: a bound ioctl is named by its method."""
    return "\n".join(p.read_text() for p in (ROOT / "pykvm").rglob("*.py") if "_build" not in p.parts)


@pytest.mark.parametrize("prefix", sorted(HEADERS))
def test_every_x86_ioctl_is_bound_or_listed_with_a_reason(prefix: str):
    if not HEADERS[prefix].exists():
        from tests.conftest import require_or_skip  # scripts/build-deps installs linux-libc-dev
        require_or_skip("PYKVM_REQUIRE_KVM",
                        f"{HEADERS[prefix]} is not installed (linux-libc-dev): the extension could not be built either")
    src = named_in_pykvm()
    ioctls = header_ioctls(prefix)
    assert len(ioctls) > 20, f"no ioctls found in {HEADERS[prefix]}"
    unbound = {n for n in ioctls if not n.startswith(OTHER_ARCH) and not re.search(rf"\b{n}\b", src)}
    assert unbound - set(NOT_BOUND) == set(), "bind these (or list them with the reason)"
    stale = {n for n in NOT_BOUND if n.startswith(prefix) and (n not in ioctls or re.search(rf"\b{n}\b", src))}
    assert stale == set(), "listed as not bound, but bound now or gone from the header"
