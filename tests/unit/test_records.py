"""The classes on pykvm run's import path that were dataclasses (see pykvm._record): the same
constructors, repr, == and hash as before, and MachineConfig and the TOML config built from
one list of fields."""
from __future__ import annotations

import inspect

import pytest

from pykvm._native import lib
from pykvm.kvm.exits import HltExit, InternalErrorExit, IoExit, MmioExit, MsrExit, ShutdownExit, SystemEventExit
from pykvm.kvm.regs import CpuidEntry
from pykvm.kvm.vm import IrqchipRoute, MsiRoute
from pykvm.memory import MemoryRegion
from pykvm.vmm.bus import Bus, Range
from pykvm.vmm.config import load_config, merge
from pykvm.vmm.machine import CONFIG_FIELDS, REQUIRED, MachineConfig, MachineError
from pykvm.vmm.pci.allocator import Window
from pykvm.vmm.pci.config import BarKind, BarSpec, BarWindow
from pykvm.vmm.runloop import RunResult, Status


def test_exits_show_and_compare_their_fields():
    out = lib.KVM_EXIT_IO_OUT
    ex = IoExit(lib.KVM_EXIT_IO, 0x3F8, 1, 1, out, b"A")
    assert repr(ex) == f"IoExit(reason={lib.KVM_EXIT_IO}, port=1016, size=1, count=1, direction={out})"
    assert ex == IoExit(lib.KVM_EXIT_IO, port=0x3F8, size=1, count=1, direction=out, data=b"A")
    assert ex != IoExit(lib.KVM_EXIT_IO, 0x3F8, 1, 1, out, b"B")  # data is compared, not shown
    assert repr(MmioExit(lib.KVM_EXIT_MMIO, 0x1000, 4, True, b"abcd")).endswith("address=4096, length=4, is_write=True)")
    assert HltExit(lib.KVM_EXIT_HLT) == HltExit(lib.KVM_EXIT_HLT) and HltExit(5) != ShutdownExit(5)
    assert repr(SystemEventExit(lib.KVM_EXIT_SYSTEM_EVENT, 1)) == f"SystemEventExit(reason={lib.KVM_EXIT_SYSTEM_EVENT}, type=1, data=[])"
    with pytest.raises(TypeError):
        hash(ex)  # mutable, like the dataclass
    a, b = InternalErrorExit(lib.KVM_EXIT_INTERNAL_ERROR), InternalErrorExit(lib.KVM_EXIT_INTERNAL_ERROR)
    assert a.data == [] and a.data is not b.data
    msr = MsrExit(lib.KVM_EXIT_X86_RDMSR, 0x10, 1, object())
    assert msr == MsrExit(lib.KVM_EXIT_X86_RDMSR, 0x10, 1, object()) and "_run" not in repr(msr)


def test_routes_and_bar_records_are_hashable_values_of_their_own_class():
    assert IrqchipRoute(1, 2, 3) != MsiRoute(1, 2, 3) and MsiRoute(1, 2, 3) != (1, 2, 3)
    assert len({MsiRoute(24, 0xFEE00000, 0x41), MsiRoute(24, 0xFEE00000, 0x41)}) == 1
    assert repr(IrqchipRoute(1, 2, 3)) == "IrqchipRoute(gsi=1, irqchip=2, pin=3)"
    w = BarWindow(0, BarKind.MEM32, 0xC000_0000, 0x1000)
    assert w == BarWindow(0, BarKind.MEM32, 0xC000_0000, 0x1000) != (0, BarKind.MEM32, 0xC000_0000, 0x1000)
    assert w.index == 0 and w.end == 0xC000_1000 and hash(w) == hash(BarWindow(0, BarKind.MEM32, 0xC000_0000, 0x1000))
    assert BarSpec(0x1000, BarKind.MEM64, True) == BarSpec(0x1000, BarKind.MEM64, prefetchable=True)
    assert repr(BarSpec(0x100, BarKind.IO)) == "BarSpec(size=256, kind=<BarKind.IO: 'io'>, prefetchable=False)"
    with pytest.raises(ValueError, match="power of two"):
        BarSpec(0x1001, BarKind.MEM32)


