"""cffi declarations for <linux/vfio.h> (filled in by the VFIO layer)."""
CDEF = ""
SOURCE = ""
