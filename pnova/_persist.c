/*
 * pnova._persist: the cache-line write-back and the store fence of real
 * persistent memory.
 *
 * On an image mapped with MAP_SYNC (a file on a DAX filesystem, or a DAX
 * device), a store is durable once its cache line is written back and a fence
 * has ordered it: clwb per 64-byte line, then sfence.  That is the machine
 * model NOVA's crash argument is made in, and what pnova's pmem layer calls
 * flush and fence (docs/DESIGN.md sections 3 and 24).  Processors without
 * clwb get clflushopt, and without that clflush (which also evicts the line).
 * The helper only reads the buffer's address: it changes no byte.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

#define LINE 64

enum { WB_NONE, WB_CLFLUSH, WB_CLFLUSHOPT, WB_CLWB };
static int how = WB_NONE;
static const char *names[] = {"none", "clflush", "clflushopt", "clwb"};

#if defined(__x86_64__)
__attribute__((target("clwb")))
static void
wb_clwb(char *p, char *end)
{
    for (; p < end; p += LINE)
        _mm_clwb(p);
}

__attribute__((target("clflushopt")))
static void
wb_clflushopt(char *p, char *end)
{
    for (; p < end; p += LINE)
        _mm_clflushopt(p);
}

static void
wb_clflush(char *p, char *end)
{
    for (; p < end; p += LINE)
        _mm_clflush(p);
}
#endif

/* flush(buffer, offset, length) -> int: write back the lines covering the range;
 * returns how many lines */
static PyObject *
flush(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "flush(buffer, offset, length)");
        return NULL;
    }
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    if ((off == -1 || n == -1) && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (off < 0 || n < 0 || off > view.len - n) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "range outside the buffer");
        return NULL;
    }
    char *base = (char *)view.buf;
    uintptr_t lo = ((uintptr_t)(base + off)) & ~(uintptr_t)(LINE - 1);
    uintptr_t hi = (uintptr_t)(base + off + n);
    Py_ssize_t lines = n ? (Py_ssize_t)((hi - lo + LINE - 1) / LINE) : 0;
#if defined(__x86_64__)
    if (n) {
        if (how == WB_CLWB)
            wb_clwb((char *)lo, (char *)hi);
        else if (how == WB_CLFLUSHOPT)
            wb_clflushopt((char *)lo, (char *)hi);
        else if (how == WB_CLFLUSH)
            wb_clflush((char *)lo, (char *)hi);
    }
#endif
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(lines);
}

/* fence(): order every write-back before it (sfence) */
static PyObject *
fence(PyObject *module, PyObject *unused)
{
#if defined(__x86_64__)
    _mm_sfence();
#else
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"flush", (PyCFunction)(void (*)(void))flush, METH_FASTCALL,
     "flush(buffer, offset, length) -> lines written back"},
    {"fence", fence, METH_NOARGS, "fence(): sfence"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef persist_module = {
    PyModuleDef_HEAD_INIT, "pnova._persist",
    "Cache-line write-back and store fence for real persistent memory (see pnova.pmem).",
    -1, methods,
};

PyMODINIT_FUNC
PyInit__persist(void)
{
#if defined(__x86_64__)
    unsigned int a, b, c, d;
    how = WB_CLFLUSH;                        /* every x86-64 has it */
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
        if (b & (1u << 24))
            how = WB_CLWB;
        else if (b & (1u << 23))
            how = WB_CLFLUSHOPT;
    }
#endif
    PyObject *m = PyModule_Create(&persist_module);
    if (m != NULL && PyModule_AddStringConstant(m, "INSTRUCTION", names[how]) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
