"""Which ioctls of <linux/kvm.h> and <linux/vfio.h> pykvm binds: every one that applies to x86
(a method naming it), except those listed here with the reason; and that every such method of
the bindings (pykvm/kvm, pykvm/vfio) is called by a test or an example, except those listed in
NOT_CALLED with the reason. The test reads the headers the extension is built from, so a newer
header's ioctls show up as failures until they are bound or listed."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, Set, Tuple

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
    return set(re.findall(rf"#define\s+({prefix}_\w+)[\s\\]+_IO[RW]*\(", text))  # also a #define continued on the next line


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


# -- every bound method is called by a test or an example -------------------------------------
BINDINGS = ("kvm", "vfio")  # pykvm/kvm and pykvm/vfio: the methods that issue the ioctls
CALLERS = ("tests", "examples")
NOT_CALLED: Dict[str, str] = {
    # KVM_CREATE_DEVICE on x86 makes one device type, KVM-VFIO, and this host's kernel has no VFIO
    # (ENODEV: tests/kvm/test_api.py::test_create_vfio_device_support_is_reported).
    "DeviceFd.set_attr": "KVM-VFIO only (no VFIO on this host); runs in the lab through vfio_group_add, "
                         "which pykvm/vmm/pci/passthrough.py calls (tests/lab/test_passthrough_*)",
    "DeviceFd.has_attr": "KVM-VFIO only (no VFIO on this host), and nothing calls it",
    "DeviceFd.get_attr": "KVM-VFIO has no readable attribute (the kernel's device has no get_attr): "
                         "no x86 device to call it on",
}


def _functions(tree: ast.Module) -> Iterator[Tuple[str, ast.AST]]:
    """("Class.method" or "function", node) for every function of a module."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node


def _names_used(node: ast.AST) -> Set[str]:
    """Every attribute and name ``node`` mentions: a method is used by name (``x.method``)."""
    return {n.attr if isinstance(n, ast.Attribute) else n.id
            for n in ast.walk(node) if isinstance(n, (ast.Attribute, ast.Name))}


def bound_methods(ioctls: Set[str]) -> Dict[str, Set[str]]:
    """{qualified name: the ioctls it names} for each function of the bindings that names one, as
    a string ("KVM_RUN") or a constant (lib.KVM_RUN)."""
    out: Dict[str, Set[str]] = {}
    for package in BINDINGS:
        for path in sorted((ROOT / "pykvm" / package).rglob("*.py")):
            for qualname, fn in _functions(ast.parse(path.read_text())):
                named = {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and n.value in ioctls}
                named |= {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute) and n.attr in ioctls}
                if named:
                    out[qualname] = named
    return out


def binding_properties() -> Set[str]:
    """Qualified names of the bindings' properties (used by reading them, not by calling)."""
    return {qualname for package in BINDINGS for path in (ROOT / "pykvm" / package).rglob("*.py")
            for qualname, fn in _functions(ast.parse(path.read_text()))
            if any(isinstance(d, ast.Name) and d.id in ("property", "cached_property") for d in fn.decorator_list)}


def _binding_callers() -> Dict[str, Set[str]]:
    """{function name: qualified names of the binding functions that mention it}."""
    callers: Dict[str, Set[str]] = {}
    for package in BINDINGS:
        for path in (ROOT / "pykvm" / package).rglob("*.py"):
            for qualname, fn in _functions(ast.parse(path.read_text())):
                for name in _names_used(fn):
                    callers.setdefault(name, set()).add(qualname)
    return callers


def _name(node: ast.AST) -> str:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


