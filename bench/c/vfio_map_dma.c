/* Baseline for bench/vfio_map_dma.py: VFIO_IOMMU_MAP_DMA + VFIO_IOMMU_UNMAP_DMA in C.
 *
 * usage: vfio_map_dma GROUP SIZE ITERATIONS IOVA [pairs|batch]
 * Opens /dev/vfio/vfio and /dev/vfio/GROUP, selects type1v2 and maps one anonymous
 * buffer of SIZE bytes ITERATIONS times (after 10 untimed pairs):
 *   pairs (default): map at IOVA and unmap again, ITERATIONS times;
 *   batch: map at IOVA + i * SIZE for every i, then unmap them in the same order
 *          (what Container.map_dma_batch + DmaBatch.unmap issue).
 * The buffer is allocated as on the Python side (see dma_buffer()).
 * Prints the mean nanoseconds per map+unmap pair.
 */
#include <fcntl.h>
#include <linux/vfio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common.h"

#define HUGE (2ul << 20)

static int container;

/* A plain anonymous page for 4 KiB; for multiples of 2 MiB, a 2 MiB-aligned region backed by
   transparent huge pages (physically contiguous: how many IOMMU calls a map takes no longer
   depends on how scattered the process's pages happen to be). Touched. */
static void *dma_buffer(size_t size)
{
    int thp = size % HUGE == 0;
    char *p = mmap(NULL, thp ? size + HUGE : size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    if (thp)
        p = (char *)(((uintptr_t)p + HUGE - 1) & ~(HUGE - 1));
    if (madvise(p, size, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) < 0)
        die("madvise");
    memset(p, 0, size);
    return p;
}

static void map(void *buf, uint64_t iova, uint64_t size)
{
    struct vfio_iommu_type1_dma_map map = {
        .argsz = sizeof(map),
        .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        .vaddr = (uintptr_t)buf,
        .iova = iova,
        .size = size,
    };
    if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map) < 0)
        die("VFIO_IOMMU_MAP_DMA");
}

static void unmap(uint64_t iova, uint64_t size)
{
    struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof(unmap), .iova = iova, .size = size};
    if (ioctl(container, VFIO_IOMMU_UNMAP_DMA, &unmap) < 0 || unmap.size != size)
        die("VFIO_IOMMU_UNMAP_DMA");
}

int main(int argc, char **argv)
{
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s GROUP SIZE ITERATIONS IOVA [pairs|batch]\n", argv[0]);
        return 2;
    }
    char path[64];
    size_t size = strtoull(argv[2], NULL, 0);
    long n = strtol(argv[3], NULL, 0);
    uint64_t iova = strtoull(argv[4], NULL, 0);
    int batch = argc == 6 && !strcmp(argv[5], "batch");

    container = open("/dev/vfio/vfio", O_RDWR);
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

    void *buf = dma_buffer(size);
    for (int i = 0; i < 10; i++) { /* untimed warm-up, as on the Python side */
        map(buf, iova, size);
        unmap(iova, size);
    }
    uint64_t t0 = now_ns();
    if (batch) {
        for (long i = 0; i < n; i++)
            map(buf, iova + (uint64_t)i * size, size);
        for (long i = 0; i < n; i++)
            unmap(iova + (uint64_t)i * size, size);
    } else {
        for (long i = 0; i < n; i++) {
            map(buf, iova, size);
            unmap(iova, size);
        }
    }
    uint64_t t1 = now_ns();
    printf("%.1f\n", (double)(t1 - t0) / n);
    return 0;
}
