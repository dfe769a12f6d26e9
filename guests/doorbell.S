/* doorbell: 64-bit guest. The VMM enters long mode with identity paging and
 * RIP = CODE_GPA. The guest:
 *   1. writes MARK_START, then MARK_PROBE (the VMM may register ioeventfds here);
 *   2. writes the dword 1 to each doorbell address listed in the parameter block;
 *   3. writes MARK_RUNG (the VMM may change memslots here, e.g. map a BAR);
 *   4. reads the first dword at BAR_GPA, reports it on DATA_PORT, writes MARK_BAR;
 *   5. writes MARK_DONE and halts.
 * A parameter block without the magic makes it write MARK_ABORT and halt. */
#include "protocol.inc"

    .code64
    .text
    .globl _start
_start:
    mov     $MARK_START, %al
    outb    %al, $MARKER_PORT
    mov     $MARK_PROBE, %al
    outb    %al, $MARKER_PORT

    /* Read the parameter block only now: the VMM may fill it at the probe marker. */
    mov     (PARAM_GPA + PARAM_MAGIC_OFF), %rax
    cmp     $PARAM_MAGIC, %rax
    jne     abort
    mov     (PARAM_GPA + PARAM_COUNT_OFF), %rcx
    mov     $(PARAM_GPA + PARAM_ADDRS_OFF), %rsi
1:  test    %rcx, %rcx
    jz      2f
    mov     (%rsi), %rdi
    movl    $1, (%rdi)
    add     $8, %rsi
    dec     %rcx
    jmp     1b

2:  mov     $MARK_RUNG, %al
    outb    %al, $MARKER_PORT

    mov     $BAR_GPA, %edi          /* zero-extends: BAR_GPA is below 4 GiB */
    movl    (%rdi), %eax
    outl    %eax, $DATA_PORT
    mov     $MARK_BAR, %al
    outb    %al, $MARKER_PORT

    mov     $MARK_DONE, %al
    outb    %al, $MARKER_PORT
3:  hlt
    jmp     3b

abort:
    mov     $MARK_ABORT, %al
    outb    %al, $MARKER_PORT
    jmp     3b