def names_used_by_callers() -> Tuple[Set[str], Set[str]]:
    """(names the tests and examples call, pass as an argument or bind to a name they call, e.g.
    ``cpu.nmi()``, ``pytest.raises(..., cpu.set_xcrs, x)``, ``probe = device.probe_feature`` then
    ``probe(...)``; every attribute they read, e.g. ``nmi`` in ``events.nmi.pending``)."""
    called: Set[str] = set()
    read: Set[str] = set()
    for top in CALLERS:
        for path in (ROOT / top).rglob("*.py"):
            if path.resolve() == Path(__file__).resolve():
                continue
            tree = ast.parse(path.read_text())
            aliases: Dict[str, Set[str]] = {}  # local name -> attributes bound to it
            here: Set[str] = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    here |= {_name(n) for n in (node.func, *node.args, *(k.value for k in node.keywords))}
                elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute):
                    for target in node.targets:
                        aliases.setdefault(_name(target), set()).add(node.value.attr)
                elif isinstance(node, ast.Attribute):
                    read.add(node.attr)
            called |= here
            called.update(*(attrs for alias, attrs in aliases.items() if alias in here))
    return called, read


def uncalled(bound: Dict[str, Set[str]], called: Set[str], read: Set[str] = frozenset(),
             properties: Set[str] = frozenset()) -> Set[str]:
    """The bound methods no test or example calls. A public method counts when a test or an
    example calls it by name, or passes it to a call (``__init__``: its class); a property when
    one reads it; a private helper (``_ioeventfd``) or a module function (``msrs_get``) when a
    binding function that mentions it counts. By name only: another class's method of the same
    name counts too."""
    callers = _binding_callers()

    def counted(qualname: str, seen: Tuple[str, ...] = ()) -> bool:
        cls, _, name = qualname.rpartition(".")
        if name == "__init__":
            return cls in called
        if qualname in properties:
            return name in read
        if cls and not name.startswith("_"):
            return name in called
        return name in called or any(counted(c, seen + (qualname,)) for c in callers.get(name, set()) - {qualname}
                                     if c not in seen)

    return {q for q in bound if not counted(q)}


def test_every_bound_method_is_called_by_a_test_or_an_example():
    if not all(h.exists() for h in HEADERS.values()):
        pytest.skip("the kernel headers are not installed: test_every_x86_ioctl_is_bound_or_listed_with_a_reason says so")
    bound = bound_methods(header_ioctls("KVM") | header_ioctls("VFIO"))
    assert {"Vcpu.run", "Vm.create_vcpu", "Container.map_dma"} <= set(bound)  # the scan finds the bindings
    called, read = names_used_by_callers()
    missing = uncalled(bound, called, read, binding_properties())
    assert missing - set(NOT_CALLED) == set(), "call these from a test (or list them in NOT_CALLED with the reason)"
    assert set(NOT_CALLED) - missing == set(), "listed in NOT_CALLED, but called now (or no longer a bound method)"


def test_the_call_check_sees_a_method_no_test_calls():
    """uncalled() on made-up input: a public method counts only when called (reading an attribute
    of its name does not), a property when read, a private helper through its callers, __init__
    through its class."""
    bound = {"Vm.used": {"A"}, "Vm.unused": {"B"}, "Vm._helper": {"C"}, "Vcpu.__init__": {"D"}, "Kvm.prop": {"E"}}
    assert uncalled(bound, {"used", "Vcpu"}, {"unused", "prop"}, {"Kvm.prop"}) == {"Vm.unused", "Vm._helper"}
    assert uncalled(bound, {"used"}, set(), {"Kvm.prop"}) == {"Vm.unused", "Vm._helper", "Vcpu.__init__", "Kvm.prop"}
    real = bound_methods({"KVM_IOEVENTFD"})
    assert real == {"Vm._ioeventfd": {"KVM_IOEVENTFD"}}
    assert uncalled(real, {"ioeventfd"}) == set() and uncalled(real, set()) == {"Vm._ioeventfd"}
    assert {"Kvm.api_version", "Kvm.vcpu_mmap_size"} <= binding_properties()
    called, read = names_used_by_callers()
    assert "nmi" in read and "set_xcrs" in called  # events.nmi.pending is read; set_xcrs passed to expect_kvm_error
    assert "probe_feature" in called  # bound to a name, then called (tests/lab/test_vfio_ioeventfd_and_feature.py)
