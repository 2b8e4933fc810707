"""Classic pcap files (tcpdump's ``-w``), read into :class:`pcaprows.Rows`.

Magic ``a1b2c3d4`` (µs) and ``a1b23c4d`` (ns), either byte order, versions
2.0 to 2.4 (and DG/UX's 543.0) as libpcap reads them (:func:`_lengths_order`:
before 2.3 a record header holds the original length before the capture
length; 2.3 files were written both ways).  Runs of equal-length records are
read as columns in place; records of mixed lengths are ruled out by the
prefilters or set aside by length and read as runs too (:class:`Reader`).
Timestamps become integer nanoseconds (``sec * 10**9 + frac * 1 or
1000``); a fraction out of range is an error naming the record, or
(lenient) skipped and counted.
"""

import array
import struct

from netweaver_agent.core import pcapkeys
from netweaver_agent.core import pcaprows
from netweaver_agent.core import pcapwalk
from netweaver_agent.core import sightings

PCAP_MAGIC_US = 0xa1b2c3d4
PCAP_MAGIC_NS = 0xa1b23c4d
MAX_CAPLEN = 0x40000        # tcpdump's largest snapshot length

# Where a record header's capture length is (libpcap's sf-pcap.c,
# ``lengths_swapped``): after the original length, before it, or wherever
# the smaller of the two is.
SWAPPED = 'swapped'
NOT_SWAPPED = 'not swapped'
MAYBE_SWAPPED = 'maybe swapped'


def _lengths_order(version):
    """How records of pcap ``version`` (major, minor) order their two
    lengths; None: a version libpcap does not read.

    The fields were interchanged at 2.3 to match the BPF header, but some
    2.3 files were written in the old order: a 2.3 record whose first
    length is the larger has them swapped.  DG/UX tcpdump wrote version
    543.0 in the old order.
    """
    if version == (543, 0):
        return SWAPPED
    major, minor = version
    if major != 2 or minor > 4:
        return None
    if minor < 3:
        return SWAPPED
    return MAYBE_SWAPPED if minor == 3 else NOT_SWAPPED


def _pcap_header(buf, path):
    for order in ('<', '>'):
        magic, = struct.unpack_from(order + 'I', buf, 0)
        if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            version = struct.unpack_from(order + 'HH', buf, 4)
            lengths = _lengths_order(version)
            if lengths is None:
                raise pcaprows.PcapError(
                    f"{path}: pcap version {version[0]}.{version[1]} is not "
                    "supported (2.4 is what tcpdump writes; 2.0 to 2.3 and "
                    "DG/UX's 543.0 are read too)")
            snaplen, network = struct.unpack_from(order + 'II', buf, 16)
            return order, magic == PCAP_MAGIC_NS, snaplen, network, lengths
    raise pcaprows.PcapError(f"{path}: not a pcap or pcapng file (starts with "
                             f"{bytes(buf[:4]).hex()})")


def _pcap_times(secs, fracs, mult, big):
    """``sec * 1e9 + frac * mult`` for every record at once (64-bit lanes:
    no record's value exceeds 2**63, so nothing carries between them)."""
    n = len(secs) // 4
    t = (pcapkeys.lanes(secs, 4, big) * pcaprows.NS +
         pcapkeys.lanes(fracs, 4, big) * mult)
    return pcapkeys.from_lanes(t, n, 'q')


def _either(short, other):
    """``short(need)`` for :func:`pcaprows.prefilter`: records either of
    two ``shorter_than`` masks marks."""
    return lambda need: short(need) | other(need)


