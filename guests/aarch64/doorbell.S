/* doorbell for arm64: the same protocol as guests/doorbell.S, written with MMIO.
 * The VMM starts vCPU 0 at CODE_GPA in EL1 with the MMU off (every data access to an
 * address outside RAM is a device access that KVM sees as MMIO). The guest:
 *   1. writes MARK_START, then MARK_PROBE to ARM_MARKER_GPA (the VMM may register
 *      ioeventfds at the probe marker);
 *   2. writes the word 1 to each doorbell address listed in the parameter block;
 *   3. writes MARK_RUNG (the VMM may change memslots here, e.g. map a BAR);
 *   4. reads the first word at BAR_GPA, reports it at ARM_DATA_GPA, writes MARK_BAR;
 *   5. writes MARK_DONE and asks PSCI for SYSTEM_OFF.
 * A parameter block without the magic makes it write MARK_ABORT and power off. */
#include "../protocol.inc"

    .text
    .globl _start
_start:
    ldr     x9, =ARM_MARKER_GPA
    mov     w1, #MARK_START
    str     w1, [x9]
    mov     w1, #MARK_PROBE
    str     w1, [x9]

    /* Read the parameter block only now: the VMM may fill it at the probe marker. */
    ldr     x2, =PARAM_GPA
    ldr     x3, [x2, #PARAM_MAGIC_OFF]
    ldr     x4, =PARAM_MAGIC
    cmp     x3, x4
    b.ne    abort
    ldr     x5, [x2, #PARAM_COUNT_OFF]
    add     x6, x2, #PARAM_ADDRS_OFF
    mov     w1, #1
1:  cbz     x5, 2f
    ldr     x7, [x6], #8
    str     w1, [x7]
    sub     x5, x5, #1
    b       1b

2:  mov     w1, #MARK_RUNG
    str     w1, [x9]

    ldr     x7, =BAR_GPA
    ldr     w1, [x7]
    ldr     x8, =ARM_DATA_GPA
    str     w1, [x8]
    mov     w1, #MARK_BAR
    str     w1, [x9]

    mov     w1, #MARK_DONE
    str     w1, [x9]
off:
    ldr     x0, =PSCI_SYSTEM_OFF
    hvc     #0
    b       off

abort:
    mov     w1, #MARK_ABORT
    str     w1, [x9]
    b       off
    .ltorg
