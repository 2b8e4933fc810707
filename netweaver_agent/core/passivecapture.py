"""Live capture for passive mode: sampled flows' keys and timestamps.

One ``AF_PACKET`` socket in the hypervisor's namespace, opened for one
passive window, with :func:`capture.passive_filter`: the kernel keeps a
consistent sample of flows (the same on the pif and on every vif) and cuts
each kept packet where its transport header ends, so no payload byte is
ever copied to user space.  Packets are read from a ``TPACKET_V3`` ring
(:mod:`netweaver_agent.core.ring`); each becomes a :class:`passive.Sighting`
(interface, kernel ns timestamp, direction, key fields), at most ``cap``
of them per window (the rest counted, not kept).

UDP to a tunnel port is read on its inner frame only when it is sent from
or to one of the host's own addresses (the tunnel endpoints), read from
the capture's namespace when the window opens: a guest's datagram crafted
to look like a tunnel packet is keyed on its own headers, never as the
packet of the vNIC its "inner" addresses name.
"""

import dataclasses
import fcntl
import gc
import itertools
import operator
import os
import select
import socket
import struct
import threading
import time

from oslo_log import log

from netweaver_agent.core import capture
from netweaver_agent.core import netns
from netweaver_agent.core import passive
from netweaver_agent.core import probe
from netweaver_agent.core import ring
from netweaver_agent.core import sightings

LOG = log.getLogger(__name__)

# Largest cap on sampled packets per window the capture accepts.
MAX_CAP = 1_000_000
# Bytes of ring per kept packet (header, address, headers-only snapshot).
_SLOT = ring.HEADER_BYTES + 128
_IFINDEX = struct.Struct('@i')
# rtnetlink: a dump of the namespace's addresses (RTM_GETADDR).
_NLMSG = struct.Struct('@IHHII')
_RTA = struct.Struct('@HH')
_IFADDRMSG = struct.Struct('@BBBBI')
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_NLMSG_DONE, _NLMSG_ERROR = 3, 2
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_NETLINK_TIMEOUT_S = 2.0
# Packet type -> direction (PACKET_OUTGOING: sent there by the host).
_T_DIRECTION = bytes(sightings.DIR_OUT if b == 4 else sightings.DIR_IN
                     for b in range(256))
_new = tuple.__new__


class _collector_off:
    """Within: the garbage collector off (a window's rows are made by the
    hundred thousand and all kept: its passes over them are waste)."""

    def __enter__(self):
        self._was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self._was:
            gc.enable()
        return False


@dataclasses.dataclass(frozen=True, slots=True)
class PassiveStats:
    """What the kernel and the reader counted in one passive window.

    ``packets``/``drops``: the kernel's (sampled packets passed to the
    socket, and dropped for want of room); ``kept``: sightings returned;
    ``over_cap``: sampled packets read past the cap, not kept;
    ``unparsed``: kept by the filter, no key in user space.
    """

    packets: int = 0
    drops: int = 0
    kept: int = 0
    over_cap: int = 0
    unparsed: int = 0