class Reader:
    """Walks the records of a classic pcap file.

    Runs of equal-length records are read as columns in place.  Records
    outside runs (lengths alternating, say probes and ICMP errors) are set
    aside by length, copied together and read as columns too, so the
    batch's rows are not in the file's order.
    """

    def __init__(self, buf, rows):
        self.buf = buf
        self.rows = rows
        self.path = rows.path
        end = len(buf)
        if end < 24:
            raise pcaprows.PcapError(
                f"{self.path}: truncated pcap file header "
                f"({end} of 24 bytes)")
        order, nano, self.snaplen, network, lengths = _pcap_header(
            buf, self.path)
        linktype = network & 0x0fffffff
        rows.linktypes.add(linktype)
        self.link = pcapkeys.LINKS.get(linktype)
        if self.link is None:
            raise pcaprows.link_refusal(self.path, linktype)
        self.mult = 1 if nano else 1000
        self.frac_limit = pcaprows.NS if nano else 1_000_000
        self.unit = 'ns' if nano else 'µs'
        self.big = order == '>'
        self.hdr_time = struct.Struct(order + 'II').unpack_from
        # hdr_caplen(buf, o + cap_at): the capture length of the record at
        # o (a 1-tuple); runs share the key_size bytes at +key_at.
        self.cap_at = self.key_at = 12 if lengths == SWAPPED else 8
        self.key_size = 4
        self.hdr_caplen = struct.Struct(order + 'I').unpack_from
        self.maybe_swapped = lengths == MAYBE_SWAPPED
        if self.maybe_swapped:
            pair = struct.Struct(order + 'II').unpack_from
            self.hdr_caplen = lambda b, at: (min(pair(b, at)),)
            self.key_size = 8
        self.ifindex = rows.interface(pcaprows.stem(self.path))
        self.aside = {}                 # caplen -> [record offsets]

    def read(self):
        buf, rows = self.buf, self.rows
        end = len(buf)
        columnar = self.link is not None
        o = 24
        block = pcaprows.BACKOFF
        while o < end:
            rows.report_progress(o, end)
            caplen = self._caplen(o, end)
            if caplen is None:
                break
            stride = 16 + caplen
            n = 1
            if columnar:
                at = o + self.key_at
                n = rows.run_length(buf, o, stride, end, self.key_at,
                                    bytes(buf[at:at + self.key_size]))
            if n > 1:
                self._run(buf, o, stride, n)
                o += stride * n
                block = pcaprows.BACKOFF
            elif columnar:
                o = self._walk(o, end, block)
                block = min(2 * block, pcaprows.MAX_BLOCK)
            else:
                self._one(buf, o)
                o += stride
        for caplen in list(self.aside):
            self._set_aside(caplen)

    def _caplen(self, o, end):
        """The capture length of the record at ``o``; None: cut short."""
        if end - o < 16:
            self.rows.truncate(o, 'record header')
            return None
        caplen, = self.hdr_caplen(self.buf, o + self.cap_at)
        limit = max(self.snaplen, MAX_CAPLEN)
        if caplen > limit:
            raise pcaprows.PcapError(
                f"{self.path}: corrupt record header at byte "
                f"{o}: capture length {caplen} exceeds {limit}")
        if o + 16 + caplen > end:
            self.rows.truncate(o, 'record')
            return None
        return caplen

    def _walk(self, o, end, count=pcaprows.BACKOFF):
        """Sort up to ``count`` records from ``o`` (:meth:`_sort`); the
        next record's offset (``end`` when the file ends or is cut
        short)."""
        offsets, o, complete = pcapwalk.walk_pcap(
            self.buf, o, end, self.cap_at, self.big, self.maybe_swapped,
            max(self.snaplen, MAX_CAPLEN), count)
        self._sort(offsets)
        if complete:
            return o
        if o < end and self._caplen(o, end) is None:
            return end
        return o

    def _sort(self, offsets):
        """Records of mixed lengths: those the prefilters rule out are
        counted (and fingerprinted where that may find something) from a
        copy of their first bytes, read as columns; the rest are set
        aside by length (:meth:`_set_aside` reads them as runs)."""
        if len(offsets) > pcaprows.BACKOFF:
            offsets = self._rule_out(offsets)
        buf, aside, get = self.buf, self.aside, self.hdr_caplen
        at = self.cap_at
        for o in offsets:
            caplen, = get(buf, o + at)
            bucket = aside.get(caplen)
            if bucket is None:
                bucket = aside[caplen] = []
            bucket.append(o)
            if len(bucket) == pcaprows.MAX_RUN:
                self._set_aside(caplen)

    def _rule_out(self, offsets):
        """The records of ``offsets`` the prefilters cannot rule out."""
        buf, rows, link = self.buf, self.rows, self.link
        n = len(offsets)
        size = 16 + pcaprows.PREFIX
        packed = pcapwalk.heads(buf, offsets, size)
        column = pcapkeys.column
        fracs = column(packed, 4, size, n, 4)
        if max(pcapkeys.ints(fracs, 'I', self.big)) >= self.frac_limit:
            return offsets                  # _one says which, or skips
        short = pcaprows.shorter_than(packed, self.cap_at, size, n,
                                      self.big)
        if self.maybe_swapped:          # the smaller length is short
            short = _either(short, pcaprows.shorter_than(packed, 12, size,
                                                         n, self.big))
        columns = {}

        def rows_of(need=None):
            """Times, capture lengths and directions of the block."""
            if not columns:
                columns['t'] = _pcap_times(column(packed, 0, size, n, 4),
                                           fracs, self.mult, self.big)
                columns['caps'] = self._caplens(packed, size, n)
                off = 16 + (link.pkttype_off or 0)
                columns['dir'] = (column(packed, off, size, n).translate(
                    pcaprows.PKTTYPE_DIR) if link.pkttype_off is not None else
                    bytes([sightings.DIR_UNKNOWN]) * n)
            return columns['t'], columns['caps'], columns['dir']

        return pcaprows.prefilter(rows, buf, offsets, packed, 16, n, link,
                                  self.ifindex, short, rows_of)

    def _caplens(self, packed, size, n):
        """The capture lengths of the ``n`` record heads of ``packed``."""
        column, big = pcapkeys.column, self.big
        caps = pcapkeys.ints(column(packed, self.cap_at, size, n, 4), 'I',
                             big)
        if self.maybe_swapped:
            caps = array.array('I', map(min, caps, pcapkeys.ints(
                column(packed, 12, size, n, 4), 'I', big)))
        return caps

    def _record_number(self, offset):
        """The 1-based number of the record at byte ``offset`` (walks the
        record headers from the start: for error messages only)."""
        o, n, get, at = 24, 1, self.hdr_caplen, self.cap_at
        while o < offset:
            o += 16 + get(self.buf, o + at)[0]
            n += 1
        return n

    def _bad_time(self, offset, frac):
        """A record whose fraction field is out of range: an error, or
        (lenient) skipped and counted."""
        if self.rows.lenient:
            self.rows.records += 1
            self.rows.invalid_times += 1
            return
        raise pcaprows.PcapError(
            f"{self.path}: record {self._record_number(offset)} (byte "
            f"{offset}) has an invalid timestamp: fraction {frac} "
            f"{self.unit} is not below {self.frac_limit:,} (use --lenient "
            "to skip such records)")

    def _one(self, buf, o, at=None):
        """The record at ``buf[o:]`` (``at``: its offset in the file when
        ``buf`` is a copy)."""
        sec, frac = self.hdr_time(buf, o)
        caplen, = self.hdr_caplen(buf, o + self.cap_at)
        if frac >= self.frac_limit:
            return self._bad_time(o if at is None else at, frac)
        link = self.link
        direction = sightings.DIR_UNKNOWN
        if link is not None and link.pkttype_off is not None \
                and caplen > link.pkttype_off:
            direction = pcaprows.PKTTYPE_DIR[buf[o + 16 + link.pkttype_off]]
        self.rows.one(buf, o + 16, caplen, link,
                      sec * pcaprows.NS + frac * self.mult, self.ifindex,
                      direction)

    def _run(self, buf, o, stride, n, offsets=None):
        """``n`` records of one length from ``o`` (``offsets``: theirs in
        the file when ``buf`` is a copy)."""
        column = pcapkeys.column
        fracs = column(buf, o + 4, stride, n, 4)
        if max(pcapkeys.ints(fracs, 'I', self.big)) >= self.frac_limit:
            for i in range(n):
                self._one(buf, o + i * stride,
                          o + i * stride if offsets is None else offsets[i])
            return
        t_ns = _pcap_times(column(buf, o, stride, n, 4), fracs, self.mult,
                           self.big)
        direction = sightings.DIR_UNKNOWN
        if self.link.pkttype_off is not None:
            direction = column(buf, o + 16 + self.link.pkttype_off, stride,
                               n).translate(pcaprows.PKTTYPE_DIR)
        self.rows.run(buf, o + 16, stride, n, stride - 16, self.link, t_ns,
                      self.ifindex, direction)

    def _set_aside(self, caplen):
        """Read the records set aside with this length, as one run."""
        offsets = self.aside.pop(caplen)
        buf = self.buf
        if len(offsets) < pcaprows.MIN_RUN:
            for o in offsets:
                self._one(buf, o)
            return
        stride = 16 + caplen
        packed = b''.join([buf[o:o + stride] for o in offsets])
        self._run(packed, 0, stride, len(offsets), offsets)
