"""The capture reader's C loops give the Python loops' answers.

``pcapwalk`` walks record headers, copies record heads and selects items
in C when ``_pcapwalk`` was built, in Python otherwise.  Both are held to
the same answers on random buffers (every byte order, the lengths' three
orders, records cut short or too long), and whole captures read with
either give the same rows.  Where the extension is expected (CI:
``NETWEAVER_REQUIRE_PCAPWALK=1``, set by tools/test.sh) its absence fails
instead of skipping.
"""

import array
import functools
import struct

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.core import pcapfile
from netweaver_agent.core import pcapkeys
from netweaver_agent.core import pcapwalk
from netweaver_agent.core import probe
from tests import packets as pk
from tests.unit import cext

C = pcapwalk._pcapwalk


def _need_c():
    cext.need(C, '_pcapwalk')


def test_extension_in_use_when_built():
    _need_c()
    assert pcapwalk.compiled()


@st.composite
def record_streams(draw):
    """A pcap-like stream: a 24-byte file header, then 16-byte record
    headers with two 4-byte lengths at 8 and 12 (either order, either
    byte order), some lengths huge, the stream maybe cut anywhere."""
    big = draw(st.booleans())
    order = '>' if big else '<'
    parts = [bytes(24)]
    for _ in range(draw(st.integers(0, 60))):
        caplen = draw(st.one_of(st.integers(0, 120),
                                st.integers(0, 0x50000)))
        orig = draw(st.integers(0, 0x50000))
        data = bytes([len(parts) % 256]) * min(caplen, 200)
        parts.append(struct.pack(order + 'IIII', 1, 2, caplen, orig) + data)
    stream = b''.join(parts)
    cut = draw(st.integers(24, len(stream)))
    return stream[:cut], big


@settings(max_examples=400, deadline=None)
@given(record_streams(), st.sampled_from([8, 12]), st.booleans(),
       st.sampled_from([0x40000, 100, 0]), st.integers(0, 70),
       st.integers(0, 40))
def test_walk_pcap_c_equals_python(stream, cap_at, pair, limit, count,
                                   end_cut):
    _need_c()
    buf, big = stream
    if pair:
        cap_at = 8
    end = max(24, len(buf) - end_cut)
    args = (buf, 24, end, cap_at, big, pair, limit, count)
    assert C.walk_pcap(*args) == pcapwalk.walk_pcap_python(*args)


def test_walk_pcap_reads_each_length_field():
    """The next record is after the chosen length: at 8, at 12, or the
    smaller of the two; a walk stops at the limit, the count and the
    end."""
    hdr = struct.Struct('<IIII')
    for walk in (pcapwalk.walk_pcap, pcapwalk.walk_pcap_python):
        for lengths, at, pair, nxt in (((4, 9), 8, False, 44),
                                       ((4, 9), 12, False, 49),
                                       ((4, 9), 8, True, 44),
                                       ((9, 4), 8, True, 44),
                                       ((9, 4), 8, False, 49)):
            buf = bytes(24) + hdr.pack(0, 0, *lengths) + bytes(9)
            assert walk(buf, 24, len(buf), at, False, pair, 100, 1) == (
                [24], nxt, True), (lengths, at, pair)
        buf = bytes(24) + hdr.pack(0, 0, 4, 4) + bytes(4) + \
            hdr.pack(0, 0, 2, 2) + bytes(2)
        assert walk(buf, 24, len(buf), 8, False, False, 100, 9) == (
            [24, 44], len(buf), False)
        assert walk(buf, 24, len(buf), 8, False, False, 100, 2) == (
            [24, 44], len(buf), True)
        # A length above the limit stops the walk before that record.
        assert walk(buf, 24, len(buf), 8, False, False, 3, 9) == (
            [], 24, False)
        # As does one running past the end.
        assert walk(buf, 24, len(buf) - 1, 8, False, False, 100, 9) == (
            [24], 44, False)
        big = bytes(24) + struct.pack('>IIII', 0, 0, 4, 4) + bytes(4)
        assert walk(big, 24, len(big), 8, True, False, 100, 9) == (
            [24], 44, False)


