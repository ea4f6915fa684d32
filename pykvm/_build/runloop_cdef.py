"""cffi declarations for the C vCPU run loop (csrc/runloop.h, csrc/runloop.c).

Struct fields are declared by name with ``...;`` so the compiler supplies the
layout; the constants come from the header, and so do the function prototypes
(read from runloop.h, not copied).
"""
import os

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "csrc", "runloop.h")
_PROTOTYPES_START = "int pykvm_runloop_run("


def _prototypes() -> str:
    """runloop.h's prototypes: from the first one to ``#endif``."""
    with open(HEADER) as f:
        text = f.read()
    return text[text.index(_PROTOTYPES_START):text.rindex("#endif")]


CDEF = r"""
#define PYKVM_RL_MAX_RANGES ...
#define PYKVM_RL_NREASONS ...
#define PYKVM_RL_UART_RING ...
#define PYKVM_RL_UART_THRE ...
#define PYKVM_RL_UART_LEVEL ...
#define PYKVM_RL_EXIT ...
#define PYKVM_RL_INTERRUPTED ...
#define PYKVM_RL_STOPPED ...
#define PYKVM_RL_BUDGET ...
#define PYKVM_RL_DEADLINE ...
#define PYKVM_RL_UART_FLUSH ...
#define PYKVM_RL_ERROR ...
#define PYKVM_RL_SPACE_PIO ...
#define PYKVM_RL_SPACE_MMIO ...

struct pykvm_rl_range {
    uint64_t base; uint64_t length; uint64_t value; uint32_t space;
    uint64_t reads; uint64_t writes; ...;
};

struct pykvm_rl_uart {
    int32_t base; int32_t tx_ok; int32_t lsr; int32_t flush_on_newline;
    int32_t vm_fd; int32_t gsi; int32_t irq_mode; int32_t level; int32_t notify_fd;
    uint32_t head; uint32_t tail; uint64_t tx_bytes; ...;
};

struct pykvm_runloop {
    int vcpu_fd;
    struct kvm_run *run;
    uint64_t run_size;
    int32_t stop;
    uint64_t exits_left;
    uint64_t deadline_ns;
    int32_t last_errno;
    uint32_t nranges;
    struct pykvm_rl_range ranges[...];
    struct pykvm_rl_uart *uart;
    int32_t last_reason;
    uint64_t last_exit_ticks;
    uint64_t exits[...];
    uint64_t c_handled[...];
    uint64_t run_ticks[...];
    uint64_t handle_ticks[...];
    ...;
};

"""
CDEF += _prototypes()

SOURCE = '#include "runloop.h"'
C_FILES = ["runloop.c"]
