"""Passive in-host latency: match the instances' own packets pif ↔ vif.

No probe is sent.  A packet's *passive key* is made of fields the host
does not rewrite between the pif and the vif: its flow (IP protocol,
addresses, ports) and, within the flow, the TCP sequence and
acknowledgement numbers, or for other IPv4 traffic the IP identification
and fragment offset.  Checksums are never part of a key (offload fills
them in late, or not at all).

* ingress = t(vif, sent to the guest) − t(pif, received) of one key
* egress  = t(pif, sent out) − t(vif, received from the guest)

Segmentation offload and GRO join or split TCP segments between the two
interfaces: a super-packet matches the packet that starts at the same
sequence number (same acknowledgement), and the packets starting inside
its byte range on the other interface are *covered*, neither matched nor
unmatched.  A key seen twice on one interface in one direction (a
retransmission, a duplicate ACK, a look-alike) is *ambiguous*: all its
sightings are dropped and counted.  A packet that reached the vif without
entering through the pif (another instance on the host, DHCP or metadata
served on the host), or left the guest without going out of the pif, is
*local*: counted apart, never unmatched.  A packet received on the pif for
the vNIC's address and never seen on its vif (or sent out of the pif from
its address and never seen leaving the vif) is *unmatched*: counted, never
loss.  IPv6 packets other than TCP carry no field to key on: *unkeyable*.

A 1:1 NAT between the pif and the vif (a floating IP, DVR) rewrites the
vNIC's own address and keeps the rest (the peer's address, ports, TCP
seq/ack, IPv4 id): its outside address is learnt from the packets the
guest itself sent that left the pif from an address no vNIC here has,
with those fields; the pif's packets to and from it are then matched as
the vif sees them (*translated*).  Nothing else teaches it (anyone can
put a packet on the pif, never on the guest's behalf on its vif).  A
NAT that rewrites the vNIC's ports too cannot be undone: the vNIC is
reported *not measurable* passively, with the reason.

This module does no I/O: sightings in, :class:`PassiveResult` out.
"""

import collections
import dataclasses
import itertools
import operator
import socket
import struct
import typing

import dpkt

from netweaver_agent.core import latency
from netweaver_agent.core import pcapkeys
from netweaver_agent.core import probe
from netweaver_agent.core import sightings

PROTOCOL = 'passive'
TCP, UDP = 6, 17

_ETH = struct.Struct('!6s6sH')
_IP4 = struct.Struct('!BBHHHBBH4s4s')
_IP6 = struct.Struct('!IHBB16s16s')
_PORTS = struct.Struct('!HH')
_TCP = struct.Struct('!HHIIB')
_U32 = 1 << 32
# The common case in one read: Ethernet, IPv4 without options, the ports
# (ethertype, version/IHL, total length, id, fragment, protocol, source,
# destination, sport, dport); then TCP's seq, ack and data offset.
_FAST4 = struct.Struct('!12xHBxHHHxB2x4s4sHH')
_FAST_TCP = struct.Struct('!IIB')
# A run's fields, once its ethertype, IPv4 version/IHL, fragment offset
# and protocol are checked in columns, read by struct.iter_unpack as the
# parts of its headers: the flow (protocol, addresses, ports: IPv4 other
# protocols without ports) and the ident (TCP: seq, ack; IPv4: id, then
# the fragment offset's low byte, checked 0).
_FLOW4 = '!23xB2x4s4sHH'
_FLOW4_NO_PORTS = '!23xB2x4s4s'
_FLOW6 = '!20xB1x16s16sHH'
_SEQ_ACK4 = '!38xII'
_SEQ_ACK6 = '!58xII'
_ID4 = '!18xHxB'
# The bytes a run's frames must hold, by IP version and protocol.
_NEED = {(4, TCP): 47, (4, UDP): 38, (4, None): 34, (6, TCP): 67,
         (6, UDP): 58}
