/* triple: 64-bit guest that triple-faults: it loads an empty IDT and executes ud2,
 * so the #UD, then the #DF, cannot be delivered and the CPU shuts down. */
#include "protocol.inc"
    .code64
    .text
    .globl _start
_start:
    mov     $MARK_START, %al
    outb    %al, $MARKER_PORT
    lidt    empty_idt
    ud2
    hlt
    .balign 8
empty_idt:
    .word   0
    .quad   0
