/*
 * The pacing loop of netweaver_agent.core.pacing.pace, in C, for the
 * sender that holds its packets packed (netweaver_agent.core.sendloop):
 * the same wake-ups, batches and spacing, with the packets written by
 * sendto(2) and the waits in clock_nanosleep(2), the GIL released
 * throughout but for the gate called before each batch.
 *
 * Optional: without it the sender paces in Python (pacing.pace);
 * tests/unit/test_sendloop.py holds both to the same rules.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

enum { IDLE = 0, PENDING = 1, DONE = 2 };

static int64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void
sleep_until(int64_t at)
{
    struct timespec ts;
    ts.tv_sec = at / 1000000000;
    ts.tv_nsec = at % 1000000000;
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) ==
           EINTR)
        ;
}

/* One destination: its socket, its address, and its last packet. */
typedef struct {
    int fd;
    const struct sockaddr *addr;
    socklen_t addrlen;
    int state;
    int64_t done;       /* when its last batch was done */
    int64_t offset;     /* its last packet's offset */
} dest_t;

typedef struct {
    dest_t *dests;
    const uint32_t *dst_index;
    const int64_t *offsets;
    const int64_t *bounds;
    const char *data;
    int64_t *times;             /* NULL, or when each packet's batch was done */
    Py_ssize_t *batch;
    Py_ssize_t nbatch;
    PyObject *gate;
    PyObject *errors;           /* list of (index, errno) */
    Py_ssize_t max_errors;
    Py_ssize_t sent, failed;
    PyThreadState *released;    /* the GIL is released while non-NULL */
} loop_t;

/* Send the batch; 0, or -1 with an exception set (the gate raised or an
 * error could not be kept). */
static int
flush(loop_t *L)
{
    Py_ssize_t k, largest = 0;
    int64_t done;
    if (L->gate != Py_None) {
        PyObject *r;
        for (k = 0; k < L->nbatch; k++) {
            Py_ssize_t i = L->batch[k];
            Py_ssize_t len = (Py_ssize_t)(L->bounds[i + 1] - L->bounds[i]);
            if (len > largest)
                largest = len;
        }
        PyEval_RestoreThread(L->released);
        L->released = NULL;
        r = PyObject_CallFunction(L->gate, "nn", largest, L->nbatch);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        L->released = PyEval_SaveThread();
    }
    for (k = 0; k < L->nbatch; k++) {
        Py_ssize_t i = L->batch[k];
        dest_t *d = &L->dests[L->dst_index[i]];
        ssize_t n;
        do {
            n = sendto(d->fd, L->data + L->bounds[i],
                       (size_t)(L->bounds[i + 1] - L->bounds[i]), 0,
                       d->addr, d->addrlen);
        } while (n < 0 && errno == EINTR);
        if (n >= 0) {
            L->sent++;
            continue;
        }
        L->failed++;
        if (PyList_GET_SIZE(L->errors) < L->max_errors) {
            int err = errno;
            PyObject *item;
            int bad;
            PyEval_RestoreThread(L->released);
            L->released = NULL;
            item = Py_BuildValue("ni", i, err);
            bad = item == NULL || PyList_Append(L->errors, item) < 0;
            Py_XDECREF(item);
            if (bad)
                return -1;
            L->released = PyEval_SaveThread();
        }
    }
    done = now_ns();
    for (k = 0; k < L->nbatch; k++) {
        Py_ssize_t i = L->batch[k];
        dest_t *d = &L->dests[L->dst_index[i]];
        d->state = DONE;
        d->done = done;
        if (L->times != NULL)
            L->times[i] = done;
    }
    L->nbatch = 0;
    return 0;
}

/* The loop of pacing.pace over packets 0..n-1; the packets sent up to
 * where it stopped, or -1 with an exception set. */