_ROW_STRUCTS = {}
_NO_PORTS = (0, 0)
# TCP header bytes by the data offset byte; plus IPv4's 20.
_TCP_HL6 = tuple((b >> 4) * 4 for b in range(256))
_TCP_HL4 = tuple(20 + h for h in _TCP_HL6)
_MIN_COLUMNS = 4
_new = tuple.__new__
_T_FRAG_HI = bytes(b & 0x1f for b in range(256))
_ETHERTYPES = {4: b'\x08\x00', 6: b'\x86\xdd'}


class PassiveError(ValueError):
    """Input the passive matcher cannot use (named in the message)."""


class Header(typing.NamedTuple):
    """What a frame's headers say for passive matching.

    ``flow``: ``(ip protocol, source, destination, sport, dport)`` with
    addresses as packed bytes (ports 0 where the protocol has none);
    ``ident``: the key within the flow, ``(seq, ack)`` for TCP,
    ``(ip id, fragment offset)`` for other IPv4, None if there is none
    (IPv6 other than TCP); ``length``: TCP payload bytes (the byte range
    a super-packet covers), else 0.  (A named tuple: one is made per
    sampled packet.)
    """

    flow: tuple
    ident: tuple | None
    length: int = 0


class Sighting(typing.NamedTuple):
    """One packet seen on one interface (``direction``: sightings.DIR_IN
    received there, sightings.DIR_OUT sent there by the host)."""

    ifname: str
    t_ns: int
    direction: int
    header: Header


@dataclasses.dataclass(frozen=True, slots=True)
class VifSpec:
    """A vNIC to measure: its host netdev (``vif``, which also names the
    result), its pif and the guest's addresses (packed bytes, as the
    port's fixed IPs were recorded)."""

    vif: str
    pif: str
    addresses: frozenset

    def __post_init__(self):
        if not self.pif or not self.vif or self.pif == self.vif:
            raise PassiveError(
                f"vNIC {self.vif!r}: pif {self.pif!r} and vif "
                f"{self.vif!r} must be two named interfaces")
        for a in self.addresses:
            if not isinstance(a, bytes) or len(a) not in (4, 16):
                raise PassiveError(
                    f"vNIC {self.vif!r}: address {a!r} is not a packed "
                    "IPv4 or IPv6 address")


@dataclasses.dataclass(frozen=True, slots=True)
class PassiveResult:
    """What one passive window measured for one vNIC.

    ``report``: a :class:`latency.LatencyReport` with ``protocol``
    ``'passive'`` (``ingress.lost`` and ``egress.lost`` are always 0:
    passive matching never claims loss), None when the window saw none of
    the vNIC's traffic (idle is not zero).  ``packets``: matched packets
    (both directions).  The counters are packets, except ``ambiguous``
    (keys).  ``translated``: of ``packets``, those matched through a 1:1
    NAT between the pif and the vif (a floating IP);
    ``not_measurable``: why the vNIC's traffic cannot be matched
    passively (a NAT that rewrites ports), None when nothing says so.
    """

    vif: str
    report: latency.LatencyReport | None
    packets: int = 0
    unmatched: int = 0
    local: int = 0
    ambiguous: int = 0
    covered: int = 0
    unkeyable: int = 0
    translated: int = 0
    not_measurable: str | None = None


def parse(frame, tunnel_ports=None, endpoints=None):
    """The :class:`Header` of an Ethernet frame, None if it is not IP.

    Up to :data:`probe.MAX_VLAN_TAGS` tags are skipped; VXLAN and Geneve
    packets to ``tunnel_ports`` (``{port: kind}``, default
    :func:`probe.tunnel_ports`) are read on their inner frame, as the vif
    sees it, when sent from or to one of ``endpoints`` (the host's own
    tunnel endpoints, packed addresses: anything else to a tunnel port,
    e.g. a guest's datagram crafted to look like one, is keyed on its own
    headers); ``endpoints`` None: from and to anywhere.  A frame cut
    before its keyed fields gives None.
    """
    if tunnel_ports is None:
        tunnel_ports = probe.tunnel_ports()
    return _parse(memoryview(frame), 0, tunnel_ports, 1, endpoints)


