"""The C declarations pyvmm's ABI is made of: struct layouts (CDEF) and the libc entry
points used with them (LIBC_CDEF). Plain strings, read by pyvmm.vmm.abi and by the build
(csrc/build_abi.py), which compiles them ahead of time into pyvmm.vmm._abi so that no C
declaration is parsed when pyvmm is imported."""

CDEF = """
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_userspace_memory_region2 {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
    uint64_t guest_memfd_offset;
    uint32_t guest_memfd;
    uint32_t pad1;
    uint64_t pad2[14];
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    uint8_t padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct {
            uint8_t direction;
            uint8_t size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;
        } io;
        struct {
            uint64_t phys_addr;
            uint8_t data[8];
            uint32_t len;
            uint8_t is_write;
        } mmio;
        struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } internal;
        struct { uint32_t type; uint32_t ndata; uint64_t data[16]; } system_event;
        struct { uint64_t flags; uint64_t gpa; uint64_t size; } memory_fault;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union { char padding[2048]; } s;
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t fd;
    uint32_t flags;
    uint8_t pad[36];
};

struct kvm_create_guest_memfd {
    uint64_t size;
    uint64_t flags;
    uint64_t reserved[6];
};

struct kvm_stats_header {
    uint32_t flags;
    uint32_t name_size;
    uint32_t num_desc;
    uint32_t id_offset;
    uint32_t desc_offset;
    uint32_t data_offset;
};

struct kvm_stats_desc {
    uint32_t flags;
    int16_t exponent;
    uint16_t size;
    uint32_t offset;
    uint32_t bucket_size;
};

struct kvm_dirty_log {
    uint32_t slot;
    uint32_t padding1;
    union {
        void *dirty_bitmap;      /* one bit per page of the slot */
        uint64_t padding2;
    };
};

struct kvm_coalesced_mmio_zone {
    uint64_t addr;
    uint32_t size;
    union {
        uint32_t pad;
        uint32_t pio;
    };
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax, ebx, ecx, edx;
    uint32_t padding[3];
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_xen_hvm_config {
    uint32_t flags;
    uint32_t msr;
    uint64_t blob_addr_32;
    uint64_t blob_addr_64;
    uint8_t blob_size_32;
    uint8_t blob_size_64;
    uint8_t pad2[30];
};

struct kvm_xen_hvm_attr {
    uint16_t type;
    uint16_t pad[3];
    union {
        uint8_t long_mode;
        uint8_t vector;
        struct { uint64_t gfn; } shared_info;
        struct {
            uint32_t send_port;
            uint32_t type;
            uint32_t flags;
            union {
                struct { uint32_t port; uint32_t vcpu; uint32_t priority; } port;
                struct { uint32_t port; int32_t fd; } eventfd;
                uint32_t padding[4];
            } deliver;
        } evtchn;
        uint32_t xen_version;
        uint64_t pad[8];
    } u;
};

struct kvm_xen_vcpu_attr {
    uint16_t type;
    uint16_t pad[3];
    union {
        uint64_t gpa;
        uint64_t pad[8];
    } u;
};

struct kvm_msr_filter_range {
    uint32_t flags;
    uint32_t nmsrs;
    uint32_t base;
    uint8_t *bitmap;
};

struct kvm_msr_filter {
    uint32_t flags;
    struct kvm_msr_filter_range ranges[16];
};
"""

# fcntl.ioctl() passes an integer argument as a C int, which truncates pointers, so the
# raw ioctl(2) is called through cffi instead.
LIBC_CDEF = """
int ioctl(int fd, unsigned long request, ...);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
int madvise(void *addr, size_t length, int advice);
int sched_getcpu(void);
"""
