/* qemu-microvm-fw: a 64 KiB firmware image for QEMU's microvm machine (-bios), the
 * workload of `pyvmm trace --vmm qemu-microvm[:K]`. Not a pyvmm guest.
 *
 * At the reset vector (CS base 0xffff0000, IP 0xfff0) it enters flat 32-bit protected
 * mode, marks its start on the marker port, then looks for virtio-mmio transports with
 * a device behind them (microvm's bank of transports at VIRTIO_BASE, VIRTIO_SLOTS of
 * them, VIRTIO_STRIDE apart) and brings each device up the way a guest driver probing
 * at boot does: reset, ACKNOWLEDGE, DRIVER, (version 2: VIRTIO_F_VERSION_1 and
 * FEATURES_OK), then every queue the device has gets a size and a ring (version 1:
 * QueuePFN; version 2: the ring addresses and QueueReady), and finally DRIVER_OK. That
 * last write makes QEMU register an ioeventfd per queue while the guest runs. It then
 * reports how many devices it brought up on the data port, marks its end and writes 0
 * to isa-debug-exit (QEMU exits with status 1). The ring memory is never used: the
 * firmware notifies no queue.
 */
#include "protocol.inc"

#define VIRTIO_BASE     0xfeb00000
#define VIRTIO_STRIDE   0x200
#define VIRTIO_SLOTS    24
#define VIRTIO_MAGIC    0x74726976          /* "virt" */
#define VQ_SIZE         16
#define RING_GPA        0x10000             /* ring pages in RAM (never touched) */
#define STACK_GPA       0x8000
#define DEBUG_EXIT_PORT 0xf4
#define FW_BASE         0xffff0000          /* where the 64 KiB image is mapped */

/* virtio-mmio register offsets */
#define R_MAGIC         0x000
#define R_VERSION       0x004
#define R_DEVICE_ID     0x008
#define R_DRV_FEAT      0x020
#define R_DRV_FEAT_SEL  0x024
#define R_PAGE_SIZE     0x028              /* version 1 */
#define R_QUEUE_SEL     0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM     0x038
#define R_QUEUE_ALIGN   0x03c              /* version 1 */
#define R_QUEUE_PFN     0x040              /* version 1 */
#define R_QUEUE_READY   0x044              /* version 2 */
#define R_STATUS        0x070
#define R_QUEUE_DESC    0x080              /* version 2, low 32 bits */
#define R_QUEUE_DRIVER  0x090
#define R_QUEUE_DEVICE  0x0a0

#define S_ACK           1
#define S_DRIVER        2
#define S_DRIVER_OK     4
#define S_FEATURES_OK   8

    .code16
    .text
    .globl _start
_start:
    cli
    lgdtl   %cs:(gdt_desc - _start)
    movl    %cr0, %eax
    orl     $1, %eax
    movl    %eax, %cr0
    ljmpl   $0x08, $(FW_BASE + pm32 - _start)

    .code32
pm32:
    movw    $0x10, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movl    $STACK_GPA, %esp
    movb    $MARK_START, %al
    outb    %al, $MARKER_PORT

    xorl    %edi, %edi                      /* devices brought up */
    movl    $VIRTIO_BASE, %esi
    movl    $VIRTIO_SLOTS, %ecx
scan:
    cmpl    $VIRTIO_MAGIC, R_MAGIC(%esi)
    jne     next
    cmpl    $0, R_DEVICE_ID(%esi)
    je      next
    pushl   %ecx
    call    bring_up
    popl    %ecx
    incl    %edi
next:
    addl    $VIRTIO_STRIDE, %esi
    loop    scan

    movl    %edi, %eax
    movw    $DATA_PORT, %dx
    outl    %eax, %dx
    movb    $MARK_DONE, %al
    outb    %al, $MARKER_PORT
    xorb    %al, %al
    outb    %al, $DEBUG_EXIT_PORT
1:  hlt
    jmp     1b

/* bring_up: the device at %esi (clobbers eax, ebx, ecx, edx) */
bring_up:
    movl    $0, R_STATUS(%esi)
    movl    $S_ACK, R_STATUS(%esi)
    movl    $(S_ACK | S_DRIVER), R_STATUS(%esi)
    movl    R_VERSION(%esi), %ebx
    cmpl    $1, %ebx
    je      1f
    movl    $1, R_DRV_FEAT_SEL(%esi)        /* features 32..63: VIRTIO_F_VERSION_1 */
    movl    $1, R_DRV_FEAT(%esi)
    movl    $0, R_DRV_FEAT_SEL(%esi)
    movl    $0, R_DRV_FEAT(%esi)
    movl    $(S_ACK | S_DRIVER | S_FEATURES_OK), R_STATUS(%esi)
    jmp     2f
1:  movl    $4096, R_PAGE_SIZE(%esi)
2:  xorl    %ecx, %ecx                      /* queue index */
queue:
    movl    %ecx, R_QUEUE_SEL(%esi)
    movl    R_QUEUE_NUM_MAX(%esi), %eax
    testl   %eax, %eax
    jz      done
    movl    $VQ_SIZE, R_QUEUE_NUM(%esi)
    cmpl    $1, %ebx
    jne     3f
    movl    $4096, R_QUEUE_ALIGN(%esi)
    movl    $(RING_GPA >> 12), R_QUEUE_PFN(%esi)
    jmp     4f
3:  movl    $RING_GPA, R_QUEUE_DESC(%esi)
    movl    $(RING_GPA + 0x100), R_QUEUE_DRIVER(%esi)
    movl    $(RING_GPA + 0x1000), R_QUEUE_DEVICE(%esi)
    movl    $1, R_QUEUE_READY(%esi)
4:  incl    %ecx
    cmpl    $8, %ecx
    jb      queue
done:
    movl    R_STATUS(%esi), %eax
    orl     $S_DRIVER_OK, %eax
    movl    %eax, R_STATUS(%esi)
    ret

    .p2align 3
gdt:
    .quad   0
    .quad   0x00cf9a000000ffff              /* flat 32-bit code */
    .quad   0x00cf92000000ffff              /* flat 32-bit data */
gdt_desc:
    .word   gdt_desc - gdt - 1
    .long   FW_BASE + gdt - _start

    .code16
    .org    0xfff0
reset:
    jmp     _start
    .org    0x10000
