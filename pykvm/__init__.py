"""pykvm: /dev/kvm and /dev/vfio from Python, and a small VMM with PCI passthrough.

Subpackages: ``pykvm.kvm`` (Kvm, Vm, Vcpu), ``pykvm.vfio`` (Container, Group,
Device), ``pykvm.memory`` (GuestMemory), ``pykvm.vmm`` (the machine),
``pykvm.host`` (host preparation), ``pykvm.lab`` (the QEMU lab).
"""

__version__ = "0.1.0"
