/* The vCPU run loop's C hot path (see runloop.h). */
#include "runloop.h"

#include <errno.h>
#include <sched.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

/* The deadline check runs after every exit: the coarse clock (a few ns, tick
 * resolution) is enough, and Python's timer kicks a guest that never exits. */
uint64_t pykvm_coarse_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t pykvm_ticks(void)
{
    return __rdtsc();
}

static inline uint64_t since(uint64_t t0, uint64_t t1)
{
    return t1 > t0 ? t1 - t0 : 0; /* guard against a TSC that steps back across CPUs */
}

static struct pykvm_rl_range *find_range(struct pykvm_runloop *rl, uint32_t space,
                                         uint64_t addr, uint32_t size)
{
    uint32_t n = rl->nranges < PYKVM_RL_MAX_RANGES ? rl->nranges : PYKVM_RL_MAX_RANGES;
    for (uint32_t i = 0; i < n; i++) {
        struct pykvm_rl_range *r = &rl->ranges[i];
        if (r->space == space && addr >= r->base && addr - r->base < r->length
            && size <= r->length - (addr - r->base))
            return r;
    }
    return NULL;
}

static void fill(uint8_t *dst, uint64_t value, uint32_t size, uint32_t count)
{
    for (uint32_t i = 0; i < count; i++)
        memcpy(dst + (size_t)i * size, &value, size); /* x86: little-endian */
}

/* The holder may be a thread the host preempted (more vCPU threads than CPUs), or one in
 * KVM_IRQ_LINE (uart_line): spin politely on a plain load with pause, and give the CPU
 * away after a while instead of burning it until the holder runs again. */
#define UART_LOCK_SPINS 1000

static void uart_lock(struct pykvm_rl_uart *u)
{
    unsigned spins = 0;
    while (__atomic_exchange_n(&u->lock, 1, __ATOMIC_ACQUIRE)) {
        while (__atomic_load_n(&u->lock, __ATOMIC_RELAXED)) {
            _mm_pause();
            if (++spins >= UART_LOCK_SPINS) {
                sched_yield();
                spins = 0;
            }
        }
    }
}

static void uart_unlock(struct pykvm_rl_uart *u)
{
    __atomic_store_n(&u->lock, 0, __ATOMIC_RELEASE);
}

#define IER_THRI 0x02

/* Under the lock: whether an interrupt other than THRE is pending (its source holds and IER enables it). */
static int uart_other_pending(const struct pykvm_rl_uart *u)
{
    return (u->ier & u->other_sources) != 0;
}

/* Under the lock: set the interrupt line to what the UART's state says, as the
 * model's _update_irq does (pending interrupt, gated by OUT2). Returns 0 or an errno. */
static int uart_line(struct pykvm_rl_uart *u)
{
    int level = u->line_enable && (uart_other_pending(u) || ((u->ier & IER_THRI) && u->thre_pending));
    if (level == u->level)
        return 0;
    u->level = level;
    if (u->vm_fd < 0)
        return 0;
    struct kvm_irq_level l = {.irq = (uint32_t)u->gsi, .level = (uint32_t)level};
    return ioctl(u->vm_fd, KVM_IRQ_LINE, &l) < 0 ? errno : 0;
}

/* Under the lock: append `count` bytes unless the ring lacks room; returns 0
 * (full), 1, or 2 (appended, and Python should drain now: a newline or the ring half full). */
static int uart_append(struct pykvm_rl_uart *u, const uint8_t *data, uint32_t count)
{
    uint32_t head = u->head;
    uint32_t tail = __atomic_load_n(&u->tail, __ATOMIC_ACQUIRE);
    if (PYKVM_RL_UART_RING - (head - tail) < count)
        return 0;
    int newline = 0;
    for (uint32_t i = 0; i < count; i++) {
        u->ring[(head + i) & (PYKVM_RL_UART_RING - 1)] = data[i];
        newline |= data[i] == '\n';
    }
    __atomic_store_n(&u->head, head + count, __ATOMIC_RELEASE);
    u->tx_bytes += count;
    int flush = (newline && u->flush_on_newline) || head + count - tail >= PYKVM_RL_UART_RING / 2;
    if (!flush && head == tail && u->notify_fd >= 0) {
        uint64_t one = 1; /* the ring was empty: wake the drain thread (non-blocking eventfd) */
        if (write(u->notify_fd, &one, sizeof one) < 0) {
            /* EAGAIN cannot happen below 2^64-1 pending wakes; nothing to do otherwise */
        }
    }
    return flush ? 2 : 1;
}