static Py_ssize_t
run(loop_t *L, Py_ssize_t n, int64_t deadline, int64_t quantum)
{
    int64_t start = now_ns(), now;
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        dest_t *d = &L->dests[L->dst_index[i]];
        int64_t offset = L->offsets[i];
        int64_t due = start + offset, earliest = due - quantum;
        if (d->state == PENDING && flush(L) < 0)
            return -1;      /* its previous packet waits in the batch */
        if (d->state == DONE) {
            int64_t spaced = d->done + (offset - d->offset);
            if (spaced > earliest)
                earliest = spaced;
        }
        now = now_ns();
        if (earliest > now && L->nbatch) {
            if (flush(L) < 0)
                return -1;
            now = now_ns();
        }
        if (earliest > now && due <= deadline) {
            /* On time (or as its destination's spacing says); what is due
             * within the quantum then goes without sleeping. */
            sleep_until(earliest > due ? earliest : due);
            now = now_ns();
        }
        if (due > deadline || now > deadline)
            break;
        d->state = PENDING;
        d->offset = offset;
        L->batch[L->nbatch++] = i;
    }
    if (L->nbatch && flush(L) < 0)
        return -1;
    return i;
}

/* Release every buffer in views[0..count-1]. */
static void
release_all(Py_buffer *views, int count)
{
    int k;
    for (k = 0; k < count; k++)
        PyBuffer_Release(&views[k]);
}

PyDoc_STRVAR(send_paced_doc,
"send_paced(fds, addrs, dst_index, offsets, bounds, data, deadline_ns,\n"
"           quantum_ns, gate, max_errors, times) -> (sent, failed,\n"
"                                                      errors, left)\n\n"
"Send packets i = 0..n-1 as pacing.pace does: packet i is\n"
"data[bounds[i]:bounds[i+1]], due offsets[i] ns after the call, to\n"
"destination dst_index[i], whose socket is fds[d] and whose address\n"
"is the packed sockaddr addrs[d].  Every wake-up sends what is due\n"
"within quantum_ns, never two packets to one destination in a batch,\n"
"never one closer to its destination's previous than their offsets\n"
"are apart (counted from when that batch was done); stops before a\n"
"packet due after deadline_ns (CLOCK_MONOTONIC) or when it passed.\n"
"gate(largest bytes, count) is called before each batch (None: no\n"
"gate).  errors: the first max_errors failed sends as (index, errno).\n"
"times: None, or a writable int64 buffer of n given when each packet's\n"
"batch was done.  dst_index is uint32, offsets and bounds int64\n"
"(bounds has n + 1 entries, non-decreasing, within data).");

