"""The compiled part of pnova; everything else is declared in pyproject.toml.

The extensions keep to CPython's stable ABI (3.11 and later), so one build
loads on any later Python: a build made here runs on a machine whose Python
differs, where no compiler or headers may be at hand.
"""
from setuptools import Extension, setup

LIMITED = {"py_limited_api": True, "define_macros": [("Py_LIMITED_API", "0x030B0000")]}

setup(ext_modules=[
    # Atomics on the shared area (pnova/atomics.py): one GCC builtin per call.
    Extension("pnova._atomic", sources=["pnova/_atomic.c"], extra_compile_args=["-O2"],
              **LIMITED),
    # Strip checksums and parity of data blocks (pnova/protect.py).
    Extension("pnova._protect", sources=["pnova/_protect.c"], extra_compile_args=["-O2"],
              **LIMITED),
    # clwb / sfence for an image mapped with MAP_SYNC (pnova/pmem.py).
    Extension("pnova._persist", sources=["pnova/_persist.c"], extra_compile_args=["-O2"],
              **LIMITED),
    # io_uring for FUSE requests taken on the caller's CPU (pnova/fuse_session.py).
    Extension("pnova._uring", sources=["pnova/_uring.c"], extra_compile_args=["-O2"],
              **LIMITED),
])