def parse_at(buf, at, caplen, tunnel_ports, endpoints=None):
    """:func:`parse` of the ``caplen`` bytes of ``buf`` at ``at`` (a
    capture ring's block), with no copy for plain IPv4."""
    if caplen >= _FAST4.size:
        (etype, vihl, tlen, ipid, frag, proto, src, dst, sport,
         dport) = _FAST4.unpack_from(buf, at)
        if (etype == dpkt.ethernet.ETH_TYPE_IP and vihl == 0x45 and
                not frag & 0x1fff):
            if proto == TCP:
                if caplen >= _FAST4.size + _FAST_TCP.size:
                    seq, ack, doff = _FAST_TCP.unpack_from(
                        buf, at + _FAST4.size)
                    return Header((proto, src, dst, sport, dport),
                                  (seq, ack),
                                  max(tlen - 20 - (doff >> 4) * 4, 0))
            elif proto != UDP:
                return Header((proto, src, dst, 0, 0), (ipid, 0))
            elif dport not in tunnel_ports:
                return Header((proto, src, dst, sport, dport), (ipid, 0))
    return _parse(memoryview(buf)[at:at + caplen], 0, tunnel_ports, 1,
                  endpoints)


def parse_run(buf, first, stride, n, caplen, tunnel_ports, lazy=False,
              endpoints=None, raw=False):
    """:func:`parse_at` of ``n`` frames of ``caplen`` bytes ``stride``
    apart in ``buf`` (a ring block's run), the first at ``first``: a list
    of :class:`Header` (None where parse_at gives None).

    A run of untagged IPv4 (no options, no later fragment) or IPv6 frames
    of one protocol, TCP or UDP (IPv4: any but UDP to a tunnel port), is
    read in one pass of :func:`struct.iter_unpack` over the block and its
    headers built by C loops; any other run frame by frame.  ``lazy``:
    when the run is read in one pass, return an iterator that reads its
    fields and makes its headers when consumed (``buf`` must not change
    until then; its checks are done now).  ``endpoints``: as
    :func:`parse`'s.  ``raw`` (with ``lazy``): a run read in one pass
    gives each header's fields as a plain ``(flow, ident, length)``
    tuple, what :class:`Header` holds, without making the header.
    """
    fast = None
    if n >= _MIN_COLUMNS:
        fast = _columns(buf, first, stride, n, caplen, tunnel_ports)
    if fast is not None:
        if lazy and raw:
            return fast
        fast = map(_new, itertools.repeat(Header), fast)
        return fast if lazy else list(fast)
    return [parse_at(buf, first + i * stride, caplen, tunnel_ports,
                     endpoints) for i in range(n)]


def _columns(buf, first, stride, n, caplen, tunnel_ports):
    """:func:`parse_run`'s one pass (an iterator of its headers' fields,
    ``(flow, ident, length)``), None when the run does not fit it."""
    if caplen < _NEED[(4, None)]:
        return None
    etype = buf[first + 12:first + 14]
    if etype == _ETHERTYPES[4]:
        version, proto = 4, buf[first + 23]
    elif etype == _ETHERTYPES[6]:
        version, proto = 6, buf[first + 20]
        if proto not in (TCP, UDP):
            return None
    else:
        return None
    if caplen < _NEED[(version, proto if proto in (TCP, UDP) else None)]:
        return None

    def col(at, width=1):
        return pcapkeys.column(buf, first + at, stride, n, width)

    def rows(fmt):
        return _rows(buf, first, stride, n, fmt)

    if col(12, 2) != etype * n:
        return None
    l4 = 34 if version == 4 else 54
    if version == 4:
        if (col(14) != b'\x45' * n or col(23) != bytes((proto,)) * n or
                col(20).translate(_T_FRAG_HI) != bytes(n) or
                col(21) != bytes(n)):
            return None
    elif col(20) != bytes((proto,)) * n:
        return None
    if proto == UDP and not tunnel_ports.keys().isdisjoint(
            pcapkeys.ints(col(l4 + 2, 2), 'H', True)):
        return None         # maybe a tunnel: frame by frame
    lengths = itertools.repeat(0)
    if version == 6:
        flows = rows(_FLOW6)
        idents = itertools.repeat(None)
    elif proto in (TCP, UDP):
        flows = rows(_FLOW4)
        idents = rows(_ID4)
    else:
        flows = map(operator.add, rows(_FLOW4_NO_PORTS),
                    itertools.repeat(_NO_PORTS))
        idents = rows(_ID4)
    if proto == TCP:
        idents = rows(_SEQ_ACK4 if version == 4 else _SEQ_ACK6)
        header = _TCP_HL4 if version == 4 else _TCP_HL6
        lengths = map(max, map(operator.sub,
                               pcapkeys.ints(col(l4 - 18 if version == 4
                                                 else 18, 2), 'H', True),
                               map(header.__getitem__, col(l4 + 12))),
                      itertools.repeat(0))
    return zip(flows, idents, lengths)


