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

/* ---- Probes read in place from a TPACKET_V3 ring (ring_take_doc). ---- */

/* struct tpacket_block_desc: num_pkts at 12, offset_to_first_pkt at 16.
 * struct tpacket3_hdr: tp_next_offset at 0, tp_sec 4, tp_nsec 8,
 * tp_snaplen 12, tp_status 20, tp_mac 24; then struct sockaddr_ll (at
 * 48): sll_ifindex at 52, sll_pkttype at 58.  Native byte order. */
#define TP3_NEED 68                 /* the header and the address */
#define TP_STATUS_USER 1
#define TP_STATUS_VLAN_VALID 0x10
/* Why ring_take stopped, when not at a block with an unknown ifindex. */
#define TAKE_IDLE (-1)
#define TAKE_SLOW (-2)
/* probe.py's tag after the 8-byte ICMP or UDP header: MAGIC, session (2),
 * seq (4), then the keyed tag (AUTH_LEN bytes).  Exported as constants:
 * a test holds them to probe's. */
static const unsigned char PROBE_MAGIC[4] = {'N', 'W', 'v', '1'};
#define PROBE_TAG_LEN 10
#define PROBE_AUTH_LEN 8
/* IP bytes of a tagged probe with its keyed tag (pcapkeys._AUTH_NEED). */
#define AUTH_NEED (20 + 8 + PROBE_TAG_LEN + PROBE_AUTH_LEN)
/* Bytes of a row in the scratch columns: key, auth, t_ns (8 each),
 * batch column (4), packet type (1). */
#define ROW_BYTES 29

