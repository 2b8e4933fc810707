"""Read tcpdump captures (pcap, pcapng) into :class:`sightings.SightingBatch`.

Formats: classic pcap (magic ``a1b2c3d4`` µs and ``a1b23c4d`` ns, either
byte order) and pcapng (sections of either byte order; interface blocks with
``if_name``, ``if_tsresol`` and ``if_tsoffset``; enhanced packet blocks with
``epb_flags`` direction; obsolete packet blocks).  Link types: Ethernet,
Linux cooked v1 and v2 (``tcpdump -i any``; their packet type gives the
direction).  Simple packet blocks carry no timestamp: they are counted as
``untimed`` and measure nothing.  Other link types are counted, not read.

Timestamps become integer nanoseconds since the epoch exactly (integer
arithmetic, never a float); resolutions finer than 1 ns are truncated.

**Fast path.**  Per-packet Python objects cap near 0.3M packets/s, so the
file is mapped into memory and read as *runs* of equal-length records (a
probe capture is mostly that): every field of a whole run is pulled out
at once and turned into keys by :func:`pcapkeys.run_keys`.  Records
outside runs (a pif capture of UDP probes and the guest's ICMP errors
alternates two lengths) are set aside by length, copied together and read
the same way, so a batch's rows are *not* in the file's order.  Everyday
traffic (a pif's TCP, ARP, DNS, IPv6, VLANs, all lengths) is mostly no
probe: blocks of up to :data:`MAX_BLOCK` records of mixed lengths have
their first :data:`PREFIX` bytes copied side by side, and the prefilters
(:func:`pcapkeys.probe_candidates`, :func:`pcapkeys.fingerprint_candidates`)
rule out in columns what cannot be a probe (or a fingerprint to or from
the instance); only the rest is set aside and read.  VLAN tags,
IP options, IPv6, VXLAN, Geneve and foreign traffic are read one record at
a time by :func:`pcapkeys.frame_key`.  Both give exactly the keys
:func:`probe.parse_key` gives.

**Encapsulation.**  VLAN tags stay in the frames tcpdump writes (libpcap
puts back the tag the kernel took out); probes inside VXLAN or Geneve are
keyed by the inner frame.  The batch's ``encap`` holds the tags' VLAN ids,
the tunnel and its VNI (see :class:`sightings.SightingBatch`), as a live
capture does.

**Sessions.**  A file may hold probes of several windows (sessions); the
most common one is kept unless another is asked for.

**Fingerprint mode** (foreign traffic, e.g. the seed's hping3 SYNs with
random sequence numbers and no tag of ours): the key of an IPv4 packet is
a 63-bit BLAKE2b hash of its source and destination addresses, IP id,
protocol and the first 8 bytes of its transport header (TCP ports and
sequence number; UDP ports, length and checksum; ICMP type, code, checksum,
id and sequence): fields no bridge or veth changes.  IPv6: addresses, next
header, payload length and the first 8 bytes after the fixed header.  The
reply bit is set when the packet comes *from* ``dst_ip`` (the instance);
without ``dst_ip`` every packet counts as a probe.  Only request/response
traffic is keyed: unicast TCP, UDP (not DHCP), ICMP/ICMPv6 echo and the
errors quoting a packet, to or from ``dst_ip``; ARP, IGMP, neighbour
discovery, router solicitations, MLD and broadcast never are.  VXLAN and
Geneve packets are keyed by their inner packet, the VNI kept in ``encap``.
A request to ``dst_ip`` and the instance's answer to it (ICMP/ICMPv6 echo:
addresses, id and sequence; TCP SYN and the SYN-ACK or RST-ACK with ack =
seq + 1: addresses, ports, the SYN's sequence number) share their key but
for the reply bit, so the guest's turnaround is measured as for probes.
Fingerprint rows have session 0.  Packets with identical invariant fields
(retransmissions) share a key: the matcher keeps the first sighting on
each interface.

**One read.**  :func:`read_capture` reads a file once, whatever the
analysis needs: probe rows of every session and, asked for, fingerprint
rows of the records that are no probe (what auto mode falls back on), so
a pipe, a fifo, process substitution or ``-`` (standard input) is read
like a file (those are copied into memory; files are mapped).

**Errors.**  An empty, unknown or corrupt file raises :class:`PcapError`
naming the file and the byte offset, as do what tcpdump refuses (a pcap
version other than 2.3/2.4, a pcapng section version other than 1.0/1.2)
and what it would misread: a link type netweaver does not read (the
message says which it reads) and a timestamp whose fraction is out of
range (µs >= 1,000,000, ns >= 10**9), named by record number and byte;
with ``lenient`` such records are skipped and counted
(:attr:`PcapRead.invalid_times`) instead.  A *truncated last record*
(tcpdump killed mid-write) is a warning, not an error: the records before
it are kept, the partial one is dropped and :attr:`PcapRead.truncated` is
set.
"""

import array
import collections
import contextlib
import dataclasses
import itertools
import mmap
import os
import socket
import stat
import struct
import sys
import time

from oslo_log import log

from netweaver_agent.core import pcapkeys
from netweaver_agent.core import probe
from netweaver_agent.core import sightings

LOG = log.getLogger(__name__)

PCAP_MAGIC_US = 0xa1b2c3d4
PCAP_MAGIC_NS = 0xa1b23c4d
PCAPNG_SHB = 0x0a0d0d0a
PCAPNG_BOM = 0x1a2b3c4d
PCAPNG_BOM_SWAPPED = 0x4d3c2b1a
PCAPNG_IDB = 1
PCAPNG_OPB = 2
PCAPNG_SPB = 3
PCAPNG_EPB = 6

MAX_CAPLEN = 0x40000        # tcpdump's largest snapshot length
MIN_RUN = 16                # shorter runs are read record by record
MAX_RUN = 1 << 16           # records per columnar step
BACKOFF = 64                # records read one by one after a failed run
MAX_BLOCK = 4096            # records of mixed lengths sorted at once
PREFIX = 80                 # bytes of each frame the prefilters read
NS = 1_000_000_000
STDIN = '-'
PCAP_VERSIONS = ((2, 3), (2, 4))        # tcpdump writes 2.4
PCAPNG_VERSIONS = ((1, 0), (1, 2))      # what libpcap reads
LINK_NAMES = {0: 'BSD loopback', 101: 'raw IP', 105: 'IEEE 802.11',
              127: '802.11 radiotap', 228: 'raw IPv4', 229: 'raw IPv6'}
PROGRESS_EVERY_S = 1.0

# Linux packet type -> direction (4 is PACKET_OUTGOING).
_PKTTYPE_DIR = bytes(sightings.DIR_IN if b < 4 else
                     sightings.DIR_OUT if b == 4 else sightings.DIR_UNKNOWN
                     for b in range(256))