def _rows(buf, first, stride, n, fmt):
    """``struct.unpack_from(fmt)`` of ``n`` frames ``stride`` apart, as
    an iterator (one :func:`struct.iter_unpack` pass)."""
    row = _ROW_STRUCTS.get((fmt, stride))
    if row is None:
        row = _ROW_STRUCTS[(fmt, stride)] = struct.Struct(
            f'{fmt}{stride - struct.calcsize(fmt)}x')
    last = first + stride * (n - 1)
    return itertools.chain(row.iter_unpack(memoryview(buf)[first:last]),
                           (struct.unpack_from(fmt, buf, last),))


def parse_ip(packet, tunnel_ports=None, endpoints=None):
    """The :class:`Header` of an IPv4 or IPv6 packet (no link layer, as
    NFQUEUE gives it), None if it is neither."""
    if tunnel_ports is None:
        tunnel_ports = probe.tunnel_ports()
    mv = memoryview(packet)
    if not len(mv):
        return None
    etype = {4: dpkt.ethernet.ETH_TYPE_IP,
             6: dpkt.ethernet.ETH_TYPE_IP6}.get(mv[0] >> 4)
    return _parse_l3(mv, 0, etype, tunnel_ports, 1, endpoints)


def _parse(mv, off, tunnel_ports, depth, endpoints=None):
    if len(mv) < off + _ETH.size:
        return None
    etype = _ETH.unpack_from(mv, off)[2]
    off += _ETH.size
    for _ in range(probe.MAX_VLAN_TAGS):
        if etype not in (dpkt.ethernet.ETH_TYPE_8021Q,
                         dpkt.ethernet.ETH_TYPE_8021AD):
            break
        if len(mv) < off + 4:
            return None
        etype = struct.unpack_from('!H', mv, off + 2)[0]
        off += 4
    return _parse_l3(mv, off, etype, tunnel_ports, depth, endpoints)


def _parse_l3(mv, off, etype, tunnel_ports, depth, endpoints=None):
    if etype == dpkt.ethernet.ETH_TYPE_IP:
        if len(mv) < off + _IP4.size:
            return None
        (vihl, _tos, _tlen, ipid, frag, _ttl, proto, _csum, src,
         dst) = _IP4.unpack_from(mv, off)
        if vihl >> 4 != 4 or (vihl & 0xf) < 5:
            return None
        l4 = off + (vihl & 0xf) * 4
        if frag & 0x1fff:
            # A later fragment: no ports; keyed by id and offset.
            return Header((proto, src, dst, 0, 0), (ipid, frag & 0x1fff))
        v4_ident = (ipid, 0)
    elif etype == dpkt.ethernet.ETH_TYPE_IP6:
        if len(mv) < off + _IP6.size:
            return None
        _vtc, _plen, proto, _hop, src, dst = _IP6.unpack_from(mv, off)
        l4 = off + _IP6.size
        v4_ident = None
    else:
        return None
    if proto == TCP:
        if len(mv) < l4 + _TCP.size:
            return None
        sport, dport, seq, ack, doff = _TCP.unpack_from(mv, l4)
        if v4_ident is not None:
            total = struct.unpack_from('!H', mv, off + 2)[0]
            length = total - (l4 - off) - (doff >> 4) * 4
        else:
            length = (_IP6.unpack_from(mv, off)[1] - (doff >> 4) * 4)
        return Header((proto, src, dst, sport, dport), (seq, ack),
                      max(length, 0))
    if proto == UDP:
        if len(mv) < l4 + _PORTS.size:
            return None
        sport, dport = _PORTS.unpack_from(mv, l4)
        if depth and dport in tunnel_ports and (
                endpoints is None or src in endpoints or
                dst in endpoints):
            inner = _tunnel_inner(mv, off, l4, v4_ident is not None,
                                  tunnel_ports[dport])
            if inner is not None:
                return _parse(mv, inner, tunnel_ports, depth - 1)
        return Header((proto, src, dst, sport, dport), v4_ident)
    return Header((proto, src, dst, 0, 0), v4_ident)