static uint32_t
native32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static uint16_t
native16(const unsigned char *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static uint32_t
be16(const unsigned char *p)
{
    return ((uint32_t)p[0] << 8) | (uint32_t)p[1];
}

/* 1 with the key, session and auth of the frame q (caplen bytes) when it
 * is an untagged Ethernet + IPv4 (no options, not a later fragment) ICMP
 * echo or UDP probe, or an echo reply, holding all of its tag (the IP
 * total length 0 or long enough); else 0 (pcapkeys decides). */
static int
probe_row(const unsigned char *q, uint32_t caplen, uint32_t *session,
          uint64_t *key, uint64_t *auth)
{
    const unsigned char *ip = q + 14, *l4 = ip + 20;
    const unsigned char *tag = l4 + 8 + PROBE_TAG_LEN;
    uint32_t total, s, addr;
    uint64_t t = 0;
    int reply, j;

    if (caplen < 14 + AUTH_NEED)
        return 0;
    if (q[12] != 0x08 || q[13] != 0x00 || ip[0] != 0x45 ||
            (ip[6] & 0x1f) || ip[7])
        return 0;
    total = be16(ip + 2);
    if (total && total < AUTH_NEED)
        return 0;
    if (memcmp(l4 + 8, PROBE_MAGIC, 4))
        return 0;
    s = be16(l4 + 12);
    if (ip[9] == 1) {
        if (l4[0] == 8)
            reply = 0;
        else if (l4[0] == 0)
            reply = 1;
        else
            return 0;
        if (be16(l4 + 4) != s)
            return 0;
    } else if (ip[9] == 17) {
        if (be16(l4) != (0x8000 | (s & 0x7fff)))
            return 0;
        reply = 0;
    } else {
        return 0;
    }
    /* The answer's source, the probe's destination. */
    addr = u32(ip + (reply ? 12 : 16), 1);
    for (j = 0; j < PROBE_AUTH_LEN; j++)
        t = (t << 8) | tag[j];
    *session = s;
    *key = ((uint64_t)u32(l4 + 14, 1) << 1) | (uint64_t)reply;
    *auth = t ^ addr;
    return 1;
}

/* Growing columns of kept rows: 8-byte keys, auths and times, 4-byte
 * batch columns, packet type bytes. */
struct rows {
    Py_ssize_t n, room;
    unsigned char *keys, *auths, *times, *cols, *types;
};

static int
rows_room(struct rows *r, Py_ssize_t more)
{
    Py_ssize_t room;
    unsigned char *all;
    if (r->n + more <= r->room)
        return 0;
    room = r->room * 2;
    if (room < r->n + more)
        room = r->n + more;
    all = PyMem_Malloc(room * ROW_BYTES + 1);
    if (all == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    if (r->n) {
        memcpy(all, r->keys, 8 * r->n);
        memcpy(all + 8 * room, r->auths, 8 * r->n);
        memcpy(all + 16 * room, r->times, 8 * r->n);
        memcpy(all + 24 * room, r->cols, 4 * r->n);
        memcpy(all + 28 * room, r->types, r->n);
    }
    PyMem_Free(r->keys);
    r->keys = all;
    r->auths = all + 8 * room;
    r->times = all + 16 * room;
    r->cols = all + 24 * room;
    r->types = all + 28 * room;
    r->room = room;
    return 0;
}

#define WALK_KEPT 0
#define WALK_SLOW (-1)
#define WALK_UNKNOWN (-2)
#define WALK_ERROR (-3)

/* Keep the wanted rows of the block b (size bytes) in r: WALK_KEPT (its
 * packet count in *seen), WALK_UNKNOWN (the ifindex the table lacks in
 * *seen; r as it was), WALK_SLOW (r as it was) or WALK_ERROR (no
 * memory). */
static int
walk_block(const unsigned char *b, Py_ssize_t size, Py_ssize_t session,
           const unsigned char *tab, Py_ssize_t ntab, struct rows *r,
           Py_ssize_t *seen)
{
    Py_ssize_t count, h, i, pf, n0 = r->n;

    if (size < 24)
        return WALK_SLOW;
    count = (Py_ssize_t)native32(b + 12);
    /* Every packet takes its header and address at least. */
    if (count > size / TP3_NEED)
        return WALK_SLOW;
    if (rows_room(r, count) < 0)
        return WALK_ERROR;
    h = (Py_ssize_t)native32(b + 16);
    pf = h;
    for (i = 0; i < count; i++) {
        const unsigned char *p;
        int32_t ifindex, column;
        uint32_t nxt, snaplen, mac, sess;
        uint64_t key, auth, t_ns;

        if (h > size - TP3_NEED)
            goto slow;
        /* The kernel wrote the block from another CPU: stream the lines
         * ahead in (the hardware's prefetch stops at page ends). */
        for (; pf < h + PREFETCH_AHEAD && pf < size; pf += 64)
            __builtin_prefetch(b + pf);
        p = b + h;
        nxt = native32(p);
        memcpy(&ifindex, p + 52, 4);
        if (ifindex < 0)
            goto slow;
        if (ifindex >= ntab)
            goto unknown;
        memcpy(&column, tab + 4 * (Py_ssize_t)ifindex, 4);
        if (column < -1)
            goto unknown;
        if (column >= 0) {
            if (native32(p + 20) & TP_STATUS_VLAN_VALID)
                goto slow;
            snaplen = native32(p + 12);
            mac = native16(p + 24);
            if ((Py_ssize_t)mac > size - h ||
                    (Py_ssize_t)snaplen > size - h - (Py_ssize_t)mac)
                goto slow;
            if (!probe_row(p + mac, snaplen, &sess, &key, &auth) ||
                    (Py_ssize_t)sess != session)
                goto slow;
            t_ns = (uint64_t)native32(p + 4) * 1000000000u +
                native32(p + 8);
            memcpy(r->keys + 8 * r->n, &key, 8);
            memcpy(r->auths + 8 * r->n, &auth, 8);
            memcpy(r->times + 8 * r->n, &t_ns, 8);
            memcpy(r->cols + 4 * r->n, &column, 4);
            r->types[r->n] = p[58];
            r->n++;
        }
        if (i + 1 < count) {
            if (nxt == 0)
                goto slow;
            h += nxt;
        }
        continue;
unknown:
        r->n = n0;
        *seen = ifindex;
        return WALK_UNKNOWN;
    }
    *seen = count;
    return WALK_KEPT;
slow:
    r->n = n0;
    return WALK_SLOW;
}

PyDoc_STRVAR(ring_take_doc,
"ring_take(ring, block_bytes, nblocks, cursor, session, table, out,\n"
"          directions) -> (seen, kept, stop)\n\n"
"Read the blocks of a TPACKET_V3 receive ring (ring: its memory, nblocks\n"
"blocks of block_bytes) that the kernel handed over, from block cursor[0]\n"
"on (cursor: one native 8-byte integer, moved on past the blocks read),\n"
"in place, giving each back to the kernel once read, while every packet\n"
"of each that the capture wants is a probe of session or an echo reply\n"
"that probe_row keys (no VLAN tag taken out).  Wanted: its interface's\n"
"batch column, table[ifindex] (native 32-bit integers), is not -1.  The\n"
"kept rows are appended (frombytes) to the five columns of the tuple out:\n"
"keys (8-byte items), batch columns (4), nanosecond times (8), directions\n"
"(1: directions[packet type]) and auths (8).  seen: the packets of the\n"
"blocks read; kept: the rows appended; stop: why it stopped at block\n"
"cursor[0]: TAKE_IDLE (not handed over yet), TAKE_SLOW (another session,\n"
"a VLAN tag, another layout, a damaged block: the caller decodes it) or\n"
"an ifindex the table has no column for (outside it or below -1: fill\n"
"and call again).");

/* out's columns: keys, batch columns, times, directions, auths. */
static const Py_ssize_t OUT_ITEMS[5] = {8, 4, 8, 1, 8};
static PyObject *str_frombytes;

/* 0 when each of out's five columns has items of OUT_ITEMS' size. */
static int
check_out(PyObject *out)
{
    Py_ssize_t i;
    if (PyTuple_GET_SIZE(out) != 5)
        goto bad;
    for (i = 0; i < 5; i++) {
        Py_buffer b;
        Py_ssize_t size;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(out, i), &b,
                               PyBUF_FORMAT) < 0)
            return -1;
        size = b.itemsize;
        PyBuffer_Release(&b);
        if (size != OUT_ITEMS[i])
            goto bad;
    }
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError,
                    "ring_take: out must hold five columns of 8-, 4-, 8-, "
                    "1- and 8-byte items");
    return -1;
}

