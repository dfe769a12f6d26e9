/* bootbench: run one boot recipe against /dev/kvm and time each phase.
 *
 * Every phase is timed with CLOCK_MONOTONIC (wall) and CLOCK_THREAD_CPUTIME_ID
 * (CPU of this thread). Wall minus CPU is time spent blocked; for KVM's memslot and
 * io-bus ioctls that is, in practice, waiting for an SRCU grace period.
 *
 * Used in-process from Python (cffi, pyvmm._native) and by the standalone
 * pyvmm-bootbench executable (main.c). Nothing here exits the process.
 */
#define _GNU_SOURCE
#include "bootbench.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "protocol.inc"

#define KICK_SIGNAL SIGUSR2

static const char *const op_names[] = {
    [BB_OP_VM] = "vm",           [BB_OP_MEM] = "mem",         [BB_OP_IOEV] = "ioev",
    [BB_OP_EEXIST] = "eexist",   [BB_OP_DEASSIGN] = "deassign", [BB_OP_VCPU] = "vcpu",
    [BB_OP_RUN] = "run",         [BB_OP_MEMSLOT] = "memslot", [BB_OP_TEARDOWN] = "teardown",
    [BB_OP_GIC] = "gic",
};

const char *bb_op_name(int op)
{
    if (op <= 0 || op > BB_OP_LAST)
        return "?";
    return op_names[op];
}

