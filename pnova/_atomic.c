/*
 * pnova._atomic: sequentially consistent atomic operations on a shared mapping.
 *
 * The processes of a mount change lock words, counters and bitmap words in
 * one MAP_SHARED mapping at once, and Python has no atomics of its own.  Each
 * method here is one GCC __atomic builtin (a single locked instruction on
 * x86-64) behind a METH_FASTCALL entry point, so a call costs what any
 * Python method call costs.  The object keeps the mapping's buffer exported
 * until release(), and every offset is checked against its length and its
 * natural alignment: a bad offset is a ValueError, never a stray store.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *base;
    Py_ssize_t len;
    int held;
    int readonly;
} Words;

static int
words_init(Words *self, PyObject *args, PyObject *kwds)
{
    PyObject *obj;
    if (!PyArg_ParseTuple(args, "O", &obj))
        return -1;
    if (self->held) {
        PyBuffer_Release(&self->view);
        self->held = 0;
    }
    /* A read-only mapping (fsck -n, a read-only mount) still needs whole-word
       loads; stores, CAS and adds on it are refused. */
    self->readonly = 0;
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_BufferError) && !PyErr_ExceptionMatches(PyExc_TypeError))
            return -1;
        PyErr_Clear();
        if (PyObject_GetBuffer(obj, &self->view, PyBUF_SIMPLE) < 0)
            return -1;
        self->readonly = 1;
    }
    self->held = 1;
    self->base = (char *)self->view.buf;
    self->len = self->view.len;
    return 0;
}

static void
words_dealloc(Words *self)
{
    if (self->held)
        PyBuffer_Release(&self->view);
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free((PyObject *)self);
    Py_DECREF(tp);          /* heap types are referenced by their instances */
}

/* The address of the naturally aligned word of `size` bytes at byte offset
   `off` (ValueError outside the mapping or misaligned). */
static inline void *
word_at_off(Words *self, Py_ssize_t off, Py_ssize_t size)
{
    if (!self->held) {
        PyErr_SetString(PyExc_ValueError, "the mapping was released");
        return NULL;
    }
    if (off < 0 || off > self->len - size || (off & (size - 1))) {
        PyErr_Format(PyExc_ValueError, "bad offset %zd for a %zd-byte word", off, size);
        return NULL;
    }
    return self->base + off;
}

/* The same, at the offset given by the Python int `o`. */
static inline void *
word_at(Words *self, PyObject *o, Py_ssize_t size)
{
    Py_ssize_t off = PyLong_AsSsize_t(o);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    return word_at_off(self, off, size);
}

/* A byte offset given as a Python int; -1 with an exception set if it is not one. */
static inline int
as_off(PyObject *o, Py_ssize_t *out)
{
    Py_ssize_t off = PyLong_AsSsize_t(o);
    if (off == -1 && PyErr_Occurred())
        return -1;
    *out = off;
    return 0;
}

/* The u64 at base + 8 * index, index being a count read from the mapping
   (checked before the arithmetic: a damaged count never wraps onto a valid
   offset). */
static inline uint64_t *
slot_at(Words *self, Py_ssize_t base, uint64_t index)
{
    if (base < 0 || base > self->len || index > (uint64_t)(self->len / 8)) {
        PyErr_Format(PyExc_ValueError, "slot %llu of the array at %zd is outside the mapping",
                     (unsigned long long)index, base);
        return NULL;
    }
    return word_at_off(self, base + 8 * (Py_ssize_t)index, 8);
}

static int
check_args(Py_ssize_t n, Py_ssize_t want, const char *name)
{
    if (n != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, want, n);
        return -1;
    }
    return 0;
}

/* A word that is about to be changed: refused on a read-only mapping. */
static inline void *
writable_word_at(Words *self, PyObject *o, Py_ssize_t size)
{
    if (self->readonly) {
        PyErr_SetString(PyExc_ValueError, "the mapping is read-only");
        return NULL;
    }
    return word_at(self, o, size);
}

