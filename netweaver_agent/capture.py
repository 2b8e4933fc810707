"""Observe probes on the host's interfaces with kernel timestamps.

Live capture uses one ``AF_PACKET``/``ETH_P_ALL`` socket in the
hypervisor's network namespace: every interface of that namespace is seen
through it, each packet with the name of the interface it crossed, the
kernel's packet type (received there, or sent by this host) and a
``SO_TIMESTAMPNS`` nanosecond timestamp from one clock.  A classic BPF
filter keeps all other traffic in the kernel, and the kernel's drop counter
(``PACKET_STATISTICS``) is read when the window closes.

An ``ETH_P_ALL`` socket taxes every packet sent on the host while it is
open, so it is opened for one probe window and closed right after.

What comes out is a :class:`SightingBatch`: columns of integers, which the
matcher consumes without building one object per packet.  Offline pcap
files give the same batches (see :mod:`netweaver_agent.pcapfile`).
"""

import array
import ctypes
import dataclasses
import errno
import select
import socket
import struct
import threading
import time

from oslo_log import log

from netweaver_agent import netns
from netweaver_agent import pcapkeys
from netweaver_agent import probe

LOG = log.getLogger(__name__)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
SO_TIMESTAMPNS = 35
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
PACKET_OUTGOING = 4
TP_STATUS_VLAN_VALID = 0x10

# Direction column values.
DIR_IN = 0       # received on that interface
DIR_OUT = 1      # sent by this host on that interface (PACKET_OUTGOING)
DIR_UNKNOWN = 2  # pcap files without direction

_TIMESPEC = struct.Struct('@qq')
# struct tpacket_auxdata: status, len, snaplen, mac, net, vlan_tci, tpid.
_AUXDATA = struct.Struct('@IIIHHHH')
_TPACKET_STATS = struct.Struct('@II')
_SOCK_FILTER = struct.Struct('HBBI')
_SOCK_FPROG = struct.Struct('HL')

RCVBUF_BYTES = 8 * 1024 * 1024
# The first SO_TIMESTAMPNS socket switches the kernel's packet timestamps on
# through deferred work; until that has run, packets carry no stamp and
# recvmsg() stamps them when read, late.  Wait this long before probing.
TIMESTAMP_WARMUP_S = 0.05
SNAPLEN = 256


class CaptureError(RuntimeError):
    """A capture could not be opened or read."""


class CapturePermissionError(CaptureError):
    """Opening a packet socket needs CAP_NET_RAW."""