# epb_flags bits 0-1 (0 unknown, 1 inbound, 2 outbound) -> direction.
_EPB_DIR = bytes((sightings.DIR_UNKNOWN, sightings.DIR_IN, sightings.DIR_OUT,
                  sightings.DIR_UNKNOWN)[b & 3] for b in range(256))


class PcapError(ValueError):
    """A capture file cannot be read; the message names file and offset."""


@dataclasses.dataclass(frozen=True, slots=True)
class PcapRead:
    """What :func:`read_pcap` found in one file.

    ``records``: packet records read; ``probes``: rows kept (the batch);
    ``foreign``: records that are no probe or reply; ``other_sessions``:
    probe rows of the sessions not chosen; ``sessions``:
    ``((session, rows), ...)``, most common first; ``untimed``: packets
    without a timestamp (pcapng simple packet blocks); ``truncated``: the
    file ends inside a record, which was dropped.
    """

    path: str
    format: str
    linktypes: tuple
    batch: sightings.SightingBatch
    records: int
    probes: int
    foreign: int
    other_sessions: int
    sessions: tuple
    untimed: int = 0
    truncated: bool = False
    # Records skipped for a timestamp field out of range (lenient reads).
    invalid_times: int = 0

    @property
    def session(self):
        return self.batch.session

    @property
    def directions_known(self):
        """Whether the file says which way its rows went (pcapng
        ``epb_flags``, Linux cooked packet types); None without rows."""
        d = self.batch.direction
        if not d:
            return None
        return d.count(sightings.DIR_UNKNOWN) == 0


def _encap_rank(e):
    return (e.vni is None, len(e.vlan), e.vlan, e.vni or 0, e.tunnel or '')


def _keep_encap(encap, at, found):
    """One encapsulation per (session, key, interface), chosen whatever
    order the records are met in (blocks read in columns do not meet them
    in the file's order): a tunnel's (with its VNI) over tags alone, then
    the fewest and lowest VLAN ids."""
    held = encap.get(at)
    if held is None or _encap_rank(found) < _encap_rank(held):
        encap[at] = found


