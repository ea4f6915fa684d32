"""cffi declarations for the C vCPU run loop in csrc/ (filled in by the run-loop work)."""
CDEF = ""
SOURCE = ""
C_FILES: list = []
