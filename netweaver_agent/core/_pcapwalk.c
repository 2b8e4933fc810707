/*
 * The two loops of reading a capture that Python cannot do in columns:
 * walking record headers (each record's length says where the next one
 * starts) and copying each record's first bytes side by side.
 *
 * Optional: netweaver_agent.core.pcapwalk uses these when the extension
 * was built (setup.py, with a C compiler and Python's headers) and the
 * same loops in Python otherwise; tests/unit/test_pcapwalk.py holds both
 * to the same answers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define PREFETCH_AHEAD 4096

static uint32_t
u32(const unsigned char *p, int big)
{
    if (big)
        return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
               ((uint32_t)p[2] << 8) | (uint32_t)p[3];
    return ((uint32_t)p[3] << 24) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[1] << 8) | (uint32_t)p[0];
}

/* Append o to the list offsets; -1 with an exception set on failure. */
static int
append_offset(PyObject *offsets, Py_ssize_t o)
{
    PyObject *item = PyLong_FromSsize_t(o);
    int failed;
    if (item == NULL)
        return -1;
    failed = PyList_Append(offsets, item);
    Py_DECREF(item);
    return failed;
}

/* An empty list for a walk's offsets, or NULL (view released) with a
 * ValueError naming the walk when its bounds are not sound. */
static PyObject *
new_offsets(Py_buffer *view, int sound, const char *walk)
{
    PyObject *offsets;
    if (!sound) {
        PyErr_Format(PyExc_ValueError, "%s: bad bounds", walk);
        PyBuffer_Release(view);
        return NULL;
    }
    offsets = PyList_New(0);
    if (offsets == NULL)
        PyBuffer_Release(view);
    return offsets;
}

PyDoc_STRVAR(walk_pcap_doc,
"walk_pcap(buf, o, end, cap_at, big, pair, limit, count)\n"
"    -> (offsets, next, complete)\n\n"
"Up to count pcap record offsets from o: a record's 16-byte header holds\n"
"its capture length at cap_at (a 4-byte integer, big-endian if big; with\n"
"pair, the smaller of those at cap_at and cap_at + 4).  Stops before a\n"
"record whose header or data passes end or whose length exceeds limit.\n"
"next: the offset after the last record taken; complete: count taken.");

