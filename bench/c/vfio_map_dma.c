/* Baseline for bench/vfio_map_dma.py: VFIO_IOMMU_MAP_DMA + VFIO_IOMMU_UNMAP_DMA pairs in C.
 *
 * usage: vfio_map_dma GROUP SIZE ITERATIONS IOVA
 * Opens /dev/vfio/vfio and /dev/vfio/GROUP, selects type1v2, maps one anonymous
 * buffer of SIZE bytes at IOVA and unmaps it, ITERATIONS times (after 10 untimed
 * pairs). Prints the mean nanoseconds per map+unmap pair.
 */
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s GROUP SIZE ITERATIONS IOVA\n", argv[0]);
        return 2;
    }
    char path[64];
    size_t size = strtoull(argv[2], NULL, 0);
    long n = strtol(argv[3], NULL, 0);
    uint64_t iova = strtoull(argv[4], NULL, 0);

    int container = open("/dev/vfio/vfio", O_RDWR);
    if (container < 0)
        die("/dev/vfio/vfio");
    snprintf(path, sizeof(path), "/dev/vfio/%s", argv[1]);
    int group = open(path, O_RDWR);
    if (group < 0)
        die(path);
    if (ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) < 0)
        die("VFIO_GROUP_SET_CONTAINER");
    if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0)
        die("VFIO_SET_IOMMU");

    void *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        die("mmap");
    struct vfio_iommu_type1_dma_map map = {
        .argsz = sizeof(map),
        .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        .vaddr = (uintptr_t)buf,
        .iova = iova,
        .size = size,
    };
    struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof(unmap), .iova = iova, .size = size};

    uint64_t t0 = 0;
    for (long i = -10; i < n; i++) { /* 10 untimed pairs first: fault the pages in, as the Python side does */
        if (i == 0)
            t0 = now_ns();
        if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map) < 0)
            die("VFIO_IOMMU_MAP_DMA");
        unmap.size = size;
        if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) < 0 || unmap.size != size)
            die("VFIO_IOMMU_UNMAP_DMA");
    }
    uint64_t t1 = now_ns();
    printf("%.1f\n", (double)(t1 - t0) / n);
    return 0;
}