class _Rows:
    """Columns being filled (every session), and counters."""

    def __init__(self, path, keyfunc, ifname):
        self.path = path
        self.keyfunc = keyfunc
        self.columnar = keyfunc is pcapkeys.frame_key
        self.forced_name = ifname
        self.t_ns = array.array('q')
        self.keys = array.array('Q')
        self.ifindex = array.array('i')
        self.direction = array.array('B')
        self.auth = array.array('Q')    # probe.auth_value per row
        self.session_runs = []          # [[session, rows], ...]
        self.encap = {}                 # (session, key, ifindex) -> Encap
        self.ifnames = {}
        self._index_of = {}             # name -> index: O(1) per block
        self.records = 0
        self.untimed = 0
        self.truncated = False
        self.linktypes = set()
        # TCP probes' source port range (probe.tcp_ident keys), or None.
        self.tcp_ports = None
        # Fingerprint rows of the records that are no probe (a _Rows
        # sharing the interfaces), or None.
        self.prints = None
        self.lenient = False
        self.invalid_times = 0
        self.progress = None            # callable(done_bytes, total)
        # Prefilter of a run for fingerprint keys (see pcapkeys), and the
        # instance's address (packed) they are for.
        self.fp_filter = None
        self.fp_dst = None
        self._last_report = None

    def fingerprint_too(self, keyfunc, fp_filter, fp_dst):
        """Also key the records that are no probe with ``keyfunc``."""
        self.prints = _Rows(self.path, keyfunc, self.forced_name)
        self.prints.fp_filter = fp_filter
        self.prints.fp_dst = fp_dst
        self.prints.ifnames = self.ifnames
        self.prints._index_of = self._index_of

    def keyed(self, flags, keys, t_ns, ifindex, direction, encaps=None):
        """Fingerprint rows decided in columns: the records whose byte in
        ``flags`` is 1, with ``keys`` in their order (session 0) and, when
        they came under VLAN tags, ``encaps`` in the same order."""
        compress = itertools.compress
        self.t_ns.extend(compress(t_ns, flags))
        self.keys.extend(keys)
        self.ifindex.extend([ifindex] * len(keys))
        self.direction.extend(compress(direction, flags))
        self.auth.extend([0] * len(keys))
        self._sessions(0, len(keys))
        if encaps is not None:
            encap = self.encap
            for key, found in zip(keys, encaps):
                _keep_encap(encap, (0, key, ifindex), found)

    def report_progress(self, done, total):
        """Call ``progress`` about once a second after the first second."""
        if self.progress is None:
            return
        now = time.monotonic()
        if self._last_report is None:
            self._last_report = now
        elif now - self._last_report >= PROGRESS_EVERY_S:
            self._last_report = now
            self.progress(done, total)

    def interface(self, name):
        """The column index for interface ``name``."""
        name = self.forced_name or name
        index = self._index_of.get(name)
        if index is None:
            index = self._index_of[name] = len(self.ifnames)
            self.ifnames[index] = name
        return index

    def _sessions(self, session, count):
        runs = self.session_runs
        if runs and runs[-1][0] == session:
            runs[-1][1] += count
        else:
            runs.append([session, count])

    def one(self, buf, off, caplen, link, t_ns, ifindex, direction):
        """Read the record whose frame is ``buf[off:off+caplen]``."""
        self.records += 1
        if link is None:
            return
        found = self.keyfunc(buf, off, caplen, link)
        if found is not None and not self._tcp_port_ok(found[1]):
            found = None
        if found is None and self.prints is not None:
            self.prints.one(buf, off, caplen, link, t_ns, ifindex, direction)
        if found is not None:
            if len(found) > 2:
                _keep_encap(self.encap, (found[0], found[1], ifindex),
                            found[2])
            self._sessions(found[0], 1)
            self.keys.append(found[1])
            self.t_ns.append(t_ns)
            self.ifindex.append(ifindex)
            self.direction.append(direction)
            self.auth.append((pcapkeys.frame_auth(
                buf, off, caplen, link,
                found[2].tunnel if len(found) > 2 else None) or 0)
                if self.columnar else 0)

    def _tcp_port_ok(self, key):
        """False for a TCP probe key whose port lies outside the range."""
        if self.tcp_ports is None or not key >> 33:
            return True
        port = probe.tcp_ident_port(key >> 1)
        return port is None or port in self.tcp_ports

    def run(self, buf, first, stride, n, caplen, link, t_ns, ifindex,
            direction):
        """Read ``n`` records whose frames start ``stride`` bytes apart.

        ``t_ns`` holds ``n`` values; ``ifindex`` and ``direction`` too, or
        one int for all.
        """
        if isinstance(ifindex, int):
            ifindex = array.array('i', [ifindex]) * n
        if isinstance(direction, int):
            direction = bytes([direction]) * n
        direction = array.array('B', direction)
        found = (pcapkeys.run_keys(buf, first, stride, n, caplen, link)
                 if self.columnar else None)
        foreign = None
        if (found is not None and self.tcp_ports is not None and
                max(found.keys) >> 33):
            # TCP keys hold the port: rows from outside the range are
            # decided, and not ours.
            found, foreign = self._tcp_in_range(found, n)
        if found is not None and found.encaps is not None:
            self._run_encap(found, ifindex)
        if found is not None and found.all_ok:
            self.records += n
            self.t_ns.extend(t_ns)
            self.keys.extend(found.keys)
            self.ifindex.extend(ifindex)
            self.direction.extend(direction)
            self.auth.extend(found.auth)
            if found.session is not None:
                self._sessions(found.session, n)
            else:
                for s in found.sessions:
                    self._sessions(s, 1)
            return
        ok = bytes(n) if found is None else found.ok
        if found is not None:
            compress = itertools.compress
            self.t_ns.extend(compress(t_ns, ok))
            self.keys.extend(compress(found.keys, ok))
            self.ifindex.extend(compress(ifindex, ok))
            self.direction.extend(compress(direction, ok))
            self.auth.extend(compress(found.auth, ok))
            for s in compress(found.sessions, ok):
                self._sessions(s, 1)
            self.records += n - ok.count(0)
        self._undecided(buf, first, stride, n, caplen, link, t_ns, ifindex,
                        direction, ok, foreign)

    def _undecided(self, buf, first, stride, n, caplen, link, t_ns,
                   ifindex, direction, ok, foreign):
        """The records of a run ``ok`` leaves (0): those the prefilters
        cannot rule out are read one by one (:meth:`one`), the rest are
        counted, and fingerprinted where that may find something."""
        ones = int.from_bytes(b'\x01' * n, 'little')      # a byte per row
        left = int.from_bytes(ok, 'little') ^ ones
        if not left:
            return
        if foreign is not None:
            foreign = int.from_bytes(foreign, 'little')
            left &= ~foreign
        prefilter = (pcapkeys.probe_candidates if self.columnar else
                     self.fp_filter)
        one = left & int.from_bytes(
            prefilter(buf, first, stride, n, caplen, link), 'little')
        rest = (left & ~one) | (foreign or 0)
        self.records += bin(rest).count('1')
        prints = self.prints
        if prints is not None and rest:
            rest &= int.from_bytes(prints.fp_filter(
                buf, first, stride, n, caplen, link), 'little')
        for mask, reader in ((one, self.one), (rest, None)):
            if not mask:
                continue
            if reader is None:
                if prints is None:
                    continue
                reader = prints.one
            flags = mask.to_bytes(n, 'little')
            i = flags.find(1)
            while i >= 0:
                reader(buf, first + i * stride, caplen, link, t_ns[i],
                       ifindex[i], direction[i])
                i = flags.find(1, i + 1)

    def _tcp_in_range(self, found, n):
        """``(found, foreign)``: ``found`` keeping the rows whose TCP port
        lies in the range, and the rows it left out (one byte per record,
        1 = not ours), or None when it kept them all.

        Every record at once: the keys as 64-bit lanes of one integer, the
        port (``key >> 17``) and the TCP_IDENT flag (``key >> 33``) cut
        out as byte columns, compared with translate tables.
        """
        keys = int.from_bytes(found.keys.tobytes(), sys.byteorder)
        ones = pcapkeys.repunit(n)
        port = ((keys >> 17) & ones * 0xffff).to_bytes(8 * n, 'little')
        flag = ((keys >> 33) & ones).to_bytes(8 * n, 'little')[0::8]
        hi, lo = port[1::8], port[0::8]
        first, last = self.tcp_ports[0], self.tcp_ports[-1]
        fh, fl = divmod(first, 256)
        lh, ll = divmod(last, 256)

        def test(col, pred):
            table = bytes(1 if pred(b) else 0 for b in range(256))
            return int.from_bytes(col.translate(table), 'little')

        above = test(hi, lambda b: b > fh) | (
            test(hi, lambda b: b == fh) & test(lo, lambda b: b >= fl))
        below = test(hi, lambda b: b < lh) | (
            test(hi, lambda b: b == lh) & test(lo, lambda b: b <= ll))
        inside = (above & below) | test(flag, lambda b: b != 1)
        ok = int.from_bytes(found.ok, 'little')
        keep = ok & inside
        if keep == ok:
            return found, None
        return (dataclasses.replace(found, ok=keep.to_bytes(n, 'little'),
                                    all_ok=False),
                (ok & ~keep).to_bytes(n, 'little'))

    def _run_encap(self, found, ifindex):
        """The tunnel of each decided record of a run (first per key)."""
        encap = self.encap
        for ok, s, k, i, e in zip(found.ok, found.sessions, found.keys,
                                  ifindex, found.encaps):
            if ok:
                _keep_encap(encap, (s, k, i), e)

    def run_length(self, buf, start, stride, end, at, pattern):
        """How many records from ``start`` have ``pattern`` at ``+at``.

        Records are ``stride`` bytes apart and must end by ``end``.  1 when
        the run is shorter than :data:`MIN_RUN`.  Columns are gathered in
        doubling sizes, so a short run costs little.
        """
        n_max = min(MAX_RUN, (end - start) // stride)
        if n_max < MIN_RUN:
            return 1
        size = len(pattern)
        n = MIN_RUN
        while True:
            col = pcapkeys.column(buf, start + at, stride, n, size)
            same = pcapkeys.equal_prefix(col, size, pattern)
            if same < n or n == n_max:
                return same if same >= MIN_RUN else 1
            n = min(2 * n, n_max)

    def truncate(self, offset, what):
        LOG.warning('%(path)s: the last %(what)s, at byte %(at)d, is cut '
                    'short (capture killed mid-write?); it is ignored',
                    {'path': self.path, 'what': what, 'at': offset})
        self.truncated = True


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


# --------------------------------------------------------------------------
# Classic pcap.

def _link_refusal(path, linktype, where=''):
    name = LINK_NAMES.get(linktype)
    name = f' ({name})' if name else ''
    return PcapError(
        f"{path}: {where}link type {linktype}{name} is not read by "
        "netweaver (it reads Ethernet (1), Linux cooked SLL (113) and "
        "SLL2 (276): capture on an Ethernet interface or with -i any)")


def _pcap_header(buf, path):
    for order in ('<', '>'):
        magic, = struct.unpack_from(order + 'I', buf, 0)
        if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
            version = struct.unpack_from(order + 'HH', buf, 4)
            if version not in PCAP_VERSIONS:
                raise PcapError(
                    f"{path}: pcap version {version[0]}.{version[1]} is not "
                    "supported (2.4 is what tcpdump writes; 2.3 is read "
                    "too)")
            snaplen, network = struct.unpack_from(order + 'II', buf, 16)
            return order, magic == PCAP_MAGIC_NS, snaplen, network
    raise PcapError(f"{path}: not a pcap or pcapng file (starts with "
                    f"{bytes(buf[:4]).hex()})")


def _pcap_times(secs, fracs, mult, big):
    """``sec * 1e9 + frac * mult`` for every record at once (64-bit lanes:
    no record's value exceeds 2**63, so nothing carries between them)."""
    n = len(secs) // 4
    t = (pcapkeys.lanes(secs, 4, big) * NS +
         pcapkeys.lanes(fracs, 4, big) * mult)
    return pcapkeys.from_lanes(t, n, 'q')


class _PcapFile:
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
            raise PcapError(f"{self.path}: truncated pcap file header "
                            f"({end} of 24 bytes)")
        order, nano, self.snaplen, network = _pcap_header(buf, self.path)
        linktype = network & 0x0fffffff
        rows.linktypes.add(linktype)
        self.link = pcapkeys.LINKS.get(linktype)
        if self.link is None:
            raise _link_refusal(self.path, linktype)
        self.mult = 1 if nano else 1000
        self.frac_limit = NS if nano else 1_000_000
        self.unit = 'ns' if nano else 'µs'
        self.big = order == '>'
        self.hdr = struct.Struct(order + 'IIII')
        self.hdr_caplen = struct.Struct(order + 'I').unpack_from
        self.ifindex = rows.interface(_stem(self.path))
        self.aside = {}                 # caplen -> [record offsets]

    def read(self):
        buf, rows = self.buf, self.rows
        end = len(buf)
        columnar = self.link is not None
        o = 24
        block = BACKOFF
        while o < end:
            rows.report_progress(o, end)
            caplen = self._caplen(o, end)
            if caplen is None:
                break
            stride = 16 + caplen
            n = 1
            if columnar:
                n = rows.run_length(buf, o, stride, end, 8,
                                    bytes(buf[o + 8:o + 12]))
            if n > 1:
                self._run(buf, o, stride, n)
                o += stride * n
                block = BACKOFF
            elif columnar:
                o = self._walk(o, end, block)
                block = min(2 * block, MAX_BLOCK)
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
        caplen, = self.hdr_caplen(self.buf, o + 8)
        limit = max(self.snaplen, MAX_CAPLEN)
        if caplen > limit:
            raise PcapError(f"{self.path}: corrupt record header at byte "
                            f"{o}: capture length {caplen} exceeds {limit}")
        if o + 16 + caplen > end:
            self.rows.truncate(o, 'record')
            return None
        return caplen

    def _walk(self, o, end, count=BACKOFF):
        """Sort up to ``count`` records from ``o`` (:meth:`_sort`); the
        next record's offset (``end`` when the file ends or is cut
        short)."""
        buf = self.buf
        get = self.hdr_caplen
        limit = max(self.snaplen, MAX_CAPLEN)
        offsets = []
        append = offsets.append
        for _ in range(count):
            if o + 16 > end:
                break
            caplen, = get(buf, o + 8)
            nxt = o + 16 + caplen
            if caplen > limit or nxt > end:
                break
            append(o)
            o = nxt
        else:
            self._sort(offsets)
            return o
        self._sort(offsets)
        if o < end and self._caplen(o, end) is None:
            return end
        return o

    def _sort(self, offsets):
        """Records of mixed lengths: those the prefilters rule out are
        counted (and fingerprinted where that may find something) from a
        copy of their first bytes, read as columns; the rest are set
        aside by length (:meth:`_set_aside` reads them as runs)."""
        if len(offsets) > BACKOFF:
            offsets = self._rule_out(offsets)
        buf, aside, get = self.buf, self.aside, self.hdr_caplen
        for o in offsets:
            caplen, = get(buf, o + 8)
            bucket = aside.get(caplen)
            if bucket is None:
                bucket = aside[caplen] = []
            bucket.append(o)
            if len(bucket) == MAX_RUN:
                self._set_aside(caplen)

    def _rule_out(self, offsets):
        """The records of ``offsets`` the prefilters cannot rule out."""
        buf, rows, link = self.buf, self.rows, self.link
        n = len(offsets)
        size = 16 + PREFIX
        packed = b''.join([buf[o:o + size] for o in offsets])
        if len(packed) != size * n:         # the last ones are shorter
            packed = b''.join([buf[o:o + size].ljust(size, b'\0')
                               for o in offsets])
        column = pcapkeys.column
        fracs = column(packed, 4, size, n, 4)
        if max(pcapkeys.ints(fracs, 'I', self.big)) >= self.frac_limit:
            return offsets                  # _one says which, or skips
        low, high = (11, 8) if self.big else (8, 11)
        wide = pcapkeys.zero(column(packed, high, size, n))
        for at in (9, 10):
            wide &= pcapkeys.zero(column(packed, at, size, n))

        def short(need):
            return wide & pcapkeys.below(column(packed, low, size, n), need)

        columns = {}

        def rows_of(need=None):
            """Times, capture lengths and directions of the block."""
            if not columns:
                columns['t'] = _pcap_times(column(packed, 0, size, n, 4),
                                           fracs, self.mult, self.big)
                columns['caps'] = pcapkeys.ints(
                    column(packed, 8, size, n, 4), 'I', self.big)
                off = 16 + (link.pkttype_off or 0)
                columns['dir'] = (column(packed, off, size, n).translate(
                    _PKTTYPE_DIR) if link.pkttype_off is not None else
                    bytes([sightings.DIR_UNKNOWN]) * n)
            return columns['t'], columns['caps'], columns['dir']

        return _prefilter(rows, buf, offsets, packed, 16, n, link,
                          self.ifindex, short, rows_of)

    def _record_number(self, offset):
        """The 1-based number of the record at byte ``offset`` (walks the
        record headers from the start: for error messages only)."""
        o, n, get = 24, 1, self.hdr_caplen
        while o < offset:
            o += 16 + get(self.buf, o + 8)[0]
            n += 1
        return n

    def _bad_time(self, offset, frac):
        """A record whose fraction field is out of range: an error, or
        (lenient) skipped and counted."""
        if self.rows.lenient:
            self.rows.records += 1
            self.rows.invalid_times += 1
            return
        raise PcapError(
            f"{self.path}: record {self._record_number(offset)} (byte "
            f"{offset}) has an invalid timestamp: fraction {frac} "
            f"{self.unit} is not below {self.frac_limit:,} (use --lenient "
            "to skip such records)")

    def _one(self, buf, o, at=None):
        """The record at ``buf[o:]`` (``at``: its offset in the file when
        ``buf`` is a copy)."""
        sec, frac, caplen, _orig = self.hdr.unpack_from(buf, o)
        if frac >= self.frac_limit:
            return self._bad_time(o if at is None else at, frac)
        link = self.link
        direction = sightings.DIR_UNKNOWN
        if link is not None and link.pkttype_off is not None \
                and caplen > link.pkttype_off:
            direction = _PKTTYPE_DIR[buf[o + 16 + link.pkttype_off]]
        self.rows.one(buf, o + 16, caplen, link, sec * NS + frac * self.mult,
                      self.ifindex, direction)

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
                               n).translate(_PKTTYPE_DIR)
        self.rows.run(buf, o + 16, stride, n, stride - 16, self.link, t_ns,
                      self.ifindex, direction)

    def _set_aside(self, caplen):
        """Read the records set aside with this length, as one run."""
        offsets = self.aside.pop(caplen)
        buf = self.buf
        if len(offsets) < MIN_RUN:
            for o in offsets:
                self._one(buf, o)
            return
        stride = 16 + caplen
        packed = b''.join([buf[o:o + stride] for o in offsets])
        self._run(packed, 0, stride, len(offsets), offsets)


