/* Baseline for bench/vfio_map_dma.py: VFIO_IOMMU_MAP_DMA + VFIO_IOMMU_UNMAP_DMA in C.
 *
 * usage: vfio_map_dma GROUP SIZE ITERATIONS IOVA [pairs|batch]
 * Opens /dev/vfio/vfio and /dev/vfio/GROUP, selects type1v2 and maps one anonymous
 * buffer of SIZE bytes ITERATIONS times (after 10 untimed pairs):
 *   pairs (default): map at IOVA and unmap again, ITERATIONS times;
 *   batch: map at IOVA + i * SIZE for every i, then unmap them in the same order
 *          (what Container.map_dma_batch + DmaBatch.unmap issue).
 * The buffer is madvise(MADV_NOHUGEPAGE), as on the Python side: whether a transparent huge
 * page backs it would otherwise depend on where mmap placed it, and change the pinning cost.
 * Prints the mean nanoseconds per map+unmap pair.
 */
#include <fcntl.h>
#include <linux/vfio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "common.h"

static int container;

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

    void *buf = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED)
        die("mmap");
    if (madvise(buf, size, MADV_NOHUGEPAGE) < 0) /* as the Python side: 4 KiB pages to pin, never a THP */
        die("madvise");
    for (int i = 0; i < 10; i++) { /* untimed: fault the pages in, as the Python side does */
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
