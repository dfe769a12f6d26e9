/* pyvmm-bootbench: the standalone boot-cost helper (static; needs no Python).
 *
 *   pyvmm-bootbench --recipe 'vm,mem,ioev:100,vcpu:1,run' [--repeat K] [--ioev-len L]
 *                   [--pin CPU] [--timeout-ms T] [--label TEXT] [--clock-cost]
 *   pyvmm-bootbench --plan FILE [--ioev-len L] [--pin CPU] [--timeout-ms T] [--clock-cost]
 *   pyvmm-bootbench --check (--recipe STEPS | --plan FILE)
 *
 * --check parses only (no KVM): prints the canonical recipe (LABEL RECIPE per plan
 * line) and exits 0, or prints one error line and exits 2.
 * Prints one JSON object per boot on stdout (JSON lines); errors go to stderr with
 * exit code 2 for bad arguments and 1 for a failed boot.  A plan file holds one boot
 * per line, "LABEL RECIPE" (blank lines and lines starting with # are skipped); every
 * line is run once in file order, in one process, and a failed boot does not stop the
 * plan (the old-kernel lab runs a whole interleaved sweep this way).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/utsname.h>

#include "bootbench.h"

extern const uint8_t bb_guest_image[], bb_guest_image_end[];

static void usage(FILE *f)
{
    fprintf(f,
            "usage: pyvmm-bootbench --recipe STEPS [--repeat K] [--ioev-len 0|1|2|4|8]\n"
            "                       [--pin CPU] [--timeout-ms MS] [--label TEXT] [--clock-cost]\n"
            "       pyvmm-bootbench --plan FILE [--ioev-len L] [--pin CPU] [--timeout-ms MS]\n"
            "       pyvmm-bootbench --check (--recipe STEPS | --plan FILE)\n"
            "plan file: one boot per line, 'LABEL RECIPE'\n"
            "steps: vm, mem, ioev:N, eexist:N, deassign:N, vcpu:K, gic (arm64),\n"
            "       run[:probe|rung|halt], memslot[:K], teardown\n");
}

static int parse_int(const char *flag, const char *v, long lo, long hi, long *out)
{
    char *end;
    long x = strtol(v ? v : "", &end, 10);
    if (!v || *end || x < lo || x > hi) {
        fprintf(stderr, "pyvmm-bootbench: %s wants a number in %ld..%ld, got '%s'\n", flag, lo,
                hi, v ? v : "");
        return -1;
    }
    *out = x;
    return 0;
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            printf("\\%c", *s);
        else if ((unsigned char)*s < 0x20)
            printf("\\u%04x", *s);
        else
            putchar(*s);
    }
    putchar('"');
}

static void print_result(const char *label, const char *recipe, int rep,
                         const struct bb_result *r, const struct bb_sample *s)
{
    printf("{\"type\":\"boot\",\"label\":");
    json_str(label);
    printf(",\"recipe\":");
    json_str(recipe);
    printf(",\"repeat\":%d,\"ok\":%s,\"error\":", rep, r->ok ? "true" : "false");
    json_str(r->err);
    printf(",\"errno\":%d,\"failed_step\":%d,\"boot_wall_ns\":%llu,\"boot_cpu_ns\":%llu",
           r->err_errno, r->failed_step, (unsigned long long)r->boot_wall_ns,
           (unsigned long long)r->boot_cpu_ns);
    printf(",\"phases\":[");
    for (int i = 0; i < r->nphases; i++) {
        const struct bb_phase *p = &r->phases[i];
        printf("%s{\"op\":\"%s\",\"count\":%d,\"target\":%d,\"end_marker\":%d,"
               "\"wall_ns\":%llu,\"cpu_ns\":%llu,\"samples\":[",
               i ? "," : "", bb_op_name(p->op), p->count, p->target, p->end_marker,
               (unsigned long long)p->wall_ns, (unsigned long long)p->cpu_ns);
        for (uint32_t k = 0; k < p->nsamples; k++)
            printf("%s%llu", k ? "," : "", (unsigned long long)s[p->sample_start + k].wall_ns);
        printf("]");
        if (p->batch_ops)
            printf(",\"batch_ns\":%llu,\"batch_ops\":%u", (unsigned long long)p->batch_ns,
                   p->batch_ops);
        printf("}");
    }
    printf("],\"events\":[");
    for (int i = 0; i < r->nevents; i++)
        printf("%s[%d,%llu]", i ? "," : "", r->events[i].marker,
               (unsigned long long)r->events[i].t_ns);
    printf("],\"doorbells_expected\":%llu,\"doorbells_completed\":%llu,"
           "\"doorbell_mmio_exits\":%llu,\"other_mmio_exits\":%llu,\"io_exits\":%llu,"
           "\"exits\":%llu,\"bar_value\":%u,\"halted\":%s,\"cpu_start\":%d,\"cpu_end\":%d,"
           "\"pinned_cpu\":%d,\"samples_dropped\":%u}\n",
           (unsigned long long)r->doorbells_expected, (unsigned long long)r->doorbells_completed,
           (unsigned long long)r->doorbell_mmio_exits, (unsigned long long)r->other_mmio_exits,
           (unsigned long long)r->io_exits, (unsigned long long)r->exits, r->bar_value,
           r->halted ? "true" : "false", r->cpu_start, r->cpu_end, r->pinned_cpu,
           r->samples_dropped);
    fflush(stdout);
}

/* Run every line of a plan file once (or, with check_only, parse every line and print
 * the canonical recipes); returns 0, 1 if any boot failed, 2 on a bad plan. */
