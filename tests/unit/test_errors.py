"""Errors are OSError subclasses carrying the errno and the ioctl's name."""
from __future__ import annotations

import errno
import pickle

from hypothesis import given
from hypothesis import strategies as st

import os

import pytest

from pykvm._fdobject import FdObject
from pykvm.errors import ClosedError, KvmError, VfioError, ioctl_error
from pykvm.vfio.errors import VfioUnavailableError


def test_errno_maps_to_the_python_builtin():
    e = ioctl_error(KvmError, errno.EACCES, "KVM_CREATE_VM")
    assert isinstance(e, PermissionError) and isinstance(e, KvmError)
    assert e.errno == errno.EACCES and e.ioctl == "KVM_CREATE_VM"
    assert "KVM_CREATE_VM" in str(e) and "EACCES" in str(e)
    assert isinstance(ioctl_error(VfioError, errno.ENOENT, "open"), FileNotFoundError)
    assert isinstance(ioctl_error(VfioError, errno.EBUSY, "VFIO_GROUP_SET_CONTAINER"), VfioError)


@given(st.integers(1, 200), st.sampled_from([KvmError, VfioError]), st.text(max_size=20))
def test_any_errno_builds_and_pickles(err, family, name):
    e = ioctl_error(family, err, name or None)
    assert isinstance(e, OSError) and isinstance(e, family)
    assert isinstance(e, type(OSError(err, "")))  # the subclass OSError itself picks: EPIPE -> BrokenPipeError, ...
    assert e.errno == err
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is type(e) and back.errno == err and back.ioctl == e.ioctl


def test_pickling_keeps_the_class_and_what_was_added_to_the_error():
    for e in (ClosedError("Vcpu"), VfioUnavailableError("/dev/vfio/vfio"), ioctl_error(KvmError, errno.EPIPE, "X")):
        e.entry = 3  # e.g. a DMA batch error's failing entry
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e) and back.errno == e.errno and back.entry == 3


class _Breaks(FdObject):
    def _release(self) -> None:
        raise RuntimeError("release failed")


def test_a_failing_child_or_release_still_closes_every_fd():
    """Real fds (pipes) through the fd-owning plumbing alone: no kernel object is faked."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    os.close(w1)
    os.close(w2)
    parent = FdObject(r1)
    child = _Breaks(r2, parent)
    with pytest.raises(RuntimeError, match="release failed"):
        parent.close()
    assert parent.closed and child.closed
    for fd in (r1, r2):
        with pytest.raises(OSError):
            os.fstat(fd)
