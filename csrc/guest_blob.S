/* Embeds the doorbell guest image in the standalone pyvmm-bootbench executable. */
    .section .rodata
    .globl bb_guest_image, bb_guest_image_end
    .balign 16
bb_guest_image:
    .incbin DOORBELL_BIN
bb_guest_image_end:
    .section .note.GNU-stack,"",@progbits
