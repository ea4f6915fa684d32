"""cffi declarations for <linux/vfio.h> (and the PCI register names of <linux/pci_regs.h>).

Same rules as kvm_cdef: structs list the fields pykvm touches and end in
``...;`` so the compiler supplies layouts; ioctl numbers and constants are
``#define X ...`` so the compiler evaluates them. Capability structs are
declared whole (header first) because pykvm casts raw INFO buffers to them.

The PYKVM_HAVE_* constants record what the headers this extension was built
from offer, so ``pykvm.vfio.iommufd`` can say why iommufd is unavailable.
"""

IOCTLS = """
VFIO_GET_API_VERSION VFIO_CHECK_EXTENSION VFIO_SET_IOMMU
VFIO_GROUP_GET_STATUS VFIO_GROUP_SET_CONTAINER VFIO_GROUP_UNSET_CONTAINER VFIO_GROUP_GET_DEVICE_FD
VFIO_DEVICE_GET_INFO VFIO_DEVICE_GET_REGION_INFO VFIO_DEVICE_GET_IRQ_INFO VFIO_DEVICE_SET_IRQS
VFIO_DEVICE_RESET VFIO_DEVICE_GET_PCI_HOT_RESET_INFO VFIO_DEVICE_PCI_HOT_RESET
VFIO_DEVICE_IOEVENTFD VFIO_DEVICE_FEATURE
VFIO_IOMMU_GET_INFO VFIO_IOMMU_MAP_DMA VFIO_IOMMU_UNMAP_DMA VFIO_IOMMU_DIRTY_PAGES
""".split()

CONSTANTS = """
VFIO_API_VERSION
VFIO_TYPE1_IOMMU VFIO_SPAPR_TCE_IOMMU VFIO_TYPE1v2_IOMMU VFIO_DMA_CC_IOMMU VFIO_EEH
VFIO_TYPE1_NESTING_IOMMU VFIO_SPAPR_TCE_v2_IOMMU VFIO_NOIOMMU_IOMMU VFIO_UNMAP_ALL VFIO_UPDATE_VADDR
VFIO_GROUP_FLAGS_VIABLE VFIO_GROUP_FLAGS_CONTAINER_SET
VFIO_DEVICE_FLAGS_RESET VFIO_DEVICE_FLAGS_PCI VFIO_DEVICE_FLAGS_PLATFORM VFIO_DEVICE_FLAGS_AMBA
VFIO_DEVICE_FLAGS_CCW VFIO_DEVICE_FLAGS_AP VFIO_DEVICE_FLAGS_FSL_MC VFIO_DEVICE_FLAGS_CAPS
VFIO_REGION_INFO_FLAG_READ VFIO_REGION_INFO_FLAG_WRITE VFIO_REGION_INFO_FLAG_MMAP VFIO_REGION_INFO_FLAG_CAPS
VFIO_REGION_INFO_CAP_SPARSE_MMAP VFIO_REGION_INFO_CAP_TYPE VFIO_REGION_INFO_CAP_MSIX_MAPPABLE
VFIO_REGION_TYPE_PCI_VENDOR_TYPE VFIO_REGION_TYPE_PCI_VENDOR_MASK VFIO_REGION_TYPE_GFX VFIO_REGION_TYPE_CCW
VFIO_IRQ_INFO_EVENTFD VFIO_IRQ_INFO_MASKABLE VFIO_IRQ_INFO_AUTOMASKED VFIO_IRQ_INFO_NORESIZE
VFIO_IRQ_SET_DATA_NONE VFIO_IRQ_SET_DATA_BOOL VFIO_IRQ_SET_DATA_EVENTFD
VFIO_IRQ_SET_ACTION_MASK VFIO_IRQ_SET_ACTION_UNMASK VFIO_IRQ_SET_ACTION_TRIGGER
VFIO_PCI_BAR0_REGION_INDEX VFIO_PCI_BAR1_REGION_INDEX VFIO_PCI_BAR2_REGION_INDEX
VFIO_PCI_BAR3_REGION_INDEX VFIO_PCI_BAR4_REGION_INDEX VFIO_PCI_BAR5_REGION_INDEX
VFIO_PCI_ROM_REGION_INDEX VFIO_PCI_CONFIG_REGION_INDEX VFIO_PCI_VGA_REGION_INDEX VFIO_PCI_NUM_REGIONS
VFIO_PCI_INTX_IRQ_INDEX VFIO_PCI_MSI_IRQ_INDEX VFIO_PCI_MSIX_IRQ_INDEX VFIO_PCI_ERR_IRQ_INDEX
VFIO_PCI_REQ_IRQ_INDEX VFIO_PCI_NUM_IRQS
VFIO_IOMMU_INFO_PGSIZES VFIO_IOMMU_INFO_CAPS
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL
VFIO_DMA_MAP_FLAG_READ VFIO_DMA_MAP_FLAG_WRITE VFIO_DMA_MAP_FLAG_VADDR
VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP VFIO_DMA_UNMAP_FLAG_ALL VFIO_DMA_UNMAP_FLAG_VADDR
VFIO_IOMMU_DIRTY_PAGES_FLAG_START VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP
VFIO_DEVICE_IOEVENTFD_8 VFIO_DEVICE_IOEVENTFD_16 VFIO_DEVICE_IOEVENTFD_32 VFIO_DEVICE_IOEVENTFD_64
VFIO_DEVICE_FEATURE_MASK VFIO_DEVICE_FEATURE_GET VFIO_DEVICE_FEATURE_SET VFIO_DEVICE_FEATURE_PROBE
VFIO_DEVICE_FEATURE_PCI_VF_TOKEN VFIO_DEVICE_FEATURE_MIGRATION VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP
VFIO_DEVICE_FEATURE_LOW_POWER_EXIT VFIO_DEVICE_FEATURE_DMA_LOGGING_START
VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
PYKVM_HAVE_IOMMUFD_H PYKVM_HAVE_VFIO_CDEV
EFD_CLOEXEC EFD_NONBLOCK EFD_SEMAPHORE
"""