def _prefilter(rows, buf, offsets, packed, head, n, link, ifindex, short,
               rows_of):
    """The records of a block of mixed lengths the prefilters cannot rule
    out (their offsets in ``buf``).

    ``packed``: each record's first ``head + PREFIX`` bytes side by side,
    the frame at ``head``; ``rows_of(need)``: the block's times, capture
    lengths and directions (right at least for the records ``need`` marks,
    a byte each); ``short``: see :func:`pcapkeys.probe_candidates`.  What
    is ruled out is counted, and fingerprinted where that may find
    something (in columns where :func:`pcapkeys.fingerprint_plain` can,
    else one by one).
    """
    size = head + PREFIX

    def plain(target, flags):
        """Key the plainest of ``flags`` into ``target`` in columns; the
        flags left to read one by one."""
        decided, parts = pcapkeys.fingerprint_plain(
            packed, head, size, n, link, target.fp_dst, short, flags)
        for keyed, keys, encaps in parts:
            t_ns, _, direction = rows_of(keyed)
            target.keyed(keyed, keys, t_ns, ifindex, direction, encaps)
        return (int.from_bytes(flags, 'little') &
                ~int.from_bytes(decided, 'little')).to_bytes(n, 'little')

    if rows.columnar:
        maybe = pcapkeys.probe_candidates(packed, head, size, n, PREFIX,
                                          link, short=short)
    else:
        found = rows.fp_filter(packed, head, size, n, PREFIX, link,
                               short=short)
        # What plain() decides is counted with what found rules out.
        maybe = plain(rows, found)
    if maybe.count(0) == 0:
        return offsets
    rows.records += maybe.count(0)
    prints = rows.prints
    if prints is not None:
        found = prints.fp_filter(packed, head, size, n, PREFIX, link,
                                 short=short)
        flags = (int.from_bytes(found, 'little') &
                 ~int.from_bytes(maybe, 'little')).to_bytes(n, 'little')
        flags = plain(prints, flags)
        i = flags.find(1)
        if i >= 0:
            t_ns, caps, direction = rows_of(flags)
        while i >= 0:
            prints.one(buf, offsets[i] + head, caps[i], link, t_ns[i],
                       ifindex, direction[i])
            i = flags.find(1, i + 1)
    return list(itertools.compress(offsets, maybe))


