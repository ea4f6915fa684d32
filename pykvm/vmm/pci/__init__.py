"""PCI for the VMM: bus 0 with mechanism #1 and ECAM, config-space model, BAR allocation,
MSI/MSI-X emulation and the GSI router. See bus.py for how BARs are mapped."""
