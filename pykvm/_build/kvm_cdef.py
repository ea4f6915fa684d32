"""cffi declarations for <linux/kvm.h> (x86-64).

Struct bodies list only the fields pykvm touches and end in ``...;``: the C
compiler supplies the real layout. Integer constants are ``#define X ...`` so
the compiler evaluates them (ioctl numbers included). The families of
constants that become Python enums (KVM_CAP_*, KVM_EXIT_*, ...) are taken
from the preprocessor's own list of macros (``cc -dM -E``), so the enum holds
exactly what this kernel header defines.
"""
import os
import re
import subprocess

# Prefixes of macro families exposed whole (as enums or flag sets).
MACRO_FAMILIES = (
    "KVM_CAP_", "KVM_EXIT_", "KVM_INTERNAL_ERROR_", "KVM_SYSTEM_EVENT_", "KVM_MP_STATE_",
    "KVM_GUESTDBG_", "KVM_MEM_", "KVM_IRQCHIP_", "KVM_IRQ_ROUTING_", "KVM_IRQFD_FLAG_",
    "KVM_IOEVENTFD_FLAG_", "KVM_VCPUEVENT_", "KVM_MSR_EXIT_REASON_", "KVM_X86_DISABLE_EXITS_",
    "KVM_PIT_", "KVM_CLOCK_", "KVM_DEV_VFIO_", "KVM_CREATE_DEVICE_", "KVM_EXIT_HYPERCALL_",
    "KVM_STATS_",
)
_EXCLUDE = re.compile(r"^KVM_(EXIT_(IO|HYPERV|XEN|NOTIFY)_.*_OFFSET|CAP_.*_H$)")

IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_EMULATED_CPUID KVM_GET_MSR_INDEX_LIST KVM_GET_MSR_FEATURE_INDEX_LIST
KVM_SET_USER_MEMORY_REGION KVM_GET_DIRTY_LOG KVM_CLEAR_DIRTY_LOG KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_CREATE_IRQCHIP KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_CREATE_PIT2 KVM_GET_PIT2 KVM_SET_PIT2
KVM_IRQ_LINE KVM_IRQ_LINE_STATUS KVM_SIGNAL_MSI KVM_SET_GSI_ROUTING KVM_IRQFD KVM_IOEVENTFD
KVM_REGISTER_COALESCED_MMIO KVM_UNREGISTER_COALESCED_MMIO KVM_GET_CLOCK KVM_SET_CLOCK
KVM_ENABLE_CAP KVM_CREATE_VCPU KVM_CREATE_DEVICE KVM_SET_DEVICE_ATTR KVM_GET_DEVICE_ATTR KVM_HAS_DEVICE_ATTR
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS KVM_GET_MSRS KVM_SET_MSRS
KVM_GET_CPUID2 KVM_SET_CPUID2 KVM_GET_LAPIC KVM_SET_LAPIC KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS KVM_SET_GUEST_DEBUG
KVM_TRANSLATE KVM_NMI KVM_INTERRUPT KVM_GET_TSC_KHZ KVM_SET_TSC_KHZ KVM_SET_SIGNAL_MASK
KVM_SET_BOOT_CPU_ID KVM_X86_SET_MSR_FILTER KVM_GET_STATS_FD
KVM_GET_SREGS2 KVM_SET_SREGS2 KVM_GET_XSAVE2 KVM_X86_GET_MCE_CAP_SUPPORTED KVM_X86_SETUP_MCE KVM_X86_SET_MCE
KVM_KVMCLOCK_CTRL KVM_SMI KVM_REINJECT_CONTROL KVM_SET_PMU_EVENT_FILTER KVM_RESET_DIRTY_RINGS
KVM_GET_NESTED_STATE KVM_SET_NESTED_STATE KVM_GET_SUPPORTED_HV_CPUID
""".split()

CONSTANTS = """
KVM_API_VERSION KVM_NR_INTERRUPTS KVM_APIC_REG_SIZE KVM_COALESCED_MMIO_PAGE_OFFSET
KVM_DEV_TYPE_VFIO KVM_DEV_VFIO_GROUP KVM_DEV_VFIO_GROUP_ADD KVM_DEV_VFIO_GROUP_DEL
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT KVM_MSR_FILTER_MAX_BITMAP_SIZE KVM_IOAPIC_NUM_PINS
KVM_SREGS2_FLAGS_PDPTRS_VALID KVM_MSR_FILTER_MAX_RANGES KVM_MSR_FILTER_READ KVM_MSR_FILTER_WRITE
KVM_MSR_FILTER_DEFAULT_ALLOW KVM_MSR_FILTER_DEFAULT_DENY KVM_PMU_EVENT_ALLOW KVM_PMU_EVENT_DENY
KVM_DIRTY_LOG_PAGE_OFFSET KVM_DIRTY_GFN_F_DIRTY KVM_DIRTY_GFN_F_RESET
KVM_STATE_NESTED_FORMAT_VMX KVM_STATE_NESTED_FORMAT_SVM KVM_STATE_NESTED_GUEST_MODE
KVM_STATE_NESTED_RUN_PENDING KVM_STATE_NESTED_EVMCS KVM_STATE_NESTED_MTF_PENDING KVM_STATE_NESTED_GIF_SET
KVM_STATE_NESTED_SMM_GUEST_MODE KVM_STATE_NESTED_SMM_VMXON KVM_STATE_NESTED_VMX_VMCS_SIZE
KVM_STATE_NESTED_SVM_VMCB_SIZE
""".split()


def _macro_names():
    cc = os.environ.get("CC", "cc")
    try:
        out = subprocess.run([cc, "-dM", "-E", "-x", "c", "-"], input="#include <linux/kvm.h>\n",
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"pykvm: cannot run the C preprocessor ({cc}): {exc}. Install gcc.")
    names = []
    for line in out.splitlines():
        m = re.match(r"#define (KVM_\w+)\s+(.+)$", line)
        if not m or not m.group(1).startswith(MACRO_FAMILIES) or _EXCLUDE.match(m.group(1)):
            continue
        value = m.group(2).strip()
        # only integer-valued macros (numbers, shifts, ioctl encodings); skip aliases of structs
        if re.search(r"\bstruct\b|\"", value):
            continue
        names.append(m.group(1))
    return sorted(set(names))


FAMILY_MACROS = [n for n in _macro_names() if n not in IOCTLS and n not in CONSTANTS]
_defines = "\n".join(f"#define {n} ..." for n in IOCTLS + CONSTANTS + FAMILY_MACROS)

CDEF = _defines + r"""
struct kvm_userspace_memory_region {
    __u32 slot; __u32 flags; __u64 guest_phys_addr; __u64 memory_size; __u64 userspace_addr; ...;
};
struct kvm_dirty_log { __u32 slot; void *dirty_bitmap; ...; };
struct kvm_clear_dirty_log { __u32 slot; __u32 num_pages; __u64 first_page; void *dirty_bitmap; ...; };

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags; ...;
};
struct kvm_segment {
    __u64 base; __u32 limit; __u16 selector;
    __u8 type, present, dpl, db, s, l, g, avl, unusable; ...;
};
struct kvm_dtable { __u64 base; __u16 limit; ...; };
struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base;
    __u64 interrupt_bitmap[4]; ...;
};
struct kvm_sregs2 {
    struct kvm_segment cs, ds, es, fs, gs, ss, tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8, efer, apic_base, flags;
    __u64 pdptrs[4]; ...;
};
struct kvm_fpu {
    __u8 fpr[8][16]; __u16 fcw; __u16 fsw; __u8 ftwx; __u16 last_opcode;
    __u64 last_ip; __u64 last_dp; __u8 xmm[16][16]; __u32 mxcsr; ...;
};
struct kvm_xsave { __u32 region[1024]; ...; };
struct kvm_xcr { __u32 xcr; __u64 value; ...; };
struct kvm_xcrs { __u32 nr_xcrs; __u32 flags; struct kvm_xcr xcrs[16]; ...; };
struct kvm_msr_entry { __u32 index; __u64 data; ...; };
struct kvm_msrs { __u32 nmsrs; struct kvm_msr_entry entries[]; ...; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; ...; };
struct kvm_cpuid_entry2 {
    __u32 function; __u32 index; __u32 flags; __u32 eax, ebx, ecx, edx; ...;
};
struct kvm_cpuid2 { __u32 nent; struct kvm_cpuid_entry2 entries[]; ...; };
struct kvm_lapic_state { char regs[1024]; ...; };
struct kvm_vcpu_events {
    struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending; __u32 error_code; } exception;
    struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;
    struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi;
    __u32 sipi_vector; __u32 flags;
    struct { __u8 smm; __u8 pending; __u8 smm_inside_nmi; __u8 latched_init; } smi;
    ...;
};
struct kvm_mp_state { __u32 mp_state; ...; };
struct kvm_debugregs { __u64 db[4]; __u64 dr6; __u64 dr7; __u64 flags; ...; };
struct kvm_guest_debug_arch { __u64 debugreg[8]; ...; };
struct kvm_guest_debug { __u32 control; struct kvm_guest_debug_arch arch; ...; };
struct kvm_translation {
    __u64 linear_address; __u64 physical_address; __u8 valid; __u8 writeable; __u8 usermode; ...;
};
struct kvm_interrupt { __u32 irq; ...; };
struct kvm_irqchip { __u32 chip_id; union { char dummy[512]; } chip; ...; };
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_pit_channel_state {
    __u32 count; __u16 latched_count; __u8 count_latched; __u8 status_latched; __u8 status;
    __u8 read_state; __u8 write_state; __u8 write_latch; __u8 rw_mode; __u8 mode; __u8 bcd;
    __u8 gate; __s64 count_load_time; ...;
};
struct kvm_pit_state2 { struct kvm_pit_channel_state channels[3]; __u32 flags; ...; };
struct kvm_irq_level { union { __u32 irq; __s32 status; }; __u32 level; ...; };
struct kvm_x86_mce { __u64 status; __u64 addr; __u64 misc; __u64 mcg_status; __u8 bank; ...; };
struct kvm_signal_mask { __u32 len; __u8 sigset[]; ...; };
struct kvm_reinject_control { __u8 pit_reinject; ...; };
struct kvm_pmu_event_filter {
    __u32 action; __u32 nevents; __u32 fixed_counter_bitmap; __u32 flags; __u64 events[]; ...;
};
struct kvm_msr_filter_range { __u32 flags; __u32 nmsrs; __u32 base; __u8 *bitmap; ...; };
struct kvm_msr_filter { __u32 flags; struct kvm_msr_filter_range ranges[...]; ...; };
struct kvm_dirty_gfn { __u32 flags; __u32 slot; __u64 offset; ...; };
struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; __u32 devid; ...; };
struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };
struct kvm_irq_routing_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 devid; };
struct kvm_irq_routing_entry {
    __u32 gsi; __u32 type; __u32 flags;
    union { struct kvm_irq_routing_irqchip irqchip; struct kvm_irq_routing_msi msi; __u32 pad[8]; } u; ...;
};
struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; ...; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags; ...; };
struct kvm_coalesced_mmio_zone { __u64 addr; __u32 size; __u32 pio; ...; };
struct kvm_coalesced_mmio { __u64 phys_addr; __u32 len; __u32 pio; __u8 data[8]; ...; };
struct kvm_coalesced_mmio_ring { __u32 first; __u32 last; struct kvm_coalesced_mmio coalesced_mmio[]; ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; __u64 realtime; __u64 host_tsc; ...; };
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ...; };
struct kvm_create_device { __u32 type; __u32 fd; __u32 flags; ...; };
struct kvm_device_attr { __u32 flags; __u32 group; __u64 attr; __u64 addr; ...; };
/* KVM_GET_STATS_FD: the stats fd starts with a header; each descriptor is followed by
   header.name_size bytes of its name (the flexible ``name``), so the array's stride is
   sizeof(struct kvm_stats_desc) + name_size. exponent is __s16 in the header (int16_t,
   the same type: common_cdef declares no __s16). */
