"""Errors are OSError subclasses carrying the errno and the ioctl's name."""
from __future__ import annotations

import errno
import pickle

from hypothesis import given
from hypothesis import strategies as st

from pykvm.errors import KvmError, VfioError, ioctl_error


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
    assert e.errno == err
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is type(e) and back.errno == err and back.ioctl == e.ioctl
