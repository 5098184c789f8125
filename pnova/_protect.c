/*
 * pnova._protect: per-strip CRC32C checksums and parity of 4 KiB data blocks,
 * and the checks of a log page's entries (log_scan, at the end).
 *
 * A data block is eight 512-byte strips.  Its protection record is eight
 * CRC32C values (u32, little-endian: 32 bytes) and one parity strip, the XOR
 * of the eight (512 bytes); see docs/SPEC.md section 9.1.  Computing them in
 * Python costs more than the write they protect, so this helper does the
 * arithmetic.  It reads the buffers it is given and returns new bytes objects,
 * except seal_into, which the pmem layer calls to store a block's records into
 * the mapping it owns (every store to the device still goes through it).
 *
 * CRC32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and
 * final XOR 0xFFFFFFFF, as the crc32c package computes it) uses, by what the
 * processor has: carry-less multiplication of 512-bit vectors (VPCLMULQDQ with
 * AVX-512), the SSE 4.2 CRC instruction, or a table.  implementation() names
 * the one in use and use() selects another, so tests can check each.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define BLOCK 4096
#define STRIP 512
#define STRIPS (BLOCK / STRIP)
#define CSUM_BYTES (4 * STRIPS)

static uint32_t table[8][256];
static int have_sse42, have_vpclmul;
enum { IMPL_TABLE, IMPL_SSE42, IMPL_VPCLMUL };
static int impl = IMPL_TABLE;                   /* what block_protect uses */
static const char *const impl_names[] = {"table", "sse4.2", "vpclmulqdq"};

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

#if defined(__x86_64__)
/*
 * The same record by folding.  A strip's CRC is the remainder of its bits (as
 * a polynomial) times x^32 modulo P, and multiplying by a power of x commutes
 * with taking remainders, so a 128-bit piece of the strip can be moved d bits
 * further on by two carry-less products with x^(d+31) mod P and x^(d-33) mod P
 * (bit-reflected: the first byte holds the highest powers; the offsets, +31
 * and -33 rather than +32 and -32, absorb the one-bit shift that a product of
 * two reflected 64-bit values carries).  Each strip keeps four such pieces in
 * one 512-bit register and folds them 512 bits on per 64 bytes read; at the
 * strip's end the four are folded into the last one and the CRC instruction
 * finishes its 16 bytes.  The eight strips of a block are folded side by side
 * (the products' latency overlaps), and their XOR, the parity, comes out of
 * the same loads.
 */
static uint64_t fold_k[4][2];   /* (low, high) multipliers: 512 bits on, then 384, 256, 128 */

static uint32_t
xpow_mod(unsigned n)            /* x^n mod P, bit-reflected (bit i: x^(31-i)) */
{
    uint32_t v = 0x80000000u;
    while (n--)
        v = (v >> 1) ^ (0x82F63B78u & (0u - (v & 1)));
    return v;
}

static void
make_fold_constants(void)
{
    static const unsigned dist[4] = {512, 384, 256, 128};
    for (int i = 0; i < 4; i++) {
        fold_k[i][0] = xpow_mod(dist[i] + 31);
        fold_k[i][1] = xpow_mod(dist[i] - 33);
    }
}

#define VEC_TARGET __attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2")))

VEC_TARGET static inline __m128i
fold128(__m128i x, __m128i k, __m128i y)
{
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00),
                                       _mm_clmulepi64_si128(x, k, 0x11)), y);
}