@dataclasses.dataclass(frozen=True, slots=True)
class Sighting:
    """One probe (or reply) seen on one interface at one instant."""

    key: probe.ProbeKey
    ifname: str
    t_ns: int
    direction: int = DIR_IN
    # probe.auth_value of the packet (its tag and address).
    auth: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class SightingBatch:
    """Sightings of one probe window (one session), as columns.

    Row ``i`` is: key ``keys[i]`` (:meth:`ProbeKey.as_int`), seen on
    interface ``ifnames[ifindex[i]]`` at ``t_ns[i]`` (ns since the epoch,
    CLOCK_REALTIME) travelling ``direction[i]`` (``DIR_*``).

    ``encap`` holds how the frame carried the probe, for the rows that
    were VLAN-tagged or VXLAN only: ``{(key, ifindex): probe.Encap}``
    (the first such sighting of that key on that interface).

    ``auth[i]``: :func:`probe.auth_value` of the row's packet (the tag it
    carries XOR a fold of its address), which the matcher checks against
    the planned probe's.  TCP rows (session :data:`probe.TCP_SESSION` on
    the wire) are kept in any window's batch: their ISN is the key.
    """

    session: int
    t_ns: array.array = dataclasses.field(
        default_factory=lambda: array.array('q'))
    keys: array.array = dataclasses.field(
        default_factory=lambda: array.array('Q'))
    ifindex: array.array = dataclasses.field(
        default_factory=lambda: array.array('i'))
    direction: array.array = dataclasses.field(
        default_factory=lambda: array.array('B'))
    auth: array.array = dataclasses.field(
        default_factory=lambda: array.array('Q'))
    ifnames: dict = dataclasses.field(default_factory=dict)
    encap: dict = dataclasses.field(default_factory=dict)

    def __len__(self):
        return len(self.t_ns)

    def interface_index(self, ifname):
        """The column index standing for ``ifname`` (added if new)."""
        for index, name in self.ifnames.items():
            if name == ifname:
                return index
        index = len(self.ifnames)
        self.ifnames[index] = ifname
        return index

    def append(self, key_int, ifindex, t_ns, direction, auth=0):
        self.keys.append(key_int)
        self.ifindex.append(ifindex)
        self.t_ns.append(t_ns)
        self.direction.append(direction)
        self.auth.append(auth)

    def add(self, sighting):
        """Append one :class:`Sighting` (slow path, for tests and tools)."""
        self.append(sighting.key.as_int(),
                    self.interface_index(sighting.ifname),
                    sighting.t_ns, sighting.direction, sighting.auth)

    def extend(self, other):
        """Append every row of ``other`` (same session), remapping names."""
        if other.session != self.session:
            raise ValueError(
                f"cannot merge sightings of session {other.session} into "
                f"session {self.session}")
        remap = {i: self.interface_index(n) for i, n in other.ifnames.items()}
        self.keys.extend(other.keys)
        self.t_ns.extend(other.t_ns)
        self.direction.extend(other.direction)
        self.auth.extend(other.auth)
        if len(other.auth) < len(other.keys):      # filled without auth
            self.auth.extend(bytes(len(other.keys) - len(other.auth)))
        self.ifindex.extend(remap[i] for i in other.ifindex)
        for (k, i), encap in other.encap.items():
            self.encap.setdefault((k, remap[i]), encap)

    def sightings(self):
        """Rows as :class:`Sighting` objects (slow path)."""
        auth = self.auth_column()
        for k, i, t, d, a in zip(self.keys, self.ifindex, self.t_ns,
                                 self.direction, auth):
            yield Sighting(probe.ProbeKey.from_int(self.session, k),
                           self.ifnames[i], t, d, a)

    def auth_column(self):
        """``auth``, padded with zeros to the rows' number (columns
        filled by hand may lack it)."""
        short = len(self.keys) - len(self.auth)
        if short > 0:
            self.auth.extend(bytes(short))
        return self.auth


@dataclasses.dataclass(frozen=True, slots=True)
class CaptureStats:
    """What the kernel and the reader counted during one window."""

    packets: int        # packets that passed the filter (kernel count)
    drops: int          # packets the kernel dropped for lack of room
    probes: int         # rows kept in the batch
    foreign: int        # passed the filter but not a probe of this session


_PROTOS = {'icmp': (1,), 'udp': (17, 1), 'tcp': (6,)}
_PROTOS6 = {'icmp': (58,), 'udp': (17, 58), 'tcp': (6,)}
# Classic BPF opcodes.
_LDH_ABS, _LDB_ABS, _LDH_IND, _LDB_IND = 0x28, 0x30, 0x48, 0x50
_LDX_IMM, _JEQ, _RET = 0x01, 0x15, 0x06
_JSET, _AND_K, _LSH_K, _ADD_X, _ADD_K = 0x45, 0x54, 0x64, 0x0c, 0x04
_TAX, _TXA = 0x07, 0x87
# Offsets of a VXLAN packet with an IPv4 underlay without options (an IPv6
# underlay is 20 bytes longer); a Geneve packet's inner frame is its
# options' length further.
_VX_UDP = 14 + 20
_VX_INNER = _VX_UDP + 8 + probe.VXLAN_HDR_LEN
_GENEVE_BASE = _VX_UDP + 8
if probe.GENEVE_HDR_LEN != probe.VXLAN_HDR_LEN:
    raise ImportError("the capture filter reads a Geneve packet's inner "
                      "frame at VXLAN's offset plus the options")


