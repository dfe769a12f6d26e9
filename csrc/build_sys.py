"""cffi builder for pyvmm.vmm._sys: the Python VMM's syscalls as compiled (API-mode) calls.

The struct layouts stay in pyvmm.vmm._abi (ABI mode, no headers needed); only the calls
live here. An API-mode call is a direct C call, where an ABI-mode call through libffi
builds its frame at run time: on a kvm_pvm host that was about 2.6 us more per ioctl
right after a vCPU ioctl (caches cold), several times the work of the call itself.
Every function returns -errno on failure, so no errno has to be fetched afterwards.
"""

import cffi

CDEF = """
long pyvmm_ioctl(int fd, unsigned long request, void *arg);
long pyvmm_ioctl_val(int fd, unsigned long request, unsigned long arg);
long pyvmm_mmap(size_t length, int prot, int flags, int fd, long offset);
long pyvmm_munmap(uintptr_t addr, size_t length);
long pyvmm_madvise(uintptr_t addr, size_t length, int advice);
int pyvmm_getcpu(void);
"""

SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

static long pyvmm_ioctl(int fd, unsigned long request, void *arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -(long)errno : r;
}

static long pyvmm_ioctl_val(int fd, unsigned long request, unsigned long arg)
{
    int r = ioctl(fd, request, arg);
    return r < 0 ? -(long)errno : r;
}

static long pyvmm_mmap(size_t length, int prot, int flags, int fd, long offset)
{
    void *p = mmap(NULL, length, prot, flags, fd, offset);
    return p == MAP_FAILED ? -(long)errno : (long)(uintptr_t)p;
}

static long pyvmm_munmap(uintptr_t addr, size_t length)
{
    return munmap((void *)addr, length) ? -(long)errno : 0;
}

static long pyvmm_madvise(uintptr_t addr, size_t length, int advice)
{
    return madvise((void *)addr, length, advice) ? -(long)errno : 0;
}

static int pyvmm_getcpu(void)
{
    return sched_getcpu();
}
"""

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("pyvmm.vmm._sys", SOURCE, extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
