/* mmiofetch: 64-bit guest that jumps into the doorbell window, where no memory slot
 * exists; KVM cannot fetch instructions from MMIO and reports an internal error. */
#include "protocol.inc"
    .code64
    .text
    .globl _start
_start:
    mov     $MARK_START, %al
    outb    %al, $MARKER_PORT
    mov     $DOORBELL_BASE, %eax
    jmp     *%rax
