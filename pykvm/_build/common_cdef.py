"""Declarations shared by every header: the ioctl entry points."""
CDEF = """
int pykvm_ioctl_ptr(int fd, unsigned long request, void *arg);
int pykvm_ioctl_int(int fd, unsigned long request, unsigned long arg);
"""

SOURCE = """
/* cffi releases the GIL around these calls, so a blocking KVM_RUN does not
   stall other Python threads. errno is read back with ffi.errno. */
static int pykvm_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    return ioctl(fd, request, arg);
}

static int pykvm_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
    return ioctl(fd, request, arg);
}
"""
