/* spin: 64-bit guest that never halts (for --timeout handling). */
#include "protocol.inc"
    .code64
    .text
    .globl _start
_start:
    mov     $MARK_START, %al
    outb    %al, $MARKER_PORT
1:  jmp     1b
