/* Sequential O_DIRECT reads of a whole block device, timed with CLOCK_MONOTONIC.
 *
 *   direct_read DEVICE BLOCK_BYTES REPS
 *
 * Prints one line per pass, "BENCH-READ <bytes> <seconds>". Built static, so the same
 * binary runs in L1 and in a busybox initramfs (passthrough_dma.py). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s DEVICE BLOCK_BYTES REPS\n", argv[0]);
        return 2;
    }
    size_t bs = strtoul(argv[2], NULL, 0);
    int reps = atoi(argv[3]);
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    unsigned long long size = 0;
    void *buf = NULL;
    if (fd < 0 || ioctl(fd, BLKGETSIZE64, &size) < 0 || posix_memalign(&buf, 4096, bs) != 0) {
        perror(argv[1]);
        return 1;
    }
    for (int r = 0; r < reps; r++) {
        struct timespec t0, t1;
        unsigned long long done = 0;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        while (done < size) {
            ssize_t n = pread(fd, buf, bs, (off_t)done);
            if (n <= 0) {
                perror("pread");
                return 1;
            }
            done += (unsigned long long)n;
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        printf("BENCH-READ %llu %.6f\n", done, (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    }
    return 0;
}