@st.composite
def block_streams(draw):
    """pcapng-like blocks: enhanced packet blocks of a few interfaces,
    some with a wrong trailer, an odd length, a capture length too long
    for the block, or another block type; the stream maybe cut."""
    big = draw(st.booleans())
    order = '>' if big else '<'
    parts = []
    for _ in range(draw(st.integers(0, 40))):
        caplen = draw(st.integers(0, 40))
        padded = (caplen + 3) & ~3
        blen = 32 + padded + draw(st.sampled_from([0, 0, 0, 4, 8]))
        btype = draw(st.sampled_from([6, 6, 6, 6, 3, 1]))
        iface = draw(st.sampled_from([0, 0, 0, 1]))
        trail = blen
        flaw = draw(st.sampled_from([None] * 8 + ['trailer', 'odd', 'cap']))
        if flaw == 'trailer':
            trail += 4
        elif flaw == 'odd':
            blen += 2
        elif flaw == 'cap':
            caplen += 8
        body = struct.pack(order + 'IIIIII', btype, blen, iface, 0, 0,
                           caplen)
        body += bytes(blen - 28) + struct.pack(order + 'I', trail)
        parts.append(body)
    stream = b''.join(parts)
    cut = draw(st.integers(0, len(stream)))
    return stream[:cut], big


@settings(max_examples=400, deadline=None)
@given(block_streams(), st.integers(0, 50))
def test_walk_epb_c_equals_python(stream, count):
    _need_c()
    buf, big = stream
    args = (buf, 0, len(buf), big, count)
    assert C.walk_epb(*args) == pcapwalk.walk_epb_python(*args)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 320), max_size=40),
       st.integers(0, 40))
def test_heads_c_equals_python(buf, offsets, size):
    _need_c()
    assert C.heads(buf, offsets, size) == pcapwalk.heads_python(
        buf, offsets, size)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 300), st.integers(0, 40),
       st.integers(0, 20), st.binary(max_size=40))
def test_select_c_equals_python(buf, start, stride, size, flags):
    _need_c()
    assert C.select(buf, start, stride, size, flags) == \
        pcapwalk.select_python(buf, start, stride, size, flags)


def test_bad_bounds_are_errors_not_reads_outside():
    _need_c()
    with pytest.raises(ValueError):
        C.walk_pcap(bytes(40), 24, 41, 8, False, False, 10, 1)
    with pytest.raises(ValueError):
        C.walk_pcap(bytes(40), 24, 40, 13, False, False, 10, 1)
    with pytest.raises(ValueError):
        C.heads(bytes(40), [-1], 4)


def _rows(read):
    if read is None:
        return None
    b = read.batch
    return (read.records, read.foreign, read.truncated,
            sorted(zip(b.keys, b.t_ns, b.direction, b.ifindex)))


@settings(max_examples=30, deadline=None)
@given(pk.randoms, st.sampled_from(['<', '>']), st.booleans(),
       st.sampled_from(['pcap', 'pcapng']))
def test_captures_read_the_same_with_either_loops(tmp_path_factory, rnd,
                                                  order, cut, fmt):
    """Hundreds of probes, replies, damaged frames and noise of mixed
    lengths (blocks the walk sorts), in probe, auto and fingerprint mode:
    the same rows with the C loops and the Python ones."""
    _need_c()
    frames = [pk.make_frame(rnd) for _ in range(rnd.randrange(150, 500))]
    frames = [f for f in frames if len(f) >= 14]
    times = [(1_763_900_000 + i) * 10 ** 9 + rnd.randrange(10 ** 9)
             for i in range(len(frames))]
    if fmt == 'pcap':
        data = pk.pcap_of(frames, times, order)
    else:
        data = pk.pcapng(frames, times, order)
    if cut:
        data = data[:rnd.randrange(24, len(data) + 1)]
    path = tmp_path_factory.mktemp('walk') / f'w.{fmt}'
    path.write_bytes(data)

    def read_all():
        out = []
        for kw in (dict(), dict(fingerprint=True, dst_ip=pk.GUEST),
                   dict(fingerprint=True, dst_ip=pk.GUEST, probes=False)):
            cap = pcapfile.read_capture(str(path), ifname='x', **kw)
            out.append((_rows(cap.probes()), _rows(cap.fingerprints())))
        return out

    with_c = read_all()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pcapwalk, '_pcapwalk', None)
        assert read_all() == with_c


