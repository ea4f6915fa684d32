"""The cffi builder: the only part of pykvm that knows C.

Each ``*_cdef.py`` module holds the declarations for one header; ``build.py``
joins them and compiles ``pykvm._native`` in API mode so that the C compiler,
not a hand-written table, supplies every ioctl number, constant and offset.
"""
