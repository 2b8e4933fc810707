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

This module does no I/O: sightings in, :class:`PassiveResult` out.
"""

import collections
import dataclasses
import socket
import struct
import typing

import dpkt

from netweaver_agent.core import latency
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
    (keys).
    """

    vif: str
    report: latency.LatencyReport | None
    packets: int = 0
    unmatched: int = 0
    local: int = 0
    ambiguous: int = 0
    covered: int = 0
    unkeyable: int = 0


def parse(frame, tunnel_ports=None):
    """The :class:`Header` of an Ethernet frame, None if it is not IP.

    Up to :data:`probe.MAX_VLAN_TAGS` tags are skipped; VXLAN and Geneve
    packets to ``tunnel_ports`` (``{port: kind}``, default
    :func:`probe.tunnel_ports`) are read on their inner frame, as the vif
    sees it.  A frame cut before its keyed fields gives None.
    """
    if tunnel_ports is None:
        tunnel_ports = probe.tunnel_ports()
    return _parse(memoryview(frame), 0, tunnel_ports, 1)


def parse_at(buf, at, caplen, tunnel_ports):
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
    return _parse(memoryview(buf)[at:at + caplen], 0, tunnel_ports, 1)


def parse_ip(packet, tunnel_ports=None):
    """The :class:`Header` of an IPv4 or IPv6 packet (no link layer, as
    NFQUEUE gives it), None if it is neither."""
    if tunnel_ports is None:
        tunnel_ports = probe.tunnel_ports()
    mv = memoryview(packet)
    if not len(mv):
        return None
    etype = {4: dpkt.ethernet.ETH_TYPE_IP,
             6: dpkt.ethernet.ETH_TYPE_IP6}.get(mv[0] >> 4)
    return _parse_l3(mv, 0, etype, tunnel_ports, 1)


def _parse(mv, off, tunnel_ports, depth):
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
    return _parse_l3(mv, off, etype, tunnel_ports, depth)


def _parse_l3(mv, off, etype, tunnel_ports, depth):
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
        if depth and dport in tunnel_ports:
            kind = tunnel_ports[dport]
            inner = l4 + 8 + probe.VXLAN_HDR_LEN
            if kind == 'geneve':
                if len(mv) < l4 + 9:
                    return None
                inner += (mv[l4 + 8] & 0x3f) * 4
            return _parse(mv, inner, tunnel_ports, depth - 1)
        return Header((proto, src, dst, sport, dport), v4_ident)
    return Header((proto, src, dst, 0, 0), v4_ident)


def match(seen, vifs):
    """``{vif: PassiveResult}`` for each :class:`VifSpec` in ``vifs``, from
    the passive sightings ``seen``.

    A pif sighting is the vNIC's if its destination (ingress, received on
    the pif) or source (egress, sent out of the pif) is one of the vNIC's
    addresses; every sighting on a vif is that vNIC's.
    """
    by_if = collections.defaultdict(list)
    for s in seen:
        by_if[s.ifname].append(s)
    names = [v.vif for v in vifs]
    if len(set(names)) != len(names):
        raise PassiveError(f"two vNICs share a vif: {sorted(names)}")
    return {v.vif: _match_vnic(v, by_if.get(v.pif, ()),
                               by_if.get(v.vif, ())) for v in vifs}


def _match_vnic(spec, pif_seen, vif_seen):
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
    ingress, neg_in = _pair(pif_in, vif_out, counts, 'unmatched', 'local')
    egress, neg_out = _pair(vif_in, pif_out, counts, 'local', 'unmatched')
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
        unkeyable=counts['unkeyable'])


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


def _pair(first, then, counts, first_only, then_only):
    """Latencies ``then − first`` of keys seen once on each side; the
    number of negative ones (left out).  Keys seen on one side only count
    as ``first_only``/``then_only`` unless a super-packet covers them."""
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
    for key, s in a.items():
        if key in b or key in amb_b:
            continue
        counts['covered' if _inside(s.header, ranges_b) else
               first_only] += 1
    for key, s in b.items():
        if key in a or key in amb_a:
            continue
        counts['covered' if _inside(s.header, ranges_a) else
               then_only] += 1
    return values, negative


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
