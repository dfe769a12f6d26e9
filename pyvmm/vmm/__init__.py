"""The VMM itself: one class per KVM file descriptor (Kvm, Vm, Vcpu), guest memory,
ioeventfds, typed exits, KVM binary stats, the ABI (structs and ioctl numbers), the
guest-physical layout and the tiny guests; x86 long-mode set-up (x86.py) and the
process's one kicker thread (kicker.py) beside the vCPU. Nothing here knows of sweeps,
labs or tracing: those rooms sit above it."""
