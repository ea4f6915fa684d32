"""The machine: a small VMM over pykvm.kvm (and pykvm.vfio for passthrough)."""
