/*
 * pnova._protect: per-strip CRC32C checksums and parity of 4 KiB data blocks.
 *
 * A data block is eight 512-byte strips.  Its protection record is eight
 * CRC32C values (u32, little-endian: 32 bytes) and one parity strip, the XOR
 * of the eight (512 bytes); see docs/SPEC.md section 9.1.  Computing them in
 * Python costs more than the write they protect, so this helper does the
 * arithmetic; it only reads the buffers it is given and returns new bytes
 * objects: every store to the device still goes through the pmem layer.
 *
 * CRC32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and
 * final XOR 0xFFFFFFFF, as the crc32c package computes it) uses the SSE 4.2
 * instruction when the processor has it and a table otherwise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 4096
#define STRIP 512
#define STRIPS (BLOCK / STRIP)
#define CSUM_BYTES (4 * STRIPS)

static uint32_t table[8][256];
static int have_sse42;

static void
make_tables(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
        table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (uint32_t i = 0; i < 256; i++)
            table[t][i] = (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xFF];
}

static uint32_t
crc_table(const uint8_t *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        v ^= c;
        c = table[7][v & 0xFF] ^ table[6][(v >> 8) & 0xFF] ^ table[5][(v >> 16) & 0xFF]
            ^ table[4][(v >> 24) & 0xFF] ^ table[3][(v >> 32) & 0xFF]
            ^ table[2][(v >> 40) & 0xFF] ^ table[1][(v >> 48) & 0xFF] ^ table[0][v >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        c = (c >> 8) ^ table[0][(c ^ *p++) & 0xFF];
    return c ^ 0xFFFFFFFFu;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static uint32_t
crc_sse42(const uint8_t *p, size_t n)
{
    uint64_t c = 0xFFFFFFFFu;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32 ^ 0xFFFFFFFFu;
}
#endif

static inline uint32_t
crc32c(const uint8_t *p, size_t n)
{
#if defined(__x86_64__)
    if (have_sse42)
        return crc_sse42(p, n);
#endif
    return crc_table(p, n);
}

static inline void
put_u32(uint8_t *out, uint32_t v)
{
    out[0] = v & 0xFF;
    out[1] = (v >> 8) & 0xFF;
    out[2] = (v >> 16) & 0xFF;
    out[3] = v >> 24;
}

/* The eight strip checksums of one block, and (if `par` is not NULL) its parity.
 * The eight CRCs are independent chains, run side by side so that the CRC
 * instruction's latency overlaps (one chain alone waits on it every word). */
#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static void
block_sse42(const uint8_t *blk, uint8_t *sums, uint8_t *par)
{
    uint64_t c[STRIPS];
    uint64_t acc[STRIP / 8];
    for (int s = 0; s < STRIPS; s++)
        c[s] = 0xFFFFFFFFu;
    for (int i = 0; i < STRIP / 8; i++) {
        uint64_t x = 0;
        /* Unrolled, the eight chains live in registers and their CRC
         * instructions overlap; as a loop over c[] they do not (-O2 keeps the
         * loop), and sealing a block took twice as long. */
#pragma GCC unroll 8
        for (int s = 0; s < STRIPS; s++) {
            uint64_t v;
            memcpy(&v, blk + s * STRIP + 8 * i, 8);
            c[s] = __builtin_ia32_crc32di(c[s], v);
            x ^= v;
        }
        acc[i] = x;
    }
    for (int s = 0; s < STRIPS; s++)
        put_u32(sums + 4 * s, (uint32_t)c[s] ^ 0xFFFFFFFFu);
    if (par != NULL)
        memcpy(par, acc, STRIP);
}
#endif

static void
block_protect(const uint8_t *blk, uint8_t *sums, uint8_t *par)
{
#if defined(__x86_64__)
    if (have_sse42) {
        block_sse42(blk, sums, par);
        return;
    }
#endif
    uint64_t acc[STRIP / 8];
    memset(acc, 0, sizeof acc);
    for (int s = 0; s < STRIPS; s++) {
        const uint8_t *strip = blk + s * STRIP;
        put_u32(sums + 4 * s, crc_table(strip, STRIP));
        for (int i = 0; i < STRIP / 8; i++) {
            uint64_t v;
            memcpy(&v, strip + 8 * i, 8);
            acc[i] ^= v;
        }
    }
    if (par != NULL)
        memcpy(par, acc, STRIP);
}

/* The bytes of `nblocks` blocks at `offset` of a readable buffer, or NULL. */
static const uint8_t *
blocks_at(Py_buffer *view, PyObject *const *args, Py_ssize_t *nblocks);

/* The (buffer, offset, nblocks) arguments of checksums() and seal(): the
 * blocks' bytes, with `view` held (released by the caller), or NULL (an
 * exception set, nothing held). */
static const uint8_t *
blocks_arg(PyObject *const *args, Py_ssize_t nargs, const char *usage, Py_buffer *view,
           Py_ssize_t *nblocks)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], view, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *p = blocks_at(view, args, nblocks);
    if (p == NULL)
        PyBuffer_Release(view);
    return p;
}

static const uint8_t *
blocks_at(Py_buffer *view, PyObject *const *args, Py_ssize_t *nblocks)
{
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    *nblocks = PyLong_AsSsize_t(args[2]);
    if (*nblocks == -1 && PyErr_Occurred())
        return NULL;
    if (off < 0 || *nblocks < 0 || off > view->len - *nblocks * BLOCK) {
        PyErr_Format(PyExc_ValueError, "blocks %zd+%zd*4096 outside a buffer of %zd bytes",
                     off, *nblocks, view->len);
        return NULL;
    }
    return (const uint8_t *)view->buf + off;
}

