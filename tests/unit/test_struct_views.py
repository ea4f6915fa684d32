"""Nested fields of the register structs (pykvm.kvm.regs): live views that keep their owner's
memory alive. Pure cffi memory, no kernel."""
from __future__ import annotations

import gc

import pytest

from pykvm._native import ffi
from pykvm.kvm.nested import NestedState
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


@pytest.mark.parametrize("make, nbytes", [
    (lambda: Sregs(cr0=0x11), ffi.sizeof("struct kvm_sregs")),
    (lambda: Xsave(8192), 8192),  # a guest with AMX: KVM_GET_XSAVE2 fills more than struct kvm_xsave
    (lambda: NestedState(4096 + 120), 4096 + 120),
])
def test_copy_and_bytes_cover_every_owned_byte_and_the_copy_is_independent(make, nbytes):
    s = make()
    assert s.nbytes() == nbytes
    ffi.memmove(ffi.cast("char *", s.ptr) + nbytes - 1, b"\x7e", 1)  # the last byte, past sizeof for a tail
    c = s.copy()
    assert type(c) is type(s) and c.nbytes() == nbytes
    assert bytes(ffi.buffer(c.ptr, nbytes)) == bytes(ffi.buffer(s.ptr, nbytes))
    ffi.memmove(ffi.cast("char *", c.ptr) + nbytes - 1, b"\x01", 1)
    assert bytes(ffi.buffer(s.ptr, nbytes))[-1] == 0x7E  # writing the copy leaves the original alone
    if not isinstance(s, NestedState):  # NestedState.to_bytes() is the ``size`` KVM wrote, not its capacity
        assert len(s.to_bytes()) == nbytes and s.to_bytes()[-1] == 0x7E