# --------------------------------------------------------------------------
# ring_take: the blocks of a TPACKET_V3 receive ring, read in place.

FUNCTIONS = {'python': pcapwalk.ring_take_python}
if C is not None:
    FUNCTIONS['c'] = C.ring_take
# Packet type -> direction, as a capture would map them.
SAME = bytes(range(256))


def _take(function, memory, block_bytes, nblocks, next, session, table,
          directions=SAME):
    """``function`` (C's or Python's ring_take) from block ``next``:
    ``(next, seen, keys, columns, t_ns, directions, auth, stop)``, the
    columns as bytes."""
    cursor = array.array('q', [next])
    out = tuple(array.array(code) for code in 'QiqBQ')
    seen, kept, stop = function(memory, block_bytes, nblocks, cursor,
                                session, table, out, directions)
    assert all(len(column) == kept for column in out)
    return (cursor[0], seen, *(column.tobytes() for column in out), stop)


TAKES = {name: functools.partial(_take, f) for name, f in FUNCTIONS.items()}
# A session above 0x3fff: a UDP probe's source port keeps its low 15 bits.
RING_SESSION = 0x6abc
BLOCK = 8192
# The kernel's packet type of a frame this host sent (sockaddr_ll).
OUTGOING = 4


def _ring_frame(rnd, clean):
    """A probe or echo reply of RING_SESSION (ICMP, UDP; some with a
    secret's tag); unless ``clean``, maybe other sessions, TCP, UDP's
    ICMP errors, VLAN tags, IPv6, tunnels or damaged frames instead."""
    pick = 1.0 if clean else rnd.random()
    if pick < 0.3:
        return pk.damage(rnd, pk.make_frame(rnd))
    proto = rnd.choice(['icmp', 'udp'] if pick > 0.5 else probe.PROTOCOLS)
    session = RING_SESSION if pick > 0.4 else rnd.randrange(0x10000)
    seq = rnd.randrange(1 << 32)
    if proto == 'tcp':
        seq = probe.tcp_ident(pk.PORT, seq & 0xffff)
    f = probe.build_frame(proto, session, seq, pk.SRC, pk.DST, pk.MAC_A,
                          pk.MAC_B, size=rnd.choice([48, 64, 64, 100]),
                          secret=pk.secret_of(rnd))
    if (proto == 'icmp' or not clean) and rnd.random() < 0.3:
        f = pk.reply(f)
    return f


def _ring_memory(rnd, nblocks):
    """A ring's memory of ``nblocks`` blocks of BLOCK bytes: blocks handed
    over (as ``pk.ring_block`` lays them out) or still the kernel's, of
    probes only or of anything, some with bytes of their headers or
    frames changed."""
    memory = bytearray(BLOCK * nblocks)
    for b in range(nblocks):
        if rnd.random() < 0.15:
            continue                            # the kernel's (status 0)
        clean = rnd.random() < 0.7
        packets = [(_ring_frame(rnd, clean),
                    rnd.choice([1, 3, 7, 9, 9, 9, 9] +
                               ([] if clean else [0, 70000])),
                    rnd.choice([0, 3, OUTGOING]),
                    rnd.randrange((1 << 32) * 10 ** 9),
                    None if clean or rnd.random() < 0.8 else 100)
                   for _ in range(rnd.randrange(0, 20))]
        block = bytearray(pk.ring_block(packets)[:BLOCK])
        for _ in range(rnd.choice([0] * 7 + [1, 3])):
            at = rnd.randrange(len(block))
            block[at] = rnd.choice([0, 1, 0x10, 0x7f, 0xff,
                                    rnd.randrange(256)])
        memory[b * BLOCK:b * BLOCK + len(block)] = block
    return memory