struct kvm_stats_header {
    __u32 flags; __u32 name_size; __u32 num_desc; __u32 id_offset; __u32 desc_offset; __u32 data_offset; ...;
};
struct kvm_stats_desc { __u32 flags; int16_t exponent; __u16 size; __u32 offset; __u32 bucket_size; char name[]; ...; };
/* KVM_GET/SET_NESTED_STATE: a 128-byte header, then ``size`` - 128 bytes of vendor data (the
   flexible ``data`` union: vmcs12 + shadow vmcs12, or vmcb12), left out here. The vendor
   headers are declared whole (cffi cannot leave an anonymous union of partial structs to the
   compiler); cffi checks them against the compiler's layout. */
struct kvm_vmx_nested_state_hdr {
    __u64 vmxon_pa; __u64 vmcs12_pa; struct { __u16 flags; } smm; __u16 pad; __u32 flags;
    __u64 preemption_timer_deadline;
};
struct kvm_svm_nested_state_hdr { __u64 vmcb_pa; };
struct kvm_nested_state {
    __u16 flags; __u16 format; __u32 size;
    union { struct kvm_vmx_nested_state_hdr vmx; struct kvm_svm_nested_state_hdr svm; __u8 pad[120]; } hdr; ...;
};
struct kvm_debug_exit_arch { __u32 exception; __u32 pad; __u64 pc; __u64 dr6; __u64 dr7; };

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u64 nr; __u64 args[6]; __u64 ret; __u32 longmode; __u32 pad; } hypercall;
        struct { __u64 rip; __u32 is_write; __u32 pad; } tpr_access;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
        struct { __u8 error; __u8 pad[7]; __u32 reason; __u32 index; __u64 data; } msr;
        char padding[256];
    };
    ...;
};
"""

# The PIC and IOAPIC states sit in a union of kvm_irqchip and hold bitfields;
# small accessors let the compiler do that layout too.
CDEF += """
__u64 pykvm_ioapic_base(const struct kvm_irqchip *c);
__u32 pykvm_ioapic_id(const struct kvm_irqchip *c);
__u32 pykvm_ioapic_irr(const struct kvm_irqchip *c);
__u64 pykvm_ioapic_redirection(const struct kvm_irqchip *c, int pin);
void pykvm_ioapic_set_redirection(struct kvm_irqchip *c, int pin, __u64 bits);
__u8 pykvm_pic_irr(const struct kvm_irqchip *c);
__u8 pykvm_pic_imr(const struct kvm_irqchip *c);
__u8 pykvm_pic_isr(const struct kvm_irqchip *c);
__u8 pykvm_pic_irq_base(const struct kvm_irqchip *c);
"""

SOURCE = """
static __u64 pykvm_ioapic_base(const struct kvm_irqchip *c) { return c->chip.ioapic.base_address; }
static __u32 pykvm_ioapic_id(const struct kvm_irqchip *c) { return c->chip.ioapic.id; }
static __u32 pykvm_ioapic_irr(const struct kvm_irqchip *c) { return c->chip.ioapic.irr; }
static __u64 pykvm_ioapic_redirection(const struct kvm_irqchip *c, int pin)
{
    return pin >= 0 && pin < KVM_IOAPIC_NUM_PINS ? c->chip.ioapic.redirtbl[pin].bits : ~0ULL;
}
static void pykvm_ioapic_set_redirection(struct kvm_irqchip *c, int pin, __u64 bits)
{
    if (pin >= 0 && pin < KVM_IOAPIC_NUM_PINS)
        c->chip.ioapic.redirtbl[pin].bits = bits;
}
static __u8 pykvm_pic_irr(const struct kvm_irqchip *c) { return c->chip.pic.irr; }
static __u8 pykvm_pic_imr(const struct kvm_irqchip *c) { return c->chip.pic.imr; }
static __u8 pykvm_pic_isr(const struct kvm_irqchip *c) { return c->chip.pic.isr; }
static __u8 pykvm_pic_irq_base(const struct kvm_irqchip *c) { return c->chip.pic.irq_base; }
"""
