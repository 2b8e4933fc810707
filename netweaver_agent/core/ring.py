"""A ``TPACKET_V3`` receive ring on an ``AF_PACKET`` socket, read in columns.

The kernel writes each packet that passes the socket's filter into a
block of a ring shared with this process (``PACKET_RX_RING``, stdlib
:mod:`mmap`), with its nanosecond timestamp, its length, the interface's
kernel index, the packet type and the VLAN tag it took out of the frame,
and hands a block over when it is full or ``tov_ms`` after its first
packet.  No system call per packet: a block of hundreds of probes costs
one ``select`` and one copy.

A block's packets of equal size sit a constant stride apart, so their
headers are read as columns (:func:`pcapkeys.column`), as
:mod:`pcapfile` reads a pcap: :func:`decode_block` gives :class:`Run`\\ s
of such packets, and the caller turns their frames into keys with the
same functions as every other reader.
"""

import array
import dataclasses
import functools
import mmap
import struct
import sys

from netweaver_agent.core import pcapkeys
from netweaver_agent.core import pcapwalk

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_VERSION = 10
TPACKET_V3 = 2
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 0x10

# struct tpacket_req3: block_size, block_nr, frame_size, frame_nr,
# retire_blk_tov, sizeof_priv, feature_req_word.
_REQ3 = struct.Struct('@IIIIIII')
# struct tpacket_stats_v3: packets, drops, freeze_q_cnt.
STATS_V3 = struct.Struct('@III')
_U32 = struct.Struct('@I')
_U16 = struct.Struct('@H')
# struct tpacket_block_desc: version, offset_to_priv, then tpacket_hdr_v1:
# block_status, num_pkts, offset_to_first_pkt, blk_len, ...
_BLOCK = struct.Struct('@IIIIII')
# struct tpacket3_hdr (48 bytes), then struct sockaddr_ll: offsets.
_H_NEXT, _H_SEC, _H_NSEC, _H_SNAPLEN, _H_STATUS, _H_MAC = 0, 4, 8, 12, 20, 24
_H_VLAN_TCI = 32
_SLL = 48
_H_IFINDEX = _SLL + 4
_H_PKTTYPE = _SLL + 10
# The low byte of a native 32-bit field (the status flags live there).
_LOW = 3 if sys.byteorder == 'big' else 0
_BE = sys.byteorder == 'big'
_T_VLAN = bytes(1 if b & TP_STATUS_VLAN_VALID else 0 for b in range(256))

BLOCK_BYTES = 256 * 1024
FRAME_BYTES = 2048
MIN_BLOCKS = 4
# A block goes to the reader at most this long after its first packet
# (or when full).  The reader's cost is per block handed over (a wake-up
# with cold caches: ~100 us), so at probe rates this sets it: 16 ms,
# 32 ms and 64 ms cost 1.0, 0.5 and 0.35 us a packet at 8,000 pps
# (benchmarks/bench_capture.py).  The price: a window ends up to this
# much later (the last block is waited for, within max_window_ms and
# capture.RING_FINISH_S); the packets' times are the kernel's either way.
BLOCK_TOV_MS = 64
# Bytes one packet takes in a block at most: its header, its address
# and SNAPLEN bytes of frame, aligned (see SLOT_BYTES in capture).
HEADER_BYTES = 96
# The in-place reader's table of batch columns (:meth:`PacketRing.take`)
# holds kernel interface indexes below this (packets of others are
# decoded in Python); a slot not filled yet holds NO_COLUMN.
TABLE_IFINDEXES = 1 << 16
NO_COLUMN = -2
# Why PacketRing.take stopped, when not at an ifindex it has no column for.
IDLE = pcapwalk.TAKE_IDLE
SLOW = pcapwalk.TAKE_SLOW


class RingError(OSError):
    """The kernel would not give this socket a receive ring."""


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """``n`` packets of one block whose frames are ``caplen`` bytes long
    and start ``stride`` bytes apart, the first at ``frame`` in the block.

    Columns, one value per packet: ``t_ns`` (CLOCK_REALTIME, ns),
    ``ifindex`` (the kernel's), ``pkttype`` (bytes: ``PACKET_HOST``,
    ``PACKET_OUTGOING``...), ``vlan``: None when the kernel took no VLAN
    tag out of any of them, else one VLAN id or None per packet.
    """

    frame: int
    stride: int
    n: int
    caplen: int
    t_ns: array.array
    ifindex: array.array
    pkttype: bytes
    vlan: list | None


def _equal_rows(data, at, stride, n, size):
    """How many of ``n`` rows ``stride`` apart hold the first's bytes at
    ``at`` (``size`` of them)."""
    col = pcapkeys.column(data, at, stride, n, size)
    return pcapkeys.equal_prefix(col, size, col[:size])