class PassiveCapture:
    """One passive window's capture: open, read in a thread, close.

    ::

        with PassiveCapture(64, netns_name='hv', cap=20000) as cap:
            time.sleep(window_s)
        sightings, stats = cap.sightings, cap.stats

    ``sample``: keep one flow in ``sample`` (a power of two), those whose
    hash is ``value``; ``interfaces``: keep sightings of these only (None:
    all); ``cap``: at most this many sightings; ``endpoints``: the
    packed addresses tunnel packets are sent from or to (None: the
    namespace's own, :func:`local_addresses`, read at :meth:`open`).
    """

    def __init__(self, sample, netns_name=None, interfaces=None,
                 cap=100_000, value=0, vxlan_port=None, geneve_port=None,
                 max_ring_bytes=capture.MAX_RING_BYTES, endpoints=None):
        if (not isinstance(cap, int) or isinstance(cap, bool) or
                not 0 < cap <= MAX_CAP):
            raise ValueError(f"passive capture cap {cap!r} is not within "
                             f"1..{MAX_CAP} packets")
        self.program = capture.passive_filter(sample, value, vxlan_port,
                                              geneve_port)
        self.netns_name = netns_name
        self.interfaces = frozenset(interfaces) if interfaces else None
        self.cap = cap
        self.max_ring_bytes = max_ring_bytes
        self._tunnels = probe.tunnel_ports(vxlan_port, geneve_port)
        self.endpoints = None if endpoints is None else frozenset(endpoints)
        self._sightings = []
        self._pending = []
        self._kept = 0
        self.stats = None
        self._names = {}
        self._sock = None
        self._ring = None
        self._thread = None
        self._wake = None
        self._stop = threading.Event()
        self._read = 0
        self._over = 0
        self._unparsed = 0
        self._kernel = [0, 0]
        self._error = None

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def open(self):
        if self.endpoints is None:
            self.endpoints = local_addresses(self.netns_name)
        try:
            sock = netns.socket_in_netns(
                self.netns_name, socket.AF_PACKET, socket.SOCK_RAW,
                socket.htons(capture.ETH_P_ALL))
        except PermissionError as exc:
            raise capture.CapturePermissionError(
                "opening an AF_PACKET capture socket needs CAP_NET_RAW "
                f"(namespace {self.netns_name or 'of this process'}): "
                f"{exc}") from exc
        try:
            capture._attach_filter(sock, self.program)
            sock.getsockopt(ring.SOL_PACKET, capture.PACKET_STATISTICS,
                            ring.STATS_V3.size)
            size = max(capture.MIN_RING_BYTES,
                       min(self.max_ring_bytes,
                           capture.RING_MARGIN * self.cap * _SLOT))
            self._ring = ring.PacketRing(sock, size)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        # The reader sleeps in select() until a block is ready or close()
        # writes here: no wake-up on a timer (as capture.LiveCapture).
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='netweaver-passive')
        self._thread.start()
        time.sleep(capture.TIMESTAMP_WARMUP_S)

    def close(self):
        if self._sock is None:
            return
        self._stop.set()
        if self._wake is not None:
            os.write(self._wake[1], b'x')
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            limit = time.monotonic() + capture.RING_FINISH_S
            while True:
                packets, drops = self._kernel_stats()
                self._read_ring()
                left = limit - time.monotonic()
                if self._read >= packets - drops or left <= 0:
                    break
                # Woken when the kernel hands the next block over.
                select.select([self._sock], [], [],
                              min(left, capture.RING_POLL_S))
        finally:
            self._ring.close()
            self._sock.close()
            self._sock = None
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None
        self.stats = PassiveStats(packets=packets, drops=drops,
                                  kept=self._kept,
                                  over_cap=self._over,
                                  unparsed=self._unparsed)
        if self._error is not None:
            raise capture.CaptureError(
                f"reading the passive capture failed: {self._error}")

    def _kernel_stats(self):
        raw = self._sock.getsockopt(ring.SOL_PACKET,
                                    capture.PACKET_STATISTICS,
                                    ring.STATS_V3.size)
        packets, drops, _freeze = ring.STATS_V3.unpack_from(raw)
        self._kernel[0] += packets
        self._kernel[1] += drops
        return tuple(self._kernel)

    def _run(self):
        sock, wake = self._sock, self._wake[0]
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([sock, wake], [], [],
                                            capture.READER_IDLE_S)
                if sock in ready:
                    self._read_ring()
        except OSError as exc:
            self._error = exc

    def _ifname(self, ifindex):
        name = self._names.get(ifindex)
        if name is None:
            try:
                out = fcntl.ioctl(self._sock.fileno(), capture.SIOCGIFNAME,
                                  capture._IFREQ.pack(b'', ifindex))
                name = out[:16].split(b'\0', 1)[0].decode('ascii',
                                                          'replace')
            except OSError:
                name = f'#{ifindex}'
            self._names[ifindex] = name
        return name

    def _read_ring(self):
        # A block makes a few tuples per packet and keeps them all: the
        # collector's passes over them would cost a third of the read.
        collect = gc.isenabled()
        gc.disable()
        try:
            self._read_blocks()
        finally:
            if collect:
                gc.enable()

    def _read_blocks(self):
        for block in self._ring.blocks():
            for run in ring.decode_block(block):
                self._take_run(block, run)

    @property
    def sightings(self):
        """The window's :class:`passive.Sighting` list (once closed).

        A run read in columns keeps its fields in columns until this (or
        :meth:`wire`) is first asked for: the collector never walks a
        growing heap of per-packet tuples while the window is open, and
        the sightings are then made by C loops, with the collector off.
        """
        if self._pending:
            with _collector_off():
                for ifnames, t_ns, dirs, fields in self._kept_columns():
                    rows = zip(ifnames, t_ns, dirs, map(
                        _new, itertools.repeat(passive.Header), fields))
                    self._sightings.extend(
                        map(_new, itertools.repeat(passive.Sighting), rows))
                self._pending.clear()
        return self._sightings

    def _kept_columns(self):
        """Each pending run's columns (interface names, times,
        directions, header fields), of the rows it keeps only: the names
        a list, the rest iterated once."""
        for ifnames, t_ns, dirs, fields, keep in self._pending:
            if keep is None:
                yield ifnames, t_ns, dirs, fields
            else:
                compress = itertools.compress
                yield (list(compress(ifnames, keep)), compress(t_ns, keep),
                       compress(dirs, keep), compress(fields, keep))

    def wire(self):
        """The window's sightings and :class:`PassiveStats` as the plain
        values privsep carries (key fields and timestamps, no payload),
        once closed: what :func:`to_wire` gives of :attr:`sightings`,
        made from the columns by C loops, with no Python object per
        packet but its row.  Asked for instead of :attr:`sightings`: it
        hands the rows over (both are empty after it)."""
        kept = list(self._kept_columns())
        names = {s.ifname for s in self._sightings}
        for ifnames, *_ in kept:
            names.update(ifnames)
        names = sorted(names)
        index = {n: i for i, n in enumerate(names)}
        rows = _rows_of(self._sightings, index)
        with _collector_off():
            for ifnames, t_ns, dirs, fields in kept:
                rows.extend(zip(map(index.__getitem__, ifnames), t_ns, dirs,
                                fields))
            self._pending.clear()
        self._sightings = []
        return {'ifnames': names, 'rows': rows,
                'stats': dataclasses.astuple(self.stats)}

    def _take_run(self, block, run):
        """Sightings of one :class:`ring.Run`, in columns: headers by
        :func:`passive.parse_run`, then each row's sighting made by C
        loops (no Python code per packet), when :attr:`sightings` is
        first read."""
        self._read += run.n
        n = min(run.n, max(self.cap - self._kept, 0))
        self._over += run.n - n
        if not n:
            return
        names = self._names
        index = run.ifindex[:n] if n < run.n else run.ifindex
        ids = set(index)
        for i in ids - names.keys():
            self._ifname(i)
        if len(ids) == 1:
            ifnames = [names[ids.pop()]] * n
        else:
            ifnames = list(map(names.__getitem__, index))
        headers = passive.parse_run(block, run.frame, run.stride, n,
                                    run.caplen, self._tunnels, lazy=True,
                                    endpoints=self.endpoints, raw=True)
        wanted = self.interfaces
        keep = None
        if wanted is not None and not wanted.issuperset(ifnames):
            keep = [name in wanted for name in ifnames]
        # A list (read frame by frame) may hold None; an iterator not.
        unparsed = headers.count(None) if isinstance(headers, list) else 0
        if unparsed:
            ok = [h is not None for h in headers]
            if keep is not None:
                self._unparsed += sum(map(operator.gt, keep, ok))
                keep = list(map(operator.and_, keep, ok))
            else:
                self._unparsed += unparsed
                keep = ok
        self._kept += n if keep is None else sum(keep)
        self._pending.append((ifnames, run.t_ns,
                              run.pkttype[:n].translate(_T_DIRECTION),
                              headers, keep))


