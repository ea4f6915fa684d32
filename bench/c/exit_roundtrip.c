/* Raw KVM_RUN loop: the floor for a PIO exit round trip on this machine.
 *
 * A real-mode guest at 0x1000 runs `l: out 0x10, al; jmp l`; this program
 * enters it 100 times untimed (warm-up), then N times, and prints the
 * nanoseconds per exit of those N. Nothing else: no statistics, no dispatch.
 * Usage: exit_roundtrip N
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "common.h"

#define MEM_SIZE 0x10000
#define CODE 0x1000

/* One KVM_RUN, which must end in the guest's `out 0x10, al`. */
static void enter(int vcpu, const struct kvm_run *run)
{
    if (ioctl(vcpu, KVM_RUN, 0) < 0)
        die("KVM_RUN");
    if (run->exit_reason != KVM_EXIT_IO || run->io.port != 0x10) {
        fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
        exit(1);
    }
}

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 100000;
    static const uint8_t code[] = {0xE6, 0x10, 0xEB, 0xFC}; /* out 0x10, al ; jmp -4 */

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap");
    memcpy(mem + CODE, code, sizeof(code));
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = CODE, .rflags = 2};
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    /* warm up, untimed, as pykvm's side does (100 exits): the first KVM_RUN alone costs
     * several steady-state exits (the vCPU's first load, the guest page's first fault) */
    for (long i = 0; i < 100; i++)
        enter(vcpu, run);
    uint64_t t0 = now_ns();
    for (long i = 0; i < n; i++)
        enter(vcpu, run);
    uint64_t t1 = now_ns();
    printf("%.1f\n", (double)(t1 - t0) / n);
    return 0;
}
