"""cffi builder for pyvmm._native (the C boot helper, callable in-process).

The cdef is the part of bootbench.h between the cdef markers, so the header is the
single description of the C API.
"""

import os

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def header_cdef() -> str:
    with open(os.path.join(HERE, "bootbench.h")) as f:
        text = f.read()
    start = text.index("/* cdef-begin */") + len("/* cdef-begin */")
    end = text.index("/* cdef-end */")
    return text[start:end]


ffibuilder = cffi.FFI()
ffibuilder.cdef(header_cdef())
ffibuilder.set_source(
    "pyvmm._native",
    '#include "bootbench.h"',
    sources=[os.path.relpath(os.path.join(HERE, "bootbench.c"), ROOT)],
    include_dirs=[HERE, os.path.join(ROOT, "guests")],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
