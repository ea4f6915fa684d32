"""Build ``pykvm._native`` (cffi API mode) from the kernel's UAPI headers and csrc/."""
import os
import sys

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import common_cdef  # noqa: E402
import kvm_cdef  # noqa: E402
import runloop_cdef  # noqa: E402
import vfio_cdef  # noqa: E402

HEADERS = ["linux/kvm.h", "linux/vfio.h"]
INCLUDE_DIRS = ["/usr/include", "/usr/local/include"]


def _check_headers() -> None:
    for header in HEADERS:
        if not any(os.path.exists(os.path.join(d, header)) for d in INCLUDE_DIRS):
            raise SystemExit(
                f"pykvm: <{header}> not found. Install the kernel's UAPI headers "
                "(Debian/Ubuntu: apt-get install linux-libc-dev; Fedora: kernel-headers)."
            )


_check_headers()
ffibuilder = cffi.FFI()
ffibuilder.cdef(common_cdef.CDEF + kvm_cdef.CDEF + vfio_cdef.CDEF + runloop_cdef.CDEF)
ffibuilder.set_source(
    "pykvm._native",
    "\n".join(
        [
            "#include <stddef.h>",
            "#include <stdint.h>",
            "#include <errno.h>",
            "#include <signal.h>",
            "#include <string.h>",
            "#include <sys/ioctl.h>",
            "#include <linux/kvm.h>",
            "#include <linux/vfio.h>",
            common_cdef.SOURCE,
            kvm_cdef.SOURCE,
            vfio_cdef.SOURCE,
            runloop_cdef.SOURCE,
        ]
    ),
    sources=[os.path.relpath(os.path.join(ROOT, "csrc", s), ROOT) for s in runloop_cdef.C_FILES],
    include_dirs=[os.path.join(ROOT, "csrc")],
    extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=ROOT, verbose=True)