def _table(rnd):
    """Batch columns by ifindex 0..9: wanted (>= 0), not (-1), unknown
    (below -1, or the table too short)."""
    wanted = [rnd.choice([0, 1, 2, -1]) for _ in range(10)]
    if rnd.random() < 0.1:
        wanted[rnd.randrange(10)] = rnd.choice([-2, -3])
    return array.array('i', wanted[:rnd.choice([10] * 8 + [8, 0])])


@settings(max_examples=400, deadline=None)
@given(pk.randoms)
def test_ring_take_c_equals_python(rnd):
    """On rings of probes, answers, other traffic and damaged blocks
    (headers, lengths, offsets, frames), C and Python read the same
    blocks, keep the same rows, stop at the same block for the same
    reason and give the same blocks back to the kernel."""
    _need_c()
    nblocks = rnd.randrange(1, 5)
    memory = _ring_memory(rnd, nblocks)
    table = _table(rnd)
    args = (BLOCK, nblocks, rnd.randrange(nblocks),
            RING_SESSION if rnd.random() < 0.9 else rnd.randrange(1 << 16),
            table)
    directions = bytes(rnd.randrange(256) for _ in range(256))
    by_c, by_python = bytearray(memory), bytearray(memory)
    assert _take(C.ring_take, by_c, *args, directions) == _take(
        pcapwalk.ring_take_python, by_python, *args, directions)
    assert by_c == by_python


def _handed_over(*blocks, spare=1):
    """Ring memory holding ``blocks`` (pk.ring_block's), then ``spare``
    blocks still the kernel's."""
    memory = bytearray(BLOCK * (len(blocks) + spare))
    for i, block in enumerate(blocks):
        memory[i * BLOCK:i * BLOCK + len(block)] = block
    return memory


def _status(memory, i):
    return struct.unpack_from('@I', memory, i * BLOCK + 8)[0]


def _probes(n, ifindex=3, session=RING_SESSION, first=1):
    out = []
    for seq in range(first, first + n):
        proto = 'udp' if seq % 3 == 0 else 'icmp'
        f = probe.build_frame(proto, session, seq, pk.SRC, pk.DST, pk.MAC_A,
                              pk.MAC_B, secret=b'k' * probe.SECRET_LEN)
        if proto == 'icmp' and seq % 5 == 0:
            f = pk.reply(f)                     # an echo reply
        out.append((f, ifindex, OUTGOING if seq % 2 else 0,
                    1_764_000_000_000_000_000 + 1000 * seq, None))
    return out


@pytest.mark.parametrize('take', sorted(TAKES))
def test_ring_take_reads_probe_blocks_and_gives_them_back(take):
    """Blocks of probes and echo replies: every row kept, with its key
    (seq << 1 | reply), batch column, time, packet type and auth as the
    per-frame parser reads them; the blocks read go back to the kernel,
    the one still the kernel's is not touched."""
    take = TAKES[take]
    first, second = _probes(30, first=1), _probes(7, ifindex=9, first=31)
    memory = _handed_over(pk.ring_block(first), pk.ring_block(second))
    table = array.array('i', [-2, -2, -2, 4, -2, -2, -2, -2, -2, 6])
    nxt, seen, keys, cols, t_ns, types, auth, stop = take(
        memory, BLOCK, 3, 0, RING_SESSION, table)
    assert (nxt, seen, stop) == (2, 37, pcapwalk.TAKE_IDLE)
    packets = first + second
    want = []
    for f, ifindex, pkttype, t, _vid in packets:
        session, key = pcapkeys.frame_key(f, 0, len(f))
        want.append((key, table[ifindex], t, pkttype,
                     pcapkeys.frame_auth(f, 0, len(f))))
    got = list(zip(array.array('Q', keys), array.array('i', cols),
                   array.array('q', t_ns), types, array.array('Q', auth)))
    assert got == want
    assert any(k & 1 for k, *_ in got) and any(a for *_, a in got)
    assert [_status(memory, i) for i in range(3)] == [0, 0, 0]
    # Nothing handed over: nothing read.
    assert take(memory, BLOCK, 3, 2, RING_SESSION, table) == (
        2, 0, b'', b'', b'', b'', b'', pcapwalk.TAKE_IDLE)


