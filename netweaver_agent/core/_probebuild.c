/*
 * The per-probe arithmetic of netweaver_agent.core.probe, in C: the keyed
 * BLAKE2b tags of a window's probes (probe.Tagger: the hash's state after
 * the key is made once per call, as hashlib's copy() does), and the loop
 * of probe.V4Builder.build (IPv4 ICMP echo and UDP probes: the varying
 * fields written into the window's template, the checksums summed from
 * the template's).
 *
 * BLAKE2b (RFC 7693) is written out here, keyed, digests of 1..64 bytes,
 * keys of 0..64 bytes: the same bytes as hashlib.blake2b, with no
 * library behind it.
 *
 * Optional: probe.py uses these when the extension was built (setup.py,
 * with a C compiler and Python's headers) and its Python loops otherwise;
 * tests/unit/test_probebuild.py holds both to the same bytes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* ---------------------------------------------------------------------
 * BLAKE2b (RFC 7693).
 */

#define B2B_BLOCK 128
#define B2B_OUT 64
#define B2B_KEY 64

typedef struct {
    uint64_t h[8];
    uint64_t t[2];              /* bytes hashed so far (128-bit counter) */
    unsigned char b[B2B_BLOCK]; /* the block not yet compressed */
    size_t c;                   /* its bytes */
    size_t outlen;
} b2b_t;

static const uint64_t B2B_IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL,
    0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
    0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL
};

static const uint8_t B2B_SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}
};

static inline uint64_t
rotr64(uint64_t x, unsigned n)
{
    return (x >> n) | (x << (64 - n));
}

static inline uint64_t
load64_le(const unsigned char *p)
{
    return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16) |
           ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) |
           ((uint64_t)p[5] << 40) | ((uint64_t)p[6] << 48) |
           ((uint64_t)p[7] << 56);
}

#define B2B_G(a, b, c, d, x, y)                 \
    do {                                        \
        v[a] = v[a] + v[b] + (x);               \
        v[d] = rotr64(v[d] ^ v[a], 32);         \
        v[c] = v[c] + v[d];                     \
        v[b] = rotr64(v[b] ^ v[c], 24);         \
        v[a] = v[a] + v[b] + (y);               \
        v[d] = rotr64(v[d] ^ v[a], 16);         \
        v[c] = v[c] + v[d];                     \
        v[b] = rotr64(v[b] ^ v[c], 63);         \
    } while (0)

#define B2B_ROUND(r)                                                  \
    do {                                                              \
        B2B_G(0, 4, 8, 12, m[B2B_SIGMA[r][0]], m[B2B_SIGMA[r][1]]);   \
        B2B_G(1, 5, 9, 13, m[B2B_SIGMA[r][2]], m[B2B_SIGMA[r][3]]);   \
        B2B_G(2, 6, 10, 14, m[B2B_SIGMA[r][4]], m[B2B_SIGMA[r][5]]);  \
        B2B_G(3, 7, 11, 15, m[B2B_SIGMA[r][6]], m[B2B_SIGMA[r][7]]);  \
        B2B_G(0, 5, 10, 15, m[B2B_SIGMA[r][8]], m[B2B_SIGMA[r][9]]);  \
        B2B_G(1, 6, 11, 12, m[B2B_SIGMA[r][10]], m[B2B_SIGMA[r][11]]); \
        B2B_G(2, 7, 8, 13, m[B2B_SIGMA[r][12]], m[B2B_SIGMA[r][13]]); \
        B2B_G(3, 4, 9, 14, m[B2B_SIGMA[r][14]], m[B2B_SIGMA[r][15]]); \
    } while (0)

/* Compress the buffered block into h (RFC 7693 §3.2, F). */
static void
b2b_compress(b2b_t *s, int last)
{
    uint64_t v[16], m[16];
    int i;
    for (i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = B2B_IV[i];
    }
    v[12] ^= s->t[0];
    v[13] ^= s->t[1];
    if (last)
        v[14] = ~v[14];
    for (i = 0; i < 16; i++)
        m[i] = load64_le(s->b + 8 * i);
    /* Written out, so that the message schedule is constant. */
    B2B_ROUND(0); B2B_ROUND(1); B2B_ROUND(2); B2B_ROUND(3);
    B2B_ROUND(4); B2B_ROUND(5); B2B_ROUND(6); B2B_ROUND(7);
    B2B_ROUND(8); B2B_ROUND(9); B2B_ROUND(10); B2B_ROUND(11);
    for (i = 0; i < 8; i++)
        s->h[i] ^= v[i] ^ v[i + 8];
}

