"""iommufd (/dev/iommu) and VFIO device cdevs (/dev/vfio/devices/vfioN): detection.

Linux 6.2+ can give each VFIO device its own cdev bound to an iommufd IOAS
instead of the group/container model. That needs, on the build side, the UAPI
headers <linux/iommufd.h> and VFIO_DEVICE_BIND_IOMMUFD in <linux/vfio.h>, and
on the running kernel CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV. Debian 12's
headers (6.1) and Debian's kernels lack them, so pykvm binds only the
group/container API; :func:`detect` reports which of the pieces are missing.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from pykvm._native import lib

__all__ = ["IommufdSupport", "detect"]

KERNEL_OPTIONS = ("CONFIG_IOMMUFD", "CONFIG_VFIO_DEVICE_CDEV")


def _kernel_config(root: str) -> Optional[Dict[str, str]]:
    """The running kernel's config (from /proc/config.gz or /boot/config-RELEASE), or None if unreadable."""
    release = os.uname().release
    for path, opener in ((f"{root}/proc/config.gz", gzip.open), (f"{root}/boot/config-{release}", open)):
        try:
            with opener(path, "rt") as f:
                text = f.read()
        except OSError:
            continue
        options = {}
        for line in text.splitlines():
            name, sep, value = line.partition("=")
            if sep and name.startswith("CONFIG_"):
                options[name] = value
        return options
    return None


@dataclass(frozen=True)
class IommufdSupport:
    """What this machine and this build of pykvm offer for iommufd and VFIO cdevs."""

    dev_iommu: bool  # /dev/iommu exists
    vfio_cdevs: List[str] = field(default_factory=list)  # /dev/vfio/devices/*
    headers_iommufd: bool = False  # the extension was built with <linux/iommufd.h>
    headers_vfio_cdev: bool = False  # ... and with VFIO_DEVICE_BIND_IOMMUFD
    kernel_options: Optional[Dict[str, Optional[str]]] = None  # None: kernel config unreadable

    @property
    def available(self) -> bool:
        """Whether pykvm can drive devices through iommufd here: headers, kernel, device
        nodes and pykvm's own iommufd bindings. This version has no such bindings, so it
        is always False; ``missing()`` lists what else this machine lacks."""
        return not self.missing()

    def missing(self) -> List[str]:
        """Each missing piece, as a sentence."""
        out = []
        if not self.headers_iommufd:
            out.append("the UAPI headers pykvm was built with have no <linux/iommufd.h> (need Linux >= 6.2 headers)")
        if not self.headers_vfio_cdev:
            out.append("<linux/vfio.h> has no VFIO_DEVICE_BIND_IOMMUFD (need Linux >= 6.6 headers)")
        if self.kernel_options is not None:
            for name in KERNEL_OPTIONS:
                if self.kernel_options.get(name) not in ("y", "m"):
                    out.append(f"the running kernel ({os.uname().release}) has {name} unset")
        if not self.dev_iommu:
            out.append("/dev/iommu does not exist")
        if not self.vfio_cdevs:
            out.append("/dev/vfio/devices/ has no VFIO device cdevs")
        if not out:
            out.append("this pykvm binds the group/container API only; iommufd bindings are not written yet")
        return out

    def describe(self) -> str:
        if self.available:
            return "iommufd and VFIO cdevs are available"
        return "iommufd/VFIO cdev unavailable: " + "; ".join(self.missing()) + ". Use Container/Group instead."


def detect(root: str = "") -> IommufdSupport:
    """Look at /dev, the kernel config and this build's headers."""
    cdev_dir = f"{root}/dev/vfio/devices"
    cdevs = sorted(os.listdir(cdev_dir)) if os.path.isdir(cdev_dir) else []
    config = _kernel_config(root)
    return IommufdSupport(
        dev_iommu=os.path.exists(f"{root}/dev/iommu"),
        vfio_cdevs=[f"{cdev_dir}/{c}" for c in cdevs],
        headers_iommufd=bool(lib.PYKVM_HAVE_IOMMUFD_H),
        headers_vfio_cdev=bool(lib.PYKVM_HAVE_VFIO_CDEV),
        kernel_options=None if config is None else {k: config.get(k) for k in KERNEL_OPTIONS},
    )
