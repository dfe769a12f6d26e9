/* bootbench: run one VM boot recipe on /dev/kvm and time every phase.
 *
 * The text between the cdef markers is handed to cffi verbatim, so it holds only
 * plain declarations and integer #defines.
 */
#ifndef PYVMM_BOOTBENCH_H
#define PYVMM_BOOTBENCH_H
#include <stddef.h>
#include <stdint.h>

/* cdef-begin */
#define BB_MAX_STEPS 24
#define BB_MAX_EVENTS 16
#define BB_ERR_LEN 256
#define BB_MAX_IOEV 4094
#define BB_MAX_VCPUS 64
#define BB_MAX_MEMSLOT 16
#define BB_BATCH_MIN 256  /* eexist: ops per batch (the step's count, repeated) */

/* Step kinds. */
#define BB_OP_VM 1        /* open /dev/kvm, KVM_CREATE_VM */
#define BB_OP_MEM 2       /* RAM slot, guest image, page tables, BAR backing */
#define BB_OP_IOEV 3      /* ioev:N    N doorbell ioeventfds (eventfd + KVM_IOEVENTFD) */
#define BB_OP_EEXIST 4    /* eexist:N  N duplicate registrations rejected with EEXIST */
#define BB_OP_DEASSIGN 5  /* deassign:N  deassign the N most recent doorbells */
#define BB_OP_VCPU 6      /* vcpu:K    K vCPUs, long-mode registers */
#define BB_OP_RUN 7       /* run[:probe|rung|halt]  run vCPU 0 to that point */
#define BB_OP_MEMSLOT 8   /* memslot[:K]  K new slots at the BAR window */
#define BB_OP_TEARDOWN 9  /* close everything (always done; timed) */
#define BB_OP_GIC 10      /* gic       arm64: the VM's GICv3 for the vCPUs made so far */
#define BB_OP_LAST 10

/* Run targets (guest markers, see guests/protocol.inc). */
#define BB_TARGET_HALT 0
#define BB_TARGET_PROBE 2
#define BB_TARGET_RUNG 3

struct bb_step {
    int op;
    int count;
    int target;
};

struct bb_recipe {
    int nsteps;
    struct bb_step steps[BB_MAX_STEPS];
};

struct bb_options {
    int ioev_len;           /* KVM_IOEVENTFD len for doorbells: 0, 1, 2, 4 or 8 */
    int pin_cpu;            /* -1: leave placement to the scheduler */
    int timeout_ms;         /* per boot; 0: no timeout */
    const uint8_t *guest;   /* doorbell guest image, loaded at CODE_GPA */
    size_t guest_len;
};

struct bb_phase {
    int op;
    int count;
    int target;
    int end_marker;         /* run: the marker (or 0 for HLT) that ended the step */
    uint64_t wall_ns;       /* CLOCK_MONOTONIC */
    uint64_t cpu_ns;        /* CLOCK_THREAD_CPUTIME_ID */
    uint32_t sample_start;  /* per-operation samples of this step in the sample array */
    uint32_t nsamples;
    uint64_t batch_ns;      /* eexist: BB_BATCH_MIN or more ops between two clock reads */
    uint32_t batch_ops;     /* ops in that batch (0: no batch) */
};

struct bb_event {
    int marker;
    uint64_t t_ns;          /* since the start of the boot */
};

struct bb_result {
    int ok;                 /* 1 when the recipe ran to the end */
    int err_errno;
    int failed_step;        /* index of the step that failed, -1 if none */
    char err[BB_ERR_LEN];
    int nphases;            /* recipe steps, then the teardown phase */
    struct bb_phase phases[BB_MAX_STEPS + 1];
    uint64_t boot_wall_ns;  /* sum over recipe steps (teardown excluded) */
    uint64_t boot_cpu_ns;
    int nevents;
    struct bb_event events[BB_MAX_EVENTS];
    uint64_t doorbells_expected;   /* doorbells the guest was asked to ring with an ioeventfd */
    uint64_t doorbells_completed;  /* sum of eventfd counters at teardown */
    uint64_t doorbell_mmio_exits;  /* doorbell writes that reached userspace */
    uint64_t other_mmio_exits;
    uint64_t io_exits;
    uint64_t exits;
    uint32_t bar_value;     /* what the guest read at BAR_GPA */
    int halted;
    int cpu_start;          /* sched_getcpu() at start and end */
    int cpu_end;
    int pinned_cpu;
    uint32_t nsamples;
    uint32_t samples_dropped;
    uint64_t rip;           /* guest RIP when a run step failed */
};

struct bb_sample {
    uint64_t wall_ns;       /* one ioctl, CLOCK_MONOTONIC */
};

int bb_parse_recipe(const char *text, struct bb_recipe *out, char *err, size_t errlen);
int bb_format_recipe(const struct bb_recipe *r, char *buf, size_t len);
const char *bb_op_name(int op);
int bb_run(const struct bb_recipe *recipe, const struct bb_options *opt,
           struct bb_result *res, struct bb_sample *samples, uint32_t cap);
void bb_clock_cost(int iters, double *wall_read_ns, double *cpu_read_ns);
/* cdef-end */

/* One line of a plan file ('LABEL RECIPE'), split in place: 0 with *label and *text
 * set, 1 for a blank or comment line, -1 with a one-line message in err. */
int bb_parse_plan_line(char *line, char **label, char **text, char *err, size_t errlen);
/* Longest plan line the helper reads, newline excluded. */
#define BB_PLAN_LINE_MAX 1022

#endif
