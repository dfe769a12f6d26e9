"""cffi builder for pyvmm.vmm._abi: the ABI's C declarations (pyvmm/vmm/_cdef.py) compiled ahead
of time in out-of-line ABI mode, so `import pyvmm` parses no C (pycparser is not even
imported). ABI mode needs no C compiler and no kernel headers: the layouts are the
project's own, checked by tests/test_abi.py against the system header and the documented
sizes."""

import os
import runpy

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
decls = runpy.run_path(os.path.join(HERE, "..", "pyvmm", "vmm", "_cdef.py"))

ffibuilder = cffi.FFI()
ffibuilder.cdef(decls["CDEF"])
ffibuilder.cdef(decls["LIBC_CDEF"])
ffibuilder.set_source("pyvmm.vmm._abi", None)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