@pytest.mark.parametrize('take', sorted(TAKES))
def test_ring_take_stops_at_a_block_it_cannot_key(take):
    """Another session's probe, a VLAN tag the kernel took out, TCP, an
    ICMP error: the block stays handed over for the caller to decode,
    the rows of the blocks before it are given; packets of interfaces
    not wanted are skipped whatever they are; an interface the table
    lacks stops the read at its block."""
    take = TAKES[take]
    table = array.array('i', [-2, -2, -2, 0, -2, -2, -2, -1])
    good = _probes(5)
    noise = [(pk.frame('tcp', 1, pk.ident('tcp', 7)), 7, 0, 1, None),
             (pk.frame('icmp', RING_SESSION + 1, 2), 7, 0, 2, 100)]
    flaws = {
        'session': [(pk.frame('icmp', RING_SESSION + 1, 9), 3, 0, 5, None)],
        'vlan': [(pk.frame('icmp', RING_SESSION, 9), 3, 0, 5, 100)],
        'tcp': [(pk.frame('tcp', RING_SESSION, pk.ident('tcp', 9)), 3, 0,
                 5, None)],
        'error': [(pk.reply(pk.frame('udp', RING_SESSION, 9)), 3, 0, 5,
                   None)],
        'unknown': [(pk.frame('icmp', RING_SESSION, 9), 5, 0, 5, None)],
    }
    for flaw, bad in flaws.items():
        memory = _handed_over(pk.ring_block(good + noise),
                              pk.ring_block(_probes(2) + bad))
        nxt, seen, keys, *_rest, stop = take(memory, BLOCK, 3, 0,
                                             RING_SESSION, table)
        assert (nxt, seen, len(keys)) == (1, 7, 5 * 8), flaw
        assert stop == (5 if flaw == 'unknown' else pcapwalk.TAKE_SLOW)
        assert [_status(memory, i) for i in range(2)] == [0, 1], flaw


def _header_at(block, i):
    """Offset of packet ``i``'s tpacket3_hdr in a pk.ring_block block."""
    h = struct.unpack_from('@I', block, 16)[0]
    for _ in range(i):
        h += struct.unpack_from('@I', block, h)[0]
    return h