static uint64_t now_ns(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t wall_ns(void) { return now_ns(CLOCK_MONOTONIC); }
static uint64_t cpu_ns(void) { return now_ns(CLOCK_THREAD_CPUTIME_ID); }

void bb_clock_cost(int iters, double *wall_read_ns, double *cpu_read_ns)
{
    if (iters <= 0)
        iters = 100000;
    volatile uint64_t sink = 0;
    uint64_t t0 = wall_ns();
    for (int i = 0; i < iters; i++)
        sink += wall_ns();
    uint64_t t1 = wall_ns();
    for (int i = 0; i < iters; i++)
        sink += cpu_ns();
    uint64_t t2 = wall_ns();
    (void)sink;
    *wall_read_ns = (double)(t1 - t0) / iters;
    *cpu_read_ns = (double)(t2 - t1) / iters;
}

/* ---- recipe parsing ------------------------------------------------------------ */

/* Write an error message; the user's own text may appear in it, so control bytes are
 * shown as '?' to keep every message on one printable line. */
static int perr(char *err, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (err && len) {
        vsnprintf(err, len, fmt, ap);
        for (char *c = err; *c; c++)
            if ((unsigned char)*c < 0x20 || *c == 0x7f)
                *c = '?';
    }
    va_end(ap);
    return -1;
}

int bb_parse_plan_line(char *line, char **label, char **text, char *err, size_t errlen)
{
    line[strcspn(line, "\r\n")] = 0;
    char *l = line + strspn(line, " \t");
    if (!*l || *l == '#')
        return 1;
    char *sep = l + strcspn(l, " \t");
    if (!*sep)
        return perr(err, errlen, "a label but no recipe: '%.64s'", l);
    *sep++ = 0;
    *label = l;
    *text = sep + strspn(sep, " \t");
    return 0;
}

static int lookup_op(const char *name, size_t n)
{
    for (int op = BB_OP_VM; op <= BB_OP_LAST; op++)
        if (strlen(op_names[op]) == n && strncmp(op_names[op], name, n) == 0)
            return op;
    return 0;
}

/* Grammar: step[,step...]; step = name[:arg]. Spaces around steps are allowed.
 * Order rules: vm first; mem after vm; vcpu after mem; run after vcpu; gic (arm64) once,
 * after vcpu and before the first run; at most one teardown, last. Counts are bounded
 * so a typo cannot exhaust the host. The grammar is the same on every architecture (the
 * host checks the lab's recipes); an arm64-only step fails when an x86 boot runs it. */
int bb_parse_recipe(const char *text, struct bb_recipe *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof(*out));
    if (!text || !*text)
        return perr(err, errlen, "empty recipe: give steps like 'vm,mem,ioev:10,vcpu:1,run'");
    int have_vm = 0, have_mem = 0, have_vcpu = 0, registered = 0, teardown = 0;
    int have_gic = 0, have_run = 0;
    const char *p = text;
    int idx = 0;
    while (*p) {
        while (*p == ' ')
            p++;
        const char *start = p;
        while (*p && *p != ',')
            p++;
        const char *end = p;
        while (end > start && end[-1] == ' ')
            end--;
        if (*p == ',')
            p++;
        idx++;
        if (end == start)
            return perr(err, errlen, "step %d is empty (two commas in a row?)", idx);
        const char *colon = memchr(start, ':', (size_t)(end - start));
        size_t nlen = colon ? (size_t)(colon - start) : (size_t)(end - start);
        int op = lookup_op(start, nlen);
        if (!op)
            return perr(err, errlen,
                        "step %d '%.*s': unknown step; known steps: vm, mem, ioev:N, eexist:N, "
                        "deassign:N, vcpu:K, gic, run[:probe|rung|halt], memslot[:K], "
                        "teardown",
                        idx, (int)(end - start), start);
        if (teardown)
            return perr(err, errlen, "step %d '%s': teardown must be the last step", idx,
                        bb_op_name(op));
        if (out->nsteps >= BB_MAX_STEPS - 1)
            return perr(err, errlen, "too many steps (at most %d)", BB_MAX_STEPS - 1);
        struct bb_step st = {.op = op, .count = 1, .target = BB_TARGET_HALT};
        if (colon) {
            const char *arg = colon + 1;
            size_t alen = (size_t)(end - arg);
            if (op == BB_OP_RUN) {
                if (alen == 5 && !strncmp(arg, "probe", 5))
                    st.target = BB_TARGET_PROBE;
                else if (alen == 4 && !strncmp(arg, "rung", 4))
                    st.target = BB_TARGET_RUNG;
                else if (alen == 4 && !strncmp(arg, "halt", 4))
                    st.target = BB_TARGET_HALT;
                else
                    return perr(err, errlen,
                                "step %d: run target '%.*s' is unknown: use probe, rung or halt",
                                idx, (int)alen, arg);
            } else if (op == BB_OP_VM || op == BB_OP_MEM || op == BB_OP_TEARDOWN ||
                       op == BB_OP_GIC) {
                return perr(err, errlen, "step %d: '%s' takes no argument", idx, bb_op_name(op));
            } else {
                if (alen == 0 || alen > 9)
                    return perr(err, errlen, "step %d '%s': count '%.*s' is not a number", idx,
                                bb_op_name(op), (int)alen, arg);
                long v = 0;
                for (size_t i = 0; i < alen; i++) {
                    if (arg[i] < '0' || arg[i] > '9')
                        return perr(err, errlen, "step %d '%s': count '%.*s' is not a number",
                                    idx, bb_op_name(op), (int)alen, arg);
                    v = v * 10 + (arg[i] - '0');
                }
                st.count = (int)v;
            }
        } else if (op == BB_OP_IOEV || op == BB_OP_EEXIST || op == BB_OP_DEASSIGN) {
            return perr(err, errlen, "step %d '%s' needs a count, e.g. '%s:10'", idx,
                        bb_op_name(op), bb_op_name(op));
        }
        switch (op) {
        case BB_OP_VM:
            if (have_vm || idx != 1)
                return perr(err, errlen, "step %d: 'vm' must be the first step, once", idx);
            have_vm = 1;
            break;
        case BB_OP_MEM:
            if (have_mem)
                return perr(err, errlen, "step %d: 'mem' appears twice", idx);
            have_mem = 1;
            break;
        case BB_OP_VCPU:
            if (!have_mem)
                return perr(err, errlen, "step %d: 'vcpu' needs 'mem' before it", idx);
            if (have_vcpu)
                return perr(err, errlen, "step %d: 'vcpu' appears twice", idx);
            if (st.count < 1 || st.count > BB_MAX_VCPUS)
                return perr(err, errlen, "step %d: vcpu count %d out of range 1..%d", idx,
                            st.count, BB_MAX_VCPUS);
            have_vcpu = 1;
            break;
        case BB_OP_IOEV:
            if (!have_mem)
                return perr(err, errlen, "step %d: 'ioev' needs 'mem' before it", idx);
            registered += st.count;
            if (registered > BB_MAX_IOEV)
                return perr(err, errlen,
                            "step %d: %d ioeventfds in all, more than the %d doorbells the "
                            "parameter block holds", idx, registered, BB_MAX_IOEV);
            break;
        case BB_OP_EEXIST:
            if (registered < 1)
                return perr(err, errlen,
                            "step %d: 'eexist' duplicates doorbell 0, so it needs an earlier "
                            "'ioev:N' with N >= 1", idx);
            if (st.count > 1000000)
                return perr(err, errlen, "step %d: eexist count %d is too large", idx, st.count);
            break;
        case BB_OP_DEASSIGN:
            if (st.count > registered)
                return perr(err, errlen,
                            "step %d: cannot deassign %d doorbells, only %d are assigned by then",
                            idx, st.count, registered);
            registered -= st.count;
            break;
        case BB_OP_RUN:
            if (!have_vcpu)
                return perr(err, errlen, "step %d: 'run' needs 'vcpu:K' before it", idx);
            have_run = 1;
            break;
        case BB_OP_GIC:
            if (!have_vcpu)
                return perr(err, errlen,
                            "step %d: 'gic' needs 'vcpu:K' before it (it makes a redistributor "
                            "for each vCPU made so far)", idx);
            if (have_gic)
                return perr(err, errlen, "step %d: 'gic' appears twice", idx);
            if (have_run)
                return perr(err, errlen,
                            "step %d: 'gic' must come before the first 'run' (KVM refuses a "
                            "GIC once a vCPU has run)", idx);
            have_gic = 1;
            break;
        case BB_OP_MEMSLOT:
            if (!have_mem)
                return perr(err, errlen, "step %d: 'memslot' needs 'mem' before it", idx);
            if (st.count < 1 || st.count > BB_MAX_MEMSLOT)
                return perr(err, errlen, "step %d: memslot count %d out of range 1..%d", idx,
                            st.count, BB_MAX_MEMSLOT);
            break;
        case BB_OP_TEARDOWN:
            teardown = 1;
            continue; /* implicit; not stored as a recipe step */
        }
        if (idx == 1 && op != BB_OP_VM)
            return perr(err, errlen, "step 1 must be 'vm' (got '%s')", bb_op_name(op));
        out->steps[out->nsteps++] = st;
    }
    if (!have_vm)
        return perr(err, errlen, "recipe has no 'vm' step");
    return 0;
}

