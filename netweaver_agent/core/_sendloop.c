/*
 * The pacing loop of netweaver_agent.core.pacing.pace, in C, for the
 * sender that holds its packets packed (netweaver_agent.core.sendloop):
 * the same wake-ups, batches and spacing, with the packets written by
 * sendto(2) and the waits in clock_nanosleep(2), the GIL released
 * throughout but for a gate written in Python, called before each batch.
 *
 * The gate may instead be a limiter applied here (limit_wait(), also
 * callable from Python): a host-wide spacing of probes, its one state
 * (the next free slot, CLOCK_MONOTONIC ns) updated by compare-and-swap,
 * so the windows of several threads share it without a lock.
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

/* Shortest spacing of two probes of nbytes under probes_per_s and
 * bytes_per_s (daemonlimits.DaemonLimits.min_step_ns). */
static int64_t
min_step_ns(int64_t nbytes, int64_t probes_per_s, int64_t bytes_per_s)
{
    int64_t by_count = (1000000000 + probes_per_s - 1) / probes_per_s;
    int64_t by_bytes = (nbytes * 1000000000 + bytes_per_s - 1) / bytes_per_s;
    return by_count > by_bytes ? by_count : by_bytes;
}

/* Take n slots of step ns from *next, no earlier than burst ns ago;
 * sleep until the last of them.  Without the GIL. */
static void
limit(int64_t *next, int64_t step, int64_t burst, Py_ssize_t n)
{
    int64_t now = now_ns(), cur, at, want;
    cur = __atomic_load_n(next, __ATOMIC_ACQUIRE);
    do {
        at = now - burst > cur ? now - burst : cur;
        want = at + (int64_t)n * step;
    } while (!__atomic_compare_exchange_n(next, &cur, want, 0,
                                          __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
    at += (int64_t)(n - 1) * step;
    if (at > now)
        sleep_until(at);
}

/* A limiter given as (state, probes_per_s, bytes_per_s, burst_ns), state
 * a writable buffer of one int64; 1, 0 if gate is no tuple, -1 with an
 * exception set.  On 1, view holds the state's buffer. */
static int
limiter_of(PyObject *gate, Py_buffer *view, long long *pps, long long *bps,
           long long *burst)
{
    PyObject *state;
    if (!PyTuple_Check(gate))
        return 0;
    if (!PyArg_ParseTuple(gate, "OLLL;limiter: (state, probes_per_s, "
                          "bytes_per_s, burst_ns)", &state, pps, bps, burst))
        return -1;
    if (*pps < 1 || *bps < 1 || *burst < 0) {
        PyErr_SetString(PyExc_ValueError, "limiter: rates must be >= 1 "
                        "and the burst >= 0");
        return -1;
    }
    if (PyObject_GetBuffer(state, view, PyBUF_WRITABLE) < 0)
        return -1;
    if (view->len != 8 || ((uintptr_t)view->buf & 7)) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "limiter: the state is one "
                        "aligned int64");
        return -1;
    }
    return 1;
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
    PyObject *gate;             /* None, a callable, or the limiter's */
    int64_t *limiter;           /* the limiter's state, or NULL */
    int64_t pps, bps, burst;
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
    for (k = 0; k < L->nbatch; k++) {
        Py_ssize_t i = L->batch[k];
        Py_ssize_t len = (Py_ssize_t)(L->bounds[i + 1] - L->bounds[i]);
        if (len > largest)
            largest = len;
    }
    if (L->limiter != NULL) {
        limit(L->limiter, min_step_ns(largest, L->pps, L->bps), L->burst,
              L->nbatch);
    } else if (L->gate != Py_None) {
        PyObject *r;
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
"gate); a tuple (state, probes_per_s, bytes_per_s, burst_ns) is a\n"
"limiter applied without Python (see limit_wait).  errors: the first\n"
"max_errors failed sends as (index, errno).\n"
"times: None, or a writable int64 buffer of n given when each packet's\n"
"batch was done.  dst_index is uint32, offsets and bounds int64\n"
"(bounds has n + 1 entries, non-decreasing, within data).");

static PyObject *
send_paced(PyObject *self, PyObject *args)
{
    PyObject *fds, *addrs, *gate, *times_obj, *result = NULL;
    Py_buffer views[5], vstate;
    Py_buffer *vidx = &views[0], *voff = &views[1], *vbnd = &views[2],
              *vdata = &views[3], *vtimes = &views[4];
    int held = 0, limited = 0;
    long long deadline, quantum, pps = 0, bps = 0, burst = 0;
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
    limited = limiter_of(gate, &vstate, &pps, &bps, &burst);
    if (limited < 0) {
        limited = 0;
        goto out;
    }
    if (!limited && gate != Py_None && !PyCallable_Check(gate)) {
        PyErr_SetString(PyExc_TypeError, "gate: expected a callable, a "
                        "limiter or None");
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
    if (limited) {
        L.limiter = (int64_t *)vstate.buf;
        L.pps = pps;
        L.bps = bps;
        L.burst = burst;
    }
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
    if (limited)
        PyBuffer_Release(&vstate);
    return result;
}

PyDoc_STRVAR(limit_wait_doc,
"limit_wait(limiter, nbytes, n)\n\n"
"Take n slots of probes of nbytes from limiter (state, probes_per_s,\n"
"bytes_per_s, burst_ns): each slot the shortest spacing the two rates\n"
"allow, from the state's next free slot but no earlier than burst_ns\n"
"ago; return when the last of them has come (sleeping without the\n"
"GIL).  The state (one int64, CLOCK_MONOTONIC ns) is updated by\n"
"compare-and-swap: send_paced's batches and these calls share it.");

static PyObject *
limit_wait(PyObject *self, PyObject *args)
{
    PyObject *gate;
    Py_buffer vstate;
    long long pps, bps, burst, nbytes;
    Py_ssize_t n;
    int64_t step;
    int limited;
    if (!PyArg_ParseTuple(args, "OLn", &gate, &nbytes, &n))
        return NULL;
    limited = limiter_of(gate, &vstate, &pps, &bps, &burst);
    if (limited <= 0) {
        if (limited == 0)
            PyErr_SetString(PyExc_TypeError, "limiter: expected (state, "
                            "probes_per_s, bytes_per_s, burst_ns)");
        return NULL;
    }
    if (nbytes < 0 || nbytes > (1 << 20) || n < 1) {
        PyBuffer_Release(&vstate);
        PyErr_SetString(PyExc_ValueError, "limit_wait: nbytes within 0..2**20, n >= 1");
        return NULL;
    }
    step = min_step_ns(nbytes, pps, bps);
    Py_BEGIN_ALLOW_THREADS
    limit((int64_t *)vstate.buf, step, burst, n);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&vstate);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"send_paced", send_paced, METH_VARARGS, send_paced_doc},
    {"limit_wait", limit_wait, METH_VARARGS, limit_wait_doc},
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
