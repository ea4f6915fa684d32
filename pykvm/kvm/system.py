"""``Kvm``: the /dev/kvm system fd (capabilities, CPUID, MSR lists, creating VMs)."""
from __future__ import annotations

import errno
import os
from typing import Dict, List

from pykvm._fdobject import FdObject
from pykvm._native import ffi, lib
from pykvm.errors import KvmError, ioctl_error
from pykvm.kvm.caps import CapLike, cap_number
from pykvm.kvm.regs import CpuidEntry, cpuid_from_c

KVM_PATH = "/dev/kvm"
_CPUID_MAX = 1024
_MSR_MAX = 4096


def open_kvm(path: str = KVM_PATH) -> int:
    """Open /dev/kvm with a message that says what to do when it fails."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ioctl_error(
            KvmError, errno.ENOENT, "open",
            f"{path} does not exist: KVM is not available. Enable VT-x/AMD-V in firmware and load "
            "kvm_intel or kvm_amd (modprobe kvm_intel); `pykvm host check` explains what is missing",
        ) from None
    except PermissionError:
        raise ioctl_error(
            KvmError, errno.EACCES, "open",
            f"no permission to open {path}: add your user to the 'kvm' group "
            "(usermod -aG kvm $USER, then log in again) or run as root",
        ) from None


class Kvm(FdObject):
    """The KVM subsystem (``/dev/kvm``). Creates VMs; answers system-wide queries."""

    _error_family = KvmError
    _what = "Kvm"

    def __init__(self, path: str = KVM_PATH):
        super().__init__(open_kvm(path))
        version = self.api_version
        if version != lib.KVM_API_VERSION:
            self.close()
            raise ioctl_error(KvmError, errno.EPROTO, "KVM_GET_API_VERSION",
                              f"KVM API version {version}, pykvm needs {lib.KVM_API_VERSION}")

    @property
    def api_version(self) -> int:
        """KVM_GET_API_VERSION: always 12 on any kernel pykvm supports."""
        return self._ioctl("KVM_GET_API_VERSION")

    def check_extension(self, cap: CapLike) -> int:
        """KVM_CHECK_EXTENSION: 0 if unsupported, else 1 or a cap-specific number."""
        return self._ioctl("KVM_CHECK_EXTENSION", cap_number(cap))

    @property
    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes of the kvm_run area each vCPU fd maps."""
        return self._ioctl("KVM_GET_VCPU_MMAP_SIZE")

    @property
    def nr_vcpus(self) -> int:
        """Recommended maximum vCPUs per VM (KVM_CAP_NR_VCPUS)."""
        return self.check_extension(lib.KVM_CAP_NR_VCPUS)

    @property
    def max_vcpus(self) -> int:
        """Hard maximum vCPUs per VM (KVM_CAP_MAX_VCPUS)."""
        return self.check_extension(lib.KVM_CAP_MAX_VCPUS) or self.nr_vcpus

    @property
    def nr_memslots(self) -> int:
        """Memory slots per address space (KVM_CAP_NR_MEMSLOTS)."""
        return self.check_extension(lib.KVM_CAP_NR_MEMSLOTS)

    def mce_cap_supported(self) -> int:
        """KVM_X86_GET_MCE_CAP_SUPPORTED: the IA32_MCG_CAP bits (above the bank count)
        ``Vcpu.setup_mce`` accepts, e.g. MCG_CTL_P (bit 8) and MCG_SER_P (bit 24)."""
        c = ffi.new("__u64 *")
        self._ioctl("KVM_X86_GET_MCE_CAP_SUPPORTED", c)
        return c[0]

    def _cpuid(self, name: str) -> List[CpuidEntry]:
        c = ffi.new("struct kvm_cpuid2 *", {"nent": _CPUID_MAX, "entries": _CPUID_MAX})
        self._ioctl(name, c)
        return cpuid_from_c(c)

    def supported_cpuid(self) -> List[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID bits KVM can show a guest."""
        return self._cpuid("KVM_GET_SUPPORTED_CPUID")

    def emulated_cpuid(self) -> List[CpuidEntry]:
        """KVM_GET_EMULATED_CPUID: bits KVM emulates (possibly slowly), e.g. MOVBE."""
        return self._cpuid("KVM_GET_EMULATED_CPUID")

    def supported_hv_cpuid(self) -> List[CpuidEntry]:
        """KVM_GET_SUPPORTED_HV_CPUID: the Hyper-V leaves (0x40000000 and up, vendor "Linux KVM
        Hv") KVM can emulate, for a VMM that shows a Windows guest a Hyper-V host to pick its
        enlightenments from and pass to ``Vcpu.set_cpuid2``. Needs KVM_CAP_SYS_HYPERV_CPUID."""
        return self._cpuid("KVM_GET_SUPPORTED_HV_CPUID")

    def _msr_list(self, name: str) -> List[int]:
        c = ffi.new("struct kvm_msr_list *", {"nmsrs": _MSR_MAX, "indices": _MSR_MAX})
        self._ioctl(name, c)
        return list(c.indices[0:c.nmsrs])

    def msr_index_list(self) -> List[int]:
        """KVM_GET_MSR_INDEX_LIST: MSRs that KVM_GET/SET_MSRS save and restore."""
        return self._msr_list("KVM_GET_MSR_INDEX_LIST")

    def feature_msr_index_list(self) -> List[int]:
        """KVM_GET_MSR_FEATURE_INDEX_LIST: MSRs describing CPU features (e.g. ARCH_CAPABILITIES)."""
        return self._msr_list("KVM_GET_MSR_FEATURE_INDEX_LIST")

    def feature_msrs(self, indices: List[int]) -> Dict[int, int]:
        """KVM_GET_MSRS on the system fd: values of feature MSRs."""
        from pykvm.kvm.vcpu import msrs_get

        return msrs_get(self, indices)

    def create_vm(self, machine_type: int = 0) -> "Vm":
        """KVM_CREATE_VM: a new, empty virtual machine."""
        from pykvm.kvm.vm import Vm

        fd = self._ioctl("KVM_CREATE_VM", machine_type)
        return Vm(fd, self)
