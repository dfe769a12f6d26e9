/* ringloop: 64-bit guest for `pyvmm check ioeventfd-ordering`.
 * Forever: one 4-byte write to the first doorbell, then MARK_LOOP on the marker port.
 * Each KVM_RUN therefore holds at most one doorbell write, which either exits to the
 * VMM as MMIO (no ioeventfd) or is absorbed by an ioeventfd before the marker exit. */
#include "protocol.inc"
    .code64
    .text
    .globl _start
_start:
    mov     $MARK_START, %al
    outb    %al, $MARKER_PORT
    mov     $DOORBELL_BASE, %edi        /* zero-extends: a low-4GiB address */
    xor     %ebx, %ebx
1:  inc     %ebx
    movl    %ebx, (%rdi)
    mov     $MARK_LOOP, %al
    outb    %al, $MARKER_PORT
    jmp     1b
