"""Walking pcap record headers and copying record heads, in C when built.

Everything else of reading a capture runs in columns (stepped slices,
translate tables); these two loops cannot: each record's length says where
the next one starts.  In Python they cost ~0.3 µs a record, a third of
reading everyday traffic; the optional extension ``_pcapwalk`` (built by
``setup.py`` where a C compiler and Python's headers are found) does the
same in a few nanoseconds.  Without it the Python loops below give the
same answers (tests/unit/test_pcapwalk.py holds both to that).

``NETWEAVER_PCAPWALK=python`` in the environment turns the extension off
(to compare, or to rule it out).
"""

import array
import itertools
import os
import struct

from netweaver_agent.core import probe

try:
    from netweaver_agent.core import _pcapwalk
except ImportError:                     # not built: the Python loops
    _pcapwalk = None

if os.environ.get('NETWEAVER_PCAPWALK') == 'python':
    _pcapwalk = None

_U32 = {False: struct.Struct('<I').unpack_from,
        True: struct.Struct('>I').unpack_from}
_EPB_HEAD = {False: struct.Struct('<IIIIII').unpack_from,
             True: struct.Struct('>IIIIII').unpack_from}
_PAIR = {False: struct.Struct('<II').unpack_from,
         True: struct.Struct('>II').unpack_from}


def compiled():
    """True when the C loops are in use."""
    return _pcapwalk is not None


def walk_pcap_python(buf, o, end, cap_at, big, pair, limit, count):
    """:func:`walk_pcap` in Python."""
    offsets = []
    append = offsets.append
    if pair:
        both = _PAIR[big]

        def get(b, at):
            return (min(both(b, at)),)
    else:
        get = _U32[big]
    for _ in range(count):
        if o + 16 > end:
            break
        caplen, = get(buf, o + cap_at)
        nxt = o + 16 + caplen
        if caplen > limit or nxt > end:
            break
        append(o)
        o = nxt
    else:
        return offsets, o, True
    return offsets, o, False


def walk_epb_python(buf, o, end, big, count):
    """:func:`walk_epb` in Python."""
    head = _EPB_HEAD[big]
    trailer = _U32[big]
    offsets = []
    append = offsets.append
    first = -1
    while len(offsets) < count and o + 32 <= end:
        btype, blen, iface_id, _hi, _lo, caplen = head(buf, o)
        nxt = o + blen
        if (btype != 6 or blen % 4 or nxt > end or
                32 + ((caplen + 3) & ~3) > blen or
                trailer(buf, nxt - 4)[0] != blen):
            break
        if first >= 0 and iface_id != first:
            break
        first = iface_id
        append(o)
        o = nxt
    return offsets, o, first


def heads_python(buf, offsets, size):
    """:func:`heads` in Python."""
    packed = b''.join([buf[o:o + size] for o in offsets])
    if len(packed) != size * len(offsets):      # the last ones are shorter
        packed = b''.join([buf[o:o + size].ljust(size, b'\0')
                           for o in offsets])
    return packed


def select_python(buf, start, stride, size, flags):
    """:func:`select` in Python."""
    buf = memoryview(buf).cast('B')         # bytes of an array too
    return b''.join([bytes(buf[o:o + size]).ljust(size, b'\0')
                     for o in (start + i * stride for i in itertools.compress(
                         range(len(flags)), flags))])


# A TPACKET_V3 block (native byte order): num_pkts, offset_to_first_pkt;
# a packet's tpacket3_hdr: next offset, sec, nsec, snaplen, status, mac;
# its sockaddr_ll's ifindex and packet type.
_TP3_BLOCK = struct.Struct('@II')
_TP3_HDR = struct.Struct('@IIII4xIH')
_TP3_IFINDEX = struct.Struct('@i')
_TP3_NEED = 68
_U32N = struct.Struct('@I')
_I64N = struct.Struct('@q')
# ring_take's out: keys, batch columns, times, directions, auths.
_OUT_ITEMS = [8, 4, 8, 1, 8]
_TP_STATUS_USER = 1
_TP_STATUS_VLAN_VALID = 0x10
# Why ring_take stopped, when not at an ifindex its table lacks.
TAKE_IDLE = -1
TAKE_SLOW = -2
# A tagged probe's IP bytes with its keyed tag (pcapkeys._AUTH_NEED).
_AUTH_NEED = 20 + 8 + probe.TAG_LEN + probe.AUTH_LEN
_ECHO_ID = struct.Struct('!H')
_TAG_AT = struct.Struct('!4sHIQ')               # MAGIC, session, seq, tag
_ROWS = {'keys': 'Q', 'columns': 'i', 't_ns': 'q', 'auth': 'Q'}