# PCI configuration-space registers and bits (<linux/pci_regs.h>) used by pykvm.vfio.pci.
PCI_REGS = """
PCI_VENDOR_ID PCI_DEVICE_ID PCI_COMMAND PCI_STATUS PCI_CLASS_REVISION PCI_HEADER_TYPE
PCI_BASE_ADDRESS_0 PCI_CAPABILITY_LIST PCI_INTERRUPT_PIN PCI_STD_HEADER_SIZEOF PCI_CFG_SPACE_SIZE
PCI_CFG_SPACE_EXP_SIZE
PCI_COMMAND_IO PCI_COMMAND_MEMORY PCI_COMMAND_MASTER PCI_COMMAND_INTX_DISABLE PCI_STATUS_CAP_LIST
PCI_CAP_LIST_ID PCI_CAP_LIST_NEXT
PCI_CAP_ID_PM PCI_CAP_ID_MSI PCI_CAP_ID_VNDR PCI_CAP_ID_EXP PCI_CAP_ID_MSIX
PCI_MSI_FLAGS PCI_MSI_FLAGS_ENABLE PCI_MSI_FLAGS_QMASK PCI_MSI_FLAGS_64BIT
PCI_MSIX_FLAGS PCI_MSIX_FLAGS_QSIZE PCI_MSIX_FLAGS_ENABLE PCI_MSIX_FLAGS_MASKALL
PCI_MSIX_TABLE PCI_MSIX_TABLE_BIR PCI_MSIX_TABLE_OFFSET PCI_MSIX_PBA PCI_MSIX_PBA_BIR PCI_MSIX_PBA_OFFSET
PCI_MSIX_ENTRY_SIZE
"""

_defines = "\n".join(f"#define {n} ..." for n in (IOCTLS + CONSTANTS.split() + PCI_REGS.split()))

CDEF = _defines + r"""
struct vfio_info_cap_header { __u16 id; __u16 version; __u32 next; ...; };

struct vfio_group_status { __u32 argsz; __u32 flags; ...; };
struct vfio_device_info { __u32 argsz; __u32 flags; __u32 num_regions; __u32 num_irqs; ...; };

struct vfio_region_info {
    __u32 argsz; __u32 flags; __u32 index; __u32 cap_offset; __u64 size; __u64 offset; ...;
};
struct vfio_region_sparse_mmap_area { __u64 offset; __u64 size; ...; };
struct vfio_region_info_cap_sparse_mmap {
    struct vfio_info_cap_header header; __u32 nr_areas; struct vfio_region_sparse_mmap_area areas[]; ...;
};
struct vfio_region_info_cap_type { struct vfio_info_cap_header header; __u32 type; __u32 subtype; ...; };

struct vfio_irq_info { __u32 argsz; __u32 flags; __u32 index; __u32 count; ...; };
struct vfio_irq_set { __u32 argsz; __u32 flags; __u32 index; __u32 start; __u32 count; __u8 data[]; ...; };

struct vfio_pci_dependent_device { __u32 group_id; __u16 segment; __u8 bus; __u8 devfn; ...; };
struct vfio_pci_hot_reset_info {
    __u32 argsz; __u32 flags; __u32 count; struct vfio_pci_dependent_device devices[]; ...;
};
struct vfio_pci_hot_reset { __u32 argsz; __u32 flags; __u32 count; __s32 group_fds[]; ...; };

struct vfio_device_ioeventfd { __u32 argsz; __u32 flags; __u64 offset; __u64 data; __s32 fd; ...; };
struct vfio_device_feature { __u32 argsz; __u32 flags; __u8 data[]; ...; };

struct vfio_iommu_type1_info { __u32 argsz; __u32 flags; __u64 iova_pgsizes; __u32 cap_offset; ...; };
struct vfio_iova_range { __u64 start; __u64 end; ...; };
struct vfio_iommu_type1_info_cap_iova_range {
    struct vfio_info_cap_header header; __u32 nr_iovas; struct vfio_iova_range iova_ranges[]; ...;
};
struct vfio_iommu_type1_info_cap_migration {
    struct vfio_info_cap_header header; __u32 flags; __u64 pgsize_bitmap; __u64 max_dirty_bitmap_size; ...;
};
struct vfio_iommu_type1_info_dma_avail { struct vfio_info_cap_header header; __u32 avail; ...; };

struct vfio_iommu_type1_dma_map { __u32 argsz; __u32 flags; __u64 vaddr; __u64 iova; __u64 size; ...; };
struct vfio_iommu_type1_dma_unmap { __u32 argsz; __u32 flags; __u64 iova; __u64 size; ...; };
struct vfio_bitmap { __u64 pgsize; __u64 size; __u64 *data; ...; };
struct vfio_iommu_type1_dirty_bitmap { __u32 argsz; __u32 flags; __u8 data[]; ...; };
struct vfio_iommu_type1_dirty_bitmap_get { __u64 iova; __u64 size; struct vfio_bitmap bitmap; ...; };

/* eventfd(2) for Pythons before 3.10 (no os.eventfd) */
int eventfd(unsigned int initval, int flags);

/* MAP_DMA/UNMAP_DMA without building the struct in Python (the map/unmap hot path). */
int pykvm_vfio_map_dma(int fd, uint32_t flags, void *vaddr, uint64_t iova, uint64_t size);
long long pykvm_vfio_unmap_dma(int fd, uint64_t iova, uint64_t size);
/* Many of them in one call (pykvm.vfio.dma_batch). */
size_t pykvm_vfio_map_dma_batch(int fd, uint32_t flags, char *base, const uint64_t *offsets,
                                const uint64_t *iovas, const uint64_t *sizes, size_t n);
size_t pykvm_vfio_unmap_dma_batch(int fd, const uint64_t *iovas, const uint64_t *sizes, size_t n);
"""