def local_addresses(netns_name=None):
    """The packed IPv4 and IPv6 addresses of every interface of namespace
    ``netns_name`` (None: this process's), by an rtnetlink dump."""
    sock = netns.socket_in_netns(netns_name, socket.AF_NETLINK,
                                 socket.SOCK_RAW, socket.NETLINK_ROUTE)
    found = set()
    with sock:
        sock.settimeout(_NETLINK_TIMEOUT_S)
        body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(_NLMSG.pack(_NLMSG.size + len(body), _RTM_GETADDR,
                              _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + body)
        while True:
            data = sock.recv(1 << 16)
            off = 0
            while off + _NLMSG.size <= len(data):
                length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(
                    data, off)
                if length < _NLMSG.size:
                    raise capture.CaptureError(
                        f"rtnetlink address dump of namespace "
                        f"{netns_name or '(this process)'}: bad message "
                        f"length {length}")
                if kind == _NLMSG_DONE:
                    return frozenset(found)
                if kind == _NLMSG_ERROR:
                    raise capture.CaptureError(
                        f"rtnetlink address dump of namespace "
                        f"{netns_name or '(this process)'} refused")
                if kind == _RTM_NEWADDR:
                    found.update(_addresses(data[off + _NLMSG.size:
                                                 off + length]))
                off += (length + 3) & ~3


def _addresses(msg):
    """IFA_LOCAL and IFA_ADDRESS values of one RTM_NEWADDR message."""
    family = msg[0]
    size = 4 if family == socket.AF_INET else 16
    off = _IFADDRMSG.size
    while off + _RTA.size <= len(msg):
        length, kind = _RTA.unpack_from(msg, off)
        if length < _RTA.size:
            break
        if (kind in (_IFA_ADDRESS, _IFA_LOCAL) and
                length - _RTA.size == size):
            yield bytes(msg[off + _RTA.size:off + length])
        off += (length + 3) & ~3


def _rows_of(sightings, index):
    """Wire rows ``(interface index, t_ns, direction, (flow, ident,
    length))`` of ``sightings``."""
    return [(index[s.ifname], s.t_ns, s.direction, tuple(s.header))
            for s in sightings]


def to_wire(sightings, stats):
    """A window's sightings and :class:`PassiveStats` as the plain values
    privsep carries: key fields and timestamps, no payload (a capture
    gives the same from its columns: :meth:`PassiveCapture.wire`)."""
    names = sorted({s.ifname for s in sightings})
    index = {n: i for i, n in enumerate(names)}
    return {'ifnames': names, 'rows': _rows_of(sightings, index),
            'stats': dataclasses.astuple(stats)}


def from_wire(raw):
    """``(sightings, stats)`` from :func:`to_wire`'s values."""
    names = raw['ifnames']
    out = []
    for i, t_ns, direction, (flow, ident, length) in raw['rows']:
        proto, src, dst, sport, dport = flow
        out.append(passive.Sighting(
            names[i], t_ns, direction,
            passive.Header((proto, bytes(src), bytes(dst), sport, dport),
                           None if ident is None else tuple(ident),
                           length)))
    return out, PassiveStats(*raw['stats'])