/* A THR write: pure output, or (interrupt mode) output that latches THRE. */
static int uart_thr(struct pykvm_rl_uart *u, const uint8_t *data, uint32_t count)
{
    int ret = 0;
    uart_lock(u);
    if (u->tx_ok || u->irq_mode) {
        ret = uart_append(u, data, count); /* full: Python drains, then the model transmits it */
        if (ret && u->irq_mode) {
            u->thre_pending = 1; /* THR is empty again at once: THRE interrupts */
            uart_line(u);
        }
    }
    uart_unlock(u);
    return ret;
}

/* An IIR read with only THRE as a possible source: report it and acknowledge
 * it (reading IIR clears THRE), or report none. */
static int uart_iir(struct pykvm_rl_uart *u, uint8_t *data)
{
    int ret = 0;
    uart_lock(u);
    if (u->irq_mode && !uart_other_pending(u)) {
        int thre = (u->ier & IER_THRI) && u->thre_pending;
        *data = (uint8_t)((thre ? 0x02 : 0x01) | u->iir_fifo);
        if (thre) {
            u->thre_pending = 0;
            uart_line(u);
        }
        ret = 1;
    }
    uart_unlock(u);
    return ret;
}

/* IER writes (DLAB=0, interrupt mode): the 16550 keeps bits 0-3, and enabling
 * THRI while THR is empty (always: transmission is instantaneous) latches a
 * THRE interrupt at once. Linux's 8250 driver toggles THRI on every start_tx
 * and stop_tx of interrupt-driven output. */
static int uart_ier(struct pykvm_rl_uart *u, const uint8_t *data, uint32_t count)
{
    int ret = 0;
    uart_lock(u);
    if (u->irq_mode) {
        for (uint32_t i = 0; i < count; i++) {
            int ier = data[i] & 0x0F;
            if ((ier & IER_THRI) && !(u->ier & IER_THRI))
                u->thre_pending = 1;
            u->ier = ier;
        }
        uart_line(u);
        ret = 1;
    }
    uart_unlock(u);
    return ret;
}

/* 0: not handled; 1: handled; 2: handled, ask Python to drain the UART ring. */
static int uart_pio(struct pykvm_rl_uart *u, struct kvm_run *run, uint8_t *data)
{
    uint32_t port = run->io.port, count = run->io.count;
    if (!u || run->io.size != 1 || port < (uint32_t)u->base || port - (uint32_t)u->base > 6)
        return 0;
    uint32_t reg = port - (uint32_t)u->base;
    if (run->io.direction == KVM_EXIT_IO_OUT)
        return reg == 0 ? uart_thr(u, data, count) : reg == 1 ? uart_ier(u, data, count) : 0;
    if (reg == 5 || reg == 6) { /* LSR, MSR (the 8250 driver reads MSR in every interrupt) */
        int32_t v = __atomic_load_n(reg == 5 ? &u->lsr : &u->msr, __ATOMIC_ACQUIRE);
        if (v < 0)
            return 0;
        memset(data, v, count);
        return 1;
    }
    if (reg == 2 && count == 1)
        return uart_iir(u, data);
    if (reg == 1) {
        int ret = 0;
        uart_lock(u);
        if (u->irq_mode) { /* DLAB=0: IER itself */
            memset(data, u->ier, count);
            ret = 1;
        }
        uart_unlock(u);
        return ret;
    }
    return 0;
}

static int handle_io(struct pykvm_runloop *rl, struct kvm_run *run)
{
    uint32_t size = run->io.size, count = run->io.count;
    uint64_t off = run->io.data_offset;
    if (size == 0 || size > 8 || count == 0 || off + (uint64_t)size * count > rl->run_size)
        return 0; /* odd: let Python's decoder judge it */
    uint8_t *data = (uint8_t *)run + off;
    int u = uart_pio(rl->uart, run, data);
    if (u)
        return u;
    struct pykvm_rl_range *r = find_range(rl, PYKVM_RL_SPACE_PIO, run->io.port, size);
    if (!r)
        return 0;
    if (run->io.direction == KVM_EXIT_IO_OUT) {
        r->writes += count;
    } else {
        r->reads += count;
        fill(data, r->value, size, count);
    }
    return 1;
}

static int handle_mmio(struct pykvm_runloop *rl, struct kvm_run *run)
{
    uint32_t len = run->mmio.len;
    if (len == 0 || len > 8)
        return 0;
    struct pykvm_rl_range *r = find_range(rl, PYKVM_RL_SPACE_MMIO, run->mmio.phys_addr, len);
    if (!r)
        return 0;
    if (run->mmio.is_write) {
        r->writes++;
    } else {
        r->reads++;
        fill(run->mmio.data, r->value, len, 1);
    }
    return 1;
}