int bb_format_recipe(const struct bb_recipe *r, char *buf, size_t len)
{
    size_t used = 0;
    buf[0] = 0;
    for (int i = 0; i < r->nsteps; i++) {
        const struct bb_step *s = &r->steps[i];
        char one[48];
        if (s->op == BB_OP_RUN)
            snprintf(one, sizeof(one), "run:%s",
                     s->target == BB_TARGET_PROBE ? "probe"
                     : s->target == BB_TARGET_RUNG ? "rung" : "halt");
        else if (s->op == BB_OP_VM || s->op == BB_OP_MEM || s->op == BB_OP_GIC)
            snprintf(one, sizeof(one), "%s", bb_op_name(s->op));
        else
            snprintf(one, sizeof(one), "%s:%d", bb_op_name(s->op), s->count);
        int n = snprintf(buf + used, len - used, "%s%s", i ? "," : "", one);
        if (n < 0 || (size_t)n >= len - used)
            return -1;
        used += (size_t)n;
    }
    return (int)used;
}

/* ---- the boot ----------------------------------------------------------------- */

struct vcpu {
    int fd;
    struct kvm_run *run;
};

struct doorbell {
    int efd;
    uint64_t addr;
};

struct boot {
    const struct bb_options *opt;
    struct bb_result *res;
    struct bb_sample *samples;
    uint32_t cap;
    int kvm, vm;
    int mmap_size;
    uint8_t *ram;
    uint8_t *bar;
    size_t bar_len;
    int nbar_slots;
    struct vcpu vcpus[BB_MAX_VCPUS];
    int nvcpus;
    struct doorbell *bells;
    int nbells;       /* currently assigned */
    int next_bell;    /* next doorbell index to use (addresses are never reused) */
    uint64_t t0;
    uint64_t deadline;
    timer_t timer;
    int have_timer;
    int gic;          /* arm64: the VGICv3 device fd, -1 before the vcpu step makes it */
};

static int fail(struct boot *b, int err, const char *fmt, ...)
{
    struct bb_result *r = b->res;
    if (r->err[0] == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->err, sizeof(r->err), fmt, ap);
        va_end(ap);
        r->err_errno = err;
    }
    return -1;
}

static void sample(struct boot *b, uint64_t ns)
{
    if (b->res->nsamples < b->cap)
        b->samples[b->res->nsamples++].wall_ns = ns;
    else
        b->res->samples_dropped++;
}

static void write_params(struct boot *b)
{
    uint8_t *p = b->ram + PARAM_GPA;
    uint64_t magic = PARAM_MAGIC, count = (uint64_t)b->nbells;
    for (int i = 0; i < b->nbells; i++)
        memcpy(p + PARAM_ADDRS_OFF + 8 * i, &b->bells[i].addr, 8);
    memcpy(p + PARAM_COUNT_OFF, &count, 8);
    memcpy(p + PARAM_MAGIC_OFF, &magic, 8);
}

static int step_vm(struct boot *b)
{
    b->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (b->kvm < 0)
        return fail(b, errno,
                    errno == EACCES ? "/dev/kvm: permission denied: run as root or join the "
                                      "'kvm' group"
                                    : "cannot open /dev/kvm: %s", strerror(errno));
    b->mmap_size = ioctl(b->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (b->mmap_size <= 0)
        return fail(b, errno, "KVM_GET_VCPU_MMAP_SIZE failed: %s", strerror(errno));
    b->vm = ioctl(b->kvm, KVM_CREATE_VM, 0);
    if (b->vm < 0)
        return fail(b, errno, "KVM_CREATE_VM failed: %s", strerror(errno));
    return 0;
}

#if !defined(__aarch64__)
static void build_page_tables(uint8_t *ram)
{
    uint64_t *pml4 = (uint64_t *)(ram + PML4_GPA);
    uint64_t *pdpt = (uint64_t *)(ram + PDPT_GPA);
    uint64_t *pd = (uint64_t *)(ram + PD_GPA);
    pml4[0] = PDPT_GPA | 0x3;
    for (int i = 0; i < 4; i++)
        pdpt[i] = (uint64_t)(PD_GPA + 0x1000 * i) | 0x3;
    for (uint64_t i = 0; i < 2048; i++)
        pd[i] = (i << 21) | 0x83; /* present, writable, 2 MiB page */
    uint64_t *gdt = (uint64_t *)(ram + GDT_GPA);
    gdt[0] = 0;
    gdt[1] = GDT_CODE64;   /* protocol.inc: flat 64-bit code */
    gdt[2] = GDT_DATA;     /* flat data */
}
#endif

static int step_mem(struct boot *b)
{
    const struct bb_options *o = b->opt;
    if (!o->guest || o->guest_len == 0 || o->guest_len > RAM_SIZE - CODE_GPA - 0x10000)
        return fail(b, EINVAL, "no guest image, or one larger than the RAM set aside for it");
    b->ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (b->ram == MAP_FAILED) {
        b->ram = NULL;
        return fail(b, errno, "mmap of guest RAM failed: %s", strerror(errno));
    }
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)b->ram,
    };
    if (ioctl(b->vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        return fail(b, errno, "KVM_SET_USER_MEMORY_REGION (RAM) failed: %s", strerror(errno));
    memcpy(b->ram + CODE_GPA, o->guest, o->guest_len);
#if !defined(__aarch64__)
    build_page_tables(b->ram);     /* arm64 runs with the MMU off: nothing to map */
#endif
    write_params(b);
    /* Backing for the BAR window, prepared here so the 'memslot' step times the ioctl. */
    b->bar_len = (size_t)BAR_SIZE * BB_MAX_MEMSLOT;
    b->bar = mmap(NULL, b->bar_len, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (b->bar == MAP_FAILED) {
        b->bar = NULL;
        return fail(b, errno, "mmap of BAR backing failed: %s", strerror(errno));
    }
    uint32_t pattern = BAR_PATTERN;
    memcpy(b->bar, &pattern, 4);
    return 0;
}

static int step_ioev(struct boot *b, int n)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
        (rlim_t)(b->nbells + n + 64) > rl.rlim_cur)
        return fail(b, EMFILE,
                    "%d ioeventfds need %d file descriptors but RLIMIT_NOFILE is %llu: raise it "
                    "with 'ulimit -n %d'", n, b->nbells + n + 64,
                    (unsigned long long)rl.rlim_cur, b->nbells + n + 128);
    int ioev_len = b->opt->ioev_len;
    for (int i = 0; i < n; i++) {
        int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (efd < 0)
            return fail(b, errno, "eventfd() failed after %d ioeventfds: %s", b->nbells,
                        strerror(errno));
        uint64_t addr = DOORBELL_BASE + (uint64_t)DOORBELL_STRIDE * (uint64_t)b->next_bell;
        struct kvm_ioeventfd io = {.addr = addr, .len = (uint32_t)ioev_len, .fd = efd};
        uint64_t t = wall_ns();
        int rc = ioctl(b->vm, KVM_IOEVENTFD, &io);
        sample(b, wall_ns() - t);
        if (rc < 0) {
            int e = errno;
            close(efd);
            return fail(b, e, "KVM_IOEVENTFD assign %#llx len %d failed: %s",
                        (unsigned long long)addr, ioev_len, strerror(e));
        }
        b->bells[b->nbells].efd = efd;
        b->bells[b->nbells].addr = addr;
        b->nbells++;
        b->next_bell++;
    }
    write_params(b);
    return 0;
}

