/* ptwrite: 64-bit guest for `pyvmm bench ptwrite` (shadow-MMU page-table writes).
 *
 * vCPU 0 (_start): build a PML4, PDPT, PD and one 4 KiB page table mapping the first
 * 2 MiB identity (the rest of the first GiB with 2 MiB pages), switch CR3 to them and
 * report 1 on the data port. Then write PTE number PTW_PTE_INDEX COUNT times (the
 * parameter block's count), alternating its accessed bit, and report 2; the same for
 * PDE number PTW_PDE_INDEX, report 3; then write an ordinary data word COUNT times and
 * report 4; then HLT. Under shadow paging the page
 * table is write-protected, so each PTE write is trapped and emulated by KVM.
 *
 * vCPU 1 (at CODE_GPA + PTW_TOUCH_OFFSET, CR3 set to PTW_PML4_GPA by the VMM): forever,
 * invalidate and touch PTW_TOUCH_PAGES pages, so its shadow entries keep being rebuilt;
 * MARK_LOOP on the marker port after each pass lets the VMM stop it. */
#include "protocol.inc"

/* COUNT (parameter block) writes of a qword at ADDR, toggling bit 5 of VALUE each time,
 * then REPORT on the data port. */
.macro WRITES addr, value, report
    mov     (PARAM_GPA + PARAM_COUNT_OFF), %ecx
    movq    $\value, %rax
    mov     $\addr, %edi
1:  xor     $0x20, %rax
    movq    %rax, (%rdi)
    dec     %ecx
    jnz     1b
    mov     $\report, %eax
    outl    %eax, $DATA_PORT
.endm

    .code64
    .text
    .globl _start
_start:
    mov     $MARK_START, %al
    outb    %al, $MARKER_PORT
    /* Zero the four table pages. */
    mov     $PTW_PML4_GPA, %edi
    xor     %eax, %eax
    mov     $(4 * 4096 / 8), %ecx
    rep stosq
    /* PML4[0] -> PDPT, PDPT[0] -> PD, PD[0] -> PT. */
    movq    $(PTW_PDPT_GPA | 3), %rax
    movq    %rax, PTW_PML4_GPA
    movq    $(PTW_PD_GPA | 3), %rax
    movq    %rax, PTW_PDPT_GPA
    movq    $(PTW_PT_GPA | 3), %rax
    movq    %rax, PTW_PD_GPA
    /* PD[1..511]: 2 MiB pages. */
    mov     $1, %ecx
1:  mov     %rcx, %rax
    shl     $21, %rax
    or      $0x83, %rax
    movq    %rax, PTW_PD_GPA(,%rcx,8)
    inc     %ecx
    cmp     $512, %ecx
    jne     1b
    /* PT[0..511]: 4 KiB pages of the first 2 MiB. */
    xor     %ecx, %ecx
2:  mov     %rcx, %rax
    shl     $12, %rax
    or      $3, %rax
    movq    %rax, PTW_PT_GPA(,%rcx,8)
    inc     %ecx
    cmp     $512, %ecx
    jne     2b
    mov     $PTW_PML4_GPA, %eax
    mov     %rax, %cr3
    mov     $1, %eax
    outl    %eax, $DATA_PORT
    /* PTE writes, PDE writes (an unused 2 MiB entry of the page directory: a level-2
     * shadow page, where KVM's write-flooding detection applies; it skips 4 KiB page
     * tables), then ordinary data writes. */
    WRITES  (PTW_PT_GPA + PTW_PTE_INDEX * 8), ((PTW_PTE_INDEX << 12) | 3), 2
    WRITES  (PTW_PD_GPA + PTW_PDE_INDEX * 8), ((PTW_PDE_INDEX << 21) | 0x83), 3
    WRITES  PTW_DATA_GPA, 0, 4
    mov     $MARK_DONE, %al
    outb    %al, $MARKER_PORT
5:  hlt
    jmp     5b

    .org    PTW_TOUCH_OFFSET
toucher:
    mov     $PTW_TOUCH_GPA, %edi
    mov     $PTW_TOUCH_PAGES, %ecx
6:  invlpg  (%rdi)
    movl    (%rdi), %eax
    add     $4096, %edi
    dec     %ecx
    jnz     6b
    mov     $MARK_LOOP, %al
    outb    %al, $MARKER_PORT
    jmp     toucher