static void
b2b_count(b2b_t *s, size_t n)
{
    s->t[0] += n;
    if (s->t[0] < n)
        s->t[1]++;
}

/* Add data; a full block is compressed only when more data follows it
 * (the last block is compressed by b2b_final, flagged). */
static void
b2b_update(b2b_t *s, const unsigned char *in, size_t n)
{
    while (n > 0) {
        size_t room;
        if (s->c == B2B_BLOCK) {
            b2b_count(s, B2B_BLOCK);
            b2b_compress(s, 0);
            s->c = 0;
        }
        room = B2B_BLOCK - s->c;
        if (room > n)
            room = n;
        memcpy(s->b + s->c, in, room);
        s->c += room;
        in += room;
        n -= room;
    }
}

/* outlen 1..64, keylen 0..64 (checked by the callers). */
static void
b2b_init(b2b_t *s, size_t outlen, const unsigned char *key, size_t keylen)
{
    int i;
    for (i = 0; i < 8; i++)
        s->h[i] = B2B_IV[i];
    s->h[0] ^= 0x01010000ULL ^ ((uint64_t)keylen << 8) ^ (uint64_t)outlen;
    s->t[0] = s->t[1] = 0;
    s->c = 0;
    s->outlen = outlen;
    memset(s->b, 0, B2B_BLOCK);
    if (keylen > 0) {
        /* The key, zero-padded, is the first block. */
        memcpy(s->b, key, keylen);
        s->c = B2B_BLOCK;
    }
}

static void
b2b_final(b2b_t *s, unsigned char *out)
{
    size_t i;
    b2b_count(s, s->c);
    memset(s->b + s->c, 0, B2B_BLOCK - s->c);
    b2b_compress(s, 1);
    for (i = 0; i < s->outlen; i++)
        out[i] = (unsigned char)(s->h[i >> 3] >> (8 * (i & 7)));
}

/* The state after the key for messages that are never empty: the key
 * block compressed already, so each message costs only its own blocks
 * (hashlib's copy() of a keyed state). */
static void
b2b_keyed(b2b_t *s, size_t outlen, const unsigned char *key, size_t keylen)
{
    b2b_init(s, outlen, key, keylen);
    if (s->c == B2B_BLOCK) {
        b2b_count(s, B2B_BLOCK);
        b2b_compress(s, 0);
        s->c = 0;
    }
}

/* ---------------------------------------------------------------------
 * Probe tags: the keyed BLAKE2b of probe._MAC_MSG (protocol code,
 * session, seq: "!BHQ") and the packed destination (probe._mac).
 */

#define MAC_HEAD 11             /* struct.calcsize('!BHQ') */
#define MAX_DST 64

typedef struct {
    b2b_t base;                 /* the state after the key */
    unsigned char msg[MAC_HEAD + MAX_DST];
    size_t msglen;
} tagger_t;

static void
tagger_init(tagger_t *g, const unsigned char *key, size_t keylen,
            size_t outlen, unsigned code, unsigned session,
            const unsigned char *dst, size_t dstlen)
{
    b2b_keyed(&g->base, outlen, key, keylen);
    g->msg[0] = (unsigned char)code;
    g->msg[1] = (unsigned char)(session >> 8);
    g->msg[2] = (unsigned char)session;
    memcpy(g->msg + MAC_HEAD, dst, dstlen);
    g->msglen = MAC_HEAD + dstlen;
}

static void
tagger_tag(const tagger_t *g, uint64_t seq, unsigned char *out)
{
    b2b_t s = g->base;
    unsigned char msg[MAC_HEAD + MAX_DST];
    int i;
    memcpy(msg, g->msg, g->msglen);
    for (i = 0; i < 8; i++)
        msg[3 + i] = (unsigned char)(seq >> (56 - 8 * i));
    b2b_update(&s, msg, g->msglen);
    b2b_final(&s, out);
}