def _probe_row(buf, q, caplen):
    """``(session, key, auth)`` of the frame at ``buf[q:q+caplen]`` when
    it is an untagged Ethernet + IPv4 (no options, not a later fragment)
    ICMP echo or UDP probe, or an echo reply, holding all of its tag;
    else None."""
    if caplen < 14 + _AUTH_NEED:
        return None
    etype, = _ECHO_ID.unpack_from(buf, q + 12)
    ip = q + 14
    l4 = ip + 20
    if (etype != 0x0800 or buf[ip] != 0x45 or buf[ip + 6] & 0x1f or
            buf[ip + 7]):
        return None
    total, = _ECHO_ID.unpack_from(buf, ip + 2)
    if 0 < total < _AUTH_NEED:
        return None
    magic, session, seq, tag = _TAG_AT.unpack_from(buf, l4 + 8)
    if magic != probe.MAGIC:
        return None
    proto = buf[ip + 9]
    if proto == 1:
        reply = {8: 0, 0: 1}.get(buf[l4])
        if reply is None or _ECHO_ID.unpack_from(buf, l4 + 4)[0] != session:
            return None
    elif proto == 17:
        if _ECHO_ID.unpack_from(buf, l4)[0] != probe.udp_source_port(
                session):
            return None
        reply = 0
    else:
        return None
    # The answer's source, the probe's destination.
    addr = ip + (12 if reply else 16)
    return (session, seq << 1 | reply,
            tag ^ int.from_bytes(buf[addr:addr + 4], 'big'))


def _walk_block(b, size, session, columns, rows):
    """:func:`ring_take`'s walk of one block (bytes ``b``): ``(None,
    packets)`` with its wanted rows appended to ``rows``, else ``(stop,
    None)``, ``stop`` :data:`TAKE_SLOW` or an ifindex the table lacks,
    and ``rows`` as they were."""
    if size < 24:
        return TAKE_SLOW, None
    count, first = _TP3_BLOCK.unpack_from(b, 12)
    if count > size // _TP3_NEED:
        return TAKE_SLOW, None
    kept = {name: array.array(code) for name, code in _ROWS.items()}
    types = bytearray()
    h = first
    for i in range(count):
        if h > size - _TP3_NEED:
            return TAKE_SLOW, None
        nxt, sec, nsec, snaplen, status, mac = _TP3_HDR.unpack_from(b, h)
        ifindex, = _TP3_IFINDEX.unpack_from(b, h + 52)
        if ifindex < 0:
            return TAKE_SLOW, None
        if ifindex >= len(columns) or columns[ifindex] < -1:
            return ifindex, None
        column = columns[ifindex]
        if column >= 0:
            if status & _TP_STATUS_VLAN_VALID:
                return TAKE_SLOW, None
            if mac > size - h or snaplen > size - h - mac:
                return TAKE_SLOW, None
            found = _probe_row(b, h + mac, snaplen)
            if found is None or found[0] != session:
                return TAKE_SLOW, None
            kept['keys'].append(found[1])
            kept['auth'].append(found[2])
            kept['t_ns'].append(sec * 1_000_000_000 + nsec)
            kept['columns'].append(column)
            types.append(b[h + 58])
        if i + 1 < count:
            if not nxt:
                return TAKE_SLOW, None
            h += nxt
    for name, col in kept.items():
        rows[name] += col.tobytes()
    rows['pkttype'] += types
    return None, count


def ring_take_python(ring, block_bytes, nblocks, cursor, session, table,
                     out, directions):
    """:func:`ring_take` in Python."""
    view = memoryview(ring).cast('B')
    place = memoryview(cursor).cast('B')
    if view.readonly or place.readonly:
        raise TypeError('ring_take: the ring and cursor must be writable')
    if len(place) != 8 or len(directions) != 256:
        raise ValueError('ring_take: cursor must be 8 bytes, directions 256')
    next, = _I64N.unpack_from(place)
    columns = array.array('i')
    if (block_bytes < 48 or block_bytes % 8 or nblocks < 1 or
            not 0 <= next < nblocks or nblocks > len(view) // block_bytes or
            len(memoryview(table).cast('B')) % columns.itemsize):
        raise ValueError('ring_take: bad bounds')
    if (len(out) != len(_OUT_ITEMS) or
            [memoryview(c).itemsize for c in out] != _OUT_ITEMS):
        raise ValueError('ring_take: out must hold five columns of 8-, 4-, '
                         '8-, 1- and 8-byte items')
    columns.frombytes(bytes(table))
    rows = {name: bytearray() for name in (*_ROWS, 'pkttype')}
    seen = 0
    stop = TAKE_IDLE
    for _ in range(nblocks):
        base = next * block_bytes
        status, = _U32N.unpack_from(view, base + 8)
        if not status & _TP_STATUS_USER:
            break
        length, = _U32N.unpack_from(view, base + 20)
        length = min(max(length, 48), block_bytes)
        walked, found = _walk_block(bytes(view[base:base + length]), length,
                                    session, columns, rows)
        if walked is not None:
            stop = walked
            break
        seen += found
        view[base + 8:base + 12] = bytes(4)     # read: the kernel's again
        next = (next + 1) % nblocks
    view.release()
    _I64N.pack_into(place, 0, next)
    place.release()
    kept = len(rows['pkttype'])
    if kept:
        for column, data in zip(out, (
                rows['keys'], rows['columns'], rows['t_ns'],
                bytes(rows['pkttype']).translate(directions), rows['auth'])):
            column.frombytes(data)
    return seen, kept, stop


