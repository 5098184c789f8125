/*
 * pnova._uring: the few io_uring calls a serving process needs to take FUSE
 * requests from its own CPU's queue (FUSE over io_uring, Linux 6.14 and later).
 *
 * A Ring is one io_uring instance of the calling process, set up with 128-byte
 * submission entries (the FUSE commands carry their arguments in the second
 * half) and with its completion work run only when the process asks for
 * completions (DEFER_TASKRUN: the kernel copies a request into the process's
 * buffers then, in its own context, on its own CPU).  Python queues commands
 * with cmd() and poll(); enter() submits everything queued and, if asked,
 * waits for at least one completion, with the interpreter's lock released,
 * and returns the completions as (user_data, result) pairs.
 *
 * The buffers the kernel reads and writes are the caller's: it passes their
 * addresses and keeps them alive for as long as the ring uses them.
 * docs/DESIGN.md section 22.8 says how the request loop uses this.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/io_uring.h>

/* Values from Linux 6.1's <linux/io_uring.h>, for older headers (the kernel
 * that runs it decides whether they work, not the headers it was built with). */
#ifndef IORING_SETUP_SQE128
#define IORING_SETUP_SQE128 (1U << 10)
#endif
#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif
#define OP_POLL_ADD 6
#define OP_URING_CMD 46

#define SQE_SIZE 128

/* A 128-byte submission entry, laid out here rather than taken from the
 * headers, whose older versions lack cmd_op and the command area. */
struct sqe128 {
    uint8_t opcode;
    uint8_t flags;
    uint16_t ioprio;
    int32_t fd;
    uint32_t cmd_op;             /* (the file offset's low half for other ops) */
    uint32_t pad1;
    uint64_t addr;
    uint32_t len;
    uint32_t op_flags;           /* poll32_events for a poll */
    uint64_t user_data;
    uint8_t rest[8];
    uint8_t cmd[SQE_SIZE - 48];  /* a command's own arguments */
};
_Static_assert(sizeof(struct sqe128) == SQE_SIZE, "submission entry is 128 bytes");

typedef struct {
    PyObject_HEAD
    int fd;
    unsigned sq_entries, cq_entries;
    void *rings;                 /* submission and completion rings (one mapping) */
    size_t rings_size;
    unsigned char *sqes;         /* the submission entries, SQE_SIZE bytes each */
    size_t sqes_size;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
    unsigned queued;             /* entries written since the last enter */
} Ring;

