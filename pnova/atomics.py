"""Atomic operations on shared memory, for state several processes change at once.

Python has no atomics of its own, and a plain ``+=`` on a shared numpy array
loses updates between processes.  This module calls GCC's libatomic
(``libatomic.so.1``, part of every Debian system with gcc's runtime) through
cffi's ABI mode: no compiler is needed at install time, and one call costs a
few hundred nanoseconds.  All operations are sequentially consistent.
"""
from __future__ import annotations

import mmap

from cffi import FFI

_ffi = FFI()
_ffi.cdef("""
uint32_t __atomic_load_4(void *p, int mo);
void __atomic_store_4(void *p, uint32_t v, int mo);
_Bool __atomic_compare_exchange_4(void *p, void *expected, uint32_t desired,
                                  _Bool weak, int success, int failure);
uint32_t __atomic_fetch_add_4(void *p, uint32_t v, int mo);
uint64_t __atomic_load_8(void *p, int mo);
void __atomic_store_8(void *p, uint64_t v, int mo);
_Bool __atomic_compare_exchange_8(void *p, void *expected, uint64_t desired,
                                  _Bool weak, int success, int failure);
uint64_t __atomic_fetch_add_8(void *p, uint64_t v, int mo);
""")
try:
    _lib = _ffi.dlopen("libatomic.so.1")
except OSError as e:  # pragma: no cover - present wherever gcc's runtime is
    raise ImportError(f"pnova needs libatomic.so.1 (Debian package libatomic1): {e}") from None

# Looked up by string: inside a class body ``_lib.__atomic_...`` would be name-mangled.
_FUNCS = tuple(getattr(_lib, f"__atomic_{op}_{n}")
               for n in (4, 8) for op in ("load", "store", "compare_exchange", "fetch_add"))
_SEQ_CST = 5
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


class SharedWords:
    """Atomic 32- and 64-bit operations at byte offsets of one shared mapping.

    Offsets must be naturally aligned (4 for 32-bit words, 8 for 64-bit).
    """

    def __init__(self, mm: mmap.mmap) -> None:
        self._mm = mm
        self._base = _ffi.from_buffer(mm)
        self._u32 = _ffi.new("uint32_t *")
        self._u64 = _ffi.new("uint64_t *")
        # Bound library functions: one attribute lookup less per call.
        (self._load4, self._store4, self._cas4, self._add4,
         self._load8, self._store8, self._cas8, self._add8) = _FUNCS

    def release(self) -> None:
        """Drop the pointer into the mapping (so that it can be closed)."""
        _ffi.release(self._base)
        self._base = None

    def load32(self, off: int) -> int:
        return self._load4(self._base + off, _SEQ_CST)

    def store32(self, off: int, v: int) -> None:
        self._store4(self._base + off, v & _M32, _SEQ_CST)

    def cas32(self, off: int, expected: int, desired: int) -> bool:
        """Set the word to ``desired`` if it holds ``expected``; True if it did."""
        e = self._u32
        e[0] = expected
        return self._cas4(self._base + off, e, desired & _M32, False, _SEQ_CST, _SEQ_CST)

    def add32(self, off: int, delta: int) -> int:
        """Add (wrapping; negative deltas subtract); return the old value."""
        return self._add4(self._base + off, delta & _M32, _SEQ_CST)

    def load64(self, off: int) -> int:
        return self._load8(self._base + off, _SEQ_CST)

    def store64(self, off: int, v: int) -> None:
        self._store8(self._base + off, v & _M64, _SEQ_CST)

    def cas64(self, off: int, expected: int, desired: int) -> bool:
        e = self._u64
        e[0] = expected
        return self._cas8(self._base + off, e, desired & _M64, False, _SEQ_CST, _SEQ_CST)

    def add64(self, off: int, delta: int) -> int:
        return self._add8(self._base + off, delta & _M64, _SEQ_CST)
