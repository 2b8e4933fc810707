"""pcapng files, read into :class:`pcaprows.Rows`.

Sections of either byte order (versions 1.0 and 1.2); interface blocks
with ``if_name``, ``if_tsresol`` and ``if_tsoffset``; enhanced packet
blocks with ``epb_flags`` direction (runs of like blocks read as columns,
blocks of mixed lengths through the prefilters); obsolete packet blocks.
Simple packet blocks carry no timestamp: counted as ``untimed``.
Timestamps become integer nanoseconds exactly (resolutions finer than
1 ns are truncated).
"""

import array
import dataclasses
import struct

from oslo_log import log

from netweaver_agent.core import pcapkeys
from netweaver_agent.core import pcaprows
from netweaver_agent.core import pcapwalk
from netweaver_agent.core import sightings

LOG = log.getLogger(__name__)

PCAPNG_SHB = 0x0a0d0d0a
PCAPNG_BOM = 0x1a2b3c4d
PCAPNG_BOM_SWAPPED = 0x4d3c2b1a
PCAPNG_IDB = 1
PCAPNG_OPB = 2
PCAPNG_SPB = 3
PCAPNG_EPB = 6
PCAPNG_VERSIONS = ((1, 0), (1, 2))      # what libpcap reads

# epb_flags bits 0-1 (0 unknown, 1 inbound, 2 outbound) -> direction.
_EPB_DIR = bytes((sightings.DIR_UNKNOWN, sightings.DIR_IN, sightings.DIR_OUT,
                  sightings.DIR_UNKNOWN)[b & 3] for b in range(256))


@dataclasses.dataclass(frozen=True, slots=True)
class _Iface:
    """One interface of a pcapng section."""

    link: pcapkeys.Link | None
    index: int
    to_ns: tuple          # (mul, div, shift, add), see _ts_converter
    linktype: int = 1


def _ts_converter(tsresol, tsoffset):
    """``(mul, div, shift, add)``: ``((ts * mul) >> shift) // div + add``."""
    add = tsoffset * pcaprows.NS
    if tsresol & 0x80:
        return pcaprows.NS, 1, tsresol & 0x7f, add
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