/* Duplicate registrations, refused with EEXIST: the cheapest op a boot times. First a
 * batch of at least BB_BATCH_MIN of them between two clock reads (its cost per op carries
 * 2/K clock reads), then n with a clock read around each for the distribution. */
static int eexist_once(struct boot *b, const struct kvm_ioeventfd *io)
{
    if (ioctl(b->vm, KVM_IOEVENTFD, io) == 0)
        return fail(b, 0, "a duplicate KVM_IOEVENTFD was accepted; expected EEXIST");
    if (errno != EEXIST)
        return fail(b, errno, "duplicate KVM_IOEVENTFD failed with %s, expected EEXIST",
                    strerror(errno));
    return 0;
}

static int step_eexist(struct boot *b, int n, struct bb_phase *ph)
{
    if (b->nbells < 1)
        return fail(b, EINVAL, "eexist needs an assigned doorbell");
    struct kvm_ioeventfd io = {.addr = b->bells[0].addr, .len = (uint32_t)b->opt->ioev_len,
                               .fd = b->bells[0].efd};
    if (n > 0) {
        uint32_t k = (uint32_t)n;
        while (k < BB_BATCH_MIN)
            k += (uint32_t)n;
        uint64_t t0 = wall_ns();
        for (uint32_t i = 0; i < k; i++)
            if (eexist_once(b, &io))
                return -1;
        ph->batch_ns = wall_ns() - t0;
        ph->batch_ops = k;
    }
    for (int i = 0; i < n; i++) {
        uint64_t t = wall_ns();
        int rc = ioctl(b->vm, KVM_IOEVENTFD, &io);
        int e = errno;
        sample(b, wall_ns() - t);
        if (rc == 0)
            return fail(b, 0, "a duplicate KVM_IOEVENTFD was accepted; expected EEXIST");
        if (e != EEXIST)
            return fail(b, e, "duplicate KVM_IOEVENTFD failed with %s, expected EEXIST",
                        strerror(e));
    }
    return 0;
}

static uint64_t drain(int efd)
{
    uint64_t v = 0;
    if (read(efd, &v, sizeof(v)) != sizeof(v))
        return 0;
    return v;
}

static int step_deassign(struct boot *b, int n)
{
    for (int i = 0; i < n; i++) {
        struct doorbell *d = &b->bells[b->nbells - 1];
        struct kvm_ioeventfd io = {.addr = d->addr, .len = (uint32_t)b->opt->ioev_len,
                                   .fd = d->efd, .flags = KVM_IOEVENTFD_FLAG_DEASSIGN};
        uint64_t t = wall_ns();
        int rc = ioctl(b->vm, KVM_IOEVENTFD, &io);
        sample(b, wall_ns() - t);
        if (rc < 0)
            return fail(b, errno, "KVM_IOEVENTFD deassign %#llx failed: %s",
                        (unsigned long long)d->addr, strerror(errno));
        b->res->doorbells_completed += drain(d->efd);
        close(d->efd);
        b->nbells--;
    }
    write_params(b);
    return 0;
}