def _run(data, h, stride, n):
    """The :class:`Run` of ``n`` packets whose headers start at ``h``."""
    caplen, = _U32.unpack_from(data, h + _H_SNAPLEN)
    mac, = _U16.unpack_from(data, h + _H_MAC)

    def col(at, size=1):
        return pcapkeys.column(data, h + at, stride, n, size)

    t = (pcapkeys.lanes(col(_H_SEC, 4), 4, _BE) * 1_000_000_000 +
         pcapkeys.lanes(col(_H_NSEC, 4), 4, _BE))
    status = col(_H_STATUS + _LOW)
    vlan = None
    if status.translate(_T_VLAN).count(1):
        tci = pcapkeys.ints(col(_H_VLAN_TCI, 4), 'I', _BE)
        vlan = [(v & 0x0fff) if s & TP_STATUS_VLAN_VALID else None
                for s, v in zip(status, tci)]
    return Run(frame=h + mac, stride=stride, n=n, caplen=caplen,
               t_ns=pcapkeys.from_lanes(t, n, 'q'),
               ifindex=pcapkeys.ints(col(_H_IFINDEX, 4), 'i', _BE),
               pkttype=col(_H_PKTTYPE), vlan=vlan)


def decode_block(data):
    """The packets of one ring block (``data``: its bytes), as runs.

    Packets of equal length (same next offset, snapshot length and frame
    offset) make one run; a lone packet is a run of one.
    """
    _v, _p, _status, count, first, _len = _BLOCK.unpack_from(data, 0)
    runs = []
    h = first
    left = count
    end = len(data)
    while left > 0:
        if h + _SLL + 20 > end:
            raise RingError(f"ring block ends inside packet header at {h}")
        nxt, = _U32.unpack_from(data, h)
        n = 1
        if nxt and left > 1:
            most = min(left - 1, (end - h - _SLL - 20) // nxt + 1)
            n = _equal_rows(data, h, nxt, most, 4)
            if n == left - 1 and h + n * nxt + _SLL + 20 <= end:
                n = left        # the last packet (next offset 0) too
            if n > 1:
                n = min(n, _equal_rows(data, h + _H_SNAPLEN, nxt, n, 4),
                        _equal_rows(data, h + _H_MAC, nxt, n, 2))
        runs.append(_run(data, h, nxt or 1, n))
        left -= n
        if not nxt or not left:
            break
        h += nxt * n
    return runs


def ring_geometry(ring_bytes, block_bytes=BLOCK_BYTES):
    """``(block_bytes, blocks)`` for a ring of about ``ring_bytes``."""
    blocks = max(MIN_BLOCKS, -(-int(ring_bytes) // block_bytes))
    return block_bytes, blocks


class PacketRing:
    """A ``TPACKET_V3`` receive ring on ``sock`` (an ``AF_PACKET`` socket
    with no ring yet), about ``ring_bytes`` long.

    :meth:`blocks` yields the blocks the kernel handed over, in order, as
    bytes (each given back to the kernel once copied); :meth:`taker`
    reads them in place first, :meth:`next_block` copies one.
    :raises RingError: the kernel refused the ring (the reason inside)
    """

    def __init__(self, sock, ring_bytes, tov_ms=BLOCK_TOV_MS,
                 block_bytes=BLOCK_BYTES):
        self.block_bytes, self.nblocks = ring_geometry(ring_bytes,
                                                       block_bytes)
        self.size = self.block_bytes * self.nblocks
        self._map = None
        # The block to read next (pcapwalk.ring_take moves it on).
        self._cursor = array.array('q', [0])
        # Chosen once (C or Python): one call less per wake-up.
        self._take = pcapwalk.ring_take_function()
        frames = self.block_bytes // FRAME_BYTES * self.nblocks
        try:
            sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
            sock.setsockopt(SOL_PACKET, PACKET_RX_RING, _REQ3.pack(
                self.block_bytes, self.nblocks, FRAME_BYTES, frames,
                int(tov_ms), 0, 0))
            self._map = mmap.mmap(sock.fileno(), self.size, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            raise RingError(
                f"a {self.size}-byte TPACKET_V3 receive ring "
                f"({self.nblocks} blocks of {self.block_bytes}): {exc}"
            ) from exc

    def taker(self, session, columns, out, directions):
        """A function of no arguments reading the blocks handed over in
        place, while each holds only probes of ``session`` that
        :func:`pcapwalk.ring_take` keys (each given back once read): its
        ``(seen, kept, stop)``, the rows appended to the columns ``out``
        (see there).  ``columns``: kernel ifindex -> batch column (-1: not
        wanted), an ``array('i')``.  ``stop``: :data:`IDLE`, :data:`SLOW`
        (the next block is to be copied, :meth:`next_block`, and decoded) or an
        ifindex ``columns`` lacks.  One C call a wake-up, no Python frame
        of its own."""
        if self._map is None:
            return lambda: (0, 0, IDLE)
        return functools.partial(self._take, self._map, self.block_bytes,
                                 self.nblocks, self._cursor, session,
                                 columns, out, directions)

    def next_block(self):
        """The bytes of the next block the kernel handed over, given back
        to it once copied, or None."""
        ring = self._map
        if ring is None:
            return None
        base = self._cursor[0] * self.block_bytes
        status, = _U32.unpack_from(ring, base + 8)
        if not status & TP_STATUS_USER:
            return None
        length, = _U32.unpack_from(ring, base + 20)
        data = ring[base:base + min(max(length, 48), self.block_bytes)]
        # Given back before it is decoded: the kernel may refill it.
        ring[base + 8:base + 12] = b'\0\0\0\0'
        self._cursor[0] = (self._cursor[0] + 1) % self.nblocks
        return data

    def blocks(self):
        """Bytes of each block ready for the reader, in ring order."""
        while (data := self.next_block()) is not None:
            yield data

    def close(self):
        if self._map is not None:
            self._map.close()
            self._map = None
