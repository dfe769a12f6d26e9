# Only what pyproject.toml cannot say: the cffi extension and the guest/helper build step.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from buildsteps import BuildPyWithGuests  # noqa: E402
from setuptools import setup  # noqa: E402

setup(cffi_modules=["csrc/build_native.py:ffibuilder", "csrc/build_abi.py:ffibuilder", "csrc/build_sys.py:ffibuilder"], cmdclass={"build_py": BuildPyWithGuests})