/* KVM_CREATE_VCPU and its kvm_run mapping; with `timed`, a sample of the ioctl. */
static struct vcpu *new_vcpu(struct boot *b, int timed)
{
    struct vcpu *v = &b->vcpus[b->nvcpus];
    uint64_t t = wall_ns();
    v->fd = ioctl(b->vm, KVM_CREATE_VCPU, b->nvcpus);
    int e = errno;
    if (timed)
        sample(b, wall_ns() - t);
    if (v->fd < 0) {
        fail(b, e, "KVM_CREATE_VCPU %d failed: %s", b->nvcpus, strerror(e));
        return NULL;
    }
    v->run = mmap(NULL, (size_t)b->mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
    if (v->run == MAP_FAILED) {
        v->run = NULL;
        close(v->fd);
        fail(b, errno, "mmap of kvm_run failed: %s", strerror(errno));
        return NULL;
    }
    b->nvcpus++;
    return v;
}

#if defined(__aarch64__)
/* arm64: every vCPU is initialised for the target KVM prefers (asked once per process),
 * with PSCI 0.2 so that the guest can power off; vCPUs other than 0 start powered off.
 * One sample per KVM_CREATE_VCPU.
 *
 * The gic step makes the VM's GICv3 after the vCPUs, the way QEMU and Firecracker order
 * it: the device, its distributor and its redistributor region (which puts one
 * redistributor per vCPU on the KVM MMIO bus: K kvm_io_bus_register_dev calls, each
 * waiting for a grace period before Linux 6.18), then its initialisation. Samples: the
 * distributor address, the redistributor address (the K registrations), the
 * initialisation. (The distributor itself goes on the bus at the first KVM_RUN.) */
static struct kvm_vcpu_init preferred;
static int have_preferred;

#define ARM64_CORE_REG(x) (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | \
                           (offsetof(struct kvm_regs, x) / sizeof(uint32_t)))

static int set_one_reg(struct boot *b, int fd, uint64_t id, uint64_t value, const char *what)
{
    struct kvm_one_reg reg = {.id = id, .addr = (uint64_t)(uintptr_t)&value};
    if (ioctl(fd, KVM_SET_ONE_REG, &reg) < 0)
        return fail(b, errno, "KVM_SET_ONE_REG (%s) failed: %s", what, strerror(errno));
    return 0;
}

static int gic_attr(struct boot *b, uint32_t group, uint64_t attr, uint64_t value,
                    const char *what)
{
    struct kvm_device_attr a = {.group = group, .attr = attr,
                                .addr = (uint64_t)(uintptr_t)&value};
    uint64_t t = wall_ns();
    int rc = ioctl(b->gic, KVM_SET_DEVICE_ATTR, &a);
    sample(b, wall_ns() - t);
    if (rc < 0)
        return fail(b, errno, "GICv3 %s (KVM_SET_DEVICE_ATTR) failed: %s", what,
                    strerror(errno));
    return 0;
}

static int step_gic(struct boot *b)
{
    struct kvm_create_device dev = {.type = KVM_DEV_TYPE_ARM_VGIC_V3};
    if (ioctl(b->vm, KVM_CREATE_DEVICE, &dev) < 0)
        return fail(b, errno, "KVM_CREATE_DEVICE (GICv3) failed: %s%s", strerror(errno),
                    errno == ENODEV ? " (the host's GIC cannot run a virtual GICv3)" : "");
    b->gic = (int)dev.fd;
    if (gic_attr(b, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_DIST, ARM_GICD_GPA,
                 "distributor address") ||
        gic_attr(b, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_REDIST, ARM_GICR_GPA,
                 "redistributor address"))
        return -1;
    struct kvm_device_attr init = {.group = KVM_DEV_ARM_VGIC_GRP_CTRL,
                                   .attr = KVM_DEV_ARM_VGIC_CTRL_INIT};
    uint64_t t = wall_ns();
    int rc = ioctl(b->gic, KVM_SET_DEVICE_ATTR, &init);
    sample(b, wall_ns() - t);
    if (rc < 0)
        return fail(b, errno, "GICv3 initialisation (KVM_DEV_ARM_VGIC_CTRL_INIT) failed: %s",
                    strerror(errno));
    return 0;
}

static int step_vcpu(struct boot *b, int k)
{
    if (!have_preferred) {
        if (ioctl(b->vm, KVM_ARM_PREFERRED_TARGET, &preferred) < 0)
            return fail(b, errno, "KVM_ARM_PREFERRED_TARGET failed: %s", strerror(errno));
        have_preferred = 1;
    }
    for (int i = 0; i < k; i++) {
        struct vcpu *v = new_vcpu(b, 1);
        if (!v)
            return -1;
        struct kvm_vcpu_init init = preferred;
        init.features[0] |= 1u << KVM_ARM_VCPU_PSCI_0_2;
        if (b->nvcpus > 1)
            init.features[0] |= 1u << KVM_ARM_VCPU_POWER_OFF;
        if (ioctl(v->fd, KVM_ARM_VCPU_INIT, &init) < 0)
            return fail(b, errno, "KVM_ARM_VCPU_INIT (target %u) failed: %s", init.target,
                        strerror(errno));
        if (set_one_reg(b, v->fd, ARM64_CORE_REG(regs.pc), CODE_GPA, "pc") ||
            set_one_reg(b, v->fd, ARM64_CORE_REG(sp_el1), STACK_TOP, "sp_el1"))
            return -1;
    }
    return 0;
}

