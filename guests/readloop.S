/* readloop: 64-bit guest for the memslot checks.
 * Forever: read 4 bytes at PROBE_GPA and report them on the data port (outl), write
 * PROBE_PATTERN there (what a slot at PROBE_GPA holds, so a write that lands in memory
 * changes nothing), then MARK_LOOP on the marker port. Each KVM_RUN holds at most one
 * access: the read (seen as an MMIO read exit, or as the value on the data port) or the
 * write (an MMIO write exit, or silently into memory before the marker exit). */
#include "protocol.inc"
    .code64
    .text
    .globl _start
_start:
    mov     $MARK_START, %al
    outb    %al, $MARKER_PORT
    mov     $PROBE_GPA, %edi
1:  movl    (%rdi), %eax
    outl    %eax, $DATA_PORT
    movl    $PROBE_PATTERN, (%rdi)
    mov     $MARK_LOOP, %al
    outb    %al, $MARKER_PORT
    jmp     1b
