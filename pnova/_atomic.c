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

/* The address of the naturally aligned word of `size` bytes at offset `o`. */
static inline void *
word_at(Words *self, PyObject *o, Py_ssize_t size)
{
    Py_ssize_t off = PyLong_AsSsize_t(o);
    if (off == -1 && PyErr_Occurred())
        return NULL;
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
static PyObject *
rdlock(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint32_t *p;
    uint64_t *r;
    uint64_t stop, clear;
    int i;
    if (check_args(n, 4, "rdlock") < 0 || !(p = writable_word_at(self, args[0], 4))
            || as_u64(args[1], &stop) < 0 || as_u64(args[2], &clear) < 0
            || !(r = writable_word_at(self, args[3], 8)))
        return NULL;
    for (i = 0; i < 8; i++) {
        uint32_t v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
        if (v & (uint32_t)stop)
            Py_RETURN_FALSE;
        if (__atomic_compare_exchange_n(p, &v, (v & ~(uint32_t)clear) + 1, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
            __atomic_store_n(r, (uint64_t)((char *)p - self->base) + 1, __ATOMIC_SEQ_CST);
            Py_RETURN_TRUE;
        }
    }
    Py_RETURN_FALSE;
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

/* fresh_mark(off, g, mask): set mask's bits for interval g; bits of another
   interval mean nothing now and are dropped. */
static PyObject *
fresh_mark(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *p;
    uint64_t g, mask, v, nv;
    if (check_args(n, 3, "fresh_mark") < 0 || !(p = writable_word_at(self, args[0], 8))
            || as_u64(args[1], &g) < 0 || as_u64(args[2], &mask) < 0)
        return NULL;
    v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    do {
        nv = g | ((v & ~LOW32) == g ? (v & LOW32) : 0) | mask;
    } while (!__atomic_compare_exchange_n(p, &v, nv, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    Py_RETURN_NONE;
}

/* fresh_take(off, g, mask) -> True if every bit of mask is set for interval g
   (decided on that first look); the bits are then cleared, unless a newer
   interval has reset the word meanwhile, which leaves nothing to clear. */
static PyObject *
fresh_take(Words *self, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *p;
    uint64_t g, mask, v;
    if (check_args(n, 3, "fresh_take") < 0 || !(p = writable_word_at(self, args[0], 8))
            || as_u64(args[1], &g) < 0 || as_u64(args[2], &mask) < 0)
        return NULL;
    v = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    if ((v & ~LOW32) != g || (v & mask) != mask)
        Py_RETURN_FALSE;
    while ((v & ~LOW32) == g &&
           !__atomic_compare_exchange_n(p, &v, v & ~mask, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
        ;                       /* v was reloaded by the failed exchange */
    Py_RETURN_TRUE;
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
    FAST(fresh_mark, "fresh_mark(off, g, mask): set mask in the fresh word at off for "
                     "interval g (high half), dropping another interval's bits"),
    FAST(fresh_take, "fresh_take(off, g, mask) -> True if mask is all set for interval g; "
                     "the bits are then cleared"),
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
