/* The vCPU run loop's C hot path: KVM_RUN in a loop, with the frequent and
 * simple exits answered here so Python only sees exits that need it.
 *
 * The Python side (pykvm/vmm/runloop.py) fills a struct pykvm_runloop from
 * the machine's buses, calls pykvm_runloop_run() without the GIL (cffi drops
 * it), and handles whatever exit is left in kvm_run when it returns.
 */
#ifndef PYKVM_RUNLOOP_H
#define PYKVM_RUNLOOP_H

#include <stdint.h>
#include <linux/kvm.h>

#define PYKVM_RL_MAX_RANGES 64
#define PYKVM_RL_NREASONS 64          /* exit reasons >= this share the last slot */
#define PYKVM_RL_UART_RING 4096       /* power of two */

/* pykvm_uart_take(): IER in bits 0-3, and these flags. */
#define PYKVM_RL_UART_THRE 0x100    /* THRE interrupt latched */
#define PYKVM_RL_UART_LEVEL 0x200   /* the line as last driven */

/* Return values of pykvm_runloop_run(). */
#define PYKVM_RL_EXIT 0         /* an exit for Python is in kvm_run */
#define PYKVM_RL_INTERRUPTED 1  /* KVM_RUN returned EINTR (a kick or another signal) */
#define PYKVM_RL_STOPPED 2      /* the stop flag was set before entering the guest */
#define PYKVM_RL_BUDGET 3       /* exits_left reached 0 (last exit handled in C) */
#define PYKVM_RL_DEADLINE 4     /* CLOCK_MONOTONIC_COARSE passed deadline_ns after a C-handled exit */
#define PYKVM_RL_UART_FLUSH 5   /* the UART ring is half full or got a newline: drain it */
#define PYKVM_RL_ERROR 6        /* KVM_RUN failed; errno in last_errno */

#define PYKVM_RL_SPACE_PIO 0
#define PYKVM_RL_SPACE_MMIO 1

/* An address range answered in C: writes are counted and dropped, reads are
 * counted and return the low bytes of `value` (little-endian, per element). */
struct pykvm_rl_range {
    uint64_t base;
    uint64_t length;
    uint64_t value;
    uint32_t space;
    uint64_t reads;
    uint64_t writes;
};

/* The 16550 fast path. The Python UART model publishes what C may do on its
 * own (pykvm_uart_publish); transmitted bytes go into a ring that Python
 * drains into the model's output. One per machine: vCPU threads append under
 * `lock` (the guest serializes its THR writes anyway), one drain at a time reads.
 *
 * Interrupt-driven transmit (irq_mode): a THR write also latches the THRE
 * interrupt, an IIR read reports and acknowledges it (if IER enables it), an
 * IER write stores IER (and latches THRE when it enables THRI). C then owns the
 * interrupt line and IER: the level, ier and thre_pending change only under
 * `lock`, and the line is driven with KVM_IRQ_LINE on vm_fd (-1: nothing to
 * drive). Python takes them over with pykvm_uart_take() before it acts. */
struct pykvm_rl_uart {
    int32_t base;               /* first port (THR) */
    int32_t tx_ok;              /* a THR write is pure output (DLAB=0, no THRE irq, no loopback);
                                   outside irq_mode, where Python owns IER */
    int32_t lsr;                /* LSR value when reading it has no side effect, else -1 */
    int32_t msr;                /* MSR value when reading it has no side effect (no deltas), else -1 */
    int32_t flush_on_newline;   /* return to Python after a '\n' so lines come out promptly */
    int32_t vm_fd;
    int32_t gsi;
    int32_t irq_mode;           /* DLAB=0, no loopback, C may drive the line: C answers THR (latching
                                   THRE), IIR, and IER reads and writes, with or without IER.THRE */
    int32_t iir_fifo;           /* IIR bits 6-7 (FIFOs enabled) */
    int32_t ier;
    int32_t other_sources;      /* IER bits RDA, RLS, MSI whose condition holds (data ready, line
                                   error, modem delta): any of them enabled in ier is an interrupt
                                   other than THRE, and IIR goes to Python */
    int32_t line_enable;        /* MCR.OUT2 set and loopback off: pending interrupts reach the line */
    int32_t thre_pending;
    int32_t level;              /* the line as last driven */
    int32_t notify_fd;          /* eventfd C signals when output lands in an empty ring without a
                                   return to Python (no newline yet), or -1: Python's drain thread
                                   sleeps on it instead of polling */
    uint32_t lock;
    uint32_t head;              /* producers' index */
    uint32_t tail;              /* consumer's index */
    uint64_t tx_bytes;
    uint8_t ring[PYKVM_RL_UART_RING];
};

struct pykvm_runloop {
    int vcpu_fd;
    struct kvm_run *run;
    uint64_t run_size;          /* bytes mapped at run (KVM_GET_VCPU_MMAP_SIZE) */

    /* control, written by Python (any thread), read here */
    int32_t stop;
    uint64_t exits_left;        /* UINT64_MAX: no budget */
    uint64_t deadline_ns;       /* CLOCK_MONOTONIC_COARSE; 0: none */
    int32_t last_errno;

    uint32_t nranges;
    struct pykvm_rl_range ranges[PYKVM_RL_MAX_RANGES];

    /* 16550 fast path, shared by every vCPU's loop of one machine; NULL: none */
    struct pykvm_rl_uart *uart;

    /* statistics, by exit reason slot; times in TSC ticks (rdtsc costs a
     * fraction of clock_gettime; Python converts with a measured rate) */
    int32_t last_reason;        /* slot of the exit being handled, -1: none */
    uint64_t last_exit_ticks;
    uint64_t exits[PYKVM_RL_NREASONS];
    uint64_t c_handled[PYKVM_RL_NREASONS];
    uint64_t run_ticks[PYKVM_RL_NREASONS];     /* inside KVM_RUN, by the reason it ended with */
    uint64_t handle_ticks[PYKVM_RL_NREASONS];  /* in userspace between that exit and the next entry */
};

/* The functions Python calls. pykvm/_build/runloop_cdef.py hands these lines to cffi as they
 * are, from here to #endif: keep them plain prototypes. */
int pykvm_runloop_run(struct pykvm_runloop *rl);
uint32_t pykvm_uart_drain(struct pykvm_rl_uart *u, uint8_t *out, uint32_t cap);
int pykvm_uart_publish(struct pykvm_rl_uart *u, int tx_ok, int lsr, int msr, int irq_mode, int iir_fifo, int ier,
                       int other_sources, int line_enable, int thre_pending);
uint32_t pykvm_uart_take(struct pykvm_rl_uart *u);
uint64_t pykvm_coarse_ns(void);
uint64_t pykvm_ticks(void);

#endif