/* A buffer argument, or -1 with a TypeError naming it. */
static int
buffer_of(PyObject *obj, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0) {
        PyErr_Format(PyExc_TypeError, "%s: expected bytes, not %.100s",
                     what, Py_TYPE(obj)->tp_name);
        return -1;
    }
    return 0;
}

/* Item i of a PySequence_Fast as an integer within 0..max; -1 with a
 * TypeError/ValueError naming it (and the probe) otherwise. */
static int
seq_at(PyObject *fast, Py_ssize_t i, unsigned long long max,
       uint64_t *out)
{
    PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
    unsigned long long v;
    if (!PyLong_Check(item)) {
        PyErr_Format(PyExc_TypeError, "seqs[%zd]: expected an int, not "
                     "%.100s", i, Py_TYPE(item)->tp_name);
        return -1;
    }
    v = PyLong_AsUnsignedLongLong(item);
    if ((v == (unsigned long long)-1 && PyErr_Occurred()) || v > max) {
        /* Negative, or beyond 64 bits, or beyond max. */
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "seqs[%zd]: %R is not within "
                     "0..%llu", i, item, max);
        return -1;
    }
    *out = v;
    return 0;
}

static int
check_key(const Py_buffer *key)
{
    if (key->len > B2B_KEY) {
        PyErr_Format(PyExc_ValueError, "key: %zd bytes, at most %d",
                     key->len, B2B_KEY);
        return -1;
    }
    return 0;
}