# --------------------------------------------------------------------------
# pcapng.

@dataclasses.dataclass(frozen=True, slots=True)
class _Iface:
    """One interface of a pcapng section."""

    link: pcapkeys.Link | None
    index: int
    to_ns: tuple          # (mul, div, shift, add), see _ts_converter
    linktype: int = 1


def _ts_converter(tsresol, tsoffset):
    """``(mul, div, shift, add)``: ``((ts * mul) >> shift) // div + add``."""
    add = tsoffset * NS
    if tsresol & 0x80:
        return NS, 1, tsresol & 0x7f, add
    if tsresol <= 9:
        return 10 ** (9 - tsresol), 1, 0, add
    return 1, 10 ** (tsresol - 9), 0, add


def _to_ns(ts, conv):
    mul, div, shift, add = conv
    return ((ts * mul) >> shift) // div + add


def _options(buf, start, stop, order):
    """``{code: value}`` of a pcapng option list (first of each code)."""
    out = {}
    o = start
    while o + 4 <= stop:
        code, length = struct.unpack_from(order + 'HH', buf, o)
        if code == 0:
            break
        out.setdefault(code, bytes(buf[o + 4:o + 4 + length]))
        o += 4 + ((length + 3) & ~3)
    return out


class _Pcapng:
    """Walks the blocks of a pcapng file."""

    def __init__(self, buf, rows):
        self.buf = buf
        self.rows = rows
        self.path = rows.path
        self.order = '<'
        self.ifaces = []
        self.ifindex = []       # ifaces' column indexes, kept alongside
        self.linktypes = {}     # linktype -> packets (unread link types)

    def read(self):
        self._read()
        unread = sum(self.linktypes.values())
        if unread and unread == self.rows.records - self.rows.untimed:
            raise _link_refusal(self.path, min(self.linktypes),
                                "every packet's ")

    def _read(self):
        buf, path, rows = self.buf, self.path, self.rows
        end = len(buf)
        if end < 28:
            raise PcapError(f"{path}: truncated pcapng section header "
                            f"({end} of 28 bytes)")
        o = 0
        backoff = 0
        block = 2 * BACKOFF
        while o < end:
            rows.report_progress(o, end)
            if end - o < 12:
                rows.truncate(o, 'block header')
                return
            if struct.unpack_from('<I', buf, o)[0] == PCAPNG_SHB:
                self._section(o)
            btype, blen = struct.unpack_from(self.order + 'II', buf, o)
            if blen < 12 or blen % 4:
                raise PcapError(f"{path}: corrupt pcapng block at byte {o}: "
                                f"length {blen}")
            if o + blen > end:
                if o == 0:
                    raise PcapError(f"{path}: truncated pcapng section "
                                    f"header ({end} of {blen} bytes)")
                rows.truncate(o, 'block')
                return
            trailer, = struct.unpack_from(self.order + 'I', buf,
                                          o + blen - 4)
            if trailer != blen:
                raise PcapError(f"{path}: corrupt pcapng block at byte {o}: "
                                f"length {blen}, trailer {trailer}")
            if btype == PCAPNG_EPB:
                n = 1
                if backoff:
                    backoff -= 1
                else:
                    n = self._epb_run(o, blen, end)
                    if n == 1:
                        backoff = BACKOFF
                        nxt = self._epb_walk(o, end, min(block, MAX_BLOCK))
                        if nxt > o:
                            backoff = 0
                            block = min(2 * block, MAX_BLOCK)
                            o = nxt
                            continue
                    else:
                        block = 2 * BACKOFF
                if n == 1:
                    self._packet(o, blen, btype)
                o += blen * n
                continue
            if btype == PCAPNG_IDB:
                self._idb(o, blen)
            elif btype == PCAPNG_OPB:
                self._packet(o, blen, btype)
            elif btype == PCAPNG_SPB:
                rows.records += 1
                rows.untimed += 1
            o += blen

    def _section(self, o):
        if len(self.buf) - o < 28:
            raise PcapError(f"{self.path}: truncated pcapng section header "
                            f"at byte {o}")
        bom, = struct.unpack_from('<I', self.buf, o + 8)
        if bom == PCAPNG_BOM:
            self.order = '<'
        elif bom == PCAPNG_BOM_SWAPPED:
            self.order = '>'
        else:
            raise PcapError(f"{self.path}: corrupt pcapng section header at "
                            f"byte {o}: byte-order magic 0x{bom:08x}")
        version = struct.unpack_from(self.order + 'HH', self.buf, o + 12)
        if version not in PCAPNG_VERSIONS:
            raise PcapError(
                f"{self.path}: pcapng section version {version[0]}."
                f"{version[1]} (at byte {o}) is not supported (1.0 is what "
                "tcpdump writes; 1.2 is read too)")
        self.ifaces = []
        self.ifindex = []

    def _idb(self, o, blen):
        buf, order, rows = self.buf, self.order, self.rows
        if blen < 20:
            raise PcapError(f"{self.path}: corrupt interface block at byte "
                            f"{o}: length {blen}")
        linktype, = struct.unpack_from(order + 'H', buf, o + 8)
        opts = _options(buf, o + 16, o + blen - 4, order)
        name = opts.get(2, b'').split(b'\0')[0].decode('utf-8', 'replace')
        if not name:
            name = f"{_stem(self.path)}#{len(self.ifaces)}"
        tsresol = opts.get(9, b'\x06')[0]
        tsoffset = 0
        if len(opts.get(14, b'')) == 8:
            tsoffset, = struct.unpack(order + 'q', opts[14])
        rows.linktypes.add(linktype)
        link = pcapkeys.LINKS.get(linktype)
        if link is None:
            LOG.warning('%(path)s: interface %(name)s has link type %(lt)d, '
                        'which is not supported',
                        {'path': self.path, 'name': name, 'lt': linktype})
        self.ifaces.append(_Iface(link, rows.interface(name),
                                  _ts_converter(tsresol, tsoffset),
                                  linktype))
        self.ifindex.append(self.ifaces[-1].index)

    def _iface(self, iface_id, o):
        if iface_id >= len(self.ifaces):
            raise PcapError(f"{self.path}: packet block at byte {o} names "
                            f"interface {iface_id}; the section describes "
                            f"{len(self.ifaces)}")
        return self.ifaces[iface_id]

    def _packet(self, o, blen, btype):
        """One enhanced (or obsolete) packet block."""
        buf, order = self.buf, self.order
        if blen < 32:
            raise PcapError(f"{self.path}: corrupt packet block at byte {o}:"
                            f" length {blen}")
        if btype == PCAPNG_EPB:
            iface_id, hi, lo, caplen, _orig = struct.unpack_from(
                order + 'IIIII', buf, o + 8)
        else:
            iface_id, _drops, hi, lo, caplen, _orig = struct.unpack_from(
                order + 'HHIIII', buf, o + 8)
        data = o + 28
        opt_start = data + ((caplen + 3) & ~3)
        if opt_start > o + blen - 4:
            raise PcapError(f"{self.path}: corrupt packet block at byte {o}:"
                            f" capture length {caplen} exceeds the block")
        iface = self._iface(iface_id, o)
        link = iface.link
        if link is None:
            self.linktypes[iface.linktype] = \
                self.linktypes.get(iface.linktype, 0) + 1
        direction = sightings.DIR_UNKNOWN
        if link is not None and link.pkttype_off is not None \
                and caplen > link.pkttype_off:
            direction = _PKTTYPE_DIR[buf[data + link.pkttype_off]]
        if btype == PCAPNG_EPB and opt_start < o + blen - 4:
            flags = _options(buf, opt_start, o + blen - 4, order).get(2)
            if flags is not None and len(flags) == 4:
                value, = struct.unpack(order + 'I', flags)
                if value & 3:
                    direction = _EPB_DIR[value & 3]
        t_ns = _to_ns((hi << 32) | lo, iface.to_ns)
        if not -(1 << 63) <= t_ns < 1 << 63:
            raise PcapError(f"{self.path}: the timestamp of the packet "
                            f"block at byte {o} is beyond the year 2262")
        self.rows.one(buf, data, caplen, link, t_ns, iface.index, direction)

    def _epb_walk(self, o, end, count):
        """Enhanced packet blocks of mixed lengths from ``o``, as
        :meth:`_PcapFile._sort` reads records: up to ``count`` sound
        blocks of one interface (of a link type read) are gathered, the
        prefilters rule out in columns what they can (:func:`_prefilter`)
        and the rest is read block by block.  The
        offset after them; ``o`` when fewer than :data:`BACKOFF` qualify
        (anything unusual ends the walk there and is read as before)."""
        buf = self.buf
        head = struct.Struct(self.order + 'IIIIII').unpack_from
        trailer = struct.Struct(self.order + 'I').unpack_from
        ifaces = self.ifaces
        offsets = []
        append = offsets.append
        first_id = None
        start = o
        while len(offsets) < count and o + 32 <= end:
            btype, blen, iface_id, _hi, _lo, caplen = head(buf, o)
            nxt = o + blen
            if (btype != PCAPNG_EPB or blen % 4 or nxt > end or
                    32 + ((caplen + 3) & ~3) > blen or
                    trailer(buf, nxt - 4)[0] != blen):
                break
            if iface_id != first_id:
                if first_id is not None or iface_id >= len(ifaces):
                    break
                if ifaces[iface_id].link is None:
                    break
                first_id = iface_id
            append(o)
            o = nxt
        if len(offsets) <= BACKOFF:
            return start
        rest = self._rule_out(offsets, ifaces[first_id])
        for r in rest:
            self._packet(r, trailer(buf, r + 4)[0], PCAPNG_EPB)
        return o

    def _rule_out(self, offsets, iface):
        """:func:`_prefilter` of enhanced packet blocks of ``iface``."""
        buf, rows, link, order = self.buf, self.rows, iface.link, self.order
        big = order == '>'
        n = len(offsets)
        size = 28 + PREFIX
        packed = b''.join([buf[o:o + size] for o in offsets])
        if len(packed) != size * n:         # the last ones are shorter
            packed = b''.join([buf[o:o + size].ljust(size, b'\0')
                               for o in offsets])
        column = pcapkeys.column
        low, high = (23, 20) if big else (20, 23)
        wide = pcapkeys.zero(column(packed, high, size, n))
        for at in (21, 22):
            wide &= pcapkeys.zero(column(packed, at, size, n))

        def short(need):
            return wide & pcapkeys.below(column(packed, low, size, n), need)

        # Every block's time is checked, keyed or not (as runs do).
        t_ns = self._times(column(packed, 12, size, n, 4),
                           column(packed, 16, size, n, 4), iface.to_ns,
                           offsets[0])
        columns = {}
        flags_of = struct.Struct(order + 'HHI').unpack_from

        def rows_of(need):
            """Times, capture lengths and directions (from ``epb_flags``
            for the records ``need`` marks)."""
            if not columns:
                columns['t'] = t_ns
                columns['caps'] = pcapkeys.ints(
                    column(packed, 20, size, n, 4), 'I', big)
                columns['blens'] = pcapkeys.ints(
                    column(packed, 4, size, n, 4), 'I', big)
                if link.pkttype_off is None:
                    columns['dir'] = bytearray([sightings.DIR_UNKNOWN]) * n
                else:
                    columns['dir'] = bytearray(column(
                        packed, 28 + link.pkttype_off, size, n).translate(
                            _PKTTYPE_DIR))
                columns['done'] = bytearray(n)
            caps, blens = columns['caps'], columns['blens']
            direction, done = columns['dir'], columns['done']
            i = need.find(1)
            while i >= 0:
                if not done[i]:
                    done[i] = 1
                    o = offsets[i]
                    opt = o + 28 + ((caps[i] + 3) & ~3)
                    stop = o + blens[i] - 4
                    if opt < stop:
                        code, length, value = (
                            flags_of(buf, opt) if opt + 8 <= stop else
                            (0, 0, 0))
                        if code != 2 or length != 4:
                            found = _options(buf, opt, stop, order).get(2)
                            value = (struct.unpack(order + 'I', found)[0]
                                     if found is not None and
                                     len(found) == 4 else 0)
                        if value & 3:
                            direction[i] = _EPB_DIR[value & 3]
                i = need.find(1, i + 1)
            return columns['t'], caps, direction

        return _prefilter(rows, buf, offsets, packed, 28, n, link,
                          iface.index, short, rows_of)

    def _times(self, hi_col, lo_col, conv, o):
        """Nanoseconds of the blocks whose timestamp halves are in
        ``hi_col`` and ``lo_col`` (``o``: the first one's offset)."""
        big = self.order == '>'
        n = len(hi_col) // 4
        if big:
            both = pcapkeys.interleave(*(hi_col[j::4] for j in range(4)),
                                       *(lo_col[j::4] for j in range(4)))
        else:
            both = pcapkeys.interleave(*(lo_col[j::4] for j in range(4)),
                                       *(hi_col[j::4] for j in range(4)))
        mul, div, shift, add = conv
        if shift or div != 1 or add < 0:
            ts = pcapkeys.ints(both, 'Q', big)
            try:
                return array.array('q', (_to_ns(t, conv) for t in ts))
            except OverflowError:
                raise PcapError(f"{self.path}: timestamps in the packet "
                                f"blocks from byte {o} are beyond the year "
                                "2262") from None
        if max(pcapkeys.ints(both, 'Q', big)) * mul + add >= 1 << 63:
            raise PcapError(f"{self.path}: timestamps in the packet blocks "
                            f"from byte {o} are beyond the year 2262")
        t = pcapkeys.lanes(both, 8, big) * mul
        if add:
            t += pcapkeys.repunit(n) * add
        return pcapkeys.from_lanes(t, n, 'q')

    def _epb_run(self, o, blen, end):
        """Read a run of like enhanced packet blocks from ``o``; its size.

        Like: same length, capture length, interface conversion and
        options layout (none, or ``epb_flags`` alone).  1: not read.
        """
        buf, order, rows = self.buf, self.order, self.rows
        if blen < 32:
            return 1
        iface_id, _hi, _lo, caplen, _orig = struct.unpack_from(
            order + 'IIIII', buf, o + 8)
        if iface_id >= len(self.ifaces):
            return 1
        iface = self.ifaces[iface_id]
        if iface.link is None or iface.link.pkttype_off is not None:
            return 1
        opt_start = 28 + ((caplen + 3) & ~3)
        opt_len = blen - 4 - opt_start
        if opt_len < 0:
            return 1
        flags_at = None
        if opt_len:
            code, length = struct.unpack_from(order + 'HH', buf,
                                              o + opt_start)
            opts = _options(buf, o + opt_start, o + blen - 4, order)
            if list(opts) != [2] or code != 2 or length != 4:
                return 1
            flags_at = opt_start + 4
        n = rows.run_length(buf, o, blen, end, 0, bytes(buf[o:o + 8]))
        if n < MIN_RUN:
            return 1
        col = pcapkeys.column

        def same(n, at, stop):
            pattern = bytes(buf[o + at:o + stop])
            return pcapkeys.equal_prefix(
                col(buf, o + at, blen, n, stop - at), stop - at, pattern)

        n = same(n, 20, 24)                     # capture length
        if flags_at is not None:
            n = same(n, opt_start, flags_at)    # option code and length
            if blen - 4 > flags_at + 4:
                n = same(n, flags_at + 4, blen - 4)
        if n < MIN_RUN:
            return 1
        big = order == '>'
        ids = pcapkeys.ints(col(buf, o + 8, blen, n, 4), 'I', big)
        if ids.count(iface_id) == n:
            ifindex = iface.index
        else:
            used = set(ids)
            if max(used) >= len(self.ifaces) or any(
                    self.ifaces[i].to_ns != iface.to_ns or
                    self.ifaces[i].link != iface.link for i in used):
                return 1
            # Not rebuilt per run: with many interfaces that was O(n) each
            ifindex = array.array('i', map(self.ifindex.__getitem__, ids))
        t_ns = self._times(col(buf, o + 12, blen, n, 4),
                           col(buf, o + 16, blen, n, 4), iface.to_ns, o)
        direction = sightings.DIR_UNKNOWN
        if flags_at is not None:
            low = flags_at + (3 if big else 0)
            direction = col(buf, o + low, blen, n).translate(_EPB_DIR)
        rows.run(buf, o + 28, blen, n, caplen, iface.link, t_ns, ifindex,
                 direction)
        return n