#else
static void fill_seg(struct kvm_segment *s, uint16_t sel, uint8_t type, int code)
{
    s->base = 0;
    s->limit = 0xFFFFFFFF;
    s->selector = sel;
    s->type = type;
    s->present = 1;
    s->dpl = 0;
    s->db = code ? 0 : 1;
    s->s = 1;
    s->l = code ? 1 : 0;
    s->g = 1;
}

/* The CPUID KVM supports, asked once per process and given to every vCPU: some kernels
 * (6.12 under nested SVM, for one) refuse 64-bit sregs until the vCPU has a CPUID that
 * advertises long mode, as any real VMM sets before the first KVM_RUN. */
#define BB_CPUID_MAX 256
static union {
    struct kvm_cpuid2 h;
    uint8_t raw[sizeof(struct kvm_cpuid2) + BB_CPUID_MAX * sizeof(struct kvm_cpuid_entry2)];
} supported_cpuid;
static int have_supported_cpuid;

static int set_cpuid(struct boot *b, int vcpu_fd)
{
    if (!have_supported_cpuid) {
        supported_cpuid.h.nent = BB_CPUID_MAX;
        if (ioctl(b->kvm, KVM_GET_SUPPORTED_CPUID, &supported_cpuid) < 0)
            return fail(b, errno, "KVM_GET_SUPPORTED_CPUID failed: %s", strerror(errno));
        have_supported_cpuid = 1;
    }
    if (ioctl(vcpu_fd, KVM_SET_CPUID2, &supported_cpuid) < 0)
        return fail(b, errno, "KVM_SET_CPUID2 failed: %s", strerror(errno));
    return 0;
}

static int step_gic(struct boot *b)
{
    return fail(b, EINVAL, "'gic' is an arm64 step (a GICv3); this helper is built for x86, "
                "whose recipes have no interrupt controller step");
}

static int step_vcpu(struct boot *b, int k)
{
    for (int i = 0; i < k; i++) {
        struct vcpu *v = new_vcpu(b, 0);
        if (!v)
            return -1;
        if (set_cpuid(b, v->fd))
            return -1;
        struct kvm_sregs sregs;
        if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
            return fail(b, errno, "KVM_GET_SREGS failed: %s", strerror(errno));
        fill_seg(&sregs.cs, SEL_CODE, 11, 1);
        fill_seg(&sregs.ds, SEL_DATA, 3, 0);
        sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
        sregs.gdt.base = GDT_GPA;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.cr3 = PML4_GPA;
        sregs.cr4 = LM_CR4;       /* protocol.inc: the 64-bit entry's control bits */
        sregs.cr0 = LM_CR0;
        sregs.efer = LM_EFER;
        if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
            return fail(b, errno, "KVM_SET_SREGS (long mode) failed: %s", strerror(errno));
        struct kvm_regs regs;
        memset(&regs, 0, sizeof(regs));
        regs.rip = CODE_GPA;
        regs.rflags = 2;
        regs.rsp = STACK_TOP;
        if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
            return fail(b, errno, "KVM_SET_REGS failed: %s", strerror(errno));
    }
    return 0;
}

#endif

static int step_memslot(struct boot *b, int k)
{
    for (int i = 0; i < k; i++) {
        if (b->nbar_slots >= BB_MAX_MEMSLOT)
            return fail(b, ENOSPC, "more than %d BAR slots in one boot", BB_MAX_MEMSLOT);
        int n = b->nbar_slots;
        struct kvm_userspace_memory_region region = {
            .slot = (uint32_t)(1 + n),
            .guest_phys_addr = BAR_GPA + (uint64_t)BAR_SIZE * (uint64_t)n,
            .memory_size = BAR_SIZE,
            .userspace_addr = (uint64_t)(uintptr_t)(b->bar + (size_t)BAR_SIZE * (size_t)n),
        };
        uint64_t t = wall_ns();
        int rc = ioctl(b->vm, KVM_SET_USER_MEMORY_REGION, &region);
        sample(b, wall_ns() - t);
        if (rc < 0)
            return fail(b, errno, "KVM_SET_USER_MEMORY_REGION (BAR slot %d) failed: %s",
                        1 + n, strerror(errno));
        b->nbar_slots++;
    }
    return 0;
}

static void record_event(struct boot *b, int marker)
{
    struct bb_result *r = b->res;
    if (r->nevents < BB_MAX_EVENTS) {
        r->events[r->nevents].marker = marker;
        r->events[r->nevents].t_ns = wall_ns() - b->t0;
        r->nevents++;
    }
}

static const char *exit_name(uint32_t reason)
{
    switch (reason) {
    case KVM_EXIT_SHUTDOWN: return "SHUTDOWN (triple fault)";
    case KVM_EXIT_FAIL_ENTRY: return "FAIL_ENTRY";
    case KVM_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
    case KVM_EXIT_SYSTEM_EVENT: return "SYSTEM_EVENT";
    case KVM_EXIT_UNKNOWN: return "UNKNOWN";
    default: return "unexpected exit";
    }
}

static void save_rip(struct boot *b, int fd)
{
#if defined(__aarch64__)
    uint64_t pc = 0;
    struct kvm_one_reg reg = {.id = ARM64_CORE_REG(regs.pc), .addr = (uint64_t)(uintptr_t)&pc};
    if (ioctl(fd, KVM_GET_ONE_REG, &reg) == 0)
        b->res->rip = pc;
#else
    struct kvm_regs regs;
    if (ioctl(fd, KVM_GET_REGS, &regs) == 0)
        b->res->rip = regs.rip;
#endif
}