def test_bus_ranges_contain_addresses_and_compare_by_value():
    dev = object()
    r = Range(0x60, 4, dev, "kbd")
    assert 0x63 in r and 0x64 not in r and r.end == 0x64
    assert r == Range(0x60, 4, dev, "kbd") and hash(r) == hash(Range(0x60, 4, dev, "kbd"))
    bus = Bus("pio", 1 << 16)
    added = bus.register(0x60, 4, dev, "kbd")
    assert added == r and bus.ranges() == (r,)
    bus.unregister(added)
    assert bus.ranges() == ()


def test_mutable_records():
    e = CpuidEntry(1, ecx=5)
    e.eax = 7
    assert e == CpuidEntry(1, 0, 0, 7, 0, 5, 0)
    assert repr(e) == "CpuidEntry(function=1, index=0, flags=0, eax=7, ebx=0, ecx=5, edx=0)"
    res = RunResult(Status.ERROR, error=OSError(5, "EIO"))
    res.status = Status.STOPPED
    assert res.exit is None and repr(res).startswith("RunResult(status=<Status.STOPPED: 'stopped'>, exit=None, error=")
    w = Window("io", 0xC000, 0x10000)
    assert w.used == [] and w == Window("io", 0xC000, 0x10000) and repr(w) == "Window(name='io', base=49152, end=65536)"
    with pytest.raises(ValueError, match="empty"):
        Window("bad", 2, 1)


def test_memory_regions_compare_by_identity_and_hide_their_mapping_in_repr():
    r = MemoryRegion(0, 0x2000, name="ram")
    try:
        assert repr(r) == "MemoryRegion(gpa=0, size=8192, backing='anon', name='ram', readonly=False)"
        assert r == r and hash(r) == hash(r) and r.host_address and len(r.buffer) == 0x2000
    finally:
        r.close()


def test_machine_config_takes_its_fields_and_defaults_from_config_fields():
    params = list(inspect.signature(MachineConfig).parameters.values())
    assert [p.name for p in params] == [f.name for f in CONFIG_FIELDS] == list(MachineConfig.__slots__)
    for p, f in zip(params, CONFIG_FIELDS):
        if f.default is REQUIRED:
            assert p.default is p.empty
        elif f.name != "vfio":  # None there: a new list for each config
            assert p.default == f.default, f.name
    a, b = MachineConfig("k"), MachineConfig("k")
    assert a == b and a.vfio == [] and a.vfio is not b.vfio and a != MachineConfig("k", cpus=2)
    assert [getattr(a, f.name) for f in CONFIG_FIELDS[1:]] == [list(f.default) if f.name == "vfio" else f.default
                                                               for f in CONFIG_FIELDS[1:]]
    assert repr(a).startswith("MachineConfig(kernel='k', initrd=None, cmdline=")


def test_config_file_keys_and_types_come_from_config_fields(tmp_path):
    path = tmp_path / "vm.toml"
    path.write_text('kernel = "bz"\nmemory = 33554432\ncpus = 2\ntimeout = 5\nvfio = ["0000:00:05.0"]\nloop = "python"\n')
    config = merge(load_config(str(path)), {"cpus": None, "vfio": [], "stats": True})
    assert config == MachineConfig(str(tmp_path / "bz"), memory=32 << 20, cpus=2, timeout=5, vfio=["0000:00:05.0"],
                                   loop="python", stats=True)
    path.write_text('kernel = "bz"\nmemroy = "1G"\n')
    with pytest.raises(MachineError, match="known: " + ", ".join(f.name for f in CONFIG_FIELDS)):
        load_config(str(path))
    path.write_text('kernel = "bz"\nstats = 1\n')
    with pytest.raises(MachineError, match="stats must be bool"):
        load_config(str(path))