# --------------------------------------------------------------------------
# The entry point.

def read_pcap(path, ifname=None, session=None, fingerprint=False,
              dst_ip=None, tcp_ports=None, lenient=False):
    """Read one capture file into a :class:`PcapRead`.

    :param ifname: the interface name for every record (one file = one
        interface); default: pcapng ``if_name`` options, else the file
        name without its extension
    :param session: keep this session's probes (default: the most common)
    :param fingerprint: key foreign packets by their invariant fields (see
        the module docstring) instead of our probes' tags
    :param dst_ip: (fingerprint) the instance's address, as a string
    :param tcp_ports: the source ports our TCP probes come from (a range,
        ``[netweaver] tcp_source_ports``): with no plan to check each
        probe's own port against, TCP packets from (answers to) other
        ports are not ours.  None: any port.
    :param lenient: skip (and count) records whose timestamp field is out
        of range instead of refusing the file
    :raises PcapError: the file is empty, unknown, corrupt or unreadable
    """
    cap = read_capture(path, ifname=ifname, probes=not fingerprint,
                       fingerprint=fingerprint, dst_ip=dst_ip,
                       tcp_ports=tcp_ports, lenient=lenient)
    return cap.fingerprints() if fingerprint else cap.probes(session)


@dataclasses.dataclass(frozen=True, slots=True)
class Capture:
    """One capture file, read once: :meth:`probes` of any session and,
    when asked for, :meth:`fingerprints` of the records that are no probe.
    """

    path: str
    format: str
    _rows: _Rows
    _keyed_probes: bool = True

    @property
    def sessions(self):
        """``((session, probe rows), ...)``, most common first."""
        return _ranked(self._rows)

    def probes(self, session=None):
        """The probe rows of ``session`` (default: the most common); None
        unless read with ``probes``."""
        if not self._keyed_probes:
            return None
        return _result(self._rows, self.format, session)

    def fingerprints(self):
        """The fingerprint rows (None unless read with ``fingerprint``)."""
        rows = self._rows
        if not self._keyed_probes:
            return _result(rows, self.format, 0)
        if rows.prints is None:
            return None
        prints = rows.prints
        prints.records, prints.untimed = rows.records, rows.untimed
        prints.truncated, prints.linktypes = rows.truncated, rows.linktypes
        prints.invalid_times = rows.invalid_times
        return _result(prints, self.format, 0)