class Reader:
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
            raise pcaprows.link_refusal(self.path, min(self.linktypes),
                                        "every packet's ")

    def _read(self):
        buf, path, rows = self.buf, self.path, self.rows
        end = len(buf)
        if end < 28:
            raise pcaprows.PcapError(
                f"{path}: truncated pcapng section header "
                f"({end} of 28 bytes)")
        o = 0
        backoff = 0
        block = 2 * pcaprows.BACKOFF
        while o < end:
            rows.report_progress(o, end)
            if end - o < 12:
                rows.truncate(o, 'block header')
                return
            if struct.unpack_from('<I', buf, o)[0] == PCAPNG_SHB:
                self._section(o)
            btype, blen = struct.unpack_from(self.order + 'II', buf, o)
            if blen < 12 or blen % 4:
                raise pcaprows.PcapError(
                    f"{path}: corrupt pcapng block at byte {o}: "
                    f"length {blen}")
            if o + blen > end:
                if o == 0:
                    raise pcaprows.PcapError(
                        f"{path}: truncated pcapng section "
                        f"header ({end} of {blen} bytes)")
                rows.truncate(o, 'block')
                return
            trailer, = struct.unpack_from(self.order + 'I', buf,
                                          o + blen - 4)
            if trailer != blen:
                raise pcaprows.PcapError(
                    f"{path}: corrupt pcapng block at byte {o}: "
                    f"length {blen}, trailer {trailer}")
            if btype == PCAPNG_EPB:
                n = 1
                if backoff:
                    backoff -= 1
                else:
                    n = self._epb_run(o, blen, end)
                    if n == 1:
                        backoff = pcaprows.BACKOFF
                        nxt = self._epb_walk(
                            o, end, min(block, pcaprows.MAX_BLOCK))
                        if nxt > o:
                            backoff = 0
                            block = min(2 * block, pcaprows.MAX_BLOCK)
                            o = nxt
                            continue
                    else:
                        block = 2 * pcaprows.BACKOFF
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
            raise pcaprows.PcapError(
                f"{self.path}: truncated pcapng section header "
                f"at byte {o}")
        bom, = struct.unpack_from('<I', self.buf, o + 8)
        if bom == PCAPNG_BOM:
            self.order = '<'
        elif bom == PCAPNG_BOM_SWAPPED:
            self.order = '>'
        else:
            raise pcaprows.PcapError(
                f"{self.path}: corrupt pcapng section header at "
                f"byte {o}: byte-order magic 0x{bom:08x}")
        version = struct.unpack_from(self.order + 'HH', self.buf, o + 12)
        if version not in PCAPNG_VERSIONS:
            raise pcaprows.PcapError(
                f"{self.path}: pcapng section version {version[0]}."
                f"{version[1]} (at byte {o}) is not supported (1.0 is what "
                "tcpdump writes; 1.2 is read too)")
        self.ifaces = []
        self.ifindex = []

    def _idb(self, o, blen):
        buf, order, rows = self.buf, self.order, self.rows
        if blen < 20:
            raise pcaprows.PcapError(
                f"{self.path}: corrupt interface block at byte "
                f"{o}: length {blen}")
        linktype, = struct.unpack_from(order + 'H', buf, o + 8)
        opts = _options(buf, o + 16, o + blen - 4, order)
        name = opts.get(2, b'').split(b'\0')[0].decode('utf-8', 'replace')
        if not name:
            name = f"{pcaprows.stem(self.path)}#{len(self.ifaces)}"
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
            raise pcaprows.PcapError(
                f"{self.path}: packet block at byte {o} names "
                f"interface {iface_id}; the section describes "
                f"{len(self.ifaces)}")
        return self.ifaces[iface_id]

    def _packet(self, o, blen, btype):
        """One enhanced (or obsolete) packet block."""
        buf, order = self.buf, self.order
        if blen < 32:
            raise pcaprows.PcapError(
                f"{self.path}: corrupt packet block at byte {o}:"
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
            raise pcaprows.PcapError(
                f"{self.path}: corrupt packet block at byte {o}:"
                f" capture length {caplen} exceeds the block")
        iface = self._iface(iface_id, o)
        link = iface.link
        if link is None:
            self.linktypes[iface.linktype] = \
                self.linktypes.get(iface.linktype, 0) + 1
        direction = sightings.DIR_UNKNOWN
        if link is not None and link.pkttype_off is not None \
                and caplen > link.pkttype_off:
            direction = pcaprows.PKTTYPE_DIR[buf[data + link.pkttype_off]]
        if btype == PCAPNG_EPB and opt_start < o + blen - 4:
            flags = _options(buf, opt_start, o + blen - 4, order).get(2)
            if flags is not None and len(flags) == 4:
                value, = struct.unpack(order + 'I', flags)
                if value & 3:
                    direction = _EPB_DIR[value & 3]
        t_ns = _to_ns((hi << 32) | lo, iface.to_ns)
        if not -(1 << 63) <= t_ns < 1 << 63:
            raise pcaprows.PcapError(
                f"{self.path}: the timestamp of the packet "
                f"block at byte {o} is beyond the year 2262")
        self.rows.one(buf, data, caplen, link, t_ns, iface.index, direction)

    def _epb_walk(self, o, end, count):
        """Enhanced packet blocks of mixed lengths from ``o``, as
        :meth:`pcapreader.Reader._sort` reads records: up to ``count`` sound
        blocks of one interface (of a link type read) are gathered, the
        prefilters rule out in columns what they can (:func:`_prefilter`)
        and the rest is read block by block.  The
        offset after them; ``o`` when fewer than :data:`BACKOFF` qualify
        (anything unusual ends the walk there and is read as before)."""
        buf = self.buf
        trailer = struct.Struct(self.order + 'I').unpack_from
        ifaces = self.ifaces
        start = o
        offsets, o, first_id = pcapwalk.walk_epb(buf, o, end,
                                                 self.order == '>', count)
        if len(offsets) <= pcaprows.BACKOFF or first_id >= len(ifaces) \
                or ifaces[first_id].link is None:
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
        size = 28 + pcaprows.PREFIX
        packed = pcapwalk.heads(buf, offsets, size)
        column = pcapkeys.column
        short = pcaprows.shorter_than(packed, 20, size, n, big)
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
                            pcaprows.PKTTYPE_DIR))
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

        return pcaprows.prefilter(rows, buf, offsets, packed, 28, n, link,
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
                raise pcaprows.PcapError(
                    f"{self.path}: timestamps in the packet "
                    f"blocks from byte {o} are beyond the year "
                    "2262") from None
        if max(pcapkeys.ints(both, 'Q', big)) * mul + add >= 1 << 63:
            raise pcaprows.PcapError(
                f"{self.path}: timestamps in the packet blocks "
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
        if n < pcaprows.MIN_RUN:
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
        if n < pcaprows.MIN_RUN:
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