def _tunnel_inner(mv, off, l4, v4, kind):
    """Where the inner frame of UDP to a tunnel port starts, None when it
    holds no IP frame: too short for a tunnel header and an inner
    Ethernet header (by the IPv4 total length, or the bytes there are),
    or an inner ethertype other than IPv4/IPv6 at its fixed place.  As
    :func:`capture.passive_filter` decides it, so a tenant's plain UDP
    to a tunnel port is sampled and keyed on its own ports."""
    inner = l4 + 8 + probe.VXLAN_HDR_LEN
    end = len(mv)
    if v4:
        end = min(end, off + struct.unpack_from('!H', mv, off + 2)[0])
    if end < inner:
        return None
    if kind == 'geneve':
        inner += (mv[l4 + 8] & 0x3f) * 4
    if end < inner + _ETH.size or _ETH.unpack_from(mv, inner)[2] not in (
            dpkt.ethernet.ETH_TYPE_IP, dpkt.ethernet.ETH_TYPE_IP6):
        return None
    return inner


def match(seen, vifs):
    """``{vif: PassiveResult}`` for each :class:`VifSpec` in ``vifs``, from
    the passive sightings ``seen``.

    A pif sighting is the vNIC's if its destination (ingress, received on
    the pif) or source (egress, sent out of the pif) is one of the vNIC's
    addresses, or one NAT translates them to (:func:`_translations`:
    learnt from the packets the vNIC itself sent); every sighting on a
    vif is that vNIC's.
    """
    by_if = collections.defaultdict(list)
    for s in seen:
        by_if[s.ifname].append(s)
    names = [v.vif for v in vifs]
    if len(set(names)) != len(names):
        raise PassiveError(f"two vNICs share a vif: {sorted(names)}")
    known = frozenset().union(*(v.addresses for v in vifs))
    translated = _Translated(by_if, known)
    return {v.vif: _match_vnic(v, by_if.get(v.pif, ()),
                               by_if.get(v.vif, ()), translated)
            for v in vifs}


class _Translated:
    """The pif's packets sent out from addresses no vNIC here has (a NAT's
    outside addresses, or anything else), indexed once per pif by
    :func:`_nat_key` (keys seen twice dropped) and, for TCP, by
    :func:`_port_key`, when a vNIC first asks."""

    def __init__(self, by_if, known):
        self.by_if = by_if
        self.known = known
        self._index = {}

    def on(self, pif):
        found = self._index.get(pif)
        if found is None:
            nat, ports, twice = {}, {}, set()
            for s in self.by_if.get(pif, ()):
                h = s.header
                if (s.direction != sightings.DIR_OUT or h.ident is None or
                        h.flow[1] in self.known):
                    continue
                key = _nat_key(h, 2)
                if key in nat:
                    twice.add(key)
                nat[key] = s
                if h.flow[0] == TCP:
                    ports.setdefault(_port_key(h), []).append(s)
            for key in twice:
                del nat[key]
            found = self._index[pif] = (nat, ports)
        return found


def _nat_key(header, peer):
    """What a 1:1 NAT of the vNIC's address keeps of a packet: protocol,
    the peer's address (``flow[peer]``), ports and ident."""
    f = header.flow
    return (f[0], f[peer], f[3], f[4], header.ident)


