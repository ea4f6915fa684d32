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
int pykvm_kick_signal(void);
int pykvm_install_kick_handler(void);
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

/* The signal that kicks a vCPU thread out of KVM_RUN. Its handler does
   nothing: the point is that the ioctl returns EINTR. Installed with
   sigaction (no SA_RESTART) from C so any thread may install it. */
static int pykvm_kick_signal(void)
{
    return SIGRTMIN + 3;
}

static void pykvm_kick_handler(int sig)
{
    (void)sig;
}

static int pykvm_install_kick_handler(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = pykvm_kick_handler;
    sigemptyset(&sa.sa_mask);
    return sigaction(pykvm_kick_signal(), &sa, NULL);
}
"""
