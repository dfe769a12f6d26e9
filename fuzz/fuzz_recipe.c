/* libFuzzer target for the only recipe parser, bb_parse_recipe(), and the plan-line
 * splitter bb_parse_plan_line(), built with AddressSanitizer and UBSan by `make fuzz`.
 *
 * The input is taken two ways: as one recipe string, and as plan-file lines. Beyond the
 * sanitizers, the target checks the parser's contract and aborts (a finding) when it
 * is broken:
 *   - a rejected recipe comes with a non-empty, one-line, printable message;
 *   - an accepted recipe formats to a canonical text that parses again to the same
 *     steps (parse -> format -> parse is stable).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bootbench.h"

static void check_message(const char *err)
{
    if (!err[0])
        abort();                          /* rejected without a reason */
    for (const char *c = err; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            abort();                      /* not one printable line */
}

static void check_recipe(const char *text)
{
    struct bb_recipe r, again;
    char err[BB_ERR_LEN], canon[512], canon2[512];
    err[0] = 0;
    if (bb_parse_recipe(text, &r, err, sizeof(err))) {
        check_message(err);
        return;
    }
    if (bb_format_recipe(&r, canon, sizeof(canon)) < 0)
        abort();                          /* an accepted recipe must format */
    if (bb_parse_recipe(canon, &again, err, sizeof(err)))
        abort();                          /* ... and its canonical form must parse */
    if (again.nsteps != r.nsteps || memcmp(again.steps, r.steps, sizeof(r.steps[0]) * r.nsteps))
        abort();
    if (bb_format_recipe(&again, canon2, sizeof(canon2)) < 0 || strcmp(canon, canon2))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = 0;
    check_recipe(text);
    /* The same bytes as a plan file: every line split and its recipe parsed. */
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char *label, *recipe, err[BB_ERR_LEN] = "";
        if (strlen(line) > BB_PLAN_LINE_MAX)
            continue;                     /* the helper rejects these before splitting */
        int rc = bb_parse_plan_line(line, &label, &recipe, err, sizeof(err));
        if (rc < 0)
            check_message(err);
        else if (rc == 0)
            check_recipe(recipe);
    }
    free(text);
    return 0;
}