static PyObject *
walk_pcap(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t o, end, cap_at, limit, count, i, pf;
    int big, pair;
    PyObject *offsets;
    const unsigned char *b;

    if (!PyArg_ParseTuple(args, "y*nnnppnn", &view, &o, &end, &cap_at,
                          &big, &pair, &limit, &count))
        return NULL;
    offsets = new_offsets(&view, end <= view.len && o >= 0 && cap_at >= 0 &&
                          cap_at + (pair ? 8 : 4) <= 16 && count >= 0,
                          "walk_pcap");
    if (offsets == NULL)
        return NULL;
    b = (const unsigned char *)view.buf;
    pf = o;
    for (i = 0; i < count; i++) {
        uint32_t caplen, other;
        Py_ssize_t nxt;
        if (o + 16 > end)
            break;
        /* Each header is a cache miss the CPU cannot foresee (its place
         * is in the one before): stream the lines ahead in. */
        for (; pf < o + PREFETCH_AHEAD && pf < end; pf += 64)
            __builtin_prefetch(b + pf);
        caplen = u32(b + o + cap_at, big);
        if (pair) {
            other = u32(b + o + cap_at + 4, big);
            if (other < caplen)
                caplen = other;
        }
        nxt = o + 16 + (Py_ssize_t)caplen;
        if ((Py_ssize_t)caplen > limit || nxt > end)
            break;
        if (append_offset(offsets, o) < 0) {
            Py_DECREF(offsets);
            PyBuffer_Release(&view);
            return NULL;
        }
        o = nxt;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(NnO)", offsets, o, i == count ? Py_True : Py_False);
}

PyDoc_STRVAR(walk_epb_doc,
"walk_epb(buf, o, end, big, count) -> (offsets, next, iface_id)\n\n"
"Up to count offsets of sound pcapng enhanced packet blocks (type 6) of\n"
"one interface from o: the block's length a multiple of 4, within end,\n"
"holding its padded capture length and repeated in its trailer.  Stops\n"
"before any other block or another interface's.  iface_id: theirs (-1:\n"
"none taken).");

static PyObject *
walk_epb(PyObject *self, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t o, end, count, pf;
    int big;
    long long first = -1;
    PyObject *offsets;
    const unsigned char *b;

    if (!PyArg_ParseTuple(args, "y*nnpn", &view, &o, &end, &big, &count))
        return NULL;
    offsets = new_offsets(&view, end <= view.len && o >= 0 && count >= 0,
                          "walk_epb");
    if (offsets == NULL)
        return NULL;
    b = (const unsigned char *)view.buf;
    pf = o;
    while (PyList_GET_SIZE(offsets) < count && o + 32 <= end) {
        /* A block's header and trailer: stream the lines ahead in. */
        for (; pf < o + PREFETCH_AHEAD && pf < end; pf += 64)
            __builtin_prefetch(b + pf);
        uint32_t btype = u32(b + o, big), blen = u32(b + o + 4, big);
        uint32_t iface = u32(b + o + 8, big), caplen = u32(b + o + 20, big);
        Py_ssize_t nxt = o + (Py_ssize_t)blen;
        if (btype != 6 || blen % 4 || nxt > end || nxt < o + 32 ||
                32 + (((Py_ssize_t)caplen + 3) & ~(Py_ssize_t)3) >
                (Py_ssize_t)blen ||
                u32(b + nxt - 4, big) != blen)
            break;
        if (first >= 0 && (long long)iface != first)
            break;
        first = iface;
        if (append_offset(offsets, o) < 0) {
            Py_DECREF(offsets);
            PyBuffer_Release(&view);
            return NULL;
        }
        o = nxt;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(NnL)", offsets, o, first);
}

PyDoc_STRVAR(heads_doc,
"heads(buf, offsets, size) -> bytes\n\n"
"The first size bytes at each offset of buf, side by side; zero-padded\n"
"where buf ends first.");

static PyObject *
heads(PyObject *self, PyObject *args)
{
    Py_buffer view;
    PyObject *offsets, *seq, *out;
    Py_ssize_t size, n, i;
    char *dst;

    if (!PyArg_ParseTuple(args, "y*On", &view, &offsets, &size))
        return NULL;
    if (size < 0) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "heads: negative size");
        return NULL;
    }
    seq = PySequence_Fast(offsets, "heads: offsets must be a sequence");
    if (seq == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    n = PySequence_Fast_GET_SIZE(seq);
    out = PyBytes_FromStringAndSize(NULL, n * size);
    if (out == NULL)
        goto fail;
    dst = PyBytes_AS_STRING(out);
    for (i = 0; i < n; i++) {
        Py_ssize_t o = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i));
        Py_ssize_t have;
        if (o == -1 && PyErr_Occurred())
            goto fail;
        if (o < 0) {
            PyErr_SetString(PyExc_ValueError, "heads: negative offset");
            goto fail;
        }
        have = o >= view.len ? 0 : view.len - o;
        if (have > size)
            have = size;
        if (have > 0)
            memcpy(dst, (const char *)view.buf + o, have);
        memset(dst + have, 0, size - have);
        dst += size;
    }
    Py_DECREF(seq);
    PyBuffer_Release(&view);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    PyBuffer_Release(&view);
    return NULL;
}

PyDoc_STRVAR(select_doc,
"select(buf, start, stride, size, flags) -> bytes\n\n"
"The size bytes at start + i * stride of buf for every i whose byte in\n"
"flags is not 0, side by side; zero-padded where buf ends first.");

static PyObject *
select_items(PyObject *self, PyObject *args)
{
    Py_buffer view, fl;
    Py_ssize_t start, stride, size, i, kept = 0;
    const unsigned char *f;
    PyObject *out;
    char *dst;

    if (!PyArg_ParseTuple(args, "y*nnny*", &view, &start, &stride, &size,
                          &fl))
        return NULL;
    if (start < 0 || stride < 0 || size < 0) {
        PyBuffer_Release(&view);
        PyBuffer_Release(&fl);
        PyErr_SetString(PyExc_ValueError, "select: negative bounds");
        return NULL;
    }
    f = (const unsigned char *)fl.buf;
    for (i = 0; i < fl.len; i++)
        kept += f[i] != 0;
    out = PyBytes_FromStringAndSize(NULL, kept * size);
    if (out != NULL) {
        dst = PyBytes_AS_STRING(out);
        for (i = 0; i < fl.len; i++) {
            Py_ssize_t o, have;
            if (!f[i])
                continue;
            o = start + i * stride;
            have = o >= view.len ? 0 : view.len - o;
            if (have > size)
                have = size;
            if (have > 0)
                memcpy(dst, (const char *)view.buf + o, have);
            memset(dst + have, 0, size - have);
            dst += size;
        }
    }
    PyBuffer_Release(&view);
    PyBuffer_Release(&fl);
    return out;
}

static PyMethodDef methods[] = {
    {"select", select_items, METH_VARARGS, select_doc},
    {"walk_pcap", walk_pcap, METH_VARARGS, walk_pcap_doc},
    {"heads", heads, METH_VARARGS, heads_doc},
    {"walk_epb", walk_epb, METH_VARARGS, walk_epb_doc},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pcapwalk",
    "Record-header walks and head copies for the capture readers.",
    -1, methods
};

PyMODINIT_FUNC
PyInit__pcapwalk(void)
{
    return PyModule_Create(&module);
}
