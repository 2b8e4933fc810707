"""The rows a capture file's reader fills, and what is made of them.

:class:`Rows` fills the pcap and pcapng readers' rows
(:mod:`pcapreader`, :mod:`pcapngreader`) into one
:class:`sightings.SightingBatch` of every session, keyed a run at a time
(:meth:`Rows.run`: equal-length records read as columns by
:func:`pcapkeys.run_keys`) or one record at a time (:meth:`Rows.one`),
with the prefilters (:func:`prefilter`) ruling out in columns the records
of mixed lengths that cannot be a probe.  :func:`result` chooses a session
(the most common unless asked) and gives its rows as a
:class:`sightings.SightingBatch` in a :class:`PcapRead`.

Encapsulation: one per key and interface, chosen whatever order the
records are met in (:func:`_keep_encap`).  Errors: :class:`PcapError`,
naming the file and the byte offset.
"""

import array
import collections
import dataclasses
import itertools
import os
import sys
import time

from oslo_log import log

from netweaver_agent.core import pcapkeys
from netweaver_agent.core import pcapwalk
from netweaver_agent.core import probe
from netweaver_agent.core import sightings

LOG = log.getLogger(__name__)

MIN_RUN = 16                # shorter runs are read record by record
MAX_RUN = 1 << 16           # records per columnar step
BACKOFF = 64                # records read one by one after a failed run
MAX_BLOCK = 4096            # records of mixed lengths sorted at once
PREFIX = 80                 # bytes of each frame the prefilters read
NS = 1_000_000_000
LINK_NAMES = {0: 'BSD loopback', 101: 'raw IP', 105: 'IEEE 802.11',
              127: '802.11 radiotap', 228: 'raw IPv4', 229: 'raw IPv6'}
PROGRESS_EVERY_S = 1.0

# Linux packet type -> direction (4 is PACKET_OUTGOING).
PKTTYPE_DIR = bytes(sightings.DIR_IN if b < 4 else
                    sightings.DIR_OUT if b == 4 else sightings.DIR_UNKNOWN
                    for b in range(256))


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


class Rows:
    """Columns being filled (every session), and counters."""

    def __init__(self, path, keyfunc, ifname):
        self.path = path
        self.keyfunc = keyfunc
        self.columnar = keyfunc is pcapkeys.frame_key
        self.forced_name = ifname
        # The rows of every session (the batch's own session is
        # meaningless here: session_runs say whose each row is).
        self.columns = sightings.SightingBatch(0)
        self.session_runs = []          # [[session, rows], ...]
        self.encap = {}                 # (session, key, ifindex) -> Encap
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
        self.prints = Rows(self.path, keyfunc, self.forced_name)
        self.prints.fp_filter = fp_filter
        self.prints.fp_dst = fp_dst
        # Both number the interfaces alike.
        self.prints.columns = sightings.SightingBatch(
            0, ifnames=self.columns.ifnames,
            _index_of=self.columns._index_of)

    def keyed(self, flags, keys, t_ns, ifindex, direction, encaps=None):
        """Fingerprint rows decided in columns: the records whose byte in
        ``flags`` is 1, with ``keys`` in their order (session 0) and, when
        they came under VLAN tags, ``encaps`` in the same order."""
        columns = self.columns
        columns.t_ns.frombytes(pcapwalk.select(t_ns, 0, 8, 8, flags))
        columns.keys.extend(keys)
        columns.ifindex.extend([ifindex] * len(keys))
        columns.direction.frombytes(pcapwalk.select(direction, 0, 1, 1,
                                                    flags))
        columns.auth.frombytes(bytes(8 * len(keys)))
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
        return self.columns.interface_index(self.forced_name or name)

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
            auth = 0
            if self.columnar:
                auth = pcapkeys.frame_auth(
                    buf, off, caplen, link,
                    found[2].tunnel if len(found) > 2 else None) or 0
            self.columns.append(found[1], ifindex, t_ns, direction, auth)

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
            self.columns.t_ns.extend(t_ns)
            self.columns.keys.extend(found.keys)
            self.columns.ifindex.extend(ifindex)
            self.columns.direction.extend(direction)
            self.columns.auth.extend(found.auth)
            if found.session is not None:
                self._sessions(found.session, n)
            else:
                for s in found.sessions:
                    self._sessions(s, 1)
            return
        ok = bytes(n) if found is None else found.ok
        if found is not None:
            compress = itertools.compress
            self.columns.t_ns.extend(compress(t_ns, ok))
            self.columns.keys.extend(compress(found.keys, ok))
            self.columns.ifindex.extend(compress(ifindex, ok))
            self.columns.direction.extend(compress(direction, ok))
            self.columns.auth.extend(compress(found.auth, ok))
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


def stem(path):
    """A file's name without directory and extension (an interface name
    for files that give none)."""
    return os.path.splitext(os.path.basename(path))[0]


def link_refusal(path, linktype, where=''):
    name = LINK_NAMES.get(linktype)
    name = f' ({name})' if name else ''
    return PcapError(
        f"{path}: {where}link type {linktype}{name} is not read by "
        "netweaver (it reads Ethernet (1), Linux cooked SLL (113) and "
        "SLL2 (276): capture on an Ethernet interface or with -i any)")


def shorter_than(packed, at, size, n, big):
    """``short(need)`` for :func:`prefilter`: a byte per record of
    ``packed`` (``n`` records ``size`` bytes apart, from
    :func:`pcapwalk.heads`), 1 where the record's 4-byte capture length at
    ``at`` is below ``need`` (< 256)."""
    column = pcapkeys.column
    low, high = (at + 3, at) if big else (at, at + 3)
    wide = pcapkeys.zero(column(packed, high, size, n))
    for mid in (at + 1, at + 2):
        wide &= pcapkeys.zero(column(packed, mid, size, n))

    def short(need):
        return wide & pcapkeys.below(column(packed, low, size, n), need)
    return short


def prefilter(rows, buf, offsets, packed, head, n, link, ifindex, short,
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


def ranked(rows):
    """``((session, rows), ...)`` of ``rows``, most common first."""
    counts = collections.Counter()
    for s, count in rows.session_runs:
        counts[s] += count
    return tuple(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def result(rows, fmt, session):
    """The :class:`PcapRead` of ``session`` (None: the most common) from
    :class:`Rows` filled by a reader of format ``fmt``."""
    ranking = ranked(rows)
    if session is None:
        session = ranking[0][0] if ranking else 0
    batch = sightings.SightingBatch(session)
    every = rows.columns
    keep = None
    if any(s != session for s, _ in rows.session_runs):
        keep = b''.join((b'\x01' if s == session else b'\x00') * count
                        for s, count in rows.session_runs)
    for name in ('t_ns', 'keys', 'ifindex', 'direction', 'auth'):
        values = getattr(every, name)
        getattr(batch, name).extend(
            values if keep is None else itertools.compress(values, keep))
    batch.ifnames.update(every.ifnames)
    batch.encap.update({(k, i): e for (s, k, i), e in rows.encap.items()
                        if s == session})
    found = len(every)
    return PcapRead(
        path=rows.path, format=fmt, linktypes=tuple(sorted(rows.linktypes)),
        batch=batch, records=rows.records, probes=len(batch),
        foreign=rows.records - rows.untimed - rows.invalid_times - found,
        other_sessions=found - len(batch), sessions=ranking,
        untimed=rows.untimed, truncated=rows.truncated,
        invalid_times=rows.invalid_times)
