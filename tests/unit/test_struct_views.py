"""Nested fields of the register structs (pykvm.kvm.regs): live views that keep their owner's
memory alive. Pure cffi memory, no kernel."""
from __future__ import annotations

import gc

import pytest

from pykvm._native import ffi
from pykvm.kvm.regs import FieldView, Fpu, Sregs, Xsave


def test_a_field_of_a_temporary_struct_reads_the_structs_memory_not_freed_memory():
    """``Sregs().cs`` outlives the temporary Sregs: with a bare cffi view its memory would be
    freed and reused by the next allocations of the same size (filled with 0xff here)."""
    views = []
    for _ in range(200):
        views.append(Sregs(cr0=0).cs)
        ffi.new("char[]", b"\xff" * ffi.sizeof("struct kvm_sregs"))  # freed at once: more churn
        junk = [ffi.new("char[]", b"\xff" * ffi.sizeof("struct kvm_sregs")) for _ in range(4)]
        del junk
    gc.collect()
    assert all(v.base == 0 and v.limit == 0 and v.selector == 0 for v in views)
    assert all(bytes(v) == bytes(ffi.sizeof("struct kvm_segment")) for v in views)


def test_views_write_through_to_the_owner_and_nest():
    s = Sregs()
    s.cs.base = 0x1234
    s.cs.selector = 8
    assert s.ptr.cs.base == 0x1234 and s.to_bytes() != Sregs().to_bytes()
    s.interrupt_bitmap[2] = 7
    assert s.ptr.interrupt_bitmap[2] == 7 and list(s.interrupt_bitmap) == [0, 0, 7, 0]
    f = Fpu()
    f.xmm[3][15] = 0xAB  # array of arrays: a view of a view
    assert f.ptr.xmm[3][15] == 0xAB and len(f.xmm) == 16 and len(f.xmm[3]) == 16
    assert bytes(f.xmm[3]) == bytes(15) + b"\xab"
    x = Xsave()
    x.region[6] = 0x1F80
    assert Xsave.copy(x).region[6] == 0x1F80


def test_a_view_assigns_a_whole_nested_struct_and_compares_by_content():
    a, b = Sregs(), Sregs()
    a.ds.base, a.ds.limit, a.ds.present = 0x10000, 0xFFFF, 1
    b.ds = a.ds  # Struct.__setattr__ takes a view
    b.es = a.ds.cdata  # or cffi's own struct
    assert b.ds == a.ds and b.es == a.ds and b.cs != a.ds
    assert b.ds.base == 0x10000 and b.es.present == 1
    assert (a.ds == 5) is False  # not NotImplemented leaking out
    with pytest.raises(TypeError):
        hash(a.ds)
    assert isinstance(a.gdt, FieldView) and isinstance(a.cr0, int)
    assert "base" in repr(a.ds)