static int
check_ids(int code, int session)
{
    if (code < 0 || code > 0xff) {
        PyErr_Format(PyExc_ValueError, "code %d is not within 0..255", code);
        return -1;
    }
    if (session < 0 || session > 0xffff) {
        PyErr_Format(PyExc_ValueError, "session %d is not within 0..65535",
                     session);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(tags_doc,
"tags(key, code, session, seqs, dst, digest_size) -> bytes\n\n"
"For each int of the sequence seqs (0..2**64-1), the keyed BLAKE2b\n"
"(digest_size bytes, 1..64; key 0..64 bytes) of\n"
"struct.pack('!BHQ', code, session, seq) + dst (dst at most 64 bytes),\n"
"concatenated: probe._mac of each, the key's state made once.");

static PyObject *
tags(PyObject *self, PyObject *args)
{
    PyObject *okey, *odst, *oseqs, *fast = NULL, *result = NULL;
    Py_buffer key = {0}, dst = {0};
    int code, session, size;
    Py_ssize_t n, i;
    tagger_t g;
    unsigned char *out;
    if (!PyArg_ParseTuple(args, "OiiOOi", &okey, &code, &session, &oseqs,
                          &odst, &size))
        return NULL;
    if (check_ids(code, session) < 0)
        return NULL;
    if (size < 1 || size > B2B_OUT) {
        PyErr_Format(PyExc_ValueError, "digest_size %d is not within "
                     "1..%d", size, B2B_OUT);
        return NULL;
    }
    if (buffer_of(okey, &key, "key") < 0)
        return NULL;
    if (buffer_of(odst, &dst, "dst") < 0)
        goto out;
    if (check_key(&key) < 0)
        goto out;
    if (dst.len > MAX_DST) {
        PyErr_Format(PyExc_ValueError, "dst: %zd bytes, at most %d",
                     dst.len, MAX_DST);
        goto out;
    }
    fast = PySequence_Fast(oseqs, "seqs: expected a sequence of ints");
    if (fast == NULL)
        goto out;
    n = PySequence_Fast_GET_SIZE(fast);
    result = PyBytes_FromStringAndSize(NULL, n * size);
    if (result == NULL)
        goto out;
    out = (unsigned char *)PyBytes_AS_STRING(result);
    tagger_init(&g, key.buf, (size_t)key.len, (size_t)size,
                (unsigned)code, (unsigned)session, dst.buf, (size_t)dst.len);
    for (i = 0; i < n; i++) {
        uint64_t seq;
        if (seq_at(fast, i, 0xffffffffffffffffULL, &seq) < 0) {
            Py_CLEAR(result);
            goto out;
        }
        tagger_tag(&g, seq, out + i * size);
    }
out:
    Py_XDECREF(fast);
    if (dst.obj != NULL)
        PyBuffer_Release(&dst);
    PyBuffer_Release(&key);
    return result;
}

/* ---------------------------------------------------------------------
 * IPv4 ICMP/UDP probes (probe.V4Builder): offsets in a packet with no IP
 * options, as probe.py has them.
 */

#define IP_ID 4
#define IP_SUM 10
#define IP_SRC 12
#define IP_DST 16
#define L4 20
#define ICMP_SUM (L4 + 2)
#define ICMP_SEQ (L4 + 6)
#define UDP_SUM (L4 + 6)
#define TAG_SEQ (L4 + 8 + 6)    /* after the L4 header, MAGIC, session */
#define TAG_MAC (TAG_SEQ + 4)
#define AUTH_LEN 8
#define MIN_PACKET (TAG_MAC + AUTH_LEN)

static inline void
put16(unsigned char *p, unsigned v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static inline uint32_t
get32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) |
           ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

/* probe._fold: the checksum of data whose word sum is total, as one
 * integer modulo 0xffff (a sum that is not zero folds to 0xffff). */
static inline unsigned
fold(uint64_t total)
{
    unsigned r = (unsigned)(total % 0xffff);
    return ~(r ? r : 0xffff) & 0xffff;
}

PyDoc_STRVAR(build_v4_doc,
"build_v4(template, src, dst, seqs, icmp, ip_base, l4_base, key, code,\n"
"         session) -> list of bytes\n\n"
"probe.V4Builder.build's loop: for each int of the sequence seqs\n"
"(0..2**32-1), template (an IPv4 ICMP echo (icmp true) or UDP probe\n"
"with its varying fields and addresses zero, at least 46 bytes) with\n"
"the addresses src and dst (4 bytes each), the IP id, the ICMP echo\n"
"sequence, the tag's sequence number, the keyed tag (8-byte BLAKE2b of\n"
"key, code, session, seq and dst; zeros when key is None) and both\n"
"checksums: the template's word sums (ip_base over the IP header,\n"
"l4_base over the transport part and, for UDP, its pseudo-header\n"
"without addresses) reduced modulo 0xffff, plus the varying fields'.\n"
"A UDP checksum of 0 is sent as 0xffff (RFC 768).");

static PyObject *
build_v4(PyObject *self, PyObject *args)
{
    PyObject *otemplate, *osrc, *odst, *oseqs, *okey, *fast = NULL;
    PyObject *result = NULL;
    Py_buffer tpl = {0}, src = {0}, dst = {0}, key = {0};
    unsigned long long ip_base, l4_base;
    int icmp, code, session;
    Py_ssize_t n, i;
    uint64_t addrs;
    tagger_t g;
    if (!PyArg_ParseTuple(args, "OOOOpKKOii", &otemplate, &osrc, &odst,
                          &oseqs, &icmp, &ip_base, &l4_base, &okey, &code,
                          &session))
        return NULL;
    if (check_ids(code, session) < 0)
        return NULL;
    if (ip_base >= 0xffff || l4_base >= 0xffff) {
        PyErr_SetString(PyExc_ValueError, "ip_base and l4_base: expected "
                        "word sums reduced modulo 0xffff (0..65534)");
        return NULL;
    }
    if (buffer_of(otemplate, &tpl, "template") < 0)
        return NULL;
    if (buffer_of(osrc, &src, "src") < 0 || buffer_of(odst, &dst, "dst") < 0)
        goto out;
    if (okey != Py_None) {
        if (buffer_of(okey, &key, "key") < 0 || check_key(&key) < 0)
            goto out;
    }
    if (tpl.len < MIN_PACKET || tpl.len > 0xffff) {
        PyErr_Format(PyExc_ValueError, "template: %zd bytes, expected an "
                     "IPv4 probe of %d..65535", tpl.len, MIN_PACKET);
        goto out;
    }
    if (src.len != 4 || dst.len != 4) {
        PyErr_Format(PyExc_ValueError, "src and dst: %zd and %zd bytes, "
                     "expected IPv4 addresses (4 bytes each)", src.len,
                     dst.len);
        goto out;
    }
    fast = PySequence_Fast(oseqs, "seqs: expected a sequence of ints");
    if (fast == NULL)
        goto out;
    n = PySequence_Fast_GET_SIZE(fast);
    result = PyList_New(n);
    if (result == NULL)
        goto out;
    if (key.obj != NULL)
        tagger_init(&g, key.buf, (size_t)key.len, AUTH_LEN, (unsigned)code,
                    (unsigned)session, dst.buf, 4);
    addrs = (uint64_t)get32(src.buf) + get32(dst.buf);
    for (i = 0; i < n; i++) {
        uint64_t seq, mac = 0;
        unsigned low, l4sum;
        unsigned char *p;
        PyObject *packet;
        int j;
        if (seq_at(fast, i, 0xffffffffULL, &seq) < 0)
            goto fail;
        packet = PyBytes_FromStringAndSize(tpl.buf, tpl.len);
        if (packet == NULL)
            goto fail;
        PyList_SET_ITEM(result, i, packet);
        p = (unsigned char *)PyBytes_AS_STRING(packet);
        low = (unsigned)(seq & 0xffff);
        memcpy(p + IP_SRC, src.buf, 4);
        memcpy(p + IP_DST, dst.buf, 4);
        put16(p + IP_ID, low);
        put16(p + IP_SUM, fold(ip_base + addrs + low));
        p[TAG_SEQ] = (unsigned char)(seq >> 24);
        p[TAG_SEQ + 1] = (unsigned char)(seq >> 16);
        p[TAG_SEQ + 2] = (unsigned char)(seq >> 8);
        p[TAG_SEQ + 3] = (unsigned char)seq;
        if (key.obj != NULL) {
            tagger_tag(&g, seq, p + TAG_MAC);
            for (j = 0; j < AUTH_LEN; j++)
                mac = (mac << 8) | p[TAG_MAC + j];
        }
        /* Each varying field sits at an even offset: it adds its value
         * modulo 0xffff (2**16 is 1 modulo 0xffff). */
        if (icmp) {
            put16(p + ICMP_SEQ, low);
            put16(p + ICMP_SUM,
                  fold(l4_base + low + seq + mac % 0xffff));
        } else {
            l4sum = fold(l4_base + addrs + seq + mac % 0xffff);
            put16(p + UDP_SUM, l4sum ? l4sum : 0xffff);
        }
    }
    goto out;
fail:
    Py_CLEAR(result);
out:
    Py_XDECREF(fast);
    if (key.obj != NULL)
        PyBuffer_Release(&key);
    if (dst.obj != NULL)
        PyBuffer_Release(&dst);
    if (src.obj != NULL)
        PyBuffer_Release(&src);
    PyBuffer_Release(&tpl);
    return result;
}

PyDoc_STRVAR(blake2b_doc,
"_blake2b(msg, key, digest_size) -> bytes\n\n"
"hashlib.blake2b(msg, key=key, digest_size=digest_size).digest(), by\n"
"this module's BLAKE2b (for the tests).");

static PyObject *
blake2b(PyObject *self, PyObject *args)
{
    Py_buffer msg, key;
    int size;
    b2b_t s;
    unsigned char out[B2B_OUT];
    if (!PyArg_ParseTuple(args, "y*y*i", &msg, &key, &size))
        return NULL;
    if (size < 1 || size > B2B_OUT || key.len > B2B_KEY) {
        PyBuffer_Release(&msg);
        PyBuffer_Release(&key);
        PyErr_Format(PyExc_ValueError, "digest_size %d (1..%d) or key of "
                     "%zd bytes (at most %d)", size, B2B_OUT, key.len,
                     B2B_KEY);
        return NULL;
    }
    b2b_init(&s, (size_t)size, key.buf, (size_t)key.len);
    b2b_update(&s, msg.buf, (size_t)msg.len);
    b2b_final(&s, out);
    PyBuffer_Release(&msg);
    PyBuffer_Release(&key);
    return PyBytes_FromStringAndSize((const char *)out, size);
}

static PyMethodDef methods[] = {
    {"tags", tags, METH_VARARGS, tags_doc},
    {"build_v4", build_v4, METH_VARARGS, build_v4_doc},
    {"_blake2b", blake2b, METH_VARARGS, blake2b_doc},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_probebuild",
    "Probe tags (keyed BLAKE2b) and IPv4 probe packets, in C.",
    -1, methods
};

PyMODINIT_FUNC
PyInit__probebuild(void)
{
    return PyModule_Create(&module);
}
