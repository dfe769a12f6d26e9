"""Every guest-physical address and port pyvmm uses, in one place.

guests/protocol.inc mirrors these values for the assembly side;
tests/test_layout.py checks that both agree.
"""

# Guest-physical memory map (slot 0 is RAM at 0..RAM_SIZE).
RAM_SIZE = 0x200000          # 2 MiB of RAM in slot 0
GDT_GPA = 0x1000             # GDT for 64-bit mode (built by the VMM)
PML4_GPA = 0x2000            # identity page tables (built by the VMM)
PDPT_GPA = 0x3000
PD_GPA = 0x4000              # four page directories: 0x4000..0x7fff, 4 GiB of 2 MiB pages
PARAM_GPA = 0x8000           # parameter block written by the VMM
CODE_GPA = 0x10000           # guest image load address
STACK_TOP = 0x1FF000         # initial stack pointer

# Parameter block (at PARAM_GPA), little-endian u64 fields.
PARAM_MAGIC_OFF = 0x00
PARAM_COUNT_OFF = 0x08       # number of doorbells to ring
PARAM_ADDRS_OFF = 0x10       # doorbell addresses, one u64 each
PARAM_MAGIC = 0x50594D4D      # "PYMM"
PARAM_AREA_SIZE = 0x8000     # PARAM_GPA..PARAM_GPA+0x8000 (room for 4094 addresses)
PARAM_MAX_DOORBELLS = (PARAM_AREA_SIZE - PARAM_ADDRS_OFF) // 8

# MMIO windows (not backed by any memory slot unless a recipe maps them).
DOORBELL_BASE = 0xD0000000   # doorbell i lives at DOORBELL_BASE + i * DOORBELL_STRIDE
DOORBELL_STRIDE = 8
BAR_GPA = 0xE0000000         # where the 'memslot' step maps a BAR-like slot
BAR_SIZE = 0x200000
BAR_PATTERN = 0xBA5EBA11     # first dword of the BAR slot, read back by the guest
UNMAPPED_READ = 0xFFFFFFFF   # what the VMM answers for an MMIO read nobody owns

# The address the check guests hammer (pyvmm check), and where memslot-coherence moves
# its slot to.
PROBE_GPA = 0xE0000000
PROBE_ALT_GPA = 0xE0200000
PROBE_PATTERN = 0xC0DEC0DE   # what the check slots hold, and what readloop writes back
COALESCED_GPA = 0xE0400000   # pyvmm stress: the coalesced MMIO zone the guest writes

# The ptwrite guest (pyvmm bench ptwrite) builds its own page tables here: a PML4, a
# PDPT, a PD and one 4 KiB page table for the first 2 MiB. It rewrites PTE number
# PTW_PTE_INDEX of that table and PDE number PTW_PDE_INDEX of the PD, writes ordinary data at PTW_DATA_GPA, and its second entry
# point (CODE_GPA + PTW_TOUCH_OFFSET, for vCPU 1) keeps faulting in PTW_TOUCH_PAGES pages.
PTW_PML4_GPA = 0x40000
PTW_PDPT_GPA = 0x41000
PTW_PD_GPA = 0x42000
PTW_PT_GPA = 0x43000
PTW_PTE_INDEX = 384
PTW_PDE_INDEX = 300
PTW_DATA_GPA = 0x100000
PTW_TOUCH_GPA = 0x120000
PTW_TOUCH_PAGES = 64
PTW_TOUCH_OFFSET = 0x800

# The Xen guest (pyvmm stress --xen): the shared_info page KVM maps for event channels,
# and the struct evtchn_send the guest hands to its EVTCHNOP_send hypercalls.
XEN_SHINFO_GPA = 0x60000
XEN_SEND_GPA = 0x61000
XEN_VCPU_INFO_GPA = 0x62000  # vCPU 0's struct vcpu_info
XEN_SEND_PORT = 3            # the port the guest sends on
XEN_DELIVER_PORT = 5         # where KVM delivers it: an event channel of vCPU 0
XEN_HCALL_EVTCHN_OP = 32     # __HYPERVISOR_event_channel_op
XEN_EVTCHNOP_SEND = 4
XEN_SENDS_PER_MARK = 64      # the guest reports MARK_LOOP after this many sends
# 64-bit entry (the VMM's GDT, selectors and control bits; C and Python both use these).
GDT_CODE64 = 0x00AF9A000000FFFF    # flat 64-bit code segment
GDT_DATA = 0x00CF92000000FFFF      # flat data segment
SEL_CODE = 0x08
SEL_DATA = 0x10
LM_CR0 = 0x80010033          # PE | MP | ET | NE | WP | PG
LM_CR4 = 0x20                # PAE
LM_EFER = 0x500              # LME | LMA
# Ports.
SERIAL_PORT = 0x3F8          # COM1 data register: one byte per OUT
MARKER_PORT = 0x80           # phase markers: one byte per OUT
DATA_PORT = 0x84             # 32-bit values reported by the guest
INIT_PORT = 0x86             # a Linux guest's /init: "user space started" (guests/linux)
INIT_MARK = 0x1E             # the value it writes there

# Phase markers written to MARKER_PORT.
# arm64 (guests/aarch64/): markers and data by MMIO, the GICv3's addresses, the guest's
# way out (PSCI SYSTEM_OFF through HVC)
ARM_MARKER_GPA = 0x0A000000
ARM_DATA_GPA = 0x0A000004
ARM_GICD_GPA = 0x08000000
ARM_GICR_GPA = 0x080A0000
ARM_GICR_STRIDE = 0x20000      # two 64 KiB frames per vCPU
PSCI_SYSTEM_OFF = 0x84000008

MARK_START = 0x01            # guest code began executing
MARK_PROBE = 0x02            # 'device probe': the VMM may register ioeventfds now
MARK_RUNG = 0x03             # every doorbell in the parameter block was written
MARK_BAR = 0x04              # the guest read BAR_GPA and reported it on DATA_PORT
MARK_DONE = 0x7F             # about to HLT
MARK_ABORT = 0xEE            # the guest found something wrong (bad parameter block)
MARK_LOOP = 0x05             # check guests: one loop iteration done

MARKER_NAMES = {
    MARK_START: "start",
    MARK_PROBE: "probe",
    MARK_RUNG: "rung",
    MARK_BAR: "bar",
    MARK_DONE: "done",
    MARK_ABORT: "abort",
    MARK_LOOP: "loop",
}