SOURCE = r"""
#include <linux/pci_regs.h>
#include <sys/eventfd.h>
#include <unistd.h>

/* Refuses (EINVAL, before the ioctl) what is not aligned to the CPU page size;
   the caller explains why. Returns the ioctl's result, errno set on failure. */
static int pykvm_vfio_map_dma(int fd, uint32_t flags, void *vaddr, uint64_t iova, uint64_t size)
{
    static uint64_t page_mask;
    if (!page_mask)
        page_mask = (uint64_t)sysconf(_SC_PAGESIZE) - 1;
    if ((((uint64_t)(uintptr_t)vaddr) | iova | size) & page_mask || !size) {
        errno = EINVAL;
        return -1;
    }
    struct vfio_iommu_type1_dma_map map = {
        .argsz = sizeof(map), .flags = flags, .vaddr = (uintptr_t)vaddr, .iova = iova, .size = size,
    };
    return ioctl(fd, VFIO_IOMMU_MAP_DMA, &map);
}

/* Returns the number of bytes the kernel unmapped, or -1 with errno set. */
static long long pykvm_vfio_unmap_dma(int fd, uint64_t iova, uint64_t size)
{
    struct vfio_iommu_type1_dma_unmap unmap = {.argsz = sizeof(unmap), .iova = iova, .size = size};
    if (ioctl(fd, VFIO_IOMMU_UNMAP_DMA, &unmap) < 0)
        return -1;
    return (long long)unmap.size;
}

/* Maps entry i as base + offsets[i] at iovas[i] for sizes[i] bytes, in order, stopping at
   the first failure. Returns how many entries are mapped (n when all are); errno says why
   entry <returned> failed. The caller undoes the mapped ones (pykvm_vfio_unmap_dma_batch). */
static size_t pykvm_vfio_map_dma_batch(int fd, uint32_t flags, char *base, const uint64_t *offsets,
                                       const uint64_t *iovas, const uint64_t *sizes, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (pykvm_vfio_map_dma(fd, flags, base + offsets[i], iovas[i], sizes[i]) < 0)
            return i;
    return n;
}

/* Unmaps n whole mappings, going on past failures so that as much as possible is unmapped.
   Returns the first entry the kernel did not unmap exactly (n when there is none), errno set
   for it (ENOENT: nothing was mapped there any more). */
static size_t pykvm_vfio_unmap_dma_batch(int fd, const uint64_t *iovas, const uint64_t *sizes, size_t n)
{
    size_t first = n;
    int first_errno = 0;
    for (size_t i = 0; i < n; i++) {
        long long done = pykvm_vfio_unmap_dma(fd, iovas[i], sizes[i]);
        if (done != (long long)sizes[i] && first == n) {
            first = i;
            first_errno = done < 0 ? errno : ENOENT;
        }
    }
    errno = first_errno;
    return first;
}
#if defined(__has_include)
# if __has_include(<linux/iommufd.h>)
#  define PYKVM_HAVE_IOMMUFD_H 1
# endif
#endif
#ifndef PYKVM_HAVE_IOMMUFD_H
# define PYKVM_HAVE_IOMMUFD_H 0
#endif
#ifdef VFIO_DEVICE_BIND_IOMMUFD
# define PYKVM_HAVE_VFIO_CDEV 1
#else
# define PYKVM_HAVE_VFIO_CDEV 0
#endif
"""
