"""modules.dep parsing and load-order resolution (pure logic)."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from pykvm.lab.modules import module_name, parse_modules_dep, resolve_load_order

DEP = """\
kernel/arch/x86/kvm/kvm-amd.ko: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/virt/lib/irqbypass.ko:
kernel/drivers/crypto/ccp/ccp.ko:
kernel/drivers/vfio/vfio.ko:
kernel/drivers/vfio/vfio_iommu_type1.ko: kernel/drivers/vfio/vfio.ko
"""


def test_module_name_normalises_dashes_and_suffixes():
    assert module_name("kernel/arch/x86/kvm/kvm-amd.ko") == "kvm_amd"
    assert module_name("kernel/fs/9p/9p.ko.xz") == "9p"
    assert module_name("vfio_iommu_type1.ko.zst") == "vfio_iommu_type1"


def test_real_shape_resolves_dependencies_first():
    deps = parse_modules_dep(DEP)
    order = resolve_load_order(deps, ["kvm-amd", "vfio_iommu_type1"])
    names = [module_name(p) for p in order]
    assert names[-1] == "vfio_iommu_type1"
    assert names.index("irqbypass") < names.index("kvm") < names.index("kvm_amd")
    assert names.index("ccp") < names.index("kvm_amd")
    assert len(names) == len(set(names)) == 6


def test_builtin_is_skipped_and_unknown_is_named():
    deps = parse_modules_dep(DEP)
    assert resolve_load_order(deps, ["virtio_pci"], builtin=["virtio_pci"]) == []
    with pytest.raises(LookupError, match="nvme"):
        resolve_load_order(deps, ["nvme"])


def test_malformed_line_is_rejected():
    with pytest.raises(ValueError, match="without ':'"):
        parse_modules_dep("kernel/foo.ko kernel/bar.ko\n")


@st.composite
def dags(draw):
    """A random module DAG: module i may depend only on modules j < i."""
    count = draw(st.integers(1, 25))
    deps = {}
    for i in range(count):
        picks = draw(st.sets(st.integers(0, i - 1), max_size=i)) if i else set()
        deps[f"kernel/m{i}.ko"] = [f"kernel/m{j}.ko" for j in sorted(picks)]
    wanted = draw(st.lists(st.sampled_from(sorted(deps)), min_size=1, max_size=count))
    return deps, [module_name(p) for p in wanted]


def _closure(deps, path, seen):
    if path not in seen:
        seen.add(path)
        for dep in deps[path]:
            _closure(deps, dep, seen)
    return seen


@given(dags())
def test_order_is_the_dependency_closure_topologically_sorted(case):
    deps, wanted = case
    text = "".join(f"{path}: {' '.join(ds)}\n" for path, ds in deps.items())
    order = resolve_load_order(parse_modules_dep(text), wanted)
    expected = set()
    for name in wanted:
        _closure(deps, f"kernel/{name}.ko", expected)
    assert set(order) == expected and len(order) == len(expected)
    position = {path: i for i, path in enumerate(order)}
    for path in order:
        assert all(position[dep] < position[path] for dep in deps[path])


def test_cycle_is_reported():
    deps = {"a.ko": ["b.ko"], "b.ko": ["a.ko"]}
    with pytest.raises(ValueError, match="cycle"):
        resolve_load_order(deps, ["a"])
