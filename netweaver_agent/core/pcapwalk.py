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

import itertools
import os
import struct

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