def _port_key(header):
    """What a NAT rewriting the vNIC's source port too keeps of a TCP
    packet it sends: protocol, destination address and port, ident."""
    f = header.flow
    return (f[0], f[2], f[4], header.ident)


def _translations(spec, left_out, translated):
    """``({outside address: vNIC address}, why not measurable or None)``
    from the packets the guest sent (``left_out``: seen leaving its vif,
    never leaving the pif as they were) to addresses no vNIC here has.

    Such a packet found leaving the pif from an address no vNIC here has,
    to the same peer, ports and ident, shows a 1:1 NAT (a floating IP):
    that address is the vNIC's outside.  Only what the guest itself sent
    teaches it: the pif's received packets (anyone's) and other vNICs'
    traffic never do.  Found with another source port (TCP seq and ack
    kept): the NAT rewrites ports, which passive matching cannot undo.
    """
    nat, ports = translated.on(spec.pif)
    outside, rewritten = {}, set()
    for s in left_out:
        h = s.header
        if (h.ident is None or h.flow[1] not in spec.addresses or
                h.flow[2] in translated.known):
            continue
        found = nat.get(_nat_key(h, 2))
        if found is not None:
            outside.setdefault(found.header.flow[1], set()).add(h.flow[1])
        elif h.flow[0] == TCP:
            rewritten.update(o.header.flow[1] for o in ports.get(
                _port_key(h), ()) if o.header.flow[3] != h.flow[3])
    mapping = {out: inside.pop() for out, inside in outside.items()
               if len(inside) == 1}
    why = None
    if rewritten - mapping.keys():
        why = ('NAT on the path rewrites the ports of its packets (sent '
               'out of the pif from ' +
               ', '.join(sorted(_text(a) for a in rewritten)) +
               '): its packets cannot be matched pif <-> vif')
    return mapping, why


def _text(packed):
    return socket.inet_ntop(
        socket.AF_INET if len(packed) == 4 else socket.AF_INET6, packed)


def _as_inside(sightings_, mapping, at):
    """``sightings_`` whose ``flow[at]`` is a NAT's outside address in
    ``mapping``, that address replaced by the vNIC's."""
    out = []
    for s in sightings_:
        f = s.header.flow
        inside = mapping.get(f[at])
        if inside is not None:
            flow = f[:at] + (inside,) + f[at + 1:]
            out.append(s._replace(header=s.header._replace(flow=flow)))
    return out


def _match_vnic(spec, pif_seen, vif_seen, translated):
    addrs = spec.addresses
    counts = collections.Counter()
    pif_in = [s for s in pif_seen if s.direction == sightings.DIR_IN and
              s.header.flow[2] in addrs]
    pif_out = [s for s in pif_seen if s.direction == sightings.DIR_OUT and
               s.header.flow[1] in addrs]
    vif_out = [s for s in vif_seen if s.direction == sightings.DIR_OUT]
    vif_in = [s for s in vif_seen if s.direction == sightings.DIR_IN]
    if not (pif_in or pif_out or vif_out or vif_in):
        return PassiveResult(spec.vif, None)
    ingress, neg_in, pif_left, vif_out = _pair(pif_in, vif_out, counts)
    egress, neg_out, vif_in, pif_left_out = _pair(vif_in, pif_out, counts)
    pif_left += pif_left_out
    mapping, why, nat = {}, None, 0
    if vif_in:
        mapping, why = _translations(spec, vif_in, translated)
    if mapping:
        # Behind a 1:1 NAT: the pif's packets to and from its outside
        # address, keyed as the vif sees them, against what is left.
        more_in, neg, left, vif_out = _pair(_as_inside(
            [s for s in pif_seen if s.direction == sightings.DIR_IN],
            mapping, 2), vif_out, counts)
        more_out, neg2, vif_in, left_out = _pair(vif_in, _as_inside(
            [s for s in pif_seen if s.direction == sightings.DIR_OUT],
            mapping, 1), counts)
        ingress += more_in
        egress += more_out
        neg_in += neg + neg2
        pif_left += left + left_out
        nat = len(more_in) + len(more_out)
    counts['unmatched'] += len(pif_left)
    counts['local'] += len(vif_out) + len(vif_in)
    hist = (('ingress', latency.log2_histogram(ingress)),
            ('egress', latency.log2_histogram(egress)))
    report = latency.LatencyReport(
        vif=spec.vif, pif=spec.pif, protocol=PROTOCOL, sent=0,
        ingress=latency.DirectionStats.from_ns(ingress),
        egress=latency.DirectionStats.from_ns(egress),
        turnaround=latency.DirectionStats(),
        anomalies=neg_in + neg_out, histograms=hist)
    return PassiveResult(
        spec.vif, report, packets=len(ingress) + len(egress),
        unmatched=counts['unmatched'], local=counts['local'],
        ambiguous=counts['ambiguous'], covered=counts['covered'],
        unkeyable=counts['unkeyable'], translated=nat,
        not_measurable=why)


