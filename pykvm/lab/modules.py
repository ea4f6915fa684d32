"""Kernel module dependencies, resolved from ``modules.dep`` as ``depmod`` writes it.

Each line of ``modules.dep`` is ``path/of/mod.ko: dep1.ko dep2.ko ...`` (paths relative to
``/lib/modules/VERSION``). A module's name is its file name without ``.ko`` (and without a
compression suffix) with ``-`` read as ``_``: the kernel treats both spellings alike.
Modules built into the kernel are listed in ``modules.builtin`` and need no loading.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence

_KO_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(path: str) -> str:
    """``kernel/arch/x86/kvm/kvm-amd.ko`` -> ``kvm_amd``."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _KO_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def parse_modules_dep(text: str) -> Dict[str, List[str]]:
    """Map each module path to the module paths it depends on, as listed."""
    deps: Dict[str, List[str]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        path, sep, rest = line.partition(":")
        if not sep:
            raise ValueError(f"modules.dep line without ':': {line!r}")
        deps[path.strip()] = rest.split()
    return deps


def resolve_load_order(
    deps: Mapping[str, Sequence[str]], wanted: Iterable[str], builtin: Iterable[str] = ()
) -> List[str]:
    """Module paths to ``insmod``, dependencies first, each once.

    ``wanted`` holds module names (``-`` or ``_`` spelling); names in ``builtin`` are
    skipped. An unknown name raises ``LookupError`` naming it, and a dependency cycle
    (which depmod never writes) raises ``ValueError``.
    """
    by_name = {module_name(path): path for path in deps}
    skip = {name.replace("-", "_") for name in builtin}
    order: List[str] = []
    done: set = set()
    active: set = set()

    def visit(path: str) -> None:
        if path in done:
            return
        if path in active:
            raise ValueError(f"dependency cycle through {path}")
        active.add(path)
        for dep in deps.get(path, ()):
            visit(dep)
        active.discard(path)
        done.add(path)
        order.append(path)

    for name in wanted:
        name = name.replace("-", "_")
        if name in skip:
            continue
        if name not in by_name:
            raise LookupError(f"kernel module {name!r} is neither in modules.dep nor built in")
        visit(by_name[name])
    return order


def load_order_for(modules_dir: Path, wanted: Iterable[str]) -> List[str]:
    """:func:`resolve_load_order` over a kernel tree's ``modules.dep`` and ``modules.builtin``."""
    deps = parse_modules_dep((modules_dir / "modules.dep").read_text())
    builtin_file = modules_dir / "modules.builtin"
    builtin = (
        [module_name(line) for line in builtin_file.read_text().split()]
        if builtin_file.exists()
        else []
    )
    return resolve_load_order(deps, wanted, builtin)
