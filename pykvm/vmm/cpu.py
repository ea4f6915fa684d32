"""Per-vCPU setup: what a vCPU must look like before its first KVM_RUN.

Every vCPU gets the same treatment (CPUID, MSRs, FPU, LAPIC LINT pins); only
the boot vCPU (the BSP, APIC ID 0) also gets the entry registers of the boot
plan. Application processors keep their reset state: the in-kernel LAPIC
holds them in wait-for-SIPI until the guest's INIT/SIPI starts them, and the
guest's own trampoline sets their registers.

- CPUID starts from ``KVM_GET_SUPPORTED_CPUID`` (what KVM can show a guest)
  and is made per vCPU: the initial APIC ID (leaf 1 EBX[31:24], leaves
  0xB/0x1F EDX, AMD 0x8000001E), a topology of one socket with ``cpus`` cores
  of one thread each (leaves 1, 4, 0xB/0x1F, 0x80000008), the hypervisor bit
  (leaf 1 ECX[31]) and the KVM signature leaves (0x40000000 "KVMKVMKVM",
  0x40000001 paravirt features such as kvmclock), so Linux uses kvmclock
  instead of calibrating the TSC against the PIT; and the host CPU's brand
  string (0x80000002-4, which KVM leaves zero), as QEMU's ``-cpu host`` does.
- MSRs: what firmware would leave: SYSENTER/SYSCALL targets zero, TSC 0,
  fast strings on (IA32_MISC_ENABLE), and MTRRs enabled with write-back as
  the default type (without it Linux maps all of RAM uncached: a slow boot).
- FPU: the state after FNINIT (FCW 0x37F) and MXCSR's reset value 0x1F80.
- LAPIC: LINT0 as ExtINT (the 8259 PIC's output reaches the CPU through it)
  and LINT1 as NMI, the wiring the MP table describes.
"""
from __future__ import annotations

import functools
import struct
from typing import Dict, Iterable, List

from pykvm._native import lib
from pykvm.kvm import CpuidEntry, Kvm, MpState, Regs, Vcpu
from pykvm.vmm.boot import BootPlan
from pykvm.vmm.cpu_tables import Segment, SpecialRegs

# struct kvm_cpuid_entry2.flags (arch/x86/include/uapi/asm/kvm.h): the index (subleaf) matters.
CPUID_FLAG_SIGNIFICANT_INDEX = 1

LEAF_FEATURES = 0x1
LEAF_CACHE = 0x4
LEAF_TOPOLOGY = 0xB
LEAF_TOPOLOGY_V2 = 0x1F
LEAF_KVM_SIGNATURE = 0x4000_0000
LEAF_KVM_FEATURES = 0x4000_0001
LEAF_EXT_MAX = 0x8000_0000
LEAF_BRAND = (0x8000_0002, 0x8000_0003, 0x8000_0004)
LEAF_EXT_ADDRESS = 0x8000_0008
LEAF_AMD_TOPOLOGY = 0x8000_001E

ECX_HYPERVISOR = 1 << 31
ECX_TSC_DEADLINE = 1 << 24
EDX_HTT = 1 << 28
CLFLUSH_LINE_8B = 8  # leaf 1 EBX[15:8]: CLFLUSH line size in 8-byte units (64 bytes)
TOPOLOGY_SMT, TOPOLOGY_CORE = 1, 2  # leaf 0xB ECX[15:8] level types
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6

FPU_FCW_INIT = 0x37F  # all exceptions masked, 64-bit precision, round to nearest
MXCSR_INIT = 0x1F80  # all SSE exceptions masked

APIC_LVT_LINT0, APIC_LVT_LINT1 = 0x350, 0x360
APIC_DELIVERY_MASK = 0x700
APIC_MODE_NMI, APIC_MODE_EXTINT = 0x4 << 8, 0x7 << 8

RFLAGS_IF = 1 << 9


def _bits_for(n: int) -> int:
    """Width of an APIC ID field holding ``n`` ids (ceil(log2 n))."""
    return max(0, (n - 1).bit_length())


def brand_leaves(brand: str) -> List[CpuidEntry]:
    """CPUID 0x80000002-4: ``brand`` as the processor brand string (48 bytes of ASCII in
    EAX, EBX, ECX, EDX of each leaf, NUL-terminated, at most 47 characters)."""
    raw = brand.encode("ascii", "replace")[:47].ljust(48, b"\0")
    return [CpuidEntry(fn, 0, 0, *struct.unpack_from("<IIII", raw, 16 * i)) for i, fn in enumerate(LEAF_BRAND)]