static int run_plan(const char *path, const struct bb_options *opt, struct bb_result *res,
                    struct bb_sample *samples, uint32_t cap, int check_only)
{
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "pyvmm-bootbench: cannot open plan '%s': %m\n", path);
        return 2;
    }
    char *line = NULL;
    size_t linecap = 0;
    ssize_t got;
    int lineno = 0, failed = 0, boots = 0, bad = 0;
    while (!bad && (got = getline(&line, &linecap, f)) >= 0) {
        lineno++;
        size_t len = (size_t)got;
        if (len && line[len - 1] == '\n')
            len--;
        if (len > BB_PLAN_LINE_MAX) {
            fprintf(stderr, "pyvmm-bootbench: plan line %d is longer than %d characters\n",
                    lineno, BB_PLAN_LINE_MAX);
            bad = 1;
            break;
        }
        if (strlen(line) < (size_t)got) {
            fprintf(stderr, "pyvmm-bootbench: plan line %d holds a NUL byte\n", lineno);
            bad = 1;
            break;
        }
        char *label, *text;
        struct bb_recipe recipe;
        char err[BB_ERR_LEN], canon[512];
        int r = bb_parse_plan_line(line, &label, &text, err, sizeof(err));
        if (r == 1)
            continue;
        if (r < 0) {
            fprintf(stderr, "pyvmm-bootbench: plan line %d has %s\n", lineno, err);
            bad = 1;
            break;
        }
        if (bb_parse_recipe(text, &recipe, err, sizeof(err))) {
            fprintf(stderr, "pyvmm-bootbench: plan line %d: bad recipe: %s\n", lineno, err);
            bad = 1;
            break;
        }
        bb_format_recipe(&recipe, canon, sizeof(canon));
        if (check_only) {
            printf("%s %s\n", label, canon);
            continue;
        }
        if (bb_run(&recipe, opt, res, samples, cap) != 0) {
            fprintf(stderr, "pyvmm-bootbench: plan line %d (%s) failed: %s\n", lineno, label,
                    res->err);
            failed = 1;
        }
        print_result(label, canon, boots++, res, samples);
    }
    free(line);
    fclose(f);
    return bad ? 2 : failed;
}

int main(int argc, char **argv)
{
    const char *recipe_text = NULL, *label = "", *plan = NULL;
    long repeat = 1, ioev_len = 4, pin = -1, timeout_ms = 10000;
    int clock_cost = 0, check_only = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--recipe") && v) {
            recipe_text = v;
            i++;
        } else if (!strcmp(a, "--plan") && v) {
            plan = v;
            i++;
        } else if (!strcmp(a, "--label") && v) {
            label = v;
            i++;
        } else if (!strcmp(a, "--repeat")) {
            if (parse_int(a, v, 1, 1000000, &repeat))
                return 2;
            i++;
        } else if (!strcmp(a, "--ioev-len")) {
            if (parse_int(a, v, 0, 8, &ioev_len))
                return 2;
            i++;
        } else if (!strcmp(a, "--pin")) {
            if (parse_int(a, v, -1, 4095, &pin))
                return 2;
            i++;
        } else if (!strcmp(a, "--timeout-ms")) {
            if (parse_int(a, v, 0, 3600000, &timeout_ms))
                return 2;
            i++;
        } else if (!strcmp(a, "--clock-cost")) {
            clock_cost = 1;
        } else if (!strcmp(a, "--check")) {
            check_only = 1;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "pyvmm-bootbench: unknown or incomplete argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if (clock_cost) {
        double w, c;
        bb_clock_cost(200000, &w, &c);
        struct utsname u;
        uname(&u);
        printf("{\"type\":\"clock_cost\",\"wall_read_ns\":%.2f,\"cpu_read_ns\":%.2f,"
               "\"kernel\":", w, c);
        json_str(u.release);
        printf("}\n");
        if (!recipe_text && !plan)
            return 0;
    }
    if (recipe_text && plan) {
        fprintf(stderr, "pyvmm-bootbench: give --recipe or --plan, not both\n");
        return 2;
    }
    if (!recipe_text && !plan) {
        fprintf(stderr, "pyvmm-bootbench: --recipe or --plan is required\n");
        usage(stderr);
        return 2;
    }
    struct bb_recipe recipe;
    char err[BB_ERR_LEN], canon[512];
    if (recipe_text) {
        if (bb_parse_recipe(recipe_text, &recipe, err, sizeof(err))) {
            fprintf(stderr, "pyvmm-bootbench: bad recipe: %s\n", err);
            return 2;
        }
        bb_format_recipe(&recipe, canon, sizeof(canon));
        if (check_only) {
            printf("%s\n", canon);
            return 0;
        }
    }
    struct bb_options opt = {
        .ioev_len = (int)ioev_len, .pin_cpu = (int)pin, .timeout_ms = (int)timeout_ms,
        .guest = bb_guest_image, .guest_len = (size_t)(bb_guest_image_end - bb_guest_image),
    };
    uint32_t cap = 2 * BB_MAX_IOEV + 1000016;
    struct bb_sample *samples = calloc(cap, sizeof(*samples));
    struct bb_result *res = calloc(1, sizeof(*res));
    if (!samples || !res) {
        fprintf(stderr, "pyvmm-bootbench: out of memory\n");
        return 1;
    }
    int failed = 0;
    if (plan) {
        failed = run_plan(plan, &opt, res, samples, cap, check_only);
        free(samples);
        free(res);
        return failed;
    }
    for (long r = 0; r < repeat; r++) {
        if (bb_run(&recipe, &opt, res, samples, cap) != 0) {
            fprintf(stderr, "pyvmm-bootbench: boot %ld failed: %s\n", r, res->err);
            failed = 1;
        }
        print_result(label, canon, (int)r, res, samples);
        if (failed)
            break;
    }
    free(samples);
    free(res);
    return failed;
}
