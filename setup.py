"""The compiled part of pnova; everything else is declared in pyproject.toml."""
from setuptools import Extension, setup

setup(ext_modules=[
    # Atomics on the shared area (pnova/atomics.py): one GCC builtin per call.
    Extension("pnova._atomic", sources=["pnova/_atomic.c"], extra_compile_args=["-O2"]),
    # Strip checksums and parity of data blocks (pnova/protect.py).
    Extension("pnova._protect", sources=["pnova/_protect.c"], extra_compile_args=["-O2"]),
    # clwb / sfence for an image mapped with MAP_SYNC (pnova/pmem.py).
    Extension("pnova._persist", sources=["pnova/_persist.c"], extra_compile_args=["-O2"]),
])