static int
ring_setup(Ring *r, unsigned entries, unsigned flags)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    p.flags = flags;
    int fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (fd < 0)
        return -errno;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP)) {
        close(fd);
        return -ENOSYS;
    }
    size_t sq = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    size_t size = sq > cq ? sq : cq;
    void *rings = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       fd, IORING_OFF_SQ_RING);
    if (rings == MAP_FAILED) {
        int e = errno;
        close(fd);
        return -e;
    }
    size_t sqes_size = (size_t)p.sq_entries * SQE_SIZE;
    void *sqes = mmap(NULL, sqes_size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      fd, IORING_OFF_SQES);
    if (sqes == MAP_FAILED) {
        int e = errno;
        munmap(rings, size);
        close(fd);
        return -e;
    }
    char *b = rings;
    r->fd = fd;
    r->sq_entries = p.sq_entries;
    r->cq_entries = p.cq_entries;
    r->rings = rings;
    r->rings_size = size;
    r->sqes = sqes;
    r->sqes_size = sqes_size;
    r->sq_head = (unsigned *)(b + p.sq_off.head);
    r->sq_tail = (unsigned *)(b + p.sq_off.tail);
    r->sq_mask = (unsigned *)(b + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(b + p.sq_off.array);
    r->cq_head = (unsigned *)(b + p.cq_off.head);
    r->cq_tail = (unsigned *)(b + p.cq_off.tail);
    r->cq_mask = (unsigned *)(b + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(b + p.cq_off.cqes);
    r->queued = 0;
    return 0;
}

static void
ring_release(Ring *r)
{
    if (r->fd < 0)
        return;
    munmap(r->sqes, r->sqes_size);
    munmap(r->rings, r->rings_size);
    close(r->fd);
    r->fd = -1;
}

static int
do_enter(Ring *r, unsigned submit, unsigned wait)
{
    unsigned flags = wait ? IORING_ENTER_GETEVENTS : 0;
    int n;
    Py_BEGIN_ALLOW_THREADS
    n = (int)syscall(__NR_io_uring_enter, r->fd, submit, wait, flags, NULL, 0);
    Py_END_ALLOW_THREADS
    return n < 0 ? -errno : n;
}

/* The next free submission entry, zeroed; NULL with an exception set when the
 * queue is full and cannot be submitted. */
static struct sqe128 *
next_sqe(Ring *r)
{
    if (r->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the ring is closed");
        return NULL;
    }
    unsigned tail = *r->sq_tail;
    unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (tail - head >= r->sq_entries) {
        int n = do_enter(r, r->queued, 0);
        if (n < 0) {
            errno = -n;
            PyErr_SetFromErrno(PyExc_OSError);
            return NULL;
        }
        r->queued -= (unsigned)n;
        head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
        if (tail - head >= r->sq_entries) {
            PyErr_SetString(PyExc_OSError, "io_uring submission queue full");
            return NULL;
        }
    }
    unsigned idx = tail & *r->sq_mask;
    struct sqe128 *sqe = (struct sqe128 *)(r->sqes + (size_t)idx * SQE_SIZE);
    memset(sqe, 0, SQE_SIZE);
    r->sq_array[idx] = idx;
    return sqe;
}

/* The next submission entry, zeroed and filled with what every operation
 * here has (opcode, descriptor, user data); NULL with an exception set. */
static struct sqe128 *
start_sqe(Ring *r, uint8_t opcode, int fd, unsigned long long user_data)
{
    struct sqe128 *sqe = next_sqe(r);
    if (sqe != NULL) {
        sqe->opcode = opcode;
        sqe->fd = fd;
        sqe->user_data = user_data;
    }
    return sqe;
}

static void
publish(Ring *r)
{
    __atomic_store_n(r->sq_tail, *r->sq_tail + 1, __ATOMIC_RELEASE);
    r->queued++;
}

static PyObject *
Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    unsigned entries = 64;
    int defer = 1;
    static char *kwlist[] = {"entries", "defer", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|Ip", kwlist, &entries, &defer))
        return NULL;
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    Ring *r = (Ring *)alloc(type, 0);
    if (r == NULL)
        return NULL;
    r->fd = -1;
    unsigned flags = IORING_SETUP_SQE128;
    if (defer)
        flags |= IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    int err = ring_setup(r, entries, flags);
    if (err < 0) {
        Py_DECREF(r);
        errno = -err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return (PyObject *)r;
}

static void
Ring_dealloc(PyObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    ring_release((Ring *)self);
    freefunc tp_free = (freefunc)PyType_GetSlot(type, Py_tp_free);
    tp_free(self);
    Py_DECREF(type);
}

/* cmd(fd, cmd_op, payload: bytes (up to 80), addr, length, user_data): queue an
 * IORING_OP_URING_CMD for the file ``fd``; ``payload`` goes to the entry's
 * command area, ``addr`` / ``length`` to its address and length fields. */
static PyObject *
Ring_cmd(PyObject *self, PyObject *args)
{
    Ring *r = (Ring *)self;
    int fd;
    unsigned cmd_op, length;
    const char *payload;
    Py_ssize_t plen;
    unsigned long long addr, user_data;
    if (!PyArg_ParseTuple(args, "iIy#KIK", &fd, &cmd_op, &payload, &plen, &addr, &length,
                          &user_data))
        return NULL;
    if (plen > SQE_SIZE - 48) {
        PyErr_SetString(PyExc_ValueError, "command payload longer than 80 bytes");
        return NULL;
    }
    struct sqe128 *sqe = start_sqe(r, OP_URING_CMD, fd, user_data);
    if (sqe == NULL)
        return NULL;
    sqe->cmd_op = cmd_op;
    sqe->addr = addr;
    sqe->len = length;
    memcpy(sqe->cmd, payload, (size_t)plen);
    publish(r);
    Py_RETURN_NONE;
}

/* poll(fd, events, user_data): queue a one-shot IORING_OP_POLL_ADD. */
static PyObject *
Ring_poll(PyObject *self, PyObject *args)
{
    Ring *r = (Ring *)self;
    int fd;
    unsigned events;
    unsigned long long user_data;
    if (!PyArg_ParseTuple(args, "iIK", &fd, &events, &user_data))
        return NULL;
    struct sqe128 *sqe = start_sqe(r, OP_POLL_ADD, fd, user_data);
    if (sqe == NULL)
        return NULL;
    sqe->op_flags = events;
    publish(r);
    Py_RETURN_NONE;
}

/* enter(wait: bool) -> list of (user_data, result): submit what is queued and
 * collect the completions there are; with ``wait``, block until one is there.
 * A signal that interrupts the wait runs its Python handler (which may raise)
 * and returns what has completed so far, possibly nothing. */
static PyObject *
Ring_enter(PyObject *self, PyObject *arg)
{
    Ring *r = (Ring *)self;
    int wait = PyObject_IsTrue(arg);
    if (wait < 0)
        return NULL;
    if (r->fd < 0) {
        PyErr_SetString(PyExc_ValueError, "the ring is closed");
        return NULL;
    }
    unsigned head = *r->cq_head;
    unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    /* completions already there: submit without waiting */
    int n = do_enter(r, r->queued, (wait && head == tail) ? 1 : 0);
    if (n >= 0) {
        r->queued -= (unsigned)n > r->queued ? r->queued : (unsigned)n;
    } else if (n == -EINTR) {
        if (PyErr_CheckSignals() < 0)
            return NULL;
    } else if (n != -EAGAIN && n != -EBUSY) {
        errno = -n;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    head = *r->cq_head;
    tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    while (head != tail) {
        struct io_uring_cqe *c = &r->cqes[head & *r->cq_mask];
        PyObject *t = Py_BuildValue("(Ki)", (unsigned long long)c->user_data, c->res);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
            return NULL;
        }
        Py_DECREF(t);
        head++;
    }
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    return out;
}

static PyObject *
Ring_close(PyObject *self, PyObject *unused)
{
    ring_release((Ring *)self);
    Py_RETURN_NONE;
}

static PyObject *
Ring_fileno(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(((Ring *)self)->fd);
}

static PyMethodDef Ring_methods[] = {
    {"cmd", Ring_cmd, METH_VARARGS, "Queue an IORING_OP_URING_CMD."},
    {"poll", Ring_poll, METH_VARARGS, "Queue a one-shot poll of a descriptor."},
    {"enter", Ring_enter, METH_O, "Submit what is queued; collect completions."},
    {"close", Ring_close, METH_NOARGS, "Release the ring (its commands are cancelled)."},
    {"fileno", Ring_fileno, METH_NOARGS, "The ring's descriptor (-1 once closed)."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Ring_slots[] = {
    {Py_tp_new, Ring_new},
    {Py_tp_dealloc, Ring_dealloc},
    {Py_tp_methods, Ring_methods},
    {Py_tp_doc, "Ring(entries=64, defer=True): one io_uring instance of this process."},
    {0, NULL},
};

static PyType_Spec Ring_spec = {
    "pnova._uring.Ring", sizeof(Ring), 0, Py_TPFLAGS_DEFAULT, Ring_slots,
};

static int
exec_module(PyObject *m)
{
    PyObject *t = PyType_FromSpec(&Ring_spec);
    if (t == NULL)
        return -1;
    if (PyModule_AddObject(m, "Ring", t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, exec_module}, {0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pnova._uring",
    "io_uring for FUSE requests taken on the caller's CPU (DESIGN 22.8).", 0, NULL,
    slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__uring(void)
{
    return PyModuleDef_Init(&module);
}