@functools.lru_cache(maxsize=1)
def host_cpu_brand(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The host CPU's brand string (/proc/cpuinfo's "model name"), or "" when there is none."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def vcpu_cpuid(supported: Iterable[CpuidEntry], apic_id: int, cpus: int, tsc_deadline: bool = False,
               brand: str = "") -> List[CpuidEntry]:
    """The CPUID table of vCPU ``apic_id`` in a ``cpus``-core, single-threaded, one-socket
    machine; ``brand`` (if any) replaces the brand string leaves."""
    supported = list(supported)
    max_ext = next((e.eax for e in supported if e.function == LEAF_EXT_MAX), 0)
    brand = brand if max_ext >= LEAF_BRAND[-1] else ""  # a CPU without the leaves keeps none
    out: List[CpuidEntry] = []
    topology_leaves = set()
    for src in supported:
        e = CpuidEntry(src.function, src.index, src.flags, src.eax, src.ebx, src.ecx, src.edx)
        fn = e.function
        if fn == LEAF_FEATURES:
            e.ebx = (apic_id << 24) | (cpus << 16) | (CLFLUSH_LINE_8B << 8)
            e.ecx |= ECX_HYPERVISOR | (ECX_TSC_DEADLINE if tsc_deadline else 0)
            e.edx = e.edx | EDX_HTT if cpus > 1 else e.edx & ~EDX_HTT
        elif fn == LEAF_CACHE:
            if e.eax & 0x1F:  # a cache is described: cores per package, and L3 shared by all cores
                level = (e.eax >> 5) & 0x7
                sharing = cpus - 1 if level == 3 else 0
                e.eax = (e.eax & 0x3FFF) | (sharing << 14) | ((cpus - 1) << 26)
        elif fn in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
            topology_leaves.add(fn)
            continue  # rebuilt below
        elif fn == LEAF_EXT_ADDRESS:
            e.ecx = (e.ecx & ~0xF0FF) | (_bits_for(cpus) << 12) | (cpus - 1)
        elif fn == LEAF_AMD_TOPOLOGY:
            e.eax, e.ebx, e.ecx = apic_id, apic_id & 0xFF, 0  # one thread per core, node 0
        elif fn == LEAF_KVM_SIGNATURE:
            continue  # rebuilt below
        elif fn in LEAF_BRAND and brand:
            continue  # rebuilt below
        out.append(e)
    for fn in sorted(topology_leaves):
        out += _topology(fn, apic_id, cpus)
    signature = struct.unpack("<III", KVM_SIGNATURE)
    out.append(CpuidEntry(LEAF_KVM_SIGNATURE, 0, 0, LEAF_KVM_FEATURES, *signature))
    if not any(e.function == LEAF_KVM_FEATURES for e in out):
        out.append(CpuidEntry(LEAF_KVM_FEATURES))
    if brand:
        out += brand_leaves(brand)
    return out


def _topology(fn: int, apic_id: int, cpus: int) -> List[CpuidEntry]:
    """Leaf 0xB/0x1F: SMT level (1 thread), core level (``cpus`` cores), then the invalid level."""
    flags = CPUID_FLAG_SIGNIFICANT_INDEX
    return [
        CpuidEntry(fn, 0, flags, eax=0, ebx=1, ecx=(TOPOLOGY_SMT << 8) | 0, edx=apic_id),
        CpuidEntry(fn, 1, flags, eax=_bits_for(cpus), ebx=cpus, ecx=(TOPOLOGY_CORE << 8) | 1, edx=apic_id),
        CpuidEntry(fn, 2, flags, eax=0, ebx=0, ecx=2, edx=apic_id),
    ]


def boot_msrs(available: Iterable[int]) -> Dict[int, int]:
    """Reset-time MSR values a boot loader leaves, limited to those KVM saves and restores."""
    wanted = {
        MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0, MSR_LSTAR: 0, MSR_CSTAR: 0, MSR_SYSCALL_MASK: 0, MSR_KERNEL_GS_BASE: 0,
        MSR_IA32_TSC: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRBACK,
    }
    have = set(available)
    return {k: v for k, v in wanted.items() if k in have}


def configure_vcpu(vcpu: Vcpu, kvm: Kvm, supported: List[CpuidEntry], cpus: int) -> None:
    """CPUID, MSRs, FPU and LAPIC LINT0/1 of one vCPU (BSP or AP); its id is its APIC ID."""
    tsc_deadline = bool(kvm.check_extension(lib.KVM_CAP_TSC_DEADLINE_TIMER))
    vcpu.set_cpuid2(vcpu_cpuid(supported, vcpu.id, cpus, tsc_deadline, host_cpu_brand()))
    vcpu.set_msrs(boot_msrs(kvm.msr_index_list()))
    fpu = vcpu.get_fpu()
    fpu.fcw = FPU_FCW_INIT
    fpu.mxcsr = MXCSR_INIT
    vcpu.set_fpu(fpu)
    lapic = vcpu.get_lapic()
    for reg, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        lapic.set_reg(reg, (lapic.reg(reg) & ~APIC_DELIVERY_MASK) | mode)
    vcpu.set_lapic(lapic)


def _load_segment(dst, seg: Segment) -> None:
    for name in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable"):
        setattr(dst, name, getattr(seg, name))


def set_boot_state(vcpu: Vcpu, plan: BootPlan) -> None:
    """Enter the kernel: the plan's segments, tables and control registers, then rip/rsp/rsi/rbx."""
    sregs = vcpu.get_sregs()  # keeps apic_base and the interrupt bitmap
    s: SpecialRegs = plan.sregs
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        _load_segment(getattr(sregs, name), getattr(s, name))
    sregs.gdt.base, sregs.gdt.limit = s.gdt.base, s.gdt.limit
    sregs.idt.base, sregs.idt.limit = s.idt.base, s.idt.limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = s.cr0, s.cr3, s.cr4, s.efer
    vcpu.set_sregs(sregs)
    r = plan.regs
    vcpu.set_regs(Regs(rip=r.rip, rsp=r.rsp, rsi=r.rsi, rbx=r.rbx, rflags=r.rflags))


def halted_for_good(vcpu: Vcpu) -> bool:
    """True if the vCPU sits in HLT with interrupts off (only an NMI/INIT could wake it):
    how Linux's halt and power-off without ACPI leave every CPU. Call from the vCPU's thread."""
    state = vcpu.get_mp_state()
    return state == MpState.HALTED and not vcpu.get_regs().rflags & RFLAGS_IF


def waiting_for_sipi(vcpu: Vcpu) -> bool:
    """True for an AP that the guest never started (still waiting for INIT/SIPI)."""
    return vcpu.get_mp_state() in (MpState.UNINITIALIZED, MpState.INIT_RECEIVED)