static PyObject *
send_paced(PyObject *self, PyObject *args)
{
    PyObject *fds, *addrs, *gate, *times_obj, *result = NULL;
    Py_buffer views[5];
    Py_buffer *vidx = &views[0], *voff = &views[1], *vbnd = &views[2],
              *vdata = &views[3], *vtimes = &views[4];
    int held = 0;
    long long deadline, quantum;
    Py_ssize_t max_errors, n, ndst, i, stopped;
    loop_t L;
    memset(&L, 0, sizeof(L));

    if (!PyArg_ParseTuple(args, "O!O!y*y*y*y*LLOnO", &PyTuple_Type, &fds,
                          &PyTuple_Type, &addrs, vidx, voff, vbnd, vdata,
                          &deadline, &quantum, &gate, &max_errors,
                          &times_obj))
        return NULL;
    held = 4;
    ndst = PyTuple_GET_SIZE(fds);
    if (PyTuple_GET_SIZE(addrs) != ndst) {
        PyErr_Format(PyExc_ValueError, "%zd sockets but %zd addresses",
                     ndst, PyTuple_GET_SIZE(addrs));
        goto out;
    }
    if (vidx->len % 4 || voff->len % 8 || vbnd->len % 8) {
        PyErr_SetString(PyExc_ValueError,
                        "dst_index is uint32, offsets and bounds int64");
        goto out;
    }
    n = vidx->len / 4;
    if (voff->len / 8 != n || vbnd->len / 8 != n + 1) {
        PyErr_Format(PyExc_ValueError,
                     "%zd packets: offsets have %zd, bounds %zd (n + 1)",
                     n, voff->len / 8, vbnd->len / 8);
        goto out;
    }
    if (gate != Py_None && !PyCallable_Check(gate)) {
        PyErr_SetString(PyExc_TypeError, "gate: expected a callable or None");
        goto out;
    }
    if (times_obj != Py_None) {
        if (PyObject_GetBuffer(times_obj, vtimes, PyBUF_WRITABLE) < 0)
            goto out;
        held = 5;
        if (vtimes->len != n * 8) {
            PyErr_Format(PyExc_ValueError, "times: %zd bytes for %zd "
                         "packets (int64 each)", vtimes->len, n);
            goto out;
        }
        L.times = (int64_t *)vtimes->buf;
    }
    L.dst_index = (const uint32_t *)vidx->buf;
    L.offsets = (const int64_t *)voff->buf;
    L.bounds = (const int64_t *)vbnd->buf;
    L.data = (const char *)vdata->buf;
    if (L.bounds[0] < 0 || L.bounds[n] > vdata->len) {
        PyErr_SetString(PyExc_ValueError, "bounds: outside data");
        goto out;
    }
    for (i = 0; i < n; i++) {
        if (L.bounds[i + 1] < L.bounds[i]) {
            PyErr_Format(PyExc_ValueError, "bounds: packet %zd ends before "
                         "it starts", i);
            goto out;
        }
        if (L.dst_index[i] >= (uint32_t)ndst) {
            PyErr_Format(PyExc_ValueError, "packet %zd: destination %u of "
                         "%zd", i, (unsigned)L.dst_index[i], ndst);
            goto out;
        }
    }
    L.dests = PyMem_Calloc(ndst ? ndst : 1, sizeof(dest_t));
    L.batch = PyMem_Calloc(ndst ? ndst : 1, sizeof(Py_ssize_t));
    L.errors = PyList_New(0);
    if (L.dests == NULL || L.batch == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    if (L.errors == NULL)
        goto out;
    for (i = 0; i < ndst; i++) {
        PyObject *fd = PyTuple_GET_ITEM(fds, i);
        PyObject *addr = PyTuple_GET_ITEM(addrs, i);
        long v = PyLong_AsLong(fd);
        if (v == -1 && PyErr_Occurred())
            goto out;
        if (!PyBytes_Check(addr) ||
                PyBytes_GET_SIZE(addr) < (Py_ssize_t)sizeof(sa_family_t)) {
            PyErr_Format(PyExc_ValueError, "destination %zd: expected a "
                         "packed sockaddr", i);
            goto out;
        }
        L.dests[i].fd = (int)v;
        L.dests[i].addr = (const struct sockaddr *)PyBytes_AS_STRING(addr);
        L.dests[i].addrlen = (socklen_t)PyBytes_GET_SIZE(addr);
    }
    L.gate = gate;
    L.max_errors = max_errors;
    /* fds and addrs (and the bytes in them) are held by the caller's
     * tuples for the whole call. */
    L.released = PyEval_SaveThread();
    stopped = run(&L, n, (int64_t)deadline, (int64_t)quantum);
    if (L.released != NULL)
        PyEval_RestoreThread(L.released);
    if (stopped < 0)
        goto out;
    result = Py_BuildValue("nnOn", L.sent, L.failed, L.errors,
                           n - L.sent - L.failed);
out:
    Py_XDECREF(L.errors);
    PyMem_Free(L.dests);
    PyMem_Free(L.batch);
    release_all(views, held);
    return result;
}

static PyMethodDef methods[] = {
    {"send_paced", send_paced, METH_VARARGS, send_paced_doc},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sendloop",
    "The pacing loop of the packed sender, in C.",
    -1, methods
};

PyMODINIT_FUNC
PyInit__sendloop(void)
{
    return PyModule_Create(&module);
}