def _fingerprint_keyfunc(dst_ip):
    """``(keyfunc, prefilter, packed address)`` of fingerprints for
    instance ``dst_ip``."""
    packed = None
    if dst_ip is not None:
        family = socket.AF_INET6 if ':' in dst_ip else socket.AF_INET
        try:
            packed = socket.inet_pton(family, dst_ip)
        except OSError as exc:
            raise ValueError(
                f"invalid instance address {dst_ip!r}") from exc

    def keyfunc(buf, off, caplen, link):
        return pcapkeys.fingerprint_key(buf, off, caplen, link, packed)

    def prefilter(buf, first, stride, n, caplen, link, short=None):
        return pcapkeys.fingerprint_candidates(buf, first, stride, n, caplen,
                                               link, packed, short)
    return keyfunc, prefilter, packed


def read_capture(path, ifname=None, probes=True, fingerprint=False,
                 dst_ip=None, tcp_ports=None, lenient=False, progress=None):
    """Read one capture file once into a :class:`Capture`.

    ``path`` may be a regular file (mapped), or ``-`` (standard input), a
    pipe or a fifo (read whole into memory).

    :param probes: key our probes (see :func:`read_pcap` for ``ifname``,
        ``tcp_ports`` and ``lenient``)
    :param fingerprint: key by fingerprint (``dst_ip``: the instance's
        address): every record, or with ``probes`` those that are no probe
    :param progress: ``callable(done_bytes, total_bytes)``, called about
        once a second on files that take longer than a second
    :raises PcapError: the file is empty, unknown, corrupt or unreadable
    """
    path = os.fspath(path)
    if not probes and not fingerprint:
        raise ValueError("read_capture: nothing to key (neither probes "
                         "nor fingerprints)")
    if probes:
        rows = _Rows(path, pcapkeys.frame_key, ifname)
        rows.tcp_ports = tcp_ports
        if fingerprint:
            rows.fingerprint_too(*_fingerprint_keyfunc(dst_ip))
    else:
        keyfunc, prefilter, packed = _fingerprint_keyfunc(dst_ip)
        rows = _Rows(path, keyfunc, ifname)
        rows.fp_filter, rows.fp_dst = prefilter, packed
    rows.lenient = lenient
    rows.progress = progress
    try:
        with _open(path) as buf:
            if not len(buf):
                raise PcapError(f"{path}: empty file (no pcap header)")
            if buf[:4] == PCAPNG_SHB.to_bytes(4, 'little'):
                fmt = 'pcapng'
                _Pcapng(buf, rows).read()
            else:
                fmt = 'pcap'
                _PcapFile(buf, rows).read()
    except OSError as exc:
        raise PcapError(f"{path}: cannot read: {exc.strerror or exc}") \
            from exc
    except (struct.error, IndexError) as exc:
        raise PcapError(f"{path}: corrupt capture: {exc}") from exc
    return Capture(path=path, format=fmt, _rows=rows, _keyed_probes=probes)