/* Values wrap: a negative delta subtracts, as the Python API promises. */
static inline int
as_u64(PyObject *v, uint64_t *out)
{
    uint64_t x = PyLong_AsUnsignedLongLongMask(v);
    if (x == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    *out = x;
    return 0;
}

#define LOAD(NAME, T, SIZE)                                                     \
static PyObject *                                                               \
NAME(Words *self, PyObject *const *args, Py_ssize_t n)                          \
{                                                                               \
    T *p;                                                                       \
    if (check_args(n, 1, #NAME) < 0 || !(p = word_at(self, args[0], SIZE)))     \
        return NULL;                                                            \
    return PyLong_FromUnsignedLongLong(__atomic_load_n(p, __ATOMIC_SEQ_CST));  \
}

#define STORE(NAME, T, SIZE)                                                    \
static PyObject *                                                               \
NAME(Words *self, PyObject *const *args, Py_ssize_t n)                          \
{                                                                               \
    T *p;                                                                       \
    uint64_t v;                                                                 \
    if (check_args(n, 2, #NAME) < 0 || !(p = writable_word_at(self, args[0], SIZE)) \
        || as_u64(args[1], &v) < 0)                                             \
        return NULL;                                                            \
    __atomic_store_n(p, (T)v, __ATOMIC_SEQ_CST);                                \
    Py_RETURN_NONE;                                                             \
}

#define CAS(NAME, T, SIZE)                                                      \
static PyObject *                                                               \
NAME(Words *self, PyObject *const *args, Py_ssize_t n)                          \
{                                                                               \
    T *p;                                                                       \
    uint64_t e, d;                                                              \
    T expected;                                                                 \
    if (check_args(n, 3, #NAME) < 0 || !(p = writable_word_at(self, args[0], SIZE)) \
        || as_u64(args[1], &e) < 0 || as_u64(args[2], &d) < 0)                  \
        return NULL;                                                            \
    expected = (T)e;                                                            \
    return PyBool_FromLong(__atomic_compare_exchange_n(                        \
        p, &expected, (T)d, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));           \
}

#define ADD(NAME, T, SIZE)                                                      \
static PyObject *                                                               \
NAME(Words *self, PyObject *const *args, Py_ssize_t n)                          \
{                                                                               \
    T *p;                                                                       \
    uint64_t v;                                                                 \
    if (check_args(n, 2, #NAME) < 0 || !(p = writable_word_at(self, args[0], SIZE)) \
        || as_u64(args[1], &v) < 0)                                             \
        return NULL;                                                            \
    return PyLong_FromUnsignedLongLong(                                         \
        __atomic_fetch_add(p, (T)v, __ATOMIC_SEQ_CST));                         \
}

LOAD(load32, uint32_t, 4)
STORE(store32, uint32_t, 4)
CAS(cas32, uint32_t, 4)
ADD(add32, uint32_t, 4)
LOAD(load64, uint64_t, 8)
STORE(store64, uint64_t, 8)
CAS(cas64, uint64_t, 8)
ADD(add64, uint64_t, 8)

/* load64s(off, count, stride): the u64 words at off, off + stride, ...,
   each loaded whole and in that order (a struct unpack reads byte by byte,
   so a word another process is storing could come back half old, half new). */
static PyObject *
load64s(Words *self, PyObject *const *args, Py_ssize_t n)
{
    Py_ssize_t count, stride, i;
    PyObject *out;
    char *first;
    if (check_args(n, 3, "load64s") < 0 || !(first = word_at(self, args[0], 8)))
        return NULL;
    count = PyLong_AsSsize_t(args[1]);
    stride = PyLong_AsSsize_t(args[2]);
    if ((count == -1 || stride == -1) && PyErr_Occurred())
        return NULL;
    if (count < 0 || stride <= 0 || (stride & 7) ||
            (count && (first - self->base) + (count - 1) * stride > self->len - 8)) {
        PyErr_SetString(PyExc_ValueError, "load64s: bad count or stride");
        return NULL;
    }
    out = PyTuple_New(count);
    if (out == NULL)
        return NULL;
    for (i = 0; i < count; i++) {
        uint64_t v = __atomic_load_n((uint64_t *)(first + i * stride), __ATOMIC_SEQ_CST);
        PyObject *x = PyLong_FromUnsignedLongLong(v);
        if (x == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        if (PyTuple_SetItem(out, i, x) < 0) {   /* steals x */
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

/* rdlock(off, stop, clear, rec) -> True if it took a reader's share of the
   reader/writer word (u32) at off and recorded it: up to eight tries, each a
   load and a compare-and-swap of v to (v & ~clear) + 1; a try that finds a
   bit of `stop` set in v fails at once (a writer holds or wants the word).
   The share is recorded by storing off + 1 in the u64 at rec right after the
   compare-and-swap, so that a process dying between the two (which leaves a
   share nobody can reap) has a window of two instructions, not of a Python
   call.  The tries are what pnova.locks.Semaphores made in Python, one call
   instead of a dozen on every namespace operation of a shared directory. */
static inline int
take_share(Words *self, uint32_t *p, uint64_t *r, uint32_t stop, uint32_t clear)
{
    for (int i = 0; i < 8; i++) {
        uint32_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
        if (v & stop)
            return 0;
        if (__atomic_compare_exchange_n(p, &v, (v & ~clear) + 1, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            __atomic_store_n(r, (uint64_t)((char *)p - self->base) + 1, __ATOMIC_SEQ_CST);
            return 1;
        }
    }
    return 0;
}

static PyObject *
rdlock(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint32_t *p;
    uint64_t *r;
    uint64_t stop, clear;
    if (check_args(n, 4, "rdlock") < 0 || !(p = writable_word_at(self, args[0], 4))
            || as_u64(args[1], &stop) < 0 || as_u64(args[2], &clear) < 0
            || !(r = writable_word_at(self, args[3], 8)))
        return NULL;
    return PyBool_FromLong(take_share(self, p, r, (uint32_t)stop, (uint32_t)clear));
}

/* rw_pair(roff, woff, rec, stop, mine) -> 0, 1 or 2: a reader's share of the
   word at roff as rdlock(roff, stop, 0, rec) takes it (0 if it does not:
   nothing taken), then the writer word at woff moved from 0 or the writer
   wanted bit (0x40000000) to mine (2 if it was, 1 if not: the share stays
   held).  The two locks of a namespace operation on one name in a shared
   directory, in their order, in one call. */
static PyObject *
rw_pair(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint32_t *p, *q;
    uint64_t *r;
    uint64_t stop, mine;
    int got;
    if (check_args(n, 5, "rw_pair") < 0 || !(p = writable_word_at(self, args[0], 4))
            || !(q = writable_word_at(self, args[1], 4))
            || !(r = writable_word_at(self, args[2], 8))
            || as_u64(args[3], &stop) < 0 || as_u64(args[4], &mine) < 0)
        return NULL;
    got = take_share(self, p, r, (uint32_t)stop, 0);
    if (got) {
        uint32_t v = __atomic_load_n(q, __ATOMIC_SEQ_CST);
        if ((v == 0 || v == 0x40000000u) &&
                __atomic_compare_exchange_n(q, &v, (uint32_t)mine, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
            got = 2;
    }
    return PyLong_FromLong(got);
}

/* bump_unlock(voff, woff, by) -> old value: add by to the u64 at voff, then
   store 0 in the u32 at woff; a name's version (by 1) or a directory's epoch
   (by 2) counted before its lock is let go. */
static PyObject *
bump_unlock(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *v;
    uint32_t *p;
    uint64_t by;
    if (check_args(n, 3, "bump_unlock") < 0 || !(v = writable_word_at(self, args[0], 8))
            || !(p = writable_word_at(self, args[1], 4)) || as_u64(args[2], &by) < 0)
        return NULL;
    uint64_t old = __atomic_fetch_add(v, by, __ATOMIC_SEQ_CST);
    __atomic_store_n(p, 0, __ATOMIC_SEQ_CST);
    return PyLong_FromUnsignedLongLong(old);
}

/* versions_match(deaths_off, deaths, epoch_off, epoch, rewrites_off, rewrites,
   version_off, version) -> True if the u64 at deaths_off holds deaths, the u64
   at epoch_off epoch, the u32 at rewrites_off rewrites and the u64 at
   version_off version, loaded in that order (the first that differs ends the
   look): the shared words that say a process's cached directory is still
   exact for one name (pnova.namei), in one call. */
static PyObject *
versions_match(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *deaths, *epoch, *version;
    uint32_t *rewrites;
    uint64_t want[4];
    int i;
    if (check_args(n, 8, "versions_match") < 0 || !(deaths = word_at(self, args[0], 8))
            || !(epoch = word_at(self, args[2], 8)) || !(rewrites = word_at(self, args[4], 4))
            || !(version = word_at(self, args[6], 8)))
        return NULL;
    for (i = 0; i < 4; i++)
        if (as_u64(args[2 * i + 1], &want[i]) < 0)
            return NULL;
    return PyBool_FromLong(__atomic_load_n(deaths, __ATOMIC_SEQ_CST) == want[0]
                           && __atomic_load_n(epoch, __ATOMIC_SEQ_CST) == want[1]
                           && __atomic_load_n(rewrites, __ATOMIC_SEQ_CST) == (uint32_t)want[2]
                           && want[2] <= 0xFFFFFFFFull
                           && __atomic_load_n(version, __ATOMIC_SEQ_CST) == want[3]);
}

/* rdunlock(off, rec): drop the record at rec (store 0), then the share of the
   word at off (fetch-add of -1): a record never outlives its share, so a
   reaper never takes a share twice. */
static PyObject *
rdunlock(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint32_t *p;
    uint64_t *r;
    if (check_args(n, 2, "rdunlock") < 0 || !(p = writable_word_at(self, args[0], 4))
            || !(r = writable_word_at(self, args[1], 8)))
        return NULL;
    __atomic_store_n(r, 0, __ATOMIC_SEQ_CST);
    __atomic_fetch_sub(p, 1, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

/* The fresh words of a disk-backed image's allocator (pnova/alloc.py, DESIGN
   24.3): a u64 whose high half names a sync interval and whose low half marks
   the blocks allocated in it.  g is the interval already shifted into the high
   half.  Each call is the load and compare-and-swap loop that the allocator
   made in Python on every allocation and free of a disk-backed image. */
#define LOW32 0xFFFFFFFFull

/* Set mask's bits of the fresh word at p for interval g (high half); bits of
   another interval mean nothing now and are dropped. */
static inline void
fresh_set(uint64_t *p, uint64_t g, uint64_t mask)
{
    uint64_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST), nv;
    do {
        nv = g | ((v & ~LOW32) == g ? (v & LOW32) : 0) | mask;
    } while (!__atomic_compare_exchange_n(p, &v, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
}

/* Clear mask's bits of the fresh word at p if every one is set for interval
   g, decided on the first look: 1 if so (unless a newer interval has reset the
   word meanwhile, which leaves nothing to clear), 0 if not. */
static inline int
fresh_clear(uint64_t *p, uint64_t g, uint64_t mask)
{
    uint64_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    if ((v & ~LOW32) != g || (v & mask) != mask)
        return 0;
    while ((v & ~LOW32) == g &&
           !__atomic_compare_exchange_n(p, &v, v & ~mask, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
        ;                       /* v was reloaded by the failed exchange */
    return 1;
}

/* fresh_mark(off, g, mask): set mask's bits for interval g; bits of another
   interval mean nothing now and are dropped. */
static PyObject *
fresh_mark(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *p;
    uint64_t g, mask;
    if (check_args(n, 3, "fresh_mark") < 0 || !(p = writable_word_at(self, args[0], 8))
            || as_u64(args[1], &g) < 0 || as_u64(args[2], &mask) < 0)
        return NULL;
    fresh_set(p, g, mask);
    Py_RETURN_NONE;
}

/* fresh_take(off, g, mask) -> True if every bit of mask is set for interval g
   (decided on that first look); the bits are then cleared, unless a newer
   interval has reset the word meanwhile, which leaves nothing to clear. */
static PyObject *
fresh_take(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *p;
    uint64_t g, mask;
    if (check_args(n, 3, "fresh_take") < 0 || !(p = writable_word_at(self, args[0], 8))
            || as_u64(args[1], &g) < 0 || as_u64(args[2], &mask) < 0)
        return NULL;
    return PyBool_FromLong(fresh_clear(p, g, mask));
}

/* fresh_note(off, mask, started, synced, running): fresh_mark(off, g, mask)
   for the sync interval now running (g from the u64 at started), unless a sync
   runs: the u64 at synced differs from it, or the one at running is not 0.
   What the allocator does after each allocation on a disk-backed image, in
   one call. */
static PyObject *
fresh_note(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *p, *ps, *py, *pr;
    uint64_t mask, g;
    if (check_args(n, 5, "fresh_note") < 0 || !(p = writable_word_at(self, args[0], 8))
            || as_u64(args[1], &mask) < 0 || !(ps = word_at(self, args[2], 8))
            || !(py = word_at(self, args[3], 8)) || !(pr = word_at(self, args[4], 8)))
        return NULL;
    g = __atomic_load_n(ps, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(py, __ATOMIC_SEQ_CST) != g || __atomic_load_n(pr, __ATOMIC_SEQ_CST))
        Py_RETURN_NONE;
    g = (g & LOW32) << 32;
    fresh_set(p, g, mask);
    Py_RETURN_NONE;
}

/* A stack of u64 values with one owner (a CPU's stash of free blocks): the
   count at `count`, the values from `slots` on.  Plain atomic loads and
   stores suffice, as only the owner changes it; the count is stored after
   the slot, so another process reading it never sees a slot not yet written. */

/* Pop the top of the stack whose count is at pc and slots at `slots` into
   *out: 1 when popped, 0 when empty, -1 with an exception set. */
static inline int
stack_pop(Words *self, uint64_t *pc, Py_ssize_t slots, uint64_t *out)
{
    uint64_t *ps;
    uint64_t k = __atomic_load_n(pc, __ATOMIC_SEQ_CST);
    if (!k)
        return 0;
    if (!(ps = slot_at(self, slots, k - 1)))
        return -1;
    *out = __atomic_load_n(ps, __ATOMIC_SEQ_CST);
    __atomic_store_n(pc, k - 1, __ATOMIC_SEQ_CST);
    return 1;
}

/* Push v on that stack: 1 when pushed, 0 when it holds cap values already,
   -1 with an exception set.  The slot is stored before the count. */
static inline int
stack_push(Words *self, uint64_t *pc, Py_ssize_t slots, uint64_t cap, uint64_t v)
{
    uint64_t *ps;
    uint64_t k = __atomic_load_n(pc, __ATOMIC_SEQ_CST);
    if (k >= cap)
        return 0;
    if (!(ps = slot_at(self, slots, k)))
        return -1;
    __atomic_store_n(ps, v, __ATOMIC_SEQ_CST);
    __atomic_store_n(pc, k + 1, __ATOMIC_SEQ_CST);
    return 1;
}

/* stash_pop(count, slots) -> the value on top, removed; 0 if the stack is empty */
static PyObject *
stash_pop(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *pc;
    uint64_t v = 0;
    Py_ssize_t slots;
    int got;
    if (check_args(n, 2, "stash_pop") < 0 || !(pc = writable_word_at(self, args[0], 8))
            || as_off(args[1], &slots) < 0 || (got = stack_pop(self, pc, slots, &v)) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(got ? v : 0);
}

/* stash_push(count, slots, cap, v) -> False if the stack already holds cap values */
static PyObject *
stash_push(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *pc;
    uint64_t cap, v;
    Py_ssize_t slots;
    int got;
    if (check_args(n, 4, "stash_push") < 0 || !(pc = writable_word_at(self, args[0], 8))
            || as_off(args[1], &slots) < 0 || as_u64(args[2], &cap) < 0
            || as_u64(args[3], &v) < 0 || (got = stack_push(self, pc, slots, cap, v)) < 0)
        return NULL;
    return PyBool_FromLong(got);
}

/* The two commonest calls of a disk-backed image's allocator, each one call:
   a block of the process's own region taken from its stash and marked fresh,
   and one given back to the stash at once because it is still fresh.  `lo`
   and `hi` bound the region, `fresh` is its first fresh word (one per 32
   blocks), `bitmap` its first bitmap word (one per 64 blocks, a set bit per
   block in use). */

/* fresh_pop(count, slots, lo, hi, fresh, started, synced, running) -> a block
   popped from the stash (0: it is empty), marked fresh as fresh_note does
   when it lies in lo..hi-1 */
static PyObject *
fresh_pop(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *pc, *pst, *psy, *pr, *pw;
    uint64_t blk = 0, lo, hi, g;
    Py_ssize_t slots, fresh;
    int got;
    if (check_args(n, 8, "fresh_pop") < 0 || !(pc = writable_word_at(self, args[0], 8))
            || as_off(args[1], &slots) < 0 || as_u64(args[2], &lo) < 0
            || as_u64(args[3], &hi) < 0 || as_off(args[4], &fresh) < 0
            || !(pst = word_at(self, args[5], 8)) || !(psy = word_at(self, args[6], 8))
            || !(pr = word_at(self, args[7], 8)))
        return NULL;
    if ((got = stack_pop(self, pc, slots, &blk)) <= 0)
        return got < 0 ? NULL : PyLong_FromLong(0);
    if (lo <= blk && blk < hi) {
        if (!(pw = slot_at(self, fresh, (blk - lo) >> 5)))
            return NULL;
        g = __atomic_load_n(pst, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(psy, __ATOMIC_SEQ_CST) == g && !__atomic_load_n(pr, __ATOMIC_SEQ_CST)) {
            fresh_set(pw, (g & LOW32) << 32, 1ull << ((blk - lo) & 31));
        }
    }
    return PyLong_FromUnsignedLongLong(blk);
}

/* fresh_push(blk, lo, hi, fresh, started, bitmap, count, slots, cap) -> 0: the
   block is not fresh in the interval at started (nothing changed: the caller
   holds it back); 1: it was, its bit is cleared and it is pushed on the
   stash; 2: it was and its bit is cleared, but the stash is full (the caller
   frees it to the bitmap); 3: it was, but the bitmap says it is free already
   (a double free: the caller raises).  blk must lie in lo..hi-1. */
static PyObject *
fresh_push(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *pw, *pst, *pb, *pc;
    uint64_t blk, lo, hi, cap, b;
    Py_ssize_t fresh, bitmap, slots;
    int got;
    if (check_args(n, 9, "fresh_push") < 0 || as_u64(args[0], &blk) < 0
            || as_u64(args[1], &lo) < 0 || as_u64(args[2], &hi) < 0
            || as_off(args[3], &fresh) < 0 || !(pst = word_at(self, args[4], 8))
            || as_off(args[5], &bitmap) < 0 || !(pc = writable_word_at(self, args[6], 8))
            || as_off(args[7], &slots) < 0 || as_u64(args[8], &cap) < 0)
        return NULL;
    if (blk < lo || blk >= hi) {
        PyErr_SetString(PyExc_ValueError, "fresh_push: the block is not in the region");
        return NULL;
    }
    b = blk - lo;
    if (!(pw = slot_at(self, fresh, b >> 5)) || !(pb = slot_at(self, bitmap, b >> 6)))
        return NULL;
    if (!fresh_clear(pw, (__atomic_load_n(pst, __ATOMIC_SEQ_CST) & LOW32) << 32,
                     1ull << (b & 31)))
        return PyLong_FromLong(0);
    if (!(__atomic_load_n(pb, __ATOMIC_SEQ_CST) >> (b & 63) & 1))
        return PyLong_FromLong(3);
    if ((got = stack_push(self, pc, slots, cap, blk)) < 0)
        return NULL;
    return PyLong_FromLong(got ? 1 : 2);
}

/* held_due(head, tail, slots, nslots, rec, synced, durable) -> whether the
   oldest record of a ring of records (pnova/alloc.py's held lists: the head
   and tail counters at head and tail, nslots records of rec bytes from
   slots on, each a tag at +0 and a need at +24) is due: its tag is below the
   u64 at synced and its need at most the u64 at durable.  False when the
   ring is empty.  A hint, read without the ring's lock, as the allocator
   asks it before each allocation on a disk-backed image. */
static PyObject *
held_due(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *ph, *pt, *psy, *pdu, *ptag, *pneed;
    uint64_t h, nslots, rec;
    Py_ssize_t slots, at;
    if (check_args(n, 7, "held_due") < 0 || !(ph = word_at(self, args[0], 8))
            || !(pt = word_at(self, args[1], 8)) || as_off(args[2], &slots) < 0
            || as_u64(args[3], &nslots) < 0 || as_u64(args[4], &rec) < 0
            || !(psy = word_at(self, args[5], 8)) || !(pdu = word_at(self, args[6], 8)))
        return NULL;
    if (!nslots || !rec || slots < 0 || slots > self->len
            || nslots - 1 > (uint64_t)self->len / rec) {
        PyErr_SetString(PyExc_ValueError, "held_due: the ring does not fit in the mapping");
        return NULL;
    }
    h = __atomic_load_n(ph, __ATOMIC_SEQ_CST);
    if (h == __atomic_load_n(pt, __ATOMIC_SEQ_CST))
        Py_RETURN_FALSE;
    at = slots + (Py_ssize_t)((h % nslots) * rec);     /* both bounded above: no wrap */
    if (!(ptag = word_at_off(self, at, 8)) || !(pneed = word_at_off(self, at + 24, 8)))
        return NULL;
    if (__atomic_load_n(ptag, __ATOMIC_SEQ_CST) < __atomic_load_n(psy, __ATOMIC_SEQ_CST) &&
            __atomic_load_n(pneed, __ATOMIC_SEQ_CST) <= __atomic_load_n(pdu, __ATOMIC_SEQ_CST))
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyObject *
words_release(Words *self, PyObject *unused)
{
    if (self->held) {
        PyBuffer_Release(&self->view);
        self->held = 0;
        self->base = NULL;
        self->len = 0;
    }
    Py_RETURN_NONE;
}

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))name, METH_FASTCALL, doc}

static PyMethodDef words_methods[] = {
    FAST(load32, "load32(off) -> value of the u32 at off"),
    FAST(store32, "store32(off, v): store the u32"),
    FAST(cas32, "cas32(off, expected, desired) -> True if the u32 held expected"),
    FAST(add32, "add32(off, delta) -> old value (wrapping add)"),
    FAST(load64, "load64(off) -> value of the u64 at off"),
    FAST(store64, "store64(off, v): store the u64"),
    FAST(cas64, "cas64(off, expected, desired) -> True if the u64 held expected"),
    FAST(add64, "add64(off, delta) -> old value (wrapping add)"),
    FAST(load64s, "load64s(off, count, stride) -> tuple of count u64 words loaded whole, in order"),
    FAST(rdlock, "rdlock(off, stop, clear, rec) -> True if a reader's share of the u32 at off "
                 "was taken (none of stop set; clear dropped) and off + 1 stored at rec"),
    FAST(rdunlock, "rdunlock(off, rec): store 0 at rec, then subtract 1 from the u32 at off"),
    FAST(rw_pair, "rw_pair(roff, woff, rec, stop, mine) -> 0 nothing taken, 1 a reader's "
                  "share of roff (as rdlock), 2 that and the writer word woff "
                  "(0 or wanted -> mine)"),
    FAST(bump_unlock, "bump_unlock(voff, woff, by) -> old u64 at voff, by added; then the u32 "
                      "at woff stored 0"),
    FAST(versions_match, "versions_match(deaths_off, deaths, epoch_off, epoch, rewrites_off, "
                         "rewrites, version_off, version) -> True if each word (u64, u64, u32, "
                         "u64) holds its value, loaded in that order"),
    FAST(fresh_mark, "fresh_mark(off, g, mask): set mask in the fresh word at off for "
                     "interval g (high half), dropping another interval's bits"),
    FAST(fresh_take, "fresh_take(off, g, mask) -> True if mask is all set for interval g; "
                     "the bits are then cleared"),
    FAST(fresh_note, "fresh_note(off, mask, started, synced, running): fresh_mark(off, g, mask) "
                     "for the interval at started, unless synced differs or running is not 0"),
    FAST(stash_pop, "stash_pop(count, slots) -> top of a one-owner stack of u64, removed "
                    "(0: empty)"),
    FAST(stash_push, "stash_push(count, slots, cap, v) -> False if the stack holds cap values; "
                     "else v is pushed"),
    FAST(fresh_pop, "fresh_pop(count, slots, lo, hi, fresh, started, synced, running) -> a block "
                    "popped from a stash (0: empty), marked fresh if in lo..hi-1"),
    FAST(fresh_push, "fresh_push(blk, lo, hi, fresh, started, bitmap, count, slots, cap) -> 0 not "
                     "fresh, 1 taken and pushed, 2 taken and the stash full, 3 a double free"),
    FAST(held_due, "held_due(head, tail, slots, nslots, rec, synced, durable) -> True if the "
                   "oldest record of the ring has tag < [synced] and need <= [durable]"),
    {"release", (PyCFunction)words_release, METH_NOARGS,
     "release(): drop the mapping's buffer so that it can be closed"},
    {NULL, NULL, 0, NULL},
};

/* A heap type made from a spec, so that the module keeps to the stable ABI
   (Py_LIMITED_API 3.11): one build of it loads on any later CPython. */
static PyType_Slot words_slots[] = {
    {Py_tp_doc, "Words(buffer): atomic 32- and 64-bit words at byte offsets of a writable buffer"},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, (initproc)words_init},
    {Py_tp_dealloc, (destructor)words_dealloc},
    {Py_tp_methods, words_methods},
    {0, NULL},
};

static PyType_Spec words_spec = {
    .name = "pnova._atomic.Words",
    .basicsize = sizeof(Words),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .slots = words_slots,
};

static struct PyModuleDef atomic_module = {
    PyModuleDef_HEAD_INIT, "pnova._atomic",
    "Sequentially consistent atomics on a shared mapping (see pnova.atomics).", -1, NULL,
};

PyMODINIT_FUNC
PyInit__atomic(void)
{
    PyObject *m, *tp;
    m = PyModule_Create(&atomic_module);
    if (m == NULL)
        return NULL;
    tp = PyType_FromSpec(&words_spec);
    if (tp == NULL || PyModule_AddObject(m, "Words", tp) < 0) {
        Py_XDECREF(tp);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