def _assemble(code):
    """``[(op, jt, jf, k)]`` from instructions whose jumps name labels.

    ``code`` holds ``(op, jt, jf, k)`` with ``jt``/``jf`` label names (or
    0: the next instruction) and ``'label'`` strings marking places.
    """
    where, n = {}, 0
    for item in code:
        if isinstance(item, str):
            where[item] = n
        else:
            n += 1
    prog = []
    for item in code:
        if isinstance(item, str):
            continue
        op, jt, jf, k = item
        here = len(prog) + 1
        jt = where[jt] - here if jt else 0
        jf = where[jf] - here if jf else 0
        if not 0 <= jt < 256 or not 0 <= jf < 256:
            raise ValueError(f"BPF jump out of range in {item!r}")
        prog.append((op, jt, jf, k))
    return prog


def _match_any(load, values, yes, no):
    """Load with ``load``, go to ``yes`` if it equals one of ``values``."""
    out = [load]
    for i, v in enumerate(values):
        last = i == len(values) - 1
        out.append((_JEQ, yes, no if last else 0, v))
    return out


def bpf_filter(protocol, vxlan_port=None, geneve_port=None):
    """A classic BPF program accepting frames that may be probes.

    IPv4 and IPv6: ``icmp`` accepts ICMP and ICMPv6; ``udp`` accepts UDP
    and ICMP/ICMPv6 (port unreachable replies); ``tcp`` accepts TCP.  Up to
    two VLAN tags left in the frame are skipped (the kernel usually moves
    the outer one out of it, see ``PACKET_AUXDATA``).  ``vxlan_port``: also
    accept VXLAN packets to that UDP port (over IPv4 without options or
    IPv6 without extension headers) whose inner frame passes the same
    test; ``geneve_port``: the same for Geneve (version 0, Ethernet
    inside, the inner frame after the options).  The rest is
    verified in user space by :func:`pcapkeys.frame_key`.  Returns
    ``(code, jt, jf, k)`` instructions.
    """
    protos = _PROTOS.get(protocol)
    if protos is None:
        raise ValueError(f"unknown probe protocol {protocol!r}")
    protos6 = _PROTOS6[protocol]
    vlan = (probe.ETH_P_8021Q, probe.ETH_P_8021AD)
    code = [(_LDX_IMM, 0, 0, 0)]
    # X: the bytes of VLAN tags before the ethertype.
    code += _match_any((_LDH_ABS, 0, 0, 12), vlan, 'tag1', 'ether')
    code += ['tag1', (_LDX_IMM, 0, 0, 4)]
    code += _match_any((_LDH_ABS, 0, 0, 16), vlan, 'tag2', 'ether')
    code += ['tag2', (_LDX_IMM, 0, 0, 8), (_LDH_ABS, 0, 0, 20)]
    code += ['ether', (_JEQ, 'ip4', 0, probe.ETH_P_IP),
             (_JEQ, 'ip6', 'reject', probe.ETH_P_IPV6)]
    tunnels = (vxlan_port or geneve_port) and 17 not in protos
    four = protos + ((17,) if tunnels else ())
    code += ['ip4'] + _match_any((_LDB_IND, 0, 0, 23), four, 'l4', 'reject')
    six = protos6 + ((17,) if tunnels else ())
    code += ['ip6'] + _match_any((_LDB_IND, 0, 0, 20), six,
                                 'l6' if tunnels else 'accept', 'reject')
    if tunnels:
        # Ours unless it is UDP: then VXLAN to vxlan_port or Geneve to
        # geneve_port only.  IPv6: X += 20, then as IPv4.
        code += ['l6', (_JEQ, 0, 'accept', 17),
                 (_TXA, 0, 0, 0), (_ADD_K, 0, 0, 20), (_TAX, 0, 0, 0),
                 (_JEQ, 'udp', 'udp', 0)]
        code += ['l4', (_JEQ, 0, 'accept', 17),
                 (_LDB_IND, 0, 0, 14), (_JEQ, 0, 'reject', 0x45)]
        code += ['udp', (_LDH_IND, 0, 0, _VX_UDP + 2)]
        if vxlan_port:
            code += [(_JEQ, 'inner', 0 if geneve_port else 'reject',
                      vxlan_port)]
        if geneve_port:
            # Version 0 and Ethernet inside; X += the options' length.
            code += [(_JEQ, 0, 'reject', geneve_port),
                     (_LDH_IND, 0, 0, _GENEVE_BASE + 2),
                     (_JEQ, 0, 'reject', probe.ETH_P_TEB),
                     (_LDB_IND, 0, 0, _GENEVE_BASE),
                     (_JSET, 'reject', 0, 0xc0),
                     (_AND_K, 0, 0, 0x3f), (_LSH_K, 0, 0, 2),
                     (_ADD_X, 0, 0, 0), (_TAX, 0, 0, 0)]
        code += ['inner', (_LDH_IND, 0, 0, _VX_INNER + 12),
                 (_JEQ, 'in4', 0, probe.ETH_P_IP),
                 (_JEQ, 'in6', 'reject', probe.ETH_P_IPV6)]
        code += ['in4'] + _match_any((_LDB_IND, 0, 0, _VX_INNER + 23),
                                     protos, 'accept', 'reject')
        code += ['in6'] + _match_any((_LDB_IND, 0, 0, _VX_INNER + 20),
                                     protos6, 'accept', 'reject')
    else:
        code += ['l4']
    code += ['accept', (_RET, 0, 0, SNAPLEN), 'reject', (_RET, 0, 0, 0)]
    return _assemble(code)


