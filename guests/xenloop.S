/* xenloop: 64-bit guest for `pyvmm stress --xen` (the Xen event-channel seed).
 *
 * Forever: EVTCHNOP_send on XEN_SEND_PORT through the Xen hypercall ABI (vmmcall on
 * AMD: RAX = __HYPERVISOR_event_channel_op, RDI = EVTCHNOP_send, RSI = the address of a
 * struct evtchn_send holding the port). With the VMM's KVM_XEN_HVM_CONFIG asking KVM to
 * intercept hypercalls and an event channel bound to vCPU 0, KVM handles each send in
 * the kernel (kvm_xen_hcall_evtchn_send -> kvm_xen_set_evtchn). After every
 * XEN_SENDS_PER_MARK sends the guest writes MARK_LOOP to the marker port and the
 * hypercall's last return value to the data port, so the VMM can count. */
#include "protocol.inc"
    .code64
    .text
    .globl _start
_start:
    mov     $MARK_START, %al
    outb    %al, $MARKER_PORT
    movl    $XEN_SEND_PORT, XEN_SEND_GPA
1:  mov     $XEN_SENDS_PER_MARK, %ecx
2:  mov     $XEN_HCALL_EVTCHN_OP, %eax
    mov     $XEN_EVTCHNOP_SEND, %edi
    mov     $XEN_SEND_GPA, %esi
    vmmcall
    dec     %ecx
    jnz     2b
    outl    %eax, $DATA_PORT
    mov     $MARK_LOOP, %al
    outb    %al, $MARKER_PORT
    jmp     1b