VEC_TARGET static void
block_vpclmul(const uint8_t *blk, uint8_t *sums, uint8_t *par)
{
    const __m512i k = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)fold_k[0]));
    const __m128i k384 = _mm_loadu_si128((const __m128i *)fold_k[1]);
    const __m128i k256 = _mm_loadu_si128((const __m128i *)fold_k[2]);
    const __m128i k128 = _mm_loadu_si128((const __m128i *)fold_k[3]);
    /* the initial value 0xFFFFFFFF is the same as XORing the first 4 bytes */
    const __m512i init = _mm512_castsi128_si512(_mm_cvtsi32_si128(-1));
    __m512i acc[STRIPS];
    __m512i x = _mm512_setzero_si512();
    for (int s = 0; s < STRIPS; s++) {
        __m512i d = _mm512_loadu_si512((const void *)(blk + s * STRIP));
        acc[s] = _mm512_xor_si512(d, init);
        x = _mm512_xor_si512(x, d);
    }
    if (par != NULL)
        _mm512_storeu_si512((void *)par, x);
    for (int i = 1; i < STRIP / 64; i++) {
        x = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int s = 0; s < STRIPS; s++) {
            __m512i d = _mm512_loadu_si512((const void *)(blk + s * STRIP + 64 * i));
            acc[s] = _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(acc[s], k, 0x00),
                                               _mm512_clmulepi64_epi128(acc[s], k, 0x11),
                                               d, 0x96);          /* a ^ b ^ c */
            x = _mm512_xor_si512(x, d);
        }
        if (par != NULL)
            _mm512_storeu_si512((void *)(par + 64 * i), x);
    }
    for (int s = 0; s < STRIPS; s++) {
        __m128i l0 = _mm512_extracti32x4_epi32(acc[s], 0);
        __m128i l1 = _mm512_extracti32x4_epi32(acc[s], 1);
        __m128i l2 = _mm512_extracti32x4_epi32(acc[s], 2);
        __m128i l3 = _mm512_extracti32x4_epi32(acc[s], 3);
        __m128i v = fold128(l0, k384, fold128(l1, k256, fold128(l2, k128, l3)));
        uint64_t c = __builtin_ia32_crc32di(0, (uint64_t)_mm_cvtsi128_si64(v));
        c = __builtin_ia32_crc32di(c, (uint64_t)_mm_extract_epi64(v, 1));
        put_u32(sums + 4 * s, (uint32_t)c ^ 0xFFFFFFFFu);
    }
}
#endif