int pykvm_runloop_run(struct pykvm_runloop *rl)
{
    struct kvm_run *run = rl->run;
    for (;;) {
        if (__atomic_load_n(&rl->stop, __ATOMIC_ACQUIRE))
            return PYKVM_RL_STOPPED;
        uint64_t t0 = __rdtsc();
        if (rl->last_reason >= 0)
            rl->handle_ticks[rl->last_reason] += since(rl->last_exit_ticks, t0);
        int ret = ioctl(rl->vcpu_fd, KVM_RUN, 0);
        int err = errno;
        uint64_t t1 = __rdtsc();
        if (ret < 0 && err == EAGAIN)
            continue;  /* an AP left wait-for-SIPI: KVM asks to be entered again */
        uint32_t reason = ret < 0 ? (err == EINTR ? KVM_EXIT_INTR : UINT32_MAX) : run->exit_reason;
        if (reason == UINT32_MAX) {
            rl->last_errno = err;
            rl->last_reason = -1;
            return PYKVM_RL_ERROR;
        }
        uint32_t slot = reason < PYKVM_RL_NREASONS ? reason : PYKVM_RL_NREASONS - 1;
        rl->exits[slot]++;
        rl->run_ticks[slot] += since(t0, t1);
        rl->last_reason = (int32_t)slot;
        rl->last_exit_ticks = t1;
        if (rl->exits_left != UINT64_MAX && rl->exits_left > 0)
            rl->exits_left--;
        if (ret < 0)
            return PYKVM_RL_INTERRUPTED;

        int handled = 0;
        if (reason == KVM_EXIT_IO)
            handled = handle_io(rl, run);
        else if (reason == KVM_EXIT_MMIO)
            handled = handle_mmio(rl, run);
        if (!handled)
            return PYKVM_RL_EXIT;
        rl->c_handled[slot]++;
        if (handled == 2)
            return PYKVM_RL_UART_FLUSH;
        if (rl->exits_left == 0)
            return PYKVM_RL_BUDGET;
        if (rl->deadline_ns && pykvm_coarse_ns() >= rl->deadline_ns)
            return PYKVM_RL_DEADLINE;
    }
}

/* Copy up to `cap` transmitted bytes out of the ring (one consumer at a
 * time: Python serializes drains with a lock). Returns how many were copied. */
uint32_t pykvm_uart_drain(struct pykvm_rl_uart *u, uint8_t *out, uint32_t cap)
{
    uint32_t tail = u->tail;
    uint32_t head = __atomic_load_n(&u->head, __ATOMIC_ACQUIRE);
    uint32_t n = head - tail;
    if (n > cap)
        n = cap;
    for (uint32_t i = 0; i < n; i++)
        out[i] = u->ring[(tail + i) & (PYKVM_RL_UART_RING - 1)];
    __atomic_store_n(&u->tail, tail + n, __ATOMIC_RELEASE);
    return n;
}

/* The model's new state, all at once under the lock so C never acts on half
 * of it; ier or thre_pending < 0 keeps C's (the model did not change it, and
 * C may have since, for another vCPU). Drives the line and returns its level,
 * or -errno if KVM_IRQ_LINE failed. */
int pykvm_uart_publish(struct pykvm_rl_uart *u, int tx_ok, int lsr, int msr, int irq_mode, int iir_fifo, int ier,
                       int other_sources, int line_enable, int thre_pending)
{
    uart_lock(u);
    u->tx_ok = tx_ok;
    u->lsr = lsr;
    u->msr = msr;
    u->irq_mode = irq_mode;
    u->iir_fifo = iir_fifo;
    if (ier >= 0)
        u->ier = ier & 0x0F;
    u->other_sources = other_sources;
    u->line_enable = line_enable;
    if (thre_pending >= 0)
        u->thre_pending = thre_pending;
    int err = uart_line(u);
    int level = u->level;
    uart_unlock(u);
    return err ? -err : level;
}

/* What C owns in interrupt mode, read at one instant for the model to take
 * over: IER (bits 0-3), PYKVM_RL_UART_THRE and PYKVM_RL_UART_LEVEL. */
uint32_t pykvm_uart_take(struct pykvm_rl_uart *u)
{
    uart_lock(u);
    uint32_t state = (uint32_t)u->ier | (u->thre_pending ? PYKVM_RL_UART_THRE : 0)
                     | (u->level ? PYKVM_RL_UART_LEVEL : 0);
    uart_unlock(u);
    return state;
}
