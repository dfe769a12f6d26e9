/* stressloop: 64-bit guest for `pyvmm stress`, one per vCPU.
 * Forever: write doorbell (i % 16), write MARK_LOOP to the marker port, write i into the
 * coalesced-MMIO zone, read PROBE_GPA (a slot that comes and goes) and report it on the
 * data port. Every access may exit or be absorbed, depending on what the other threads
 * have just registered. */
#include "protocol.inc"
    .code64
    .text
    .globl _start
_start:
    mov     $MARK_START, %al
    outb    %al, $MARKER_PORT
    mov     $DOORBELL_BASE, %edi
    mov     $COALESCED_GPA, %esi
    mov     $PROBE_GPA, %r8d
    xor     %ecx, %ecx
1:  inc     %ecx
    mov     %ecx, %eax
    and     $15, %eax
    movl    %ecx, (%rdi,%rax,DOORBELL_STRIDE)
    mov     $MARK_LOOP, %al
    outb    %al, $MARKER_PORT
    movl    %ecx, (%rsi)
    movl    (%r8), %eax
    outl    %eax, $DATA_PORT
    jmp     1b