/* A phase marker from the guest (a port write on x86, an MMIO write on arm64): 1 when
 * it ends the run step, -1 on an abort, 0 to go on. */
static int on_marker(struct boot *b, int m, int target, int *end_marker)
{
    record_event(b, m);
    if (m == MARK_RUNG) /* the guest rang every doorbell assigned by now */
        b->res->doorbells_expected = (uint64_t)b->nbells;
    if (m == MARK_ABORT)
        return fail(b, EPROTO, "guest aborted: bad parameter block");
    if (target != BB_TARGET_HALT && m == target) {
        *end_marker = m;
        return 1;
    }
    return 0;
}

static int step_run(struct boot *b, int target, int *end_marker)
{
    struct vcpu *v = &b->vcpus[0];
    struct kvm_run *run = v->run;
    struct bb_result *r = b->res;
    if (r->halted)
        return fail(b, EINVAL, "run: the guest has already halted");
    for (;;) {
        int rc = ioctl(v->fd, KVM_RUN, 0);
        if (rc < 0) {
            if (errno == EINTR) {
                run->immediate_exit = 0;
                if (b->deadline && wall_ns() >= b->deadline) {
                    save_rip(b, v->fd);
                    return fail(b, ETIMEDOUT, "guest did not reach %s within %d ms (rip %#llx)",
                                target == BB_TARGET_HALT ? "HLT" : "its marker",
                                b->opt->timeout_ms, (unsigned long long)r->rip);
                }
                continue;
            }
            return fail(b, errno, "KVM_RUN failed: %s", strerror(errno));
        }
        r->exits++;
        switch (run->exit_reason) {
        case KVM_EXIT_IO: {
            r->io_exits++;
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            if (run->io.direction == KVM_EXIT_IO_IN) {
                memset(data, 0xff, (size_t)run->io.size * run->io.count);
                break;
            }
            if (run->io.port == MARKER_PORT) {
                int done = on_marker(b, data[0], target, end_marker);
                if (done)
                    return done < 0 ? -1 : 0;
            } else if (run->io.port == DATA_PORT && run->io.size == 4) {
                memcpy(&r->bar_value, data, 4);
            }
            break;
        }
        case KVM_EXIT_MMIO: {
            uint64_t a = run->mmio.phys_addr;
#if defined(__aarch64__)
            if (run->mmio.is_write && a == ARM_MARKER_GPA) {
                r->io_exits++;      /* the guest's port I/O, by MMIO */
                int done = on_marker(b, run->mmio.data[0], target, end_marker);
                if (done)
                    return done < 0 ? -1 : 0;
                break;
            }
            if (run->mmio.is_write && a == ARM_DATA_GPA && run->mmio.len == 4) {
                r->io_exits++;
                memcpy(&r->bar_value, run->mmio.data, 4);
                break;
            }
#endif
            if (run->mmio.is_write && a >= DOORBELL_BASE &&
                a < DOORBELL_BASE + (uint64_t)DOORBELL_STRIDE * BB_MAX_IOEV)
                r->doorbell_mmio_exits++;
            else
                r->other_mmio_exits++;
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0xff, sizeof(run->mmio.data));
            break;
        }
#if defined(__aarch64__)
        case KVM_EXIT_SYSTEM_EVENT:
            if (run->system_event.type != KVM_SYSTEM_EVENT_SHUTDOWN) {
                save_rip(b, v->fd);
                return fail(b, EIO, "KVM_RUN: system event %u at pc %#llx (expected the "
                            "guest's SYSTEM_OFF)", run->system_event.type,
                            (unsigned long long)r->rip);
            }
            /* fall through: PSCI SYSTEM_OFF is arm64's HLT */
#endif
        case KVM_EXIT_HLT:
            r->halted = 1;
            *end_marker = 0;
            if (target != BB_TARGET_HALT)
                return fail(b, EPROTO, "guest halted before reaching marker %d", target);
            return 0;
        case KVM_EXIT_INTERNAL_ERROR:
            save_rip(b, v->fd);
            return fail(b, EIO, "KVM_EXIT_INTERNAL_ERROR suberror %u at rip %#llx",
                        run->internal.suberror, (unsigned long long)r->rip);
        default:
            save_rip(b, v->fd);
            return fail(b, EIO, "KVM_RUN: %s (exit reason %u) at rip %#llx",
                        exit_name(run->exit_reason), run->exit_reason,
                        (unsigned long long)r->rip);
        }
    }
}

static void noop_handler(int sig) { (void)sig; }

static void arm_timeout(struct boot *b)
{
    if (b->opt->timeout_ms <= 0)
        return;
    b->deadline = wall_ns() + (uint64_t)b->opt->timeout_ms * 1000000ull;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = noop_handler; /* no SA_RESTART: KVM_RUN returns EINTR */
    sigemptyset(&sa.sa_mask);
    struct sigaction old;
    if (sigaction(KICK_SIGNAL, NULL, &old) == 0 && old.sa_handler == SIG_DFL)
        sigaction(KICK_SIGNAL, &sa, NULL);
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = KICK_SIGNAL;
    sev._sigev_un._tid = gettid();
    if (timer_create(CLOCK_MONOTONIC, &sev, &b->timer) != 0)
        return;
    b->have_timer = 1;
    /* Fire at the deadline, then every 10 ms in case a signal lands between KVM_RUNs. */
    struct itimerspec its = {
        .it_value = {.tv_sec = b->opt->timeout_ms / 1000,
                     .tv_nsec = (long)(b->opt->timeout_ms % 1000) * 1000000L},
        .it_interval = {.tv_sec = 0, .tv_nsec = 10000000L},
    };
    timer_settime(b->timer, 0, &its, NULL);
}