@contextlib.contextmanager
def _open(path):
    """The bytes of ``path``: a map of a regular file; standard input
    (``-``), pipes, fifos and character devices read whole."""
    if path == STDIN:
        yield sys.stdin.buffer.read()
        return
    with open(path, 'rb') as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            yield f.read()
        elif info.st_size == 0:
            yield b''
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                yield buf


def _ranked(rows):
    counts = collections.Counter()
    for s, count in rows.session_runs:
        counts[s] += count
    return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _result(rows, fmt, session):
    ranked = _ranked(rows)
    if session is None:
        session = ranked[0][0] if ranked else 0
    batch = sightings.SightingBatch(session)
    columns = (('t_ns', rows.t_ns), ('keys', rows.keys),
               ('ifindex', rows.ifindex), ('direction', rows.direction),
               ('auth', rows.auth))
    if all(s == session for s, _ in rows.session_runs):
        for name, values in columns:
            getattr(batch, name).extend(values)
    else:
        keep = b''.join((b'\x01' if s == session else b'\x00') * count
                        for s, count in rows.session_runs)
        for name, values in columns:
            getattr(batch, name).extend(itertools.compress(values, keep))
    batch.ifnames.update(rows.ifnames)
    batch.encap.update({(k, i): e for (s, k, i), e in rows.encap.items()
                        if s == session})
    found = len(rows.keys)
    return PcapRead(
        path=rows.path, format=fmt, linktypes=tuple(sorted(rows.linktypes)),
        batch=batch, records=rows.records, probes=len(batch),
        foreign=rows.records - rows.untimed - rows.invalid_times - found,
        other_sessions=found - len(batch), sessions=ranked,
        untimed=rows.untimed, truncated=rows.truncated,
        invalid_times=rows.invalid_times)