def walk_pcap(buf, o, end, cap_at, big, pair, limit, count):
    """``(offsets, next, complete)``: up to ``count`` pcap record offsets
    from ``o``.

    A record's 16-byte header holds its capture length at ``cap_at`` (4
    bytes, big-endian if ``big``; with ``pair`` the smaller of those at
    ``cap_at`` and ``cap_at + 4``).  The walk stops before a record whose
    header or data passes ``end`` or whose capture length exceeds
    ``limit``; ``next`` is the offset after the last record taken,
    ``complete`` whether ``count`` were taken.
    """
    if _pcapwalk is None:
        return walk_pcap_python(buf, o, end, cap_at, big, pair, limit, count)
    return _pcapwalk.walk_pcap(buf, o, end, cap_at, big, pair, limit, count)


def walk_epb(buf, o, end, big, count):
    """``(offsets, next, iface_id)``: up to ``count`` offsets of sound
    pcapng enhanced packet blocks of one interface from ``o``.

    Sound: type 6, a length that is a multiple of 4, ends within ``end``,
    holds the padded capture length and is repeated in the trailer.  The
    walk stops before any other block and before another interface's;
    ``iface_id`` is that of the blocks taken (-1: none).
    """
    if _pcapwalk is None:
        return walk_epb_python(buf, o, end, big, count)
    return _pcapwalk.walk_epb(buf, o, end, big, count)


def heads(buf, offsets, size):
    """The first ``size`` bytes of each record at ``offsets`` in ``buf``,
    side by side (zero-padded where ``buf`` ends first)."""
    if _pcapwalk is None:
        return heads_python(buf, offsets, size)
    return _pcapwalk.heads(buf, offsets, size)


def select(buf, start, stride, size, flags):
    """The ``size`` bytes at ``start + i * stride`` of ``buf`` for every
    ``i`` whose byte in ``flags`` is not 0, side by side (zero-padded
    where ``buf`` ends first): ``itertools.compress`` of a column of
    items, without a Python object per item."""
    if _pcapwalk is None:
        return select_python(buf, start, stride, size, flags)
    return _pcapwalk.select(buf, start, stride, size, flags)


def ring_take(ring, block_bytes, nblocks, cursor, session, table, out,
              directions):
    """Read the blocks of a ``TPACKET_V3`` receive ring that the kernel
    handed over, in place, while each holds only probes the capture can
    key here; give each back to the kernel once read.

    ``ring``: the ring's memory (writable), ``nblocks`` blocks of
    ``block_bytes``; ``cursor``: the block to read first, one native
    8-byte integer (``array('q')``), moved on past the blocks read.
    ``table``: native 32-bit integers, a kernel ifindex's batch column
    (-1: the interface is not wanted, its packets are skipped).  A block
    is read here when each packet it holds of a wanted interface is an
    untagged Ethernet + IPv4 ICMP echo or UDP probe of ``session``, or an
    echo reply, holding all of its tag, with no VLAN tag taken out by the
    kernel.  Their rows are appended (``frombytes``) to the five columns
    of the tuple ``out``: keys (``'Q'``), batch columns (``'i'``),
    nanosecond times (``'q'``), directions (``'B'``:
    ``directions[packet type]``, a 256-byte table) and auths (``'Q'``).

    Returns ``(seen, kept, stop)``: the packets of the blocks read, the
    rows appended, and why it stopped at block ``cursor[0]``:
    :data:`TAKE_IDLE` (the kernel's still), :data:`TAKE_SLOW` (another
    session, VLAN tags, TCP, tunnels, an ICMP error, a damaged block...:
    the caller decodes that block in columns, see
    :mod:`netweaver_agent.core.ring`) or an ifindex that ``table`` has no
    column for (outside it or below -1: fill it and call again).
    """
    if _pcapwalk is None:
        return ring_take_python(ring, block_bytes, nblocks, cursor, session,
                                table, out, directions)
    return _pcapwalk.ring_take(ring, block_bytes, nblocks, cursor, session,
                               table, out, directions)


def ring_take_function():
    """:func:`ring_take` itself, C or Python, for a reader calling it on
    every wake-up (without this module's dispatch)."""
    if _pcapwalk is None:
        return ring_take_python
    return _pcapwalk.ring_take
