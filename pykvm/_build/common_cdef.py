"""Declarations shared by every header: kernel integer types and the ioctl entry points."""
CDEF = """
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef unsigned long long __u64;
typedef int32_t __s32;
typedef long long __s64;

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
