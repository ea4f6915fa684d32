"""The lab: a QEMU (TCG) machine with a real IOMMU, VFIO and KVM, for tests and demos.

L1 is q35 with an emulated Intel IOMMU, ``edu``, ``nvme`` and ``pci-testdev`` (addresses
and IDs in :mod:`pykvm.lab.devices`), running Debian's stock kernel with ``kvm_amd``,
``vfio_pci`` and ``vfio_iommu_type1`` loaded. Commands run in a chroot of the host's root
(shared read-only over 9p), so they use the host's Python and this checkout.

Python API::

    from pykvm.lab import Lab
    lab = Lab.prepare()                 # tools, kernel, initramfs, disk (cached)
    result = lab.run(["uname", "-a"], timeout=60, stream=print)
    result.returncode, result.output, result.console, result.out_dir, result.timings
    lab.kernel_path, lab.modules_dir, lab.kernel_version
    lab.build_initramfs(path, init_script, ["nvme"], {"/etc/x": "..."})  # e.g. for L2

Inside L1: ``PYKVM_IN_LAB=1``; ``PYKVM_LAB_OUT`` (= ``devices.LAB_OUT_GUEST``) is a
writable directory that is ``result.out_dir`` on the host; ``/tmp`` is a tmpfs; ``HOME``
is ``/tmp/home``; the checkout is read-only (bytecode goes to ``PYTHONPYCACHEPREFIX=/tmp/pycache``).

Errors: :class:`LabUnavailable` (cannot prepare: missing tools, no kernel), and
:class:`LabError` (:class:`LabTimeout`, :class:`LabCrash`) with the last console lines.
Knobs: ``PYKVM_LAB_CACHE``, ``PYKVM_LAB_KERNEL``, ``PYKVM_LAB_MEMORY_MB`` (default
3072), ``PYKVM_LAB_CPUS`` (default 1).

This package must not import ``pykvm._native`` or ``pykvm.kvm``: it prepares the machine
where those are tested.
"""
from pykvm.lab.devices import (
    EDU_BDF, EDU_ID, LAB_OUT_GUEST, NVME_BDF, NVME_DISK_MAGIC, NVME_ID, NVME_SERIAL,
    TESTDEV_BDF, TESTDEV_ID, nvme_sector,
)
from pykvm.lab.image import LabImage, LabUnavailable, cache_root
from pykvm.lab.run import Lab, LabCrash, LabError, LabResult, LabTimeout

__all__ = [
    "Lab", "LabImage", "LabResult", "LabError", "LabTimeout", "LabCrash", "LabUnavailable",
    "cache_root", "nvme_sector", "EDU_BDF", "EDU_ID", "NVME_BDF", "NVME_ID", "NVME_SERIAL",
    "NVME_DISK_MAGIC", "TESTDEV_BDF", "TESTDEV_ID", "LAB_OUT_GUEST",
]