@pytest.mark.parametrize('take', sorted(TAKES))
def test_ring_take_leaves_damaged_blocks_to_the_caller(take):
    """Counts, offsets and lengths pointing outside the block (or a
    packet count the block cannot hold) are never followed: the block is
    left for the caller to decode (ring.decode_block names the flaw)."""
    take = TAKES[take]
    table = array.array('i', [-2, -2, -1, 0])
    block = bytearray(pk.ring_block(_probes(4)))
    h2 = _header_at(block, 2)
    flaws = {
        'count': (12, '@I', 10 ** 6),
        'first': (16, '@I', BLOCK - 20),
        'next': (h2, '@I', BLOCK),
        'next0': (h2, '@I', 0),
        'mac': (h2 + 24, '@H', 0xffff),
        'snaplen': (h2 + 12, '@I', BLOCK),
        'length': (20, '@I', 1),
        'ifindex': (h2 + 52, '@i', -3),
    }
    for flaw, (at, fmt, value) in flaws.items():
        bad = bytearray(block)
        struct.pack_into(fmt, bad, at, value)
        memory = _handed_over(bad)
        *_rows, stop = take(memory, BLOCK, 2, 0, RING_SESSION, table)
        assert stop == pcapwalk.TAKE_SLOW, flaw
        assert _status(memory, 0) == 1, flaw
    # A block cut short (its length says so) inside the header of its
    # last packet, one of an interface not wanted: not read.
    cut = bytearray(pk.ring_block(_probes(3) + _probes(1, ifindex=2)))
    struct.pack_into('@I', cut, 20, _header_at(cut, 3) + 60)
    assert take(_handed_over(cut), BLOCK, 2, 0, RING_SESSION,
                table)[-1] == pcapwalk.TAKE_SLOW
    # More packets than the block can hold (each takes its header and
    # address at least), all on an interface not wanted: not read.
    crowded = bytearray(BLOCK)
    struct.pack_into('@IIIIII', crowded, 0, 3, 0, 1, BLOCK // 60, 48, BLOCK)
    for at in range(48, BLOCK - 16, 16):
        struct.pack_into('@IIII', crowded, at, 16, 2, 2, 2)
    assert take(_handed_over(crowded), BLOCK, 2, 0, RING_SESSION,
                table)[-1] == pcapwalk.TAKE_SLOW


@pytest.mark.parametrize('take', sorted(FUNCTIONS))
def test_ring_take_bad_arguments_are_errors(take):
    take = FUNCTIONS[take]
    memory, table = bytearray(2 * BLOCK), array.array('i')
    out = tuple(array.array(code) for code in 'QiqBQ')

    def call(block_bytes=BLOCK, nblocks=2, next=0, **kw):
        args = dict(ring=memory, cursor=array.array('q', [next]),
                    table=table, out=out, directions=SAME)
        args.update(kw)
        return take(args['ring'], block_bytes, nblocks, args['cursor'],
                    RING_SESSION, args['table'], args['out'],
                    args['directions'])

    for bounds in ((BLOCK, 3, 0), (BLOCK, 2, 2), (BLOCK, 0, 0), (44, 2, 0),
                   (BLOCK + 4, 1, 0), (BLOCK, 2, -1)):
        with pytest.raises(ValueError):
            call(*bounds)
    for bad in (dict(table=b'\0\0\0'), dict(directions=SAME[:255]),
                dict(cursor=array.array('i', [0])),
                dict(out=out[:4]), dict(out=out[:4] + (array.array('i'),))):
        with pytest.raises(ValueError):
            call(**bad)
    for bad in (dict(ring=bytes(memory)), dict(cursor=b'\0' * 8)):
        with pytest.raises(TypeError):
            call(**bad)
    assert not any(out)


def test_the_c_walk_knows_the_probe_tag():
    """The tag layout the C walk reads is probe's."""
    _need_c()
    assert C.PROBE_MAGIC == probe.MAGIC
    assert C.PROBE_TAG_LEN == probe.TAG_LEN
    assert C.PROBE_AUTH_LEN == probe.AUTH_LEN
    assert (C.TAKE_IDLE, C.TAKE_SLOW) == (pcapwalk.TAKE_IDLE,
                                          pcapwalk.TAKE_SLOW)


@settings(max_examples=400, deadline=None)
@given(pk.probe_frames(), st.sampled_from(sorted(FUNCTIONS)))
def test_ring_take_keeps_only_what_frame_key_reads_alike(frame, take):
    """A packet is read in place only if the per-frame parser gives it
    the same session (the window's), key and auth, untagged and not
    tunnelled; probes and echo replies of ours holding their tag are."""
    if take == 'c':
        _need_c()
    found = pcapkeys.frame_key(frame, 0, len(frame))
    # The session its tag would carry (an ICMP or UDP probe's).
    session = int.from_bytes(frame[46:48], 'big')
    memory = _handed_over(pk.ring_block([(frame, 3, 0, 10**18, None)]))
    # Past the frame: bytes no probe holds (never read).
    end = pk.RING_BLOCK_HDR + pk.RING_MAC + len(frame)
    memory[end:BLOCK] = b'\xee' * (BLOCK - end)
    got = TAKES[take](memory, BLOCK, 2, 0, session,
                      array.array('i', [-2, -2, -2, 0]))
    if got[-1] != pcapwalk.TAKE_IDLE:
        assert got[2] == b''
        # Left to the caller: not such a probe, or not all of its tag.
        assert (found is None or len(found) > 2 or
                pcapkeys.frame_auth(frame, 0, len(frame)) is None or
                frame[12:14] != b'\x08\x00' or frame[14] != 0x45 or
                frame[23] not in (1, 17) or len(frame) < 60 or
                frame[23] == 1 and frame[34] not in (0, 8) or
                0 < int.from_bytes(frame[16:18], 'big') < 46)
        return
    assert found is not None and len(found) == 2
    (key,), (auth,) = array.array('Q', got[2]), array.array('Q', got[6])
    assert (session, key) == found
    assert auth == pcapkeys.frame_auth(frame, 0, len(frame))


@pytest.mark.parametrize('take', sorted(TAKES))
def test_ring_take_leaves_short_ip_lengths_to_the_caller(take):
    """An IP total length too short for the keyed tag (the frame longer:
    Ethernet padding, or a lie) is decided by the caller, which reads no
    tag past it; 0 (the frame's end) and lengths holding it are read."""
    take = TAKES[take]
    f = bytearray(probe.build_frame('icmp', RING_SESSION, 9, pk.SRC, pk.DST,
                                    pk.MAC_A, pk.MAC_B,
                                    secret=b'k' * probe.SECRET_LEN))
    table = array.array('i', [-2, -2, -2, 0])
    for total, read in ((21, False), (40, False), (45, False), (46, True),
                        (0, True), (len(f) - 14, True)):
        f[16:18] = total.to_bytes(2, 'big')
        memory = _handed_over(pk.ring_block([(bytes(f), 3, 0, 1, None)]))
        got = take(memory, BLOCK, 2, 0, RING_SESSION, table)
        assert (got[-1] == pcapwalk.TAKE_IDLE) == read, total


@pytest.mark.parametrize('take', sorted(TAKES))
def test_ring_take_leaves_near_probes_to_the_caller(take):
    """A probe with one field off (what the per-frame parser checks) is
    not read in place: the ICMP id or UDP source port not the tag's
    session's, the magic, a later fragment, IP options, another
    ethertype, ICMP type or protocol, a frame cut before the tag's end."""
    take = TAKES[take]
    table = array.array('i', [-2, -2, -2, 0])
    icmp = probe.build_frame('icmp', RING_SESSION, 9, pk.SRC, pk.DST,
                             pk.MAC_A, pk.MAC_B)
    udp = probe.build_frame('udp', RING_SESSION, 9, pk.SRC, pk.DST,
                            pk.MAC_A, pk.MAC_B)

    def changed(frame, at, value):
        f = bytearray(frame)
        f[at:at + len(value)] = value
        return bytes(f)

    near = [changed(icmp, 38, b'\x00\x01'),           # ICMP id
            changed(udp, 34, b'\x80\x01'),            # UDP source port
            changed(icmp, 42, b'NWv2'),                # magic
            changed(icmp, 20, b'\x00\x08'),            # a later fragment
            changed(icmp, 14, b'\x46'),                # IP options
            changed(icmp, 12, b'\x86\xdd'),            # ethertype
            changed(icmp, 34, b'\x03'),                # ICMP type
            changed(icmp, 23, b'\x06'),                # protocol
            icmp[:59]]
    for frame in [icmp, udp] + near:
        memory = _handed_over(pk.ring_block([(frame, 3, 0, 1, None)]))
        got = take(memory, BLOCK, 2, 0, RING_SESSION, table)
        assert (got[-1] == pcapwalk.TAKE_IDLE) == (frame in (icmp, udp))