def ingress_pairs(seen, spec):
    """``{(flow, ident): (t_pif, t_vif)}`` of the packets in ``seen`` (passive
    sightings) to ``spec``'s vNIC matched pif → vif (keys seen once on
    each side), the pairs :func:`match`'s ingress statistics rest on."""
    counts = collections.Counter()
    a, _ = _index([s for s in seen if s.ifname == spec.pif and
                   s.direction == sightings.DIR_IN and
                   s.header.flow[2] in spec.addresses], counts)
    b, _ = _index([s for s in seen if s.ifname == spec.vif and
                   s.direction == sightings.DIR_OUT], counts)
    return {k: (s.t_ns, b[k].t_ns) for k, s in a.items() if k in b}


def _index(seen, counts):
    """``{key: sighting}`` of keys seen once; ambiguous keys dropped."""
    once, twice = {}, set()
    for s in seen:
        h = s.header
        if h.ident is None:
            counts['unkeyable'] += 1
            continue
        key = (h.flow, h.ident)
        if key in once:
            twice.add(key)
        else:
            once[key] = s
    for key in twice:
        del once[key]
    return once, twice


def _pair(first, then, counts):
    """``(latencies then − first of keys seen once on each side, the
    number of negative ones (left out), the sightings of ``first`` and of
    ``then`` left unpaired)``; a sighting a super-packet on the other side
    covers is counted ``covered``, not left; keys ambiguous on one side
    are counted and neither paired nor left."""
    a, amb_a = _index(first, counts)
    b, amb_b = _index(then, counts)
    counts['ambiguous'] += len(amb_a | amb_b)
    values, negative = [], 0
    for key, s in a.items():
        other = b.get(key)
        if other is None:
            continue
        d = other.t_ns - s.t_ns
        if d < 0:
            negative += 1
        else:
            values.append(d)
    ranges_a, ranges_b = _ranges(a.values()), _ranges(b.values())
    left_a, left_b = [], []
    for key, s in a.items():
        if key in b or key in amb_b:
            continue
        if _inside(s.header, ranges_b):
            counts['covered'] += 1
        else:
            left_a.append(s)
    for key, s in b.items():
        if key in a or key in amb_a:
            continue
        if _inside(s.header, ranges_a):
            counts['covered'] += 1
        else:
            left_b.append(s)
    return values, negative, left_a, left_b


def _ranges(seen):
    """``{(flow, ack): [(seq, length)]}`` of TCP packets with payload."""
    out = collections.defaultdict(list)
    for s in seen:
        h = s.header
        if h.flow[0] == TCP and h.length:
            out[(h.flow, h.ident[1])].append((h.ident[0], h.length))
    return out


def _inside(header, ranges):
    """Whether a TCP packet starts inside a super-packet's byte range."""
    if header.flow[0] != TCP or header.ident is None:
        return False
    seq, ack = header.ident
    for start, length in ranges.get((header.flow, ack), ()):
        if 0 < (seq - start) % _U32 < length:
            return True
    return False


def address(text):
    """Packed bytes of an IPv4 or IPv6 address given as text."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(family, text)
        except OSError:
            continue
    raise PassiveError(f"{text!r} is not an IP address")
