/* Sequential O_DIRECT reads of a whole block device, timed with CLOCK_MONOTONIC.
 *
 *   direct_read DEVICE BLOCK_BYTES REPS [MODE [DEPTH [SPAN]]]
 *
 * Each pass reads the device from its start to its end, or to SPAN bytes (a real disk is
 * larger than a bench needs), in whole reads: a tail shorter than BLOCK_BYTES is left out.
 *
 * MODE (default sync):
 *   sync  one pread(2) at a time: the task sleeps until the device's interrupt completes it;
 *   irq   io_uring with DEPTH reads in flight, completions by interrupt (what a deeper queue
 *         buys: fewer interrupts, and sleeps, per byte);
 *   poll  io_uring with IORING_SETUP_IOPOLL and DEPTH reads in flight: the task polls the
 *         completion queue, no interrupt at all, provided the NVMe driver has poll queues
 *         (nvme.poll_queues > 0 when the controller was probed; else the kernel falls back to
 *         interrupts: /sys/block/DEV/queue/io_poll says which). Each read is capped at the
 *         largest power of two the device takes as one request whatever the buffer's
 *         physical pages (max_sectors and max_segments pages: 256 KiB for the lab's NVMe,
 *         whose 127 segments fall just short of its 512 KiB): the block layer does not poll
 *         a read it must split (1 MiB polled reads hung in every try on Linux 6.1).
 * MODE may end in "+huge": the buffers then sit on 2 MiB transparent huge pages (2 MiB aligned,
 * MADV_HUGEPAGE; stderr says how much of them the kernel gave huge pages), so that pinning
 * them for each read and releasing them after touches one page head per 2 MiB instead of one
 * struct page per 4 KiB: less CPU per byte in the machine that reads, the same DMA.
 * Prints one line per pass, "BENCH-READ <bytes> <seconds> <cpu seconds>" (the CPU time is the
 * reader's own, user + system, by its machine's accounting: the kernel's work for each read,
 * and what interrupts it takes while it runs). Built static, so the same
 * binary runs in L1 and in a busybox initramfs (passthrough_dma.py). io_uring through its
 * raw system calls: no liburing in a static busybox world. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/io_uring.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct ring {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
};

static int ring_open(struct ring *r, unsigned depth, int poll)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = poll ? IORING_SETUP_IOPOLL : 0;
    r->fd = (int)syscall(__NR_io_uring_setup, depth, &p);
    if (r->fd < 0)
        return -1;
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP && cq_len > sq_len)
        sq_len = cq_len;
    char *sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
    char *cq = sq;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP))
        cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
    r->sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                   MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || r->sqes == MAP_FAILED)
        return -1;
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    return 0;
}

/* One pass over [0, size) with up to `depth` reads of `bs` bytes in flight; -1 on error. */
static int ring_pass(struct ring *r, int fd, char *bufs, size_t bs, unsigned depth, unsigned long long size)
{
    unsigned long long next = 0, done = 0;
    unsigned inflight = 0, free_slots[depth], nfree = depth;
    for (unsigned i = 0; i < depth; i++)
        free_slots[i] = i;
    while (done < size) {
        unsigned to_submit = 0, tail = *r->sq_tail;
        while (nfree && next < size) {
            unsigned slot = free_slots[--nfree], idx = tail & *r->sq_mask;
            struct io_uring_sqe *sqe = &r->sqes[idx];
            memset(sqe, 0, sizeof *sqe);
            sqe->opcode = IORING_OP_READ;
            sqe->fd = fd;
            sqe->off = next;
            sqe->addr = (unsigned long)(bufs + slot * bs);
            sqe->len = (unsigned)(size - next < bs ? size - next : bs);
            sqe->user_data = slot;
            r->sq_array[idx] = idx;
            next += sqe->len;
            tail++;
            to_submit++;
        }
        __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
        inflight += to_submit;
        if (syscall(__NR_io_uring_enter, r->fd, to_submit, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0) {
            perror("io_uring_enter");
            return -1;
        }
        unsigned head = *r->cq_head;
        while (head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            if (cqe->res <= 0) {
                fprintf(stderr, "read: %s\n", strerror(-cqe->res));
                return -1;
            }
            done += (unsigned long long)cqe->res;
            free_slots[nfree++] = (unsigned)cqe->user_data;
            inflight--;
            head++;
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    }
    return inflight == 0 ? 0 : -1;
}

/* The largest power of two <= both max_sectors and max_segments pages of fd's disk (0 if unknown). */
static size_t unsplit_bytes(int fd)
{
    unsigned short max_sectors = 0;
    unsigned long segments = 0;
    struct stat st;
    char path[64];
    if (ioctl(fd, BLKSECTGET, &max_sectors) < 0 || fstat(fd, &st) < 0)
        return 0;
    snprintf(path, sizeof path, "/sys/dev/block/%u:%u/queue/max_segments", major(st.st_rdev), minor(st.st_rdev));
    FILE *f = fopen(path, "r");
    if (f == NULL || fscanf(f, "%lu", &segments) != 1)
        segments = 0;
    if (f != NULL)
        fclose(f);
    size_t limit = max_sectors * 512UL, page = (size_t)sysconf(_SC_PAGESIZE), cap = page;
    if (segments && segments * page < limit)
        limit = segments * page;
    while (cap * 2 <= limit)
        cap *= 2;
    return limit >= page ? cap : 0;
}

static int sync_pass(int fd, char *buf, size_t bs, unsigned long long size)
{
    unsigned long long done = 0;
    while (done < size) {
        ssize_t n = pread(fd, buf, bs, (off_t)done);
        if (n <= 0) {
            perror("pread");
            return -1;
        }
        done += (unsigned long long)n;
    }
    return 0;
}

static double cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

#define HUGE_PAGE (2UL << 20)

/* len bytes, 2 MiB aligned, asked for on transparent huge pages; NULL if mmap fails. */
static void *huge_buffer(size_t len)
{
    size_t span = (len + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1);
    char *raw = mmap(NULL, span + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
        return NULL;
    char *buf = (char *)(((unsigned long)raw + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1));
    madvise(buf, span, MADV_HUGEPAGE);
    return buf;
}

/* The kB of this process's anonymous memory on huge pages (smaps_rollup), or -1. */
static long anon_huge_kb(void)
{
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    long kb = -1;
    while (f != NULL && fgets(line, sizeof line, f))
        if (sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
            break;
    if (f != NULL)
        fclose(f);
    return kb;
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 7) {
        fprintf(stderr, "usage: %s DEVICE BLOCK_BYTES REPS [sync|irq|poll[+huge] [DEPTH [SPAN]]]\n", argv[0]);
        return 2;
    }
    size_t bs = strtoul(argv[2], NULL, 0);
    int reps = atoi(argv[3]);
    char mode[16] = "sync";
    int huge = 0;
    if (argc > 4) {
        snprintf(mode, sizeof mode, "%s", argv[4]);
        char *plus = strchr(mode, '+');
        if (plus != NULL) {
            huge = strcmp(plus, "+huge") == 0;
            if (huge)
                *plus = '\0'; /* anything else after '+' stays, and the mode check refuses it */
        }
    }
    unsigned depth = argc > 5 ? (unsigned)atoi(argv[5]) : 1;
    int use_ring = strcmp(mode, "sync") != 0;
    if ((use_ring && strcmp(mode, "irq") && strcmp(mode, "poll")) || depth < 1 || depth > 256 || bs == 0) {
        fprintf(stderr, "bad mode %s or depth %u (1..256)\n", mode, depth);
        return 2;
    }
    if (!use_ring)
        depth = 1;
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    unsigned long long size = 0;
    void *bufs = NULL;
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) < 0 ||
        (huge ? (bufs = huge_buffer(bs * depth)) == NULL : posix_memalign(&bufs, 4096, bs * depth) != 0)) {
        perror(argv[1]);
        return 1;
    }
    char *end = NULL;
    unsigned long long span = argc > 6 ? strtoull(argv[6], &end, 0) : 0;
    if (argc > 6 && (*argv[6] == '\0' || *end != '\0')) {
        fprintf(stderr, "bad SPAN %s: a byte count\n", argv[6]);
        return 2;
    }
    if (span && span < size)
        size = span;
    if (strcmp(mode, "poll") == 0) {
        size_t cap = unsplit_bytes(fd);
        if (cap && bs > cap) {
            bs = cap;
            fprintf(stderr, "poll: reads capped at %zu bytes (the device's largest unsplit request)\n", bs);
        }
    }
    if (size < bs) {
        fprintf(stderr, "%llu bytes to read (SPAN or the device) is less than one %zu-byte read\n", size, bs);
        return 2;
    }
    size -= size % bs; /* whole reads only: the bytes printed are the bytes read */
    memset(bufs, 0, bs * depth); /* fault the buffers in before the clock starts */
    if (huge)
        fprintf(stderr, "direct_read: %ld kB of the %zu kB buffer on huge pages\n", anon_huge_kb(), bs * depth / 1024);
    struct ring ring = {0};
    if (use_ring && ring_open(&ring, depth, strcmp(mode, "poll") == 0) < 0) {
        perror("io_uring_setup");
        return 1;
    }
    for (int r = 0; r < reps; r++) {
        struct timespec t0, t1;
        double cpu0 = cpu_seconds();
        clock_gettime(CLOCK_MONOTONIC, &t0);
        if ((use_ring ? ring_pass(&ring, fd, bufs, bs, depth, size) : sync_pass(fd, bufs, bs, size)) < 0)
            return 1;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        printf("BENCH-READ %llu %.6f %.6f\n", size, (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9,
               cpu_seconds() - cpu0);
    }
    return 0;
}