static int
append_column(PyObject *column, unsigned char *data, Py_ssize_t len)
{
    PyObject *view, *done;
    view = PyMemoryView_FromMemory((char *)data, len, PyBUF_READ);
    if (view == NULL)
        return -1;
    done = PyObject_CallMethodOneArg(column, str_frombytes, view);
    Py_DECREF(view);
    if (done == NULL)
        return -1;
    Py_DECREF(done);
    return 0;
}

static PyObject *
ring_take(PyObject *self, PyObject *args)
{
    Py_buffer view, cur, tab, dirs;
    PyObject *outs, *result = NULL;
    Py_ssize_t block_bytes, nblocks, next, session, seen = 0, found = 0;
    Py_ssize_t stop = TAKE_IDLE, guard, i;
    int64_t at;
    struct rows r = {0, 0, NULL, NULL, NULL, NULL, NULL};
    unsigned char *ring;

    if (!PyArg_ParseTuple(args, "w*nnw*ny*O!y*", &view, &block_bytes,
                          &nblocks, &cur, &session, &tab, &PyTuple_Type,
                          &outs, &dirs))
        return NULL;
    if (cur.len != 8 || dirs.len != 256) {
        PyErr_SetString(PyExc_ValueError,
                        "ring_take: cursor must be 8 bytes, directions 256");
        goto done;
    }
    memcpy(&at, cur.buf, 8);
    next = (Py_ssize_t)at;
    if (block_bytes < 48 || block_bytes % 8 || nblocks < 1 || next < 0 ||
            next >= nblocks || nblocks > view.len / block_bytes ||
            tab.len % 4) {
        PyErr_SetString(PyExc_ValueError, "ring_take: bad bounds");
        goto done;
    }
    if (check_out(outs) < 0)
        goto done;
    ring = (unsigned char *)view.buf;
    for (guard = 0; guard < nblocks; guard++) {
        unsigned char *b = ring + next * block_bytes;
        uint32_t *status = (uint32_t *)(b + 8);
        Py_ssize_t length;
        int walked;

        /* The kernel writes the block, then its status. */
        if (!(__atomic_load_n(status, __ATOMIC_ACQUIRE) & TP_STATUS_USER))
            break;
        length = (Py_ssize_t)native32(b + 20);
        if (length < 48)
            length = 48;
        if (length > block_bytes)
            length = block_bytes;
        walked = walk_block(b, length, session, tab.buf, tab.len / 4, &r,
                            &found);
        if (walked == WALK_ERROR)
            goto done;
        if (walked == WALK_SLOW) {
            stop = TAKE_SLOW;
            break;
        }
        if (walked == WALK_UNKNOWN) {
            stop = found;
            break;
        }
        seen += found;
        /* Read: the kernel's again. */
        __atomic_store_n(status, 0, __ATOMIC_RELEASE);
        next = (next + 1) % nblocks;
    }
    at = (int64_t)next;
    memcpy(cur.buf, &at, 8);
    if (r.n) {
        const unsigned char *d = (const unsigned char *)dirs.buf;
        for (i = 0; i < r.n; i++)
            r.types[i] = d[r.types[i]];
        if (append_column(PyTuple_GET_ITEM(outs, 0), r.keys, 8 * r.n) < 0 ||
                append_column(PyTuple_GET_ITEM(outs, 1), r.cols,
                              4 * r.n) < 0 ||
                append_column(PyTuple_GET_ITEM(outs, 2), r.times,
                              8 * r.n) < 0 ||
                append_column(PyTuple_GET_ITEM(outs, 3), r.types, r.n) < 0 ||
                append_column(PyTuple_GET_ITEM(outs, 4), r.auths,
                              8 * r.n) < 0)
            goto done;
    }
    result = Py_BuildValue("(nnn)", seen, r.n, stop);
done:
    PyMem_Free(r.keys);
    PyBuffer_Release(&view);
    PyBuffer_Release(&cur);
    PyBuffer_Release(&tab);
    PyBuffer_Release(&dirs);
    return result;
}

static PyMethodDef methods[] = {
    {"ring_take", ring_take, METH_VARARGS, ring_take_doc},
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
    PyObject *m;
    str_frombytes = PyUnicode_InternFromString("frombytes");
    if (str_frombytes == NULL)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "PROBE_MAGIC", PyBytes_FromStringAndSize(
            (const char *)PROBE_MAGIC, 4)) < 0 ||
            PyModule_AddIntConstant(m, "PROBE_TAG_LEN", PROBE_TAG_LEN) < 0 ||
            PyModule_AddIntConstant(m, "PROBE_AUTH_LEN", PROBE_AUTH_LEN) < 0 ||
            PyModule_AddIntConstant(m, "TAKE_IDLE", TAKE_IDLE) < 0 ||
            PyModule_AddIntConstant(m, "TAKE_SLOW", TAKE_SLOW) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
