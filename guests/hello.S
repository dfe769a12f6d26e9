/* hello: real-mode guest. Prints one line on COM1 (port 0x3f8) and halts.
 * Loaded at CODE_GPA; the VMM starts it with CS = CODE_GPA >> 4, IP = 0. */
#include "protocol.inc"

    .code16
    .text
    .globl _start
_start:
    mov     %cs, %ax
    mov     %ax, %ds
    mov     $MARK_START, %al
    outb    %al, $MARKER_PORT
    mov     $SERIAL_PORT, %dx
    lea     msg, %si
1:  lodsb
    test    %al, %al
    jz      2f
    outb    %al, %dx
    jmp     1b
2:  mov     $MARK_DONE, %al
    outb    %al, $MARKER_PORT
    hlt
    jmp     2b

msg:
    .asciz  "Hello from a pyvmm real-mode guest\n"