static void
block_protect(const uint8_t *blk, uint8_t *sums, uint8_t *par)
{
#if defined(__x86_64__)
    if (impl == IMPL_VPCLMUL) {
        block_vpclmul(blk, sums, par);
        return;
    }
    if (impl == IMPL_SSE42) {
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
    /* (divided, not multiplied: a huge count must not wrap around) */
    if (off < 0 || *nblocks < 0 || off > view->len || *nblocks > (view->len - off) / BLOCK) {
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

static int
overlaps(Py_ssize_t a, Py_ssize_t alen, Py_ssize_t b, Py_ssize_t blen)
{
    return alen > 0 && blen > 0 && a < b + blen && b < a + alen;
}

/* seal_into(buf, offset, nblocks, sums, sums2, parity) -> int: seal() writing into
 * the writable buffer itself: the checksums at byte `sums` (and again at
 * `sums2` unless it is -1), the parity at byte `parity` (unless -1); returns
 * the CRC32C of the checksums (the extent's data digest).  For the pmem layer,
 * which owns the buffer: the records need no copy through Python objects. */
static PyObject *
seal_into(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "seal_into(buffer, offset, nblocks, sums, sums2, parity)");
        return NULL;
    }
    Py_ssize_t at[3];
    for (int i = 0; i < 3; i++) {
        at[i] = PyLong_AsSsize_t(args[3 + i]);
        if (at[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    Py_ssize_t n;
    const uint8_t *p = blocks_at(&view, args, &n);
    if (p == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    /* (n blocks fit in the buffer, so these products cannot wrap) */
    Py_ssize_t need[3] = {n * CSUM_BYTES, n * CSUM_BYTES, n * STRIP};
    Py_ssize_t data = p - (const uint8_t *)view.buf;
    for (int i = 0; i < 3; i++) {
        if (at[i] < -1 || (i == 0 && at[i] < 0) || at[i] > view.len - need[i]) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_ValueError, "a record outside the buffer");
            return NULL;
        }
        /* a record kept inside the blocks it describes, or over another record */
        int bad = at[i] >= 0 && overlaps(at[i], need[i], data, n * BLOCK);
        for (int j = 0; j < i; j++)
            bad |= at[i] >= 0 && at[j] >= 0 && overlaps(at[i], need[i], at[j], need[j]);
        if (bad) {
            PyBuffer_Release(&view);
            PyErr_SetString(PyExc_ValueError, "records overlap each other or the blocks");
            return NULL;
        }
    }
    uint8_t *base = (uint8_t *)view.buf;
    uint8_t *sums = base + at[0];
    uint8_t *par = at[2] >= 0 ? base + at[2] : NULL;
    for (Py_ssize_t b = 0; b < n; b++)
        block_protect(p + b * BLOCK, sums + b * CSUM_BYTES, par ? par + b * STRIP : NULL);
    if (at[1] >= 0)
        memcpy(base + at[1], sums, (size_t)need[0]);
    uint32_t digest = crc32c(sums, (size_t)need[0]);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(digest);
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

static inline uint64_t
le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static inline uint32_t
le32(const uint8_t *p)
{
    return p[0] | (p[1] << 8) | (p[2] << 16) | ((uint32_t)p[3] << 24);
}

#define U64(off) PyLong_FromUnsignedLongLong(le64(e + (off)))
#define U32(off) PyLong_FromUnsignedLong(le32(e + (off)))
#define U8(off) PyLong_FromLong(e[off])
#define PAD8(n) (((n) + 7) & ~(Py_ssize_t)7)

/* The tuple layout.decode_entry makes of a whole entry whose CRC is good
 * (the same fields, in the same order, of the same types: SPEC section 7),
 * or NULL with no exception set when it would raise ValueError there (a
 * size that is not its type's, a name length, an operation or an entry type
 * it does not know): the walk then decodes that entry itself, and so raises
 * as before.  NULL with an exception: out of memory. */
static PyObject *
decode_one(const uint8_t *e, Py_ssize_t size)
{
    uint8_t type = e[0], flags = e[1];
    switch (type) {
    case 1:                                     /* E_WRITE */
        if (size != 64)
            return NULL;
        return Py_BuildValue("(iNNNNNN)", 1, U64(8), U64(16), U32(24), U64(32), U64(40),
                             U64(48));
    case 2:                                     /* E_SETATTR */
        if (size != 64)
            return NULL;
        return Py_BuildValue("(iNNNNNNNNN)", 2, U64(8), U32(16), U32(20), U32(24), U32(28),
                             U64(32), U64(40), U64(48), U64(56));
    case 3:                                     /* E_LINK */
        if (size != 32)
            return NULL;
        return Py_BuildValue("(iNNN)", 3, U64(8), U64(16), U64(24));
    case 4: {                                   /* E_DENTRY */
        if (size < 48)
            return NULL;
        Py_ssize_t nlen = e[32], base = PAD8(40 + nlen);
        uint8_t op = e[34];
        if (nlen < 1 || (op != 1 && op != 2) ||
                size != base + ((flags & 0x40) && size > base ? 8 : 0))
            return NULL;
        return Py_BuildValue("(iNNy#NNN)", 4, U64(8), U8(34), (const char *)e + 40, nlen,
                             U64(16), U8(33), U64(24));
    }
    case 5: {                                   /* E_XATTR */
        if (size < 40)
            return NULL;
        Py_ssize_t nlen = e[24], vlen = e[26] | (e[27] << 8);
        uint8_t op = e[25];
        if (nlen < 1 || PAD8(32 + nlen + vlen) != size || (op != 1 && op != 2))
            return NULL;
        return Py_BuildValue("(iNNy#y#N)", 5, U64(8), U8(25), (const char *)e + 32, nlen,
                             (const char *)e + 32 + nlen, vlen, U64(16));
    }
    }
    return NULL;
}

/* log_scan(buffer, pos, lim[, decode]) -> (list, pos): the log entries that
 * lie one after another from pos, each whole before lim and matching its
 * CRC32C (taken over the entry with its crc field, bytes 4..7, as zero; see
 * docs/SPEC.md section 7), copied out, or with decode true each decoded as
 * layout.decode_entry does; the scan stops at lim, at a next-page marker
 * (type 6, 8 bytes), at the first entry that does not read, or, decoding, at
 * the first one decode_entry would refuse, and returns where it stopped.
 * What a log walk does for every entry of a page, in one call; the walk
 * itself looks at whatever stopped the scan. */
static PyObject *
log_scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer view;
    Py_ssize_t pos, lim;
    uint8_t copy[BLOCK];
    if (nargs != 3 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "log_scan(buffer, pos, lim[, decode])");
        return NULL;
    }
    int decode = nargs == 4 ? PyObject_IsTrue(args[3]) : 0;
    if (decode < 0)
        return NULL;
    pos = PyLong_AsSsize_t(args[1]);
    lim = PyLong_AsSsize_t(args[2]);
    if ((pos == -1 || lim == -1) && PyErr_Occurred())
        return NULL;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        goto fail;
    if (pos < 0 || lim > view.len || (pos & 7)) {
        PyErr_SetString(PyExc_ValueError, "log_scan: positions outside the buffer");
        goto fail;
    }
    const uint8_t *base = (const uint8_t *)view.buf;
    while (pos + 8 <= lim) {
        const uint8_t *e = base + pos;
        Py_ssize_t size = e[2] | (e[3] << 8);
        uint32_t want = e[4] | (e[5] << 8) | (e[6] << 16) | ((uint32_t)e[7] << 24);
        if ((e[0] == 6 && size == 8) || size < 8 || (size & 7) || size > lim - pos
                || size > BLOCK)
            break;
        memcpy(copy, e, (size_t)size);
        memset(copy + 4, 0, 4);
        if (crc32c(copy, (size_t)size) != want)
            break;
        PyObject *raw;
        if (decode) {
            raw = decode_one(e, size);
            if (raw == NULL) {
                if (PyErr_Occurred())
                    goto fail;
                break;                          /* the walk decodes it, and raises */
            }
        } else
            raw = PyBytes_FromStringAndSize((const char *)e, size);
        if (raw == NULL || PyList_Append(out, raw) < 0) {
            Py_XDECREF(raw);
            goto fail;
        }
        Py_DECREF(raw);
        pos += size;
    }
    PyBuffer_Release(&view);
    PyObject *res = Py_BuildValue("(Nn)", out, pos);
    return res;
fail:
    Py_XDECREF(out);
    PyBuffer_Release(&view);
    return NULL;
}

/* implementation() -> str: how block records are computed here */
static PyObject *
implementation(PyObject *module, PyObject *unused)
{
    return PyUnicode_FromString(impl_names[impl]);
}

/* implementations() -> list of str: those this processor can run, fastest first */
static PyObject *
implementations(PyObject *module, PyObject *unused)
{
    if (have_vpclmul)
        return Py_BuildValue("[sss]", impl_names[2], impl_names[1], impl_names[0]);
    if (have_sse42)
        return Py_BuildValue("[ss]", impl_names[1], impl_names[0]);
    return Py_BuildValue("[s]", impl_names[0]);
}

/* use(name) -> str: compute block records with `name` from now on; returns the
 * previous one (ValueError if this processor cannot run it) */
static PyObject *
use(PyObject *module, PyObject *arg)
{
    const char *name = PyUnicode_AsUTF8AndSize(arg, NULL);
    if (name == NULL)
        return NULL;
    int avail[3] = {1, have_sse42, have_vpclmul};
    for (int i = 0; i < 3; i++) {
        if (strcmp(name, impl_names[i]) == 0 && avail[i]) {
            int old = impl;
            impl = i;
            return PyUnicode_FromString(impl_names[old]);
        }
    }
    PyErr_Format(PyExc_ValueError, "%s: not an implementation this processor runs", name);
    return NULL;
}

static PyMethodDef methods[] = {
    {"checksums", (PyCFunction)(void (*)(void))checksums, METH_FASTCALL,
     "checksums(buffer, offset, nblocks) -> bytes: eight CRC32C (u32 LE) per block"},
    {"seal", (PyCFunction)(void (*)(void))seal, METH_FASTCALL,
     "seal(buffer, offset, nblocks) -> (checksums, parity) of the blocks"},
    {"seal_into", (PyCFunction)(void (*)(void))seal_into, METH_FASTCALL,
     "seal_into(buffer, offset, nblocks, sums, sums2, parity) -> int: records written "
     "into the buffer; returns the checksums' CRC32C"},
    {"matches", (PyCFunction)(void (*)(void))matches, METH_FASTCALL,
     "matches(buffer, block_offset, record_offset) -> bool"},
    {"good_run", (PyCFunction)(void (*)(void))good_run, METH_FASTCALL,
     "good_run(buffer, block_offset, nblocks, record_offset) -> int: blocks that match"},
    {"crc32c", crc, METH_O, "crc32c(data) -> int"},
    {"log_scan", (PyCFunction)(void (*)(void))log_scan, METH_FASTCALL,
     "log_scan(buffer, pos, lim[, decode]) -> (entries, pos): the whole entries with "
     "good CRCs from pos on, up to lim or a next-page marker, raw or decoded"},
    {"implementation", implementation, METH_NOARGS, "implementation() -> str: the one in use"},
    {"implementations", implementations, METH_NOARGS,
     "implementations() -> list: those this processor runs, fastest first"},
    {"use", use, METH_O, "use(name) -> str: select an implementation; returns the previous"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef protect_module = {
    PyModuleDef_HEAD_INIT, "pnova._protect",
    "Strip checksums and parity of data blocks (see pnova.protect), and the checks of "
    "a log page's entries (see pnova.log).", -1, methods,
};

PyMODINIT_FUNC
PyInit__protect(void)
{
    make_tables();
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
    /* (the AVX-512 check includes the operating system's saving of its registers) */
    have_vpclmul = have_sse42 && __builtin_cpu_supports("avx512f")
        && __builtin_cpu_supports("vpclmulqdq") && __builtin_cpu_supports("pclmul");
    make_fold_constants();
    impl = have_vpclmul ? IMPL_VPCLMUL : have_sse42 ? IMPL_SSE42 : IMPL_TABLE;
#endif
    PyObject *m = PyModule_Create(&protect_module);
    if (m != NULL && (PyModule_AddIntConstant(m, "CSUM_BYTES", CSUM_BYTES) < 0
                      || PyModule_AddIntConstant(m, "STRIP_BYTES", STRIP) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