def _attach_filter(sock, program):
    blob = b''.join(_SOCK_FILTER.pack(*ins) for ins in program)
    cbuf = ctypes.create_string_buffer(blob, len(blob))
    fprog = _SOCK_FPROG.pack(len(program), ctypes.addressof(cbuf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def open_packet_socket(netns_name=None, protocol='icmp', vxlan_port=None,
                       geneve_port=None):
    """An ``AF_PACKET`` socket with ns timestamps and the probe filter.

    Created in network namespace ``netns_name`` (None: the current one).
    ``PACKET_AUXDATA`` is on: the kernel takes a frame's (outer) VLAN tag
    out of its bytes, and says so in each message's auxiliary data.
    """
    try:
        sock = netns.socket_in_netns(netns_name, socket.AF_PACKET,
                                     socket.SOCK_RAW,
                                     socket.htons(ETH_P_ALL))
    except PermissionError as exc:
        raise CapturePermissionError(
            "opening an AF_PACKET capture socket needs CAP_NET_RAW "
            f"(namespace {netns_name or 'of this process'}): {exc}") from exc
    try:
        _attach_filter(sock, bpf_filter(protocol, vxlan_port, geneve_port))
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE,
                            RCVBUF_BYTES)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                            RCVBUF_BYTES)
        # Reset the kernel's counters: reading them clears them.
        sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class LiveCapture:
    """One probe window's capture: open, read in a thread, close.

    Use as a context manager::

        with LiveCapture(session, 'icmp', netns_name='hv') as cap:
            ...send probes...
            cap.settle(timeout_s)
        batch, stats = cap.batch, cap.stats

    Only sightings of ``session`` on interfaces in ``interfaces`` (all
    when None) are kept.  ``vxlan_port``, ``geneve_port``: probes may also
    come inside VXLAN or Geneve packets to that UDP port (see
    :func:`bpf_filter`).
    """

    def __init__(self, session, protocol='icmp', netns_name=None,
                 interfaces=None, vxlan_port=None, geneve_port=None):
        self.session = session
        self.vxlan_port = vxlan_port
        self.geneve_port = geneve_port
        # Frames to these ports are opened (standard ones and ours).
        self._tunnels = probe.tunnel_ports(vxlan_port, geneve_port)
        self.protocol = protocol
        self.netns_name = netns_name
        self.interfaces = frozenset(interfaces) if interfaces else None
        self.batch = SightingBatch(session)
        self.stats = None
        self._sock = None
        self._thread = None
        self._stop = threading.Event()
        self._foreign = 0
        self._error = None
        self._last_probe_ns = 0

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def open(self):
        self._sock = open_packet_socket(self.netns_name, self.protocol,
                                        self.vxlan_port, self.geneve_port)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='netweaver-capture')
        self._thread.start()
        time.sleep(TIMESTAMP_WARMUP_S)

    def settle(self, quiet_s, max_s=None):
        """Wait until no probe was seen for ``quiet_s`` (at most ``max_s``)."""
        start = time.monotonic()
        limit = start + (max_s if max_s is not None else quiet_s * 4)
        while True:
            now = time.monotonic()
            last = self._last_probe_ns / 1e9
            if now >= limit:
                return
            if last and now - last >= quiet_s and now - start >= quiet_s:
                return
            if not last and now - start >= quiet_s:
                return
            time.sleep(min(0.005, quiet_s))

    def close(self):
        if self._sock is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._drain()
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS,
                                        _TPACKET_STATS.size)
            packets, drops = _TPACKET_STATS.unpack(raw)
        finally:
            self._sock.close()
            self._sock = None
        self.stats = CaptureStats(packets=packets, drops=drops,
                                  probes=len(self.batch),
                                  foreign=self._foreign)
        if drops:
            LOG.warning('Capture dropped %(drops)d of %(packets)d packets '
                        'in probe window %(session)d',
                        {'drops': drops, 'packets': packets + drops,
                         'session': self.session})
        if self._error is not None:
            raise CaptureError(
                f"reading the capture socket failed: {self._error}")

    def _run(self):
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([self._sock], [], [], 0.02)
                if ready:
                    self._drain()
        except OSError as exc:
            self._error = exc

    def _drain(self):
        sock = self._sock
        batch = self.batch
        session = self.session
        wanted = self.interfaces
        tunnels = self._tunnels
        cmsg_space = (socket.CMSG_SPACE(_TIMESPEC.size) +
                      socket.CMSG_SPACE(_AUXDATA.size))
        while True:
            try:
                data, ancdata, _flags, addr = sock.recvmsg(SNAPLEN,
                                                           cmsg_space)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    return
                raise
            ifname = addr[0]
            if wanted is not None and ifname not in wanted:
                continue
            # Fixed-offset parse (no packet objects): ~10x parse_key.
            found = pcapkeys.frame_key(data, 0, len(data), tunnels=tunnels)
            if found is None or (found[0] != session and
                                 found[0] != probe.TCP_SESSION):
                self._foreign += 1
                continue
            auth = pcapkeys.frame_auth(
                data, 0, len(data),
                tunnel=found[2].tunnel if len(found) > 2 else None) or 0
            t_ns = None
            vid = None
            for level, ctype, cdata in ancdata:
                if level == socket.SOL_SOCKET and ctype == SO_TIMESTAMPNS:
                    sec, nsec = _TIMESPEC.unpack_from(cdata)
                    t_ns = sec * 1_000_000_000 + nsec
                elif level == SOL_PACKET and ctype == PACKET_AUXDATA:
                    aux = _AUXDATA.unpack_from(cdata)
                    if aux[0] & TP_STATUS_VLAN_VALID:
                        vid = aux[5] & 0x0fff
            if t_ns is None:
                t_ns = time.time_ns()
            direction = DIR_OUT if addr[2] == PACKET_OUTGOING else DIR_IN
            index = batch.interface_index(ifname)
            batch.append(found[1], index, t_ns, direction, auth)
            if vid is not None or len(found) > 2:
                batch.encap.setdefault((found[1], index),
                                       _live_encap(vid, found))
            self._last_probe_ns = time.monotonic_ns()


def _live_encap(vid, found):
    """The :class:`probe.Encap` of a live frame: the tag the kernel took
    out (``vid``), then whatever :func:`pcapkeys.frame_key` read."""
    encap = found[2] if len(found) > 2 else probe.NO_ENCAP
    if vid is None:
        return encap
    return probe.Encap(vlan=(vid,) + encap.vlan, vni=encap.vni,
                       tunnel=encap.tunnel)
