"""KVM_GET/SET_NESTED_STATE and KVM_GET_SUPPORTED_HV_CPUID on the real /dev/kvm.

This host's PVM has neither (KVM_CAP_NESTED_STATE and KVM_CAP_SYS_HYPERV_CPUID are 0), so
those tests skip here; tests/lab/test_kvm_in_lab.py runs them on L1's kvm_amd.
"""
from __future__ import annotations

import errno
import struct

import pytest

from pykvm._native import lib
from pykvm.kvm import Cap, HltExit
from pykvm.kvm.nested import NestedFlag, NestedFormat, NestedState, VmxSmmFlag
from tests.kvm.guests import CODE, HLT, real_mode_vcpu
from tests.kvm.test_modes import CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, flat_mode, map_4k
from tests.kvm.test_vcpu_state_extra import expect_kvm_error

pytestmark = pytest.mark.kvm

HEADER = NestedState.HEADER_SIZE
EFER_SVME = 1 << 12
ALL_ONES = (1 << 64) - 1
# What KVM reports for a vCPU whose guest never turned SVM/VMX on: flags, vendor header
# fields, and the vendor data at most (SVM: vmcb12; VMX: vmcs12 and shadow vmcs12).
OUTSIDE_GUEST_MODE = {
    NestedFormat.SVM: (NestedFlag.GIF_SET, {"vmcb_pa": 0}, lib.KVM_STATE_NESTED_SVM_VMCB_SIZE),
    NestedFormat.VMX: (0, {"vmxon_pa": ALL_ONES, "vmcs12_pa": ALL_ONES}, 2 * lib.KVM_STATE_NESTED_VMX_VMCS_SIZE),
}
# 64-bit code: KVM emulates CLGI/STGI only with EFER.SVME set and paging on (#UD otherwise).
SVME_CLGI = bytes.fromhex(
    "b9 80 00 00 c0"  # mov ecx, 0xc0000080 (EFER)
    "0f 32"           # rdmsr
    "0f ba e8 0c"     # bts eax, 12 (SVME)
    "0f 30"           # wrmsr
    "0f 01 dd"        # clgi
) + HLT
STGI = bytes.fromhex("0f 01 dc") + HLT


def host_format(kvm) -> NestedFormat:
    """The nested format of the host's vendor (CPUID leaf 0 as KVM reports it)."""
    leaf0 = next(e for e in kvm.supported_cpuid() if e.function == 0)
    vendor = b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))
    return NestedFormat.SVM if vendor in (b"AuthenticAMD", b"HygonGenuine") else NestedFormat.VMX


@pytest.fixture
def nested_cpu(kvm, vm):
    """A long-mode vCPU about to run SVME_CLGI then STGI, with the CPUID KVM supports (it
    offers SVM or VMX where kvm_amd/kvm_intel has nested=1)."""
    if not vm.check_extension(Cap.NESTED_STATE):
        pytest.skip("KVM_CAP_NESTED_STATE is 0: this KVM (PVM) keeps no nested state; runs on the lab's kvm_amd")
    cpu, mem = real_mode_vcpu(vm, SVME_CLGI + STGI)
    cpu.set_cpuid2(kvm.supported_cpuid())
    map_4k(mem, 0x2000, CODE, CODE, [0x3000])
    flat_mode(cpu, mem, CR0_PE | CR0_ET | CR0_PG, cr3=0x2000, cr4=CR4_PAE, efer=EFER_LME | EFER_LMA,
              long_mode=True)
    return cpu


def test_nested_state_outside_guest_mode_round_trips(kvm, vm, nested_cpu):
    fmt = host_format(kvm)
    flags, header_fields, max_data = OUTSIDE_GUEST_MODE[fmt]
    state = nested_cpu.get_nested_state()
    assert state.format == fmt and state.flags == flags and not state.flags & NestedFlag.GUEST_MODE
    assert state.size == HEADER and state.data == b""
    assert state.capacity == vm.check_extension(Cap.NESTED_STATE) == HEADER + max_data
    assert {name: getattr(state, name) for name in header_fields} == header_fields
    nested_cpu.set_nested_state(state)
    again = nested_cpu.get_nested_state()
    assert again.to_bytes() == state.to_bytes() and len(again.to_bytes()) == HEADER
    nested_cpu.set_nested_state(NestedState.from_bytes(state.to_bytes()))  # as if read back from a file
    assert nested_cpu.get_nested_state() == state


def test_set_nested_state_refuses_invalid_states(nested_cpu):
    state = nested_cpu.get_nested_state()
    other = NestedFormat.VMX if state.format == NestedFormat.SVM else NestedFormat.SVM
    # another vendor's format; a size below the header; GUEST_MODE while the guest never
    # turned SVM/VMX on (no VMCB12/VMCS12 to run)
    for field, value in (("format", other), ("size", HEADER - 1), ("flags", state.flags | NestedFlag.GUEST_MODE)):
        bad = state.copy()
        setattr(bad, field, value)
        expect_kvm_error("KVM_SET_NESTED_STATE", errno.EINVAL, nested_cpu.set_nested_state, bad)
    bad = state.copy()
    bad.size = bad.capacity + 1
    with pytest.raises(ValueError, match="larger than"):
        nested_cpu.set_nested_state(bad)
    assert nested_cpu.get_nested_state() == state