/* checksums(buf, offset, nblocks) -> 32 bytes per block: the strips' CRC32C */
static PyObject *
checksums(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t n;
    const uint8_t *p = blocks_arg(args, nargs, "checksums(buffer, offset, nblocks)", &view, &n);
    if (p == NULL)
        return NULL;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * CSUM_BYTES);
    if (out != NULL) {
        uint8_t *o = (uint8_t *)PyBytes_AsString(out);
        for (Py_ssize_t b = 0; b < n; b++)
            block_protect(p + b * BLOCK, o + b * CSUM_BYTES, NULL);
    }
    PyBuffer_Release(&view);
    return out;
}

/* seal(buf, offset, nblocks) -> (checksums: 32 bytes per block, parity: 512 per block) */
static PyObject *
seal(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t n;
    const uint8_t *p = blocks_arg(args, nargs, "seal(buffer, offset, nblocks)", &view, &n);
    if (p == NULL)
        return NULL;
    PyObject *sums = PyBytes_FromStringAndSize(NULL, n * CSUM_BYTES);
    PyObject *par = PyBytes_FromStringAndSize(NULL, n * STRIP);
    if (sums == NULL || par == NULL) {
        Py_XDECREF(sums);
        Py_XDECREF(par);
        PyBuffer_Release(&view);
        return NULL;
    }
    uint8_t *o = (uint8_t *)PyBytes_AsString(sums);
    uint8_t *q = (uint8_t *)PyBytes_AsString(par);
    for (Py_ssize_t b = 0; b < n; b++)
        block_protect(p + b * BLOCK, o + b * CSUM_BYTES, q + b * STRIP);
    PyBuffer_Release(&view);
    return Py_BuildValue("(NN)", sums, par);
}

/* matches(buf, block_offset, record_offset) -> bool: the block's strips have the
 * checksums the record at record_offset holds (the read path's one call) */
static PyObject *
matches(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "matches(buffer, block_offset, record_offset)");
        return NULL;
    }
    Py_ssize_t boff = PyLong_AsSsize_t(args[1]);
    Py_ssize_t roff = PyLong_AsSsize_t(args[2]);
    if ((boff == -1 || roff == -1) && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (boff < 0 || roff < 0 || boff > view.len - BLOCK || roff > view.len - CSUM_BYTES) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "block or record outside the buffer");
        return NULL;
    }
    uint8_t sums[CSUM_BYTES];
    block_protect((const uint8_t *)view.buf + boff, sums, NULL);
    int same = memcmp(sums, (const uint8_t *)view.buf + roff, CSUM_BYTES) == 0;
    PyBuffer_Release(&view);
    return PyBool_FromLong(same);
}

/* good_run(buf, block_offset, nblocks, record_offset) -> int: how many of the
 * consecutive blocks from block_offset match their consecutive records from
 * record_offset before the first that does not (nblocks if all do): one call
 * checks a whole extent a read returns */
static PyObject *
good_run(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "good_run(buffer, block_offset, nblocks, record_offset)");
        return NULL;
    }
    Py_ssize_t boff = PyLong_AsSsize_t(args[1]);
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    Py_ssize_t roff = PyLong_AsSsize_t(args[3]);
    if ((boff == -1 || n == -1 || roff == -1) && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (boff < 0 || roff < 0 || n < 0 || boff > view.len - n * BLOCK
            || roff > view.len - n * CSUM_BYTES) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "blocks or records outside the buffer");
        return NULL;
    }
    const uint8_t *p = (const uint8_t *)view.buf;
    uint8_t sums[CSUM_BYTES];
    Py_ssize_t b;
    Py_BEGIN_ALLOW_THREADS
    for (b = 0; b < n; b++) {
        block_protect(p + boff + b * BLOCK, sums, NULL);
        if (memcmp(sums, p + roff + b * CSUM_BYTES, CSUM_BYTES) != 0)
            break;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(b);
}

/* crc32c(data) -> int: the CRC32C of a whole buffer (for strips being rebuilt) */
static PyObject *
crc(PyObject *module, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    uint32_t c = crc32c((const uint8_t *)view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

static PyMethodDef methods[] = {
    {"checksums", (PyCFunction)(void (*)(void))checksums, METH_FASTCALL,
     "checksums(buffer, offset, nblocks) -> bytes: eight CRC32C (u32 LE) per block"},
    {"seal", (PyCFunction)(void (*)(void))seal, METH_FASTCALL,
     "seal(buffer, offset, nblocks) -> (checksums, parity) of the blocks"},
    {"matches", (PyCFunction)(void (*)(void))matches, METH_FASTCALL,
     "matches(buffer, block_offset, record_offset) -> bool"},
    {"good_run", (PyCFunction)(void (*)(void))good_run, METH_FASTCALL,
     "good_run(buffer, block_offset, nblocks, record_offset) -> int: blocks that match"},
    {"crc32c", crc, METH_O, "crc32c(data) -> int"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef protect_module = {
    PyModuleDef_HEAD_INIT, "pnova._protect",
    "Strip checksums and parity of data blocks (see pnova.protect).", -1, methods,
};

PyMODINIT_FUNC
PyInit__protect(void)
{
    make_tables();
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
#endif
    return PyModule_Create(&protect_module);
}
