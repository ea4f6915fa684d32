"""The CPU brand string pykvm gives its guests (CPUID 0x80000002-4): encoding and placement."""
from __future__ import annotations

import struct

from hypothesis import given, strategies as st

from pykvm.kvm import CpuidEntry
from pykvm.vmm.cpu import LEAF_BRAND, LEAF_EXT_MAX, brand_leaves, host_cpu_brand, vcpu_cpuid


def decode(entries) -> bytes:
    """What a guest's brand-string code (CPUID 0x80000002..4, EAX..EDX in order) reads."""
    by_fn = {e.function: e for e in entries}
    return b"".join(struct.pack("<IIII", by_fn[fn].eax, by_fn[fn].ebx, by_fn[fn].ecx, by_fn[fn].edx) for fn in LEAF_BRAND)


@given(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60))
def test_brand_leaves_hold_the_string_nul_terminated(brand: str):
    raw = decode(brand_leaves(brand))
    assert len(raw) == 48 and raw.split(b"\0")[0] == brand.encode()[:47] and raw[47] == 0


def supported(max_ext: int):
    """A KVM_GET_SUPPORTED_CPUID-like table whose brand leaves are zero, as KVM gives them."""
    return [CpuidEntry(0, 0, 0, 0xD), CpuidEntry(LEAF_EXT_MAX, 0, 0, max_ext),
            *(CpuidEntry(fn) for fn in LEAF_BRAND if fn <= max_ext)]


def test_vcpu_cpuid_replaces_the_zero_brand_leaves_once():
    table = vcpu_cpuid(supported(0x8000_0021), apic_id=0, cpus=1, brand="AMD EPYC")
    assert [e.function for e in table].count(LEAF_BRAND[0]) == 1
    assert decode(table).rstrip(b"\0") == b"AMD EPYC"


def test_no_brand_or_no_leaves_leaves_the_table_alone():
    assert decode(vcpu_cpuid(supported(0x8000_0021), 0, 1)) == bytes(48)
    assert not any(e.function in LEAF_BRAND for e in vcpu_cpuid(supported(0x8000_0001), 0, 1, brand="X"))


def test_host_cpu_brand_reads_model_name(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
    assert host_cpu_brand.__wrapped__(str(cpuinfo)) == "AMD EPYC 7B13 64-Core Processor"
    assert host_cpu_brand.__wrapped__(str(tmp_path / "missing")) == ""