def test_guest_clgi_and_stgi_show_in_the_svm_gif_flag(kvm, nested_cpu):
    """The guest sets EFER.SVME and runs CLGI: the state loses GIF_SET; STGI brings it back.
    A clear GIF can be set from the host only once EFER.SVME is on, and GUEST_MODE needs
    the VMCB12 after the header (kvm_amd, Linux 6.1)."""
    if host_format(kvm) != NestedFormat.SVM:
        pytest.skip("the guest runs SVM's CLGI/STGI: this host's KVM is VMX")
    cpu = nested_cpu
    initial = cpu.get_nested_state()
    assert initial.flags == NestedFlag.GIF_SET
    gif_clear = initial.copy()
    gif_clear.flags = 0
    expect_kvm_error("KVM_SET_NESTED_STATE", errno.EINVAL, cpu.set_nested_state, gif_clear)  # EFER.SVME is off
    assert isinstance(cpu.run(timeout=5), HltExit) and cpu.get_regs().rip == CODE + len(SVME_CLGI)
    assert cpu.get_sregs().efer & EFER_SVME
    after_clgi = cpu.get_nested_state()
    assert (after_clgi.flags, after_clgi.size, after_clgi.vmcb_pa) == (0, HEADER, 0)
    assert isinstance(cpu.run(timeout=5), HltExit) and cpu.get_regs().rip == CODE + len(SVME_CLGI + STGI)
    assert cpu.get_nested_state() == initial
    cpu.set_nested_state(after_clgi)  # accepted now that EFER.SVME is on
    assert cpu.get_nested_state().flags == 0
    guest_mode = initial.copy()
    guest_mode.flags |= NestedFlag.GUEST_MODE
    expect_kvm_error("KVM_SET_NESTED_STATE", errno.EINVAL, cpu.set_nested_state, guest_mode)  # no VMCB12


def test_header_accessors_read_their_vendor_header():
    """The accessors read the kernel's header layout (packed here by hand) and refuse the other vendor's."""
    svm = NestedState.from_bytes(struct.pack("<HHIQ", NestedFlag.GUEST_MODE | NestedFlag.GIF_SET, NestedFormat.SVM,
                                             HEADER + 4, 0x5000) + bytes(HEADER - 16) + b"vmcb")
    assert (svm.vmcb_pa, svm.data, svm.capacity) == (0x5000, b"vmcb", HEADER + 4)
    assert svm.flags == NestedFlag.GUEST_MODE | NestedFlag.GIF_SET and svm.hdr.svm.vmcb_pa == 0x5000
    vmx = NestedState.from_bytes(struct.pack("<HHIQQH", 0, NestedFormat.VMX, HEADER, 0x1000, 0x2000,
                                             VmxSmmFlag.VMXON))
    assert (vmx.vmxon_pa, vmx.vmcs12_pa, vmx.smm_flags, vmx.capacity) == (0x1000, 0x2000, VmxSmmFlag.VMXON, HEADER)
    with pytest.raises(ValueError, match="SVM header"):
        vmx.vmcb_pa
    with pytest.raises(ValueError, match="VMX header"):
        svm.vmxon_pa
    copy = svm.copy()
    copy.hdr.svm.vmcb_pa = 0x6000
    assert svm.vmcb_pa == 0x5000 and copy != svm


def test_supported_hv_cpuid_reports_the_kvm_hyperv_leaves(kvm, vm):
    """The leaves name KVM's Hyper-V emulation; given to a vCPU, they are what the guest's CPUID reads."""
    if not kvm.check_extension(Cap.SYS_HYPERV_CPUID):
        pytest.skip("KVM_CAP_SYS_HYPERV_CPUID is 0: this KVM (PVM) emulates no Hyper-V; runs on the lab's kvm_amd")
    hv = kvm.supported_hv_cpuid()
    leaves = {e.function: e for e in hv}
    top = leaves[0x40000000]
    assert b"".join(r.to_bytes(4, "little") for r in (top.ebx, top.ecx, top.edx)) == b"Linux KVM Hv"
    assert leaves[0x40000001].eax == 0x31237648  # "Hv#1": the Hyper-V interface
    assert max(leaves) == top.eax and min(leaves) == 0x40000000
    # mov eax,0x40000001 ; cpuid ; mov esi,eax ; mov eax,0x40000000 ; cpuid ; hlt  (real mode, 32-bit operands)
    code = bytes.fromhex("66 b8 01 00 00 40 0f a2 66 89 c6 66 b8 00 00 00 40 0f a2") + HLT
    cpu, _ = real_mode_vcpu(vm, code)
    cpu.set_cpuid2([e for e in kvm.supported_cpuid() if not 0x40000000 <= e.function < 0x40000100] + hv)
    assert isinstance(cpu.run(timeout=5), HltExit)
    r = cpu.get_regs()
    assert (r.rsi, r.rbx, r.rcx, r.rdx) == (0x31237648, top.ebx, top.ecx, top.edx)