static void disarm_timeout(struct boot *b)
{
    if (b->have_timer) {
        timer_delete(b->timer);
        b->have_timer = 0;
    }
}

static void teardown(struct boot *b)
{
    struct bb_result *r = b->res;
    for (int i = 0; i < b->nbells; i++) {
        r->doorbells_completed += drain(b->bells[i].efd);
        close(b->bells[i].efd);
    }
    b->nbells = 0;
    for (int i = 0; i < b->nvcpus; i++) {
        if (b->vcpus[i].run)
            munmap(b->vcpus[i].run, (size_t)b->mmap_size);
        close(b->vcpus[i].fd);
    }
    b->nvcpus = 0;
    if (b->gic >= 0)
        close(b->gic);
    b->gic = -1;
    if (b->vm >= 0)
        close(b->vm);
    if (b->kvm >= 0)
        close(b->kvm);
    b->vm = b->kvm = -1;
    /* Memory goes last: the VM (and its slots) are gone by now. */
    if (b->ram)
        munmap(b->ram, RAM_SIZE);
    if (b->bar)
        munmap(b->bar, b->bar_len);
    b->ram = b->bar = NULL;
}

int bb_run(const struct bb_recipe *recipe, const struct bb_options *opt,
           struct bb_result *res, struct bb_sample *samples, uint32_t cap)
{
    memset(res, 0, sizeof(*res));
    res->failed_step = -1;
    res->pinned_cpu = -1;
    struct boot b;
    memset(&b, 0, sizeof(b));
    b.opt = opt;
    b.res = res;
    b.samples = samples;
    b.cap = samples ? cap : 0;
    b.kvm = b.vm = b.gic = -1;

    if (opt->ioev_len != 0 && opt->ioev_len != 1 && opt->ioev_len != 2 && opt->ioev_len != 4 &&
        opt->ioev_len != 8) {
        fail(&b, EINVAL, "ioeventfd length %d is invalid: use 0, 1, 2, 4 or 8", opt->ioev_len);
        return -1;
    }
    b.bells = calloc(BB_MAX_IOEV, sizeof(*b.bells));
    if (!b.bells) {
        fail(&b, ENOMEM, "out of memory");
        return -1;
    }
    cpu_set_t old_set;
    int restore_affinity = 0;
    if (opt->pin_cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(opt->pin_cpu, &set);
        if (sched_getaffinity(0, sizeof(old_set), &old_set) == 0 &&
            sched_setaffinity(0, sizeof(set), &set) == 0) {
            restore_affinity = 1;
            res->pinned_cpu = opt->pin_cpu;
        } else {
            fail(&b, errno, "cannot pin to CPU %d: %s", opt->pin_cpu, strerror(errno));
            free(b.bells);
            return -1;
        }
    }
    res->cpu_start = sched_getcpu();
    arm_timeout(&b);
    b.t0 = wall_ns();
    int rc = 0;
    for (int i = 0; i < recipe->nsteps && rc == 0; i++) {
        const struct bb_step *s = &recipe->steps[i];
        struct bb_phase *ph = &res->phases[res->nphases++];
        ph->op = s->op;
        ph->count = s->count;
        ph->target = s->target;
        ph->sample_start = res->nsamples;
        uint64_t w0 = wall_ns(), c0 = cpu_ns();
        switch (s->op) {
        case BB_OP_VM: rc = step_vm(&b); break;
        case BB_OP_MEM: rc = step_mem(&b); break;
        case BB_OP_IOEV: rc = step_ioev(&b, s->count); break;
        case BB_OP_EEXIST: rc = step_eexist(&b, s->count, ph); break;
        case BB_OP_DEASSIGN: rc = step_deassign(&b, s->count); break;
        case BB_OP_VCPU: rc = step_vcpu(&b, s->count); break;
        case BB_OP_RUN: rc = step_run(&b, s->target, &ph->end_marker); break;
        case BB_OP_MEMSLOT: rc = step_memslot(&b, s->count); break;
        case BB_OP_GIC: rc = step_gic(&b); break;
        default: rc = fail(&b, EINVAL, "unknown step kind %d", s->op); break;
        }
        ph->cpu_ns = cpu_ns() - c0;
        ph->wall_ns = wall_ns() - w0;
        ph->nsamples = res->nsamples - ph->sample_start;
        res->boot_wall_ns += ph->wall_ns;
        res->boot_cpu_ns += ph->cpu_ns;
        if (rc)
            res->failed_step = i;
    }
    disarm_timeout(&b);
    struct bb_phase *td = &res->phases[res->nphases++];
    td->op = BB_OP_TEARDOWN;
    td->count = 1;
    td->sample_start = res->nsamples;
    uint64_t w0 = wall_ns(), c0 = cpu_ns();
    teardown(&b);
    td->cpu_ns = cpu_ns() - c0;
    td->wall_ns = wall_ns() - w0;
    res->cpu_end = sched_getcpu();
    if (restore_affinity)
        sched_setaffinity(0, sizeof(old_set), &old_set);
    free(b.bells);
    res->ok = rc == 0;
    return rc;
}
