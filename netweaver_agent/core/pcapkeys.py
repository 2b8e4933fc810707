"""Probe keys straight from captured bytes, one frame or a run at a time.

:func:`frame_key` and :func:`run_keys` give exactly what
:func:`probe.parse_key` gives, without building packet objects:

* :func:`frame_key` reads one frame at fixed offsets when it is untagged
  Ethernet (or Linux cooked) + IPv4 without options, VXLAN and Geneve
  over such a frame included (the inner frame read the same way), and
  hands anything else (VLAN tags, IPv6, IP options) to ``parse_frame``;
* :func:`run_keys` reads ``n`` frames of equal length lying ``stride``
  bytes apart (a run of records in a capture file) as *columns*: each field
  is pulled out of all frames at once with a stepped slice
  (``buf[off::stride]``, done in C), checked with ``bytes.translate``
  tables and big-integer bit operations (one byte per frame), and turned
  into keys with ``map`` over :mod:`operator` functions.  A run of VXLAN
  or Geneve packets whose outer headers agree is read the same way at
  the inner frames' offset.  Frames it cannot decide are left to
  :func:`frame_key`.

:func:`fingerprint_key` keys *foreign* packets by their invariant fields
(see :mod:`netweaver_agent.core.pcapfile`), request/response traffic only.
"""

import array
import dataclasses
import hashlib
import itertools
import operator
import struct
import sys

import dpkt

from netweaver_agent.core import pcapwalk
from netweaver_agent.core import probe

LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276

_HOST_BE = sys.byteorder == 'big'
_ETH_P_ARP = dpkt.ethernet.ETH_TYPE_ARP      # never ours
_ETH_P_IPV6 = dpkt.ethernet.ETH_TYPE_IP6
_ETH_P_IP = dpkt.ethernet.ETH_TYPE_IP
# IP protocols and ICMP types, dpkt's names.
_P_ICMP = dpkt.ip.IP_PROTO_ICMP
_P_TCP = dpkt.ip.IP_PROTO_TCP
_P_UDP = dpkt.ip.IP_PROTO_UDP
_P_ICMP6 = dpkt.ip.IP_PROTO_ICMP6
_ECHO, _ECHOREPLY = dpkt.icmp.ICMP_ECHO, dpkt.icmp.ICMP_ECHOREPLY
_UNREACH = dpkt.icmp.ICMP_UNREACH
_ECHO6 = dpkt.icmp6.ICMP6_ECHO_REQUEST
_ECHOREPLY6 = dpkt.icmp6.ICMP6_ECHO_REPLY
_TUNNEL_PORTS = probe.TUNNEL_PORTS
_ETH_VLAN = (dpkt.ethernet.ETH_TYPE_8021Q, dpkt.ethernet.ETH_TYPE_8021AD)
_MAGIC = probe.MAGIC
_SYN, _RST, _ACK = 0x02, 0x04, 0x10
_TAG_NEED = 20 + 8 + probe.TAG_LEN       # IP length to hold a tagged probe
_TCP_NEED = 20 + 20
_UNREACH_NEED = 20 + 8 + _TAG_NEED       # ICMP error quoting a UDP probe
# With the keyed tag too (run_keys decides only rows holding all of it).
_AUTH_NEED = _TAG_NEED + probe.AUTH_LEN
_UNREACH_AUTH_NEED = _UNREACH_NEED + probe.AUTH_LEN

for _code, _size in (('H', 2), ('I', 4), ('Q', 8), ('q', 8), ('i', 4)):
    if array.array(_code).itemsize != _size:
        raise ImportError(f"array type {_code!r} is not {_size} bytes here")


@dataclasses.dataclass(frozen=True, slots=True)
class Link:
    """Where a link type keeps the ethertype, the IP header, the direction.

    ``pkttype_off``: offset of the Linux packet type byte (cooked captures).
    """

    linktype: int
    ethertype_off: int
    ip_off: int
    pkttype_off: int | None = None


LINKS = {
    LINKTYPE_ETHERNET: Link(LINKTYPE_ETHERNET, 12, 14),
    LINKTYPE_LINUX_SLL: Link(LINKTYPE_LINUX_SLL, 14, 16, 1),
    LINKTYPE_LINUX_SLL2: Link(LINKTYPE_LINUX_SLL2, 0, 20, 10),
}
ETHERNET = LINKS[LINKTYPE_ETHERNET]


# --------------------------------------------------------------------------
# One frame.

_ETHERTYPE = struct.Struct('!H')
_IPV4 = struct.Struct('!BxHxxHxB')          # v/hl, total length, frag, proto
_TAG_AT = struct.Struct('!4sHI')            # MAGIC, session, seq
_U16 = struct.Struct('!H')
_TCP = struct.Struct('!HHIIBB')             # sport dport seq ack off flags


def _slow_key(buf, off, caplen, link, decap=True, tunnels=None):
    """:func:`probe.parse_frame` on the record, as ``(session, key)``, or
    ``(session, key, encap)`` when the frame was tagged or tunnelled.
    ``decap`` False: tunnels are not opened (an inner frame's own)."""
    if link.linktype == LINKTYPE_ETHERNET:
        frame = bytes(buf[off:off + caplen])
    else:
        # A blank Ethernet header in front of the cooked header's protocol.
        et = off + link.ethertype_off
        frame = (bytes(12) + bytes(buf[et:et + 2]) +
                 bytes(buf[off + link.ip_off:off + caplen]))
    if decap:
        found = probe.parse_frame(frame, tunnels=tunnels)
    else:
        try:
            found = probe._frame_key(frame, None, decap=False)
        except probe._PARSE_ERRORS:
            return None
    if found is None:
        return None
    key, encap = found
    if encap is probe.NO_ENCAP:
        return key.session, key.as_int()
    return key.session, key.as_int(), encap


def frame_key(buf, off, caplen, link=ETHERNET, decap=True, tunnels=None):
    """The ``(session, key_int)`` of the frame at ``buf[off:off+caplen]``.

    The same answer as :func:`probe.parse_frame` (None for anything that
    is not a probe or a reply), with a third item, the
    :class:`probe.Encap`, when the frame carries VLAN tags, VXLAN or
    Geneve: ``(session, key_int, encap)``.  dpkt's rules, mirrored here: IP
    data is cut to the IP total length (0: to the frame's end); fragments
    with a non-zero offset are not decoded; the UDP length field is
    ignored.  ``decap`` False: tunnels are not opened (for inner frames);
    ``tunnels``: their UDP ports (:func:`probe.tunnel_ports`; None: the
    standard ones).
    """
    ip = off + link.ip_off
    avail = caplen - link.ip_off
    if avail < 20 or caplen < link.ethertype_off + 2:
        return _slow_key(buf, off, caplen, link, decap, tunnels)
    etype, = _ETHERTYPE.unpack_from(buf, off + link.ethertype_off)
    if etype != _ETH_P_IP:
        if etype == _ETH_P_ARP:
            return None
        return _slow_key(buf, off, caplen, link, decap, tunnels)
    vhl, length, frag, proto = _IPV4.unpack_from(buf, ip)
    if vhl != 0x45:
        return _slow_key(buf, off, caplen, link, decap, tunnels)
    if frag & 0x1fff:
        return None
    plen = (min(length, avail) if length else avail) - 20
    l4 = ip + 20
    if proto == _P_ICMP:
        if plen < 4:
            return None
        icmp_type = buf[l4]
        if icmp_type in (_ECHO, _ECHOREPLY):
            if plen < 8 + probe.TAG_LEN:
                return None
            magic, session, seq = _TAG_AT.unpack_from(buf, l4 + 8)
            if magic != _MAGIC or _U16.unpack_from(buf, l4 + 4)[0] != session:
                return None
            return session, (seq << 1) | (icmp_type == 0)
        if icmp_type == _UNREACH:
            return _unreach_key(buf, l4, plen, off, caplen, link)
        return None
    if proto == _P_UDP:
        if plen < 8 + probe.TAG_LEN:
            return None
        magic, session, seq = _TAG_AT.unpack_from(buf, l4 + 8)
        if (magic != _MAGIC or _U16.unpack_from(buf, l4)[0] !=
                probe.udp_source_port(session)):
            kind = (_TUNNEL_PORTS if tunnels is None else tunnels).get(
                _U16.unpack_from(buf, l4 + 2)[0])
            if kind is not None and decap:
                return _tunnel_key(buf, l4 + 8, l4 + plen, kind)
            return None
        return session, seq << 1
    if proto == _P_TCP:
        if plen < 20:
            return None
        sport, dport, seq, ack, doff, flags = _TCP.unpack_from(buf, l4)
        if doff < 0x50:
            return None
        if flags & _SYN and not flags & _ACK:
            value, port, reply = seq, sport, 0
        elif flags & _ACK and flags & (_RST | _SYN):
            value, port, reply = (ack - 1) & 0xffffffff, dport, 1
        else:
            return None
        if not port:
            return None
        # The key holds the port and the ISN (probe.tcp_wire_ident), no
        # session: an ISN of ours from another port is another key, which
        # no plan holds.
        return probe.TCP_SESSION, (probe.tcp_wire_ident(port, value) << 1 |
                                   reply)
    return None


def frame_auth(buf, off, caplen, link=ETHERNET, tunnel=None):
    """The auth (:func:`probe.auth_value`) of the probe or answer in the
    frame at ``buf[off:off+caplen]``, or None.

    Call it on frames :func:`frame_key` keyed; ``tunnel``: the tunnel
    kind of the :class:`probe.Encap` it gave (the probe is then the inner
    frame's).  VLAN tags are read through.  Never an exception.
    """
    try:
        return _frame_auth(buf, off, caplen, link, tunnel)
    except (struct.error, IndexError):
        return None


def _frame_auth(buf, off, caplen, link, tunnel):
    end = min(off + caplen, len(buf))
    et = off + link.ethertype_off
    if et + 2 > end:
        return None
    etype, = _ETHERTYPE.unpack_from(buf, et)
    ip = off + link.ip_off
    tags = 0
    while etype in _ETH_VLAN and tags < probe.MAX_VLAN_TAGS:
        if ip + 4 > end:
            return None
        etype, = _ETHERTYPE.unpack_from(buf, ip + 2)
        ip += 4
        tags += 1
    if tunnel is None:
        return probe.ip_auth(buf, ip, end, etype)
    # The UDP payload of the outer packet, then the inner frame.
    if etype == _ETH_P_IP:
        if ip + 20 > end:
            return None
        total, = _U16.unpack_from(buf, ip + 2)
        stop = min(end, ip + total) if total else end
        l4 = ip + (buf[ip] & 0x0f) * 4
    elif etype == _ETH_P_IPV6:
        found = probe._ip6_payload(buf, ip, end)
        if found is None:
            return None
        l4, stop = found[1], found[2]
    else:
        return None
    inner = _tunnel_inner(buf, l4 + 8, stop, tunnel)
    if inner is None:
        return None
    return _frame_auth(buf, inner, stop - inner, ETHERNET, None)


def _tunnel_inner(buf, start, stop, kind):
    """Offset of the inner frame of the VXLAN or Geneve header at
    ``buf[start:stop]``, or None (the rules of :mod:`probe`)."""
    if kind == 'vxlan':
        if (stop - start < probe.VXLAN_HDR_LEN + dpkt.ethernet.ETH_HDR_LEN or
                not buf[start] & 0x08):
            return None
        return start + probe.VXLAN_HDR_LEN
    return probe.geneve_inner_offset(buf, start, stop)


def _tunnel_key(buf, start, stop, kind):
    """The key of the frame inside the tunnel header at ``buf[start:]``
    (the UDP payload, up to ``stop``), with its :class:`probe.Encap`."""
    inner = _tunnel_inner(buf, start, stop, kind)
    if inner is None:
        return None
    found = frame_key(buf, inner, stop - inner, ETHERNET, decap=False)
    if found is None:
        return None
    vni = int.from_bytes(buf[start + 4:start + 7], 'big')
    return found[0], found[1], probe.Encap(vni=vni, tunnel=kind)


def _unreach_key(buf, l4, plen, off, caplen, link):
    """An ICMP unreachable quoting a UDP probe (the guest's answer)."""
    if plen < 8 + 20:
        return None
    inner = l4 + 8
    vhl, length, _frag, proto = _IPV4.unpack_from(buf, inner)
    if vhl != 0x45:
        return _slow_key(buf, off, caplen, link)
    if proto != _P_UDP:
        return None
    avail = plen - 8
    if (min(length, avail) if length else avail) - 20 < 8 + probe.TAG_LEN:
        return None
    magic, session, seq = _TAG_AT.unpack_from(buf, inner + 28)
    if magic != _MAGIC:
        return None
    return session, (seq << 1) | 1


# Fingerprint mode: which packets are request/response traffic.
_ICMP_OK = frozenset((_ECHOREPLY, _ECHO,
                      _UNREACH, dpkt.icmp.ICMP_TIMEXCEED,
                      dpkt.icmp.ICMP_PARAMPROB))     # errors quoting one
_ICMP6_OK = frozenset((_ECHO6, _ECHOREPLY6,
                       dpkt.icmp6.ICMP6_DST_UNREACH,
                       dpkt.icmp6.ICMP6_PACKET_TOO_BIG,
                       dpkt.icmp6.ICMP6_TIME_EXCEEDED,
                       dpkt.icmp6.ICMP6_PARAM_PROB))     # errors quoting one
# DHCP and DHCPv6 (client/server ports): broadcast or link-local chatter.
_DHCP_PORTS = frozenset((67, 68, 546, 547))
_BROADCAST4 = b'\xff' * 4


def fingerprint_key(buf, off, caplen, link=ETHERNET, dst_ip=None):
    """The fingerprint ``(0, key_int)`` of an IPv4/IPv6 frame, or None;
    ``(0, key_int, encap)`` when it came inside a tunnel or VLAN tags.

    ``dst_ip``: the instance's address as packed bytes (4 or 16), or None.
    Only request/response traffic counts: TCP, UDP (not DHCP), ICMP and
    ICMPv6 echo requests/replies and the errors quoting a packet, unicast,
    to or from ``dst_ip`` (any address when None).  ARP, IGMP, neighbour
    discovery, router solicitations and advertisements, MLD, multicast
    and broadcast are never keyed.  Up to two VLAN tags are skipped,
    on Ethernet and in Linux cooked captures alike (libpcap puts the tag
    the kernel took out back after the cooked header: its protocol field
    then says 802.1Q); VXLAN and Geneve packets are keyed by their inner
    frame (the VNI goes into the :class:`probe.Encap`).
    """
    end = off + caplen
    if off + link.ethertype_off + 2 > end:
        return None
    if link.linktype == LINKTYPE_ETHERNET:
        return _fingerprint_frame(buf, off, end, dst_ip, decap=True)
    if off + link.pkttype_off >= end or \
            buf[off + link.pkttype_off] in _GROUP_PKTTYPES:
        return None                 # to a group, as Ethernet's bit says
    etype, = _ETHERTYPE.unpack_from(buf, off + link.ethertype_off)
    return _fingerprint_tagged(buf, etype, off + link.ip_off, end, dst_ip,
                               decap=True)


# Linux packet types PACKET_BROADCAST and PACKET_MULTICAST.
_GROUP_PKTTYPES = (1, 2)


def _fingerprint_frame(buf, off, end, dst_ip, decap):
    """:func:`fingerprint_key` of the Ethernet frame at ``buf[off:end]``."""
    if off + ETHERNET.ip_off > end or buf[off] & 1:
        return None                 # short, or to a group (bcast/mcast)
    etype, = _ETHERTYPE.unpack_from(buf, off + 12)
    return _fingerprint_tagged(buf, etype, off + ETHERNET.ip_off, end,
                               dst_ip, decap)


def _fingerprint_tagged(buf, etype, ip, end, dst_ip, decap):
    """:func:`fingerprint_key` of what follows an ethertype ``etype``
    (VLAN tags, up to two, then IP at ``ip``)."""
    vlan = ()
    while etype in _ETH_VLAN and len(vlan) < probe.MAX_VLAN_TAGS:
        if ip + 4 > end:
            return None
        vlan += (_U16.unpack_from(buf, ip)[0] & 0x0fff,)
        etype, = _ETHERTYPE.unpack_from(buf, ip + 2)
        ip += 4
    found = _fingerprint_ip(buf, etype, ip, end, dst_ip, decap)
    if found is None or not vlan or not decap:
        return found
    inner = found[2] if len(found) > 2 else probe.NO_ENCAP
    return found[0], found[1], probe.Encap(vlan=vlan, vni=inner.vni,
                                           tunnel=inner.tunnel)


def _fingerprint_ip(buf, etype, ip, end, dst_ip, decap):
    """:func:`fingerprint_key` of the IP packet at ``buf[ip:end]``."""
    if etype == _ETH_P_IP:
        if ip + 20 > end or buf[ip] >> 4 != 4:
            return None
        hl = (buf[ip] & 0x0f) * 4
        total, = _U16.unpack_from(buf, ip + 2)
        stop = min(end, ip + total) if total else end
        l4 = ip + hl
        if hl < 20 or l4 + 8 > stop:
            return None
        if _U16.unpack_from(buf, ip + 6)[0] & 0x1fff:
            return None             # a later fragment: no transport header
        proto = buf[ip + 9]
        src = bytes(buf[ip + 12:ip + 16])
        dst = bytes(buf[ip + 16:ip + 20])
        if dst[0] >= 224 or dst == _BROADCAST4:
            return None
        icmp_ok = proto == _P_ICMP and buf[l4] in _ICMP_OK
        head = (bytes(buf[ip + 4:ip + 6]) + bytes(buf[ip + 9:ip + 10]))
    elif etype == _ETH_P_IPV6:
        if ip + 48 > end or buf[ip] >> 4 != 6:
            return None
        l4 = ip + 40
        plen, = _U16.unpack_from(buf, ip + 4)
        stop = min(end, l4 + plen) if plen else end
        if l4 + 8 > stop:
            return None
        proto = buf[ip + 6]
        src = bytes(buf[ip + 8:ip + 24])
        dst = bytes(buf[ip + 24:ip + 40])
        if dst[0] == 0xff:
            return None             # multicast: ND, RS, MLD...
        icmp_ok = proto == _P_ICMP6 and buf[l4] in _ICMP6_OK
        head = bytes(buf[ip + 6:ip + 7]) + bytes(buf[ip + 4:ip + 6])
    else:
        return None
    if proto == _P_UDP:
        sport, dport = _U16.unpack_from(buf, l4)[0], _U16.unpack_from(
            buf, l4 + 2)[0]
        kind = _TUNNEL_PORTS.get(dport)
        if kind is not None and decap:
            return _fingerprint_tunnel(buf, l4 + 8, stop, kind, dst_ip)
        if sport in _DHCP_PORTS or dport in _DHCP_PORTS:
            return None
    elif proto != _P_TCP and not icmp_ok:
        return None                 # IGMP, ND/RA/RS, MLD, other protocols
    if dst_ip is not None and dst != dst_ip and src != dst_ip:
        return None
    reply = dst_ip is not None and src == dst_ip
    fields = None
    if dst_ip is not None:
        fields = _pair_fields(buf, proto, l4, stop, src, dst, reply)
    if fields is None:
        fields = src + dst + head + bytes(buf[l4:l4 + 8])
    digest = hashlib.blake2b(fields, digest_size=8).digest()
    h63 = int.from_bytes(digest, 'big') >> 1
    return 0, (h63 << 1) | reply


_PAIR = b'P'                # keeps pair fields apart from packet fields
_ECHO_REQUEST = {_P_ICMP: _ECHO, _P_ICMP6: _ECHO6}
_ECHO_REPLY = {_P_ICMP: _ECHOREPLY, _P_ICMP6: _ECHOREPLY6}


def _pair_fields(buf, proto, l4, stop, src, dst, reply):
    """What a request to the instance and the instance's answer to it
    have in common, or None: such packets share their fingerprint but for
    the reply bit, so the guest's turnaround is measured as for probes.

    ICMP/ICMPv6 echo: the addresses (requester first), id and sequence.
    TCP: a SYN (no ACK) and the SYN-ACK or RST-ACK acknowledging it (ack =
    seq + 1): addresses and ports (requester first) and the SYN's
    sequence number.  Anything else, or traffic the instance started:
    None (the packet's own fields key it).
    """
    client, server = (dst, src) if reply else (src, dst)
    if proto == _P_TCP:
        if l4 + 14 > stop:
            return None
        flags = buf[l4 + 13]
        a, b = bytes(buf[l4:l4 + 2]), bytes(buf[l4 + 2:l4 + 4])
        if not reply and flags & _SYN and not flags & (_ACK | _RST):
            return _PAIR + client + server + a + b + bytes(buf[l4 + 4:l4 + 8])
        if reply and flags & _ACK and flags & (_SYN | _RST):
            acked = (int.from_bytes(buf[l4 + 8:l4 + 12], 'big') -
                     1) & 0xffffffff
            return _PAIR + client + server + b + a + acked.to_bytes(4, 'big')
        return None
    want = _ECHO_REPLY if reply else _ECHO_REQUEST
    if want.get(proto) == buf[l4] and buf[l4 + 1] == 0:
        return (_PAIR + client + server + bytes([proto]) +
                bytes(buf[l4 + 4:l4 + 8]))
    return None


def _fingerprint_tunnel(buf, start, stop, kind, dst_ip):
    """The fingerprint of the frame inside a VXLAN/Geneve header."""
    inner = _tunnel_inner(buf, start, stop, kind)
    if inner is None:
        return None
    found = _fingerprint_frame(buf, inner, stop, dst_ip, decap=False)
    if found is None:
        return None
    vni = int.from_bytes(buf[start + 4:start + 7], 'big')
    return found[0], found[1], probe.Encap(vni=vni, tunnel=kind)


# --------------------------------------------------------------------------
# Columns.

def column(buf, start, stride, n, size=1):
    """Bytes ``start..start+size`` of ``n`` records ``stride`` apart."""
    stop = start + stride * (n - 1) + 1
    if size == 1:
        return bytes(buf[start:stop:stride])
    out = bytearray(size * n)
    for j in range(size):
        out[j::size] = buf[start + j:stop + j:stride]
    return bytes(out)


def interleave(*cols):
    """Byte columns of equal length, interleaved (``a0 b0 a1 b1 ...``)."""
    size = len(cols)
    out = bytearray(size * len(cols[0]))
    for j, c in enumerate(cols):
        out[j::size] = c
    return bytes(out)


def ints(col, typecode, big_endian):
    """An :class:`array.array` of the fixed-size integers in ``col``."""
    values = array.array(typecode)
    values.frombytes(col)
    if big_endian != _HOST_BE:
        values.byteswap()
    return values


def widen(col, size, big_endian):
    """A column of ``size``-byte integers as 8-byte little-endian lanes."""
    n = len(col) // size
    out = bytearray(8 * n)
    for j in range(size):
        out[j::8] = col[size - 1 - j if big_endian else j::size]
    return out


def lanes(col, size, big_endian):
    """A column of integers as one big integer, 64 bits per record.

    Adding, multiplying by a small factor or shifting this integer does
    the same to every record at once, as long as no record's value
    leaves its 64 bits.
    """
    return int.from_bytes(widen(col, size, big_endian), 'little')


def repunit(n):
    """1 in each of ``n`` lanes (``lanes`` of a column of ones)."""
    return int.from_bytes(b'\x01\0\0\0\0\0\0\0' * n, 'little')


def from_lanes(value, n, typecode):
    """An 8-byte :class:`array.array` from ``n`` lanes of ``value``."""
    return ints(value.to_bytes(8 * n, 'little'), typecode, False)


def equal_prefix(col, size, pattern, start=0):
    """How many ``size``-byte items of ``col`` from item ``start`` on equal
    ``pattern`` in a row.

    Galloping search: the cost grows with the answer, not with ``col``.
    """
    n = len(col) // size - start
    base = start * size
    good, k = 0, 1
    while k <= n and col[base:base + size * k] == pattern * k:
        good, k = k, 2 * k
    hi = min(k, n + 1)              # the first k known (or bound) to fail
    while good + 1 < hi:
        mid = (good + hi) // 2
        if col[base:base + size * mid] == pattern * mid:
            good = mid
        else:
            hi = mid
    return good


def _table(bad):
    """A translate table: 1 where ``bad(byte)``, else 0."""
    return bytes(1 if bad(b) else 0 for b in range(256))


def _mask(col, table):
    """Big integer with one byte per record: 1 where bad."""
    return int.from_bytes(col.translate(table), 'little')


def _differ(a, b):
    """Big integer, one byte per record: non-zero where ``a`` != ``b``."""
    return int.from_bytes(a, 'little') ^ int.from_bytes(b, 'little')


_T_NOT_08 = _table(lambda b: b != 0x08)
_T_NOT_00 = _table(lambda b: b != 0x00)
_T_NOT_45 = _table(lambda b: b != 0x45)
_T_FRAG_HI = _table(lambda b: b & 0x1f)
_T_ZERO = _table(lambda b: b == 0)
_T_NONZERO = _table(lambda b: b != 0)
_T_DOFF_BAD = _table(lambda b: b < 0x50)
_T_TWO = _table(lambda b: b == 2)
_T_NOT_03 = _table(lambda b: b != 3)
_T_NO_VXLAN_I = _table(lambda b: not b & 0x08)
_T_TAG_LEAD = _table(lambda b: b == probe.MAGIC[0])
_T_ONE_FF = bytes(0xff if b == 1 else 0 for b in range(256))
_T_PORT_HI = bytes((b & 0x7f) | 0x80 for b in range(256))
_T_BIT = bytes(b & 1 for b in range(256))
_T_PROTO = {p: _table(lambda b, p=p: b != p)
            for p in (_P_ICMP, _P_TCP, _P_UDP)}
# ICMP type -> 0 echo request, 1 echo reply, 2 anything else.
_T_ECHO = bytes(0 if b == _ECHO else 1 if b == _ECHOREPLY else 2
                for b in range(256))
# TCP flags -> 0 probe (SYN, no ACK), 1 reply (ACK with RST or SYN), 2 other.
_T_TCP = bytes(0 if b & _SYN and not b & _ACK else
               1 if b & _ACK and b & (_RST | _SYN) else 2
               for b in range(256))


_T_SHORT = {}        # need -> its table (built once: runs call this a lot)


def _short(hi, lo, need):
    """Mask of IP total lengths with ``0 < length < need`` (need < 256)."""
    t_lo = _T_SHORT.get(need)
    if t_lo is None:
        t_lo = _T_SHORT[need] = _table(lambda b: 0 < b < need)
    return _mask(hi, _T_ZERO) & _mask(lo, t_lo)


@dataclasses.dataclass(frozen=True, slots=True)
class RunKeys:
    """Keys of a run: ``ok`` (one byte per record, 1 = decided probe), and
    for those records the ``sessions`` and ``keys`` (arrays over *all*
    records; rows where ``ok`` is 0 hold garbage).  ``all_ok``: every
    record decided; ``session``: the one session of all records, or None.
    """

    ok: bytes
    sessions: array.array
    keys: array.array
    all_ok: bool
    session: int | None
    # Per record, the probe.Encap of a run of tunnelled frames (what
    # frame_key gives third); None when the run is not tunnelled.
    encaps: list | None = None
    # Per record, what frame_auth gives (array 'Q'; garbage where not ok).
    auth: array.array | None = None


def run_keys(buf, first, stride, n, caplen, link=ETHERNET, decap=True):
    """Keys of ``n`` frames at ``first + i * stride``, each ``caplen`` long.

    Handles runs of one protocol: ICMP echo requests/replies, UDP probes,
    or TCP SYN probes and their RST/ACK or SYN/ACK replies, also inside
    VXLAN or Geneve over IPv4 (``decap``; the standard ports).  Returns a
    :class:`RunKeys`, or None when no record can be decided here.
    """
    if caplen - link.ip_off < _TCP_NEED:
        return None
    ip = first + link.ip_off
    l4 = ip + 20

    def col(at, size=1):
        return column(buf, at, stride, n, size)

    proto = buf[ip + 9]
    if proto not in (_P_ICMP, _P_TCP, _P_UDP):
        return None
    et = first + link.ethertype_off
    bad = (_mask(col(et), _T_NOT_08) | _mask(col(et + 1), _T_NOT_00) |
           _mask(col(ip), _T_NOT_45) | _mask(col(ip + 6), _T_FRAG_HI) |
           _mask(col(ip + 7), _T_NOT_00) |
           _mask(col(ip + 9), _T_PROTO[proto]))
    if (proto == _P_UDP and decap and buf[l4 + 8] != _MAGIC[0] and
            _U16.unpack_from(buf, l4 + 2)[0] in _TUNNEL_PORTS):
        return _tunnel_run(buf, col, first, stride, n, caplen, link, bad)
    tag_at = None
    if proto == _P_TCP:
        found = _tcp(col, l4, n)
        need = _TCP_NEED
    elif proto == _P_ICMP and buf[l4] == _UNREACH:
        if caplen - link.ip_off < _UNREACH_AUTH_NEED:
            return None
        found = _unreach(col, l4, n)
        need = _UNREACH_AUTH_NEED
        tag_at = l4 + 8 + _TAG_NEED
    else:
        if caplen - link.ip_off < _AUTH_NEED:
            return None
        found = _tagged(col, l4, n, proto)
        need = _AUTH_NEED
        tag_at = l4 + 8 + probe.TAG_LEN
    if found is None:
        return None
    more_bad, sess_col, seq_col, replies = found
    bad |= more_bad | _short(col(ip + 2), col(ip + 3), need)
    ok = _ok_bytes(bad, n)
    all_ok = not bad
    if not all_ok and not ok.count(1):
        return None
    # key = seq << 1 | reply, every record at once in 64-bit lanes.
    seq_lanes = lanes(seq_col, len(seq_col) // n, True) << 1
    if replies.count(1):
        seq_lanes |= lanes(replies.translate(_T_BIT), 1, False)
    keys = from_lanes(seq_lanes, n, 'Q')
    session = None
    if all_ok and sess_col == sess_col[:2] * n:
        session = int.from_bytes(sess_col[:2], 'big')
    return RunKeys(ok=ok, sessions=ints(sess_col, 'H', True), keys=keys,
                   all_ok=all_ok, session=session,
                   auth=_run_auth(col, ip, tag_at, replies, proto, n))


def _run_auth(col, ip, tag_at, replies, proto, n):
    """frame_auth of every record: the tag (at ``tag_at``; None: TCP,
    no tag) XOR the address, the destination of probes and the source of
    answers (``replies``: one byte per record, 1 = answer)."""
    n_replies = 0 if proto == _P_UDP else replies.count(1)
    if n_replies == n:
        addr = col(ip + 12, 4)
    elif n_replies == 0:
        addr = col(ip + 16, 4)
    else:
        m1 = replies.translate(_T_ONE_FF)
        addr = _blend(col(ip + 16, 4), col(ip + 12, 4),
                      interleave(m1, m1, m1, m1))
    value = lanes(addr, 4, True)
    if tag_at is not None:
        value ^= lanes(col(tag_at, 8), 8, True)
    return from_lanes(value, n, 'Q')


def _tunnel_run(buf, col, first, stride, n, caplen, link, bad):
    """:func:`run_keys` of VXLAN/Geneve packets over IPv4: the outer
    headers are checked as columns against the first record's layout (the
    same port, the same Geneve options length, the same IP length, within
    the record), then the inner frames are read as a run of their own."""
    l4 = first + link.ip_off + 20
    start = l4 + 8
    dport = _U16.unpack_from(buf, l4 + 2)[0]
    kind = _TUNNEL_PORTS[dport]
    lead = buf[start]
    if kind == 'vxlan':
        if not lead & 0x08:
            return None
        hdr = probe.VXLAN_HDR_LEN
        bad |= _mask(col(start), _T_NO_VXLAN_I)
    else:
        if lead >> 6:
            return None
        hdr = probe.GENEVE_HDR_LEN + (lead & 0x3f) * 4
        teb = dpkt.ethernet.ETH_TYPE_TEB
        bad |= (_differ(col(start), bytes([lead]) * n) |
                _differ(col(start + 2), bytes([teb >> 8]) * n) |
                _differ(col(start + 3), bytes([teb & 0xff]) * n))
    ip = first + link.ip_off
    total = _U16.unpack_from(buf, ip + 2)[0]
    if not 0 < total <= caplen - link.ip_off:
        return None
    bad |= (_differ(col(l4 + 2), bytes([dport >> 8]) * n) |
            _differ(col(l4 + 3), bytes([dport & 0xff]) * n) |
            # A UDP probe of ours to that port is one: frame_key's.
            _mask(col(start), _T_TAG_LEAD) |
            # The IP packet (and the inner frame) ends where the first's.
            _differ(col(ip + 2), bytes([total >> 8]) * n) |
            _differ(col(ip + 3), bytes([total & 0xff]) * n))
    off = start + hdr - first
    inner = run_keys(buf, first + off, stride, n,
                     link.ip_off + total - off, ETHERNET, decap=False)
    if inner is None:
        return None
    ok = _ok_bytes(bad, n)
    if bad:
        ok = (int.from_bytes(ok, 'little') &
              int.from_bytes(inner.ok, 'little')).to_bytes(n, 'little')
        if not ok.count(1):
            return None
    else:
        ok = inner.ok
    all_ok = ok.count(0) == 0
    vnis = col(start + 4, 3)
    if vnis == vnis[:3] * n:
        encaps = [probe.Encap(vni=int.from_bytes(vnis[:3], 'big'),
                              tunnel=kind)] * n
    else:
        made = {}
        encaps = []
        for i in range(0, 3 * n, 3):
            vni = vnis[i:i + 3]
            encap = made.get(vni)
            if encap is None:
                encap = made[vni] = probe.Encap(
                    vni=int.from_bytes(vni, 'big'), tunnel=kind)
            encaps.append(encap)
    return RunKeys(ok=ok, sessions=inner.sessions, keys=inner.keys,
                   all_ok=all_ok, session=inner.session if all_ok else None,
                   encaps=encaps, auth=inner.auth)


def _ok_bytes(bad, n):
    """One byte per record: 1 where the big-int ``bad`` has a zero byte."""
    if not bad:
        return b'\x01' * n
    return bad.to_bytes(n, 'little').translate(_T_ZERO)


def _tagged(col, l4, n, proto):
    """ICMP echo / UDP probes: the tag sits right after the 8-byte header.

    Returns ``(bad, session column (BE bytes), seqs, reply bits)``.
    """
    s_hi, s_lo = col(l4 + 12), col(l4 + 13)
    bad = 0
    if col(l4 + 8, 4) != _MAGIC * n:
        for j in range(4):
            bad |= _differ(col(l4 + 8 + j), _MAGIC[j:j + 1] * n)
    if proto == _P_ICMP:
        replies = col(l4).translate(_T_ECHO)
        bad |= (_mask(replies, _T_TWO) | _differ(col(l4 + 4), s_hi) |
                _differ(col(l4 + 5), s_lo))
    else:
        replies = bytes(n)
        # The source port is 32768 | (session & 0x7fff).
        bad |= (_differ(col(l4), s_hi.translate(_T_PORT_HI)) |
                _differ(col(l4 + 1), s_lo))
    return bad, interleave(s_hi, s_lo), col(l4 + 14, 4), replies


def _unreach(col, l4, n):
    """ICMP unreachable errors quoting a UDP probe (IP header without
    options, then the UDP header and the tag)."""
    inner = l4 + 8
    bad = (_mask(col(l4), _T_NOT_03) | _mask(col(inner), _T_NOT_45) |
           _mask(col(inner + 9), _T_PROTO[17]) |
           _short(col(inner + 2), col(inner + 3), _TAG_NEED))
    if col(inner + 28, 4) != _MAGIC * n:
        for j in range(4):
            bad |= _differ(col(inner + 28 + j), _MAGIC[j:j + 1] * n)
    return (bad, interleave(col(inner + 32), col(inner + 33)),
            col(inner + 34, 4), b'\x01' * n)


def _tcp(col, l4, n):
    """TCP SYN probes and replies acknowledging their ISN (``ack - 1``);
    the key's seq is :func:`probe.tcp_wire_ident` of the probe's source
    port and ISN, its session :data:`probe.TCP_SESSION`."""
    replies = col(l4 + 13).translate(_T_TCP)
    bad = _mask(replies, _T_TWO) | _mask(col(l4 + 12), _T_DOFF_BAD)
    n_replies = replies.count(1)
    if n_replies == 0:
        value, port = col(l4 + 4, 4), col(l4, 2)
    else:
        # (ack - 1) mod 2**32 for every record: add 2**32 - 1 in 64-bit
        # lanes (no carry leaves a lane), keep each lane's low 4 bytes.
        wide = (lanes(col(l4 + 8, 4), 4, True) +
                repunit(n) * 0xffffffff).to_bytes(8 * n, 'little')
        acked = interleave(wide[3::8], wide[2::8], wide[1::8], wide[0::8])
        if n_replies == n:
            value, port = acked, col(l4 + 2, 2)
        else:
            # Per record: the acknowledged number for replies, else seq.
            m1 = replies.translate(_T_ONE_FF)
            value = _blend(col(l4 + 4, 4), acked, interleave(m1, m1, m1, m1))
            port = _blend(col(l4, 2), col(l4 + 2, 2), interleave(m1, m1))
    p_hi, p_lo = port[0::2], port[1::2]
    bad |= _mask(p_hi, _T_ZERO) & _mask(p_lo, _T_ZERO)
    # seq = probe.tcp_wire_ident(port, ISN): the ISN's high half, the
    # TCP_IDENT flag, the port, the ISN's low half: 7 bytes, BE.  TCP
    # keys carry no session.
    ident = interleave(value[0::4], value[1::4], b'\x01' * n, p_hi, p_lo,
                       value[2::4], value[3::4])
    return bad, bytes(2 * n), ident, replies


def _blend(a, b, mask):
    """Bytes of ``b`` where ``mask`` is 0xff, else of ``a``."""
    m = int.from_bytes(mask, 'little')
    a_int = int.from_bytes(a, 'little')
    b_int = int.from_bytes(b, 'little')
    return ((a_int & ~m) | (b_int & m)).to_bytes(len(a), 'little')


# --------------------------------------------------------------------------
# Prefilters: which records of a run need a look of their own.
#
# Real traffic (TCP data and ACKs, ARP, DNS, IPv6, VLANs...) is mostly no
# probe and, to the instance, mostly no fingerprint either.  These decide
# that for a whole run in columns, from the bytes frame_key and
# fingerprint_key decide on, so only the rest is read one record at a
# time.  They only ever say "certainly nothing": anything they cannot
# tell (IP options, fragments, QinQ, records too short for the test) is
# left to the per-record functions.

_T_EQ = [bytes(1 if b == v else 0 for b in range(256)) for v in range(256)]
_T_IP6_BAD = _table(lambda b: b >> 4 != 6)
_T_ICMP_ECHO = _table(lambda b: b in (0, 8))
_T_ICMP6_ECHO = _table(lambda b: b in (_ECHO6, _ECHOREPLY6))
_T_TCP_CAND = _table(lambda b: _T_TCP[b] != 2)


def _eq(col, value):
    return _mask(col, _T_EQ[value])


def _eq16(hi, lo, value):
    return _eq(hi, value >> 8) & _eq(lo, value & 0xff)


def _tunnel_ports(col, l4):
    """Records whose UDP destination port is a tunnel's."""
    hi, lo = col(l4 + 2), col(l4 + 3)
    found = 0
    for port in _TUNNEL_PORTS:
        found |= _eq16(hi, lo, port)
    return found


_T_BELOW = {}


def below(col, need):
    """Mask (a byte per record) of the bytes of ``col`` below ``need``."""
    table = _T_BELOW.get(need)
    if table is None:
        table = _T_BELOW[need] = _table(lambda b: b < need)
    return _mask(col, table)


def zero(col):
    """Mask (a byte per record) of the zero bytes of ``col``."""
    return _mask(col, _T_ZERO)


def _short_of(caplen, short, n):
    """``short(need)``: the mask of records shorter than ``need`` bytes,
    from the run's one ``caplen`` unless the caller knows each."""
    if short is not None:
        return short
    ones = int.from_bytes(b'\x01' * n, 'little')
    return lambda need: ones if need > caplen else 0


def _layouts(col, first, n, short, link):
    """``[(kind, mask, ip)]``: the records whose IP header (``kind`` 4 or
    6) starts at ``ip``, untagged or under one VLAN tag, and a mask of
    the records frame_key reads some other way (QinQ: left to it)."""
    et = first + link.ethertype_off
    ip0 = first + link.ip_off
    hi, lo = col(et), col(et + 1)
    out = [(4, _eq16(hi, lo, _ETH_P_IP), ip0),
           (6, _eq16(hi, lo, _ETH_P_IPV6), ip0)]
    tagged = 0
    for tpid in _ETH_VLAN:
        tagged |= _eq16(hi, lo, tpid)
    other = short(link.ethertype_off + 2)
    if tagged:
        other |= tagged & short(link.ip_off + 4)
        ihi, ilo = col(ip0 + 2), col(ip0 + 3)
        out += [(4, tagged & _eq16(ihi, ilo, _ETH_P_IP), ip0 + 4),
                (6, tagged & _eq16(ihi, ilo, _ETH_P_IPV6), ip0 + 4)]
        for tpid in _ETH_VLAN:
            other |= tagged & _eq16(ihi, ilo, tpid)
    return out, other


def probe_candidates(buf, first, stride, n, caplen, link=ETHERNET,
                     short=None):
    """One byte per record of a run (``n`` records ``stride`` apart, each
    ``caplen`` long): 0 where :func:`frame_key` certainly gives None.

    ``short``: for records of several lengths (``caplen`` then bounds
    them), ``short(need)`` gives the mask (a byte per record) of those
    shorter than ``need``; each record's bytes up to ``caplen`` must be
    readable at its place (a copy of its first ``caplen`` bytes will do).
    """
    def col(at):
        return column(buf, at, stride, n)

    short = _short_of(caplen, short, n)
    layouts, cand = _layouts(col, first, n, short, link)
    for kind, mask, ip in layouts:
        if not mask:
            continue
        l4 = ip + (20 if kind == 4 else 40)
        cut = mask & short(l4 + 14 - first)
        cand |= cut                     # too short to tell here
        mask &= ~cut
        if not mask:
            continue
        if kind == 4:
            maybe = (_mask(col(ip), _T_NOT_45) |
                     _mask(col(ip + 6), _T_FRAG_HI) |
                     _mask(col(ip + 7), _T_NONZERO))
            proto = col(ip + 9)
            icmp = _eq(proto, _P_ICMP)
            echo, error = _T_ICMP_ECHO, _UNREACH
        else:
            maybe = _mask(col(ip), _T_IP6_BAD)
            proto = col(ip + 6)
            icmp = _eq(proto, _P_ICMP6)
            echo, error = _T_ICMP6_ECHO, dpkt.icmp6.ICMP6_DST_UNREACH
        if icmp:
            # Echoes of ours carry the tag; errors quote what they quote.
            kind = col(l4)
            icmp &= (_mask(kind, echo) & _eq(col(l4 + 8), _MAGIC[0]) |
                     _eq(kind, error))
        udp = _eq(proto, _P_UDP)
        if udp:
            udp &= (_eq(col(l4 + 8), _MAGIC[0]) | _tunnel_ports(col, l4))
        tcp = _eq(proto, _P_TCP)
        if tcp:
            tcp &= _mask(col(l4 + 13), _T_TCP_CAND)
        cand |= mask & (maybe | icmp | udp | tcp)
    return _flags(cand, n)


def fingerprint_candidates(buf, first, stride, n, caplen, link=ETHERNET,
                           dst_ip=None, short=None):
    """One byte per record of a run: 0 where :func:`fingerprint_key` with
    ``dst_ip`` (packed) certainly gives None: no IP, or IP neither to nor
    from ``dst_ip`` and no tunnel.  Without ``dst_ip``: IP ones only.
    ``short``: see :func:`probe_candidates`."""
    def col(at):
        return column(buf, at, stride, n)

    short = _short_of(caplen, short, n)
    layouts, cand = _layouts(col, first, n, short, link)
    for kind, mask, ip in layouts:
        if not mask:
            continue
        size = 4 if kind == 4 else 16
        src = ip + (12 if kind == 4 else 8)
        l4 = ip + (20 if kind == 4 else 40)
        cut = mask & short(max(src + 2 * size, l4 + 4) - first)
        cand |= cut
        mask &= ~cut
        if not mask:
            continue
        if dst_ip is None:
            cand |= mask
            continue
        ours = 0
        if len(dst_ip) == size:
            is_src = is_dst = mask
            for j in range(size):
                is_src &= _eq(col(src + j), dst_ip[j])
                is_dst &= _eq(col(src + size + j), dst_ip[j])
            ours = is_src | is_dst
        if kind == 4:
            maybe = (_mask(col(ip), _T_NOT_45) |
                     _mask(col(ip + 6), _T_FRAG_HI) |
                     _mask(col(ip + 7), _T_NONZERO))
            proto = col(ip + 9)
        else:
            maybe = _mask(col(ip), _T_IP6_BAD)
            proto = col(ip + 6)
        # Tunnels carry any inner address (IPv4 options shift the UDP
        # header: those are in maybe).
        tunnel = _eq(proto, _P_UDP)
        if tunnel:
            tunnel &= _tunnel_ports(col, l4)
        cand |= mask & (ours | maybe | tunnel)
    return _flags(cand, n)


def _flags(mask, n):
    """A big-int mask (one 0/1 byte per record) as ``n`` bytes."""
    return mask.to_bytes(n, 'little') if mask else bytes(n)


_T_ICMP_OK = _table(lambda b: b in _ICMP_OK)
_T_GROUP_BIT = _table(lambda b: b & 1)
_T_MCAST4 = _table(lambda b: b >= 224)
_T_NOT_FF = _table(lambda b: b != 0xff)
_T_SYN_ONLY = _table(lambda b: b & _SYN and not b & (_ACK | _RST))
_T_ANSWER = _table(lambda b: b & _ACK and b & (_SYN | _RST))
_T_GROUP_PKTTYPE = _table(lambda b: b in _GROUP_PKTTYPES)


_BLAKE8 = hashlib.blake2b(digest_size=8)     # copied: no keyword parsing


def _digest8(data):
    h = _BLAKE8.copy()
    h.update(data)
    return h.digest()


_T_CLEAR_BIT0 = bytes(b & 0xfe for b in range(256))


def fingerprint_hashes(cols, bits, keep):
    """Fingerprint keys of the records ``keep`` marks (a byte per record,
    1 = key it), in order, as an ``array('Q')``: ``(h63 << 1) | bit``,
    ``h63`` the top 63 bits of the 8-byte BLAKE2b of the record's bytes
    across ``cols`` (byte columns, in order) and ``bit`` its byte of
    ``bits`` (0 or 1) -- what :func:`fingerprint_key` computes one by one.

    No Python step per record: the columns are interleaved, the kept
    records' bytes sliced out and hashed through ``map``,
    and the digests read as big-endian 64-bit integers whose lowest bit
    is replaced by ``bits``.
    """
    compress = itertools.compress
    size = len(cols)
    fields = interleave(*cols)
    starts = list(compress(range(0, len(fields), size), keep))
    chunks = map(fields.__getitem__, map(
        slice, starts, map(operator.add, starts, itertools.repeat(size))))
    digests = bytearray(b''.join(map(_digest8, chunks)))
    low = (int.from_bytes(digests[7::8].translate(_T_CLEAR_BIT0), 'little') |
           int.from_bytes(bytes(compress(bits, keep)), 'little'))
    digests[7::8] = low.to_bytes(len(starts), 'little')
    keys = array.array('Q', digests)
    if not _HOST_BE:
        keys.byteswap()
    return keys


_T_V6_NOT = _T_IP6_BAD
_T_ICMP6_OK = _table(lambda b: b in _ICMP6_OK)
# Per family: version byte table (bad), source offset, address size,
# transport offset, protocol offset, ICMP protocol, echo request, reply,
# the ICMP types keyed, shortest non-zero length field that holds 8
# transport bytes (and its offset), multicast test of the first
# destination byte.
_PLAIN = {
    4: (_T_NOT_45, 12, 4, 20, 9, _P_ICMP, _ECHO, _ECHOREPLY, _T_ICMP_OK, 28, 2,
        _T_MCAST4),
    6: (_T_V6_NOT, 8, 16, 40, 6, _P_ICMP6, _ECHO6, _ECHOREPLY6,
        _T_ICMP6_OK, 8, 4, _T_EQ[0xff]),
}


def _vlan_encap(tci):
    return probe.Encap(vlan=(tci & 0x0fff,), vni=probe.NO_ENCAP.vni,
                       tunnel=probe.NO_ENCAP.tunnel)


def fingerprint_plain(buf, first, stride, n, link, dst_ip, short, want):
    """Fingerprints of the plainest records of a run, in columns.

    ``want``: a byte per record, 1 for those to key.  Decided here are the
    IPv4 (without options or a fragment offset) and IPv6 records,
    untagged or under one VLAN tag, long enough for the fields, not to a
    tunnel port and not a request/answer pair (see :func:`_pair_fields`):
    for those :func:`fingerprint_key`'s answer is computed from columns
    (:func:`fingerprint_hashes`).  Returns ``(decided, parts)``:
    ``decided`` a byte per record (1 = decided here, with or without a
    key) and ``parts`` a list of ``(keyed, keys, encaps)``, one per
    layout that keyed any: ``keyed`` a byte per record (1 = keyed), the
    keys of those records in order and, for tagged layouts, their
    :class:`probe.Encap` in the same order (else None).  ``short``: see
    :func:`probe_candidates`.
    """
    def col(at):
        return column(buf, at, stride, n)

    ones = int.from_bytes(b'\x01' * n, 'little')
    want = int.from_bytes(want, 'little')
    if not want:
        return bytes(n), []
    layouts, _ = _layouts(col, first, n, short, link)
    if link.linktype == LINKTYPE_ETHERNET:
        group = _mask(col(first), _T_GROUP_BIT)
    else:
        group = _mask(col(first + link.pkttype_off), _T_GROUP_PKTTYPE)
    decided = 0
    parts = []
    for kind, mask, ip in layouts:
        mask &= want
        if not mask:
            continue
        if mask.bit_count() * 3 > n:           # many: columns of all
            found = _plain_layout(col, first, n, link, dst_ip, short, kind,
                                  mask, ip, group)
        else:
            found = _plain_subset(buf, first, stride, n, link, dst_ip,
                                  short, kind, mask, ip, group)
        decided |= found[0]
        if found[1] is not None:
            parts.append(found[1:])
    return (decided & ones).to_bytes(n, 'little'), parts


def _plain_subset(buf, first, stride, n, link, dst_ip, short, kind, mask,
                  ip, group):
    """:func:`_plain_layout` of the few records ``mask`` holds (a third
    or less): their bytes copied together first, so each column is
    short."""
    mask_b = mask.to_bytes(n, 'little')
    rows = list(itertools.compress(range(n), mask_b))
    m = len(rows)
    sub = pcapwalk.select(buf, first, stride, stride, mask_b)

    def col(at):
        return column(sub, at, stride, m)

    def sub_short(need):
        return int.from_bytes(bytes(itertools.compress(
            _flags(short(need), n), mask_b)), 'little')

    ones = int.from_bytes(b'\x01' * m, 'little')
    decided, keyed_b, keys, encaps = _plain_layout(
        col, 0, m, link, dst_ip, sub_short, kind, ones, ip - first,
        int.from_bytes(bytes(itertools.compress(_flags(group, n), mask_b)),
                       'little'))

    def spread(flags):
        out = bytearray(n)
        for i in itertools.compress(rows, _flags(flags, m)):
            out[i] = 1
        return out

    decided = int.from_bytes(spread(decided), 'little')
    if keyed_b is None:
        return decided, None, None, None
    return decided, bytes(spread(int.from_bytes(keyed_b, 'little'))), \
        keys, encaps


def _plain_layout(col, first, n, link, dst_ip, short, kind, mask, ip,
                  group):
    """``(decided, keyed, keys, encaps)`` of :func:`fingerprint_plain` for
    the records of one layout (``mask``; IP header at ``ip``); ``keyed``
    None when none is keyed."""
    ones = int.from_bytes(b'\x01' * n, 'little')
    (version_bad, src_at, size, l4_at, proto_at, icmp_proto, echo_req,
     echo_rep, icmp_ok, least, len_at, mcast) = _PLAIN[kind]
    l4 = ip + l4_at
    plain = mask & ~_mask(col(ip), version_bad) & ~short(l4 + 14 - first)
    if kind == 4:
        plain &= ~_mask(col(ip + 6), _T_FRAG_HI) & _eq(col(ip + 7), 0)
    # The length field holds the 8 transport bytes read (0: the
    # record's end, which short() checked).
    hi, lo = col(ip + len_at), col(ip + len_at + 1)
    plain &= ~(zero(hi) & ~zero(lo) & below(lo, least)) & ones
    if not plain:
        return 0, None, None, None
    proto = col(ip + proto_at)
    udp = _eq(proto, _P_UDP)
    plain &= ~(udp & _tunnel_ports(col, l4))
    src = [col(ip + src_at + j) for j in range(size)]
    dst = [col(ip + src_at + size + j) for j in range(size)]
    reply = 0
    tcp = _eq(proto, _P_TCP)
    icmp = _eq(proto, icmp_proto)
    if dst_ip is None:
        ours = ones
    elif len(dst_ip) != size:
        ours = 0
    else:
        from_it = to_it = ones
        for j in range(size):
            from_it &= _eq(src[j], dst_ip[j])
            to_it &= _eq(dst[j], dst_ip[j])
        reply = from_it
        # Pairs (their key is the pair's) are left to fingerprint_key.
        flags = col(l4 + 13)
        syn = _mask(flags, _T_SYN_ONLY)
        answer = _mask(flags, _T_ANSWER)
        icmp_type, code = col(l4), col(l4 + 1)
        pairs = (tcp & ((to_it & ~from_it & syn) | (from_it & answer)) |
                 icmp & zero(code) &
                 ((to_it & ~from_it & _eq(icmp_type, echo_req)) |
                  (from_it & _eq(icmp_type, echo_rep))))
        plain &= ~pairs
        ours = from_it | to_it
    decided = plain
    sport_hi, sport_lo = col(l4), col(l4 + 1)
    dport_hi, dport_lo = col(l4 + 2), col(l4 + 3)
    dhcp = 0
    for port in _DHCP_PORTS:
        dhcp |= (_eq16(sport_hi, sport_lo, port) |
                 _eq16(dport_hi, dport_lo, port))
    group_ip = _mask(dst[0], mcast)
    if kind == 4:
        broadcast = ones
        for j in range(4):
            broadcast &= ~_mask(dst[j], _T_NOT_FF)
        group_ip |= broadcast
    keyed = (plain & ours & ~group & ~group_ip &
             (tcp | udp & ~dhcp | icmp & _mask(col(l4), icmp_ok)))
    keyed &= ones
    if not keyed:
        return decided, None, None, None
    keyed_b = keyed.to_bytes(n, 'little')
    if kind == 4:
        head = (col(ip + 4), col(ip + 5), proto)
    else:
        head = (proto, col(ip + 4), col(ip + 5))
    keys = fingerprint_hashes(
        (*src, *dst, *head, *(col(l4 + j) for j in range(8))),
        reply.to_bytes(n, 'little'), keyed_b)
    encaps = None
    if ip != first + link.ip_off:           # under a VLAN tag
        tci = ints(interleave(col(ip - 4), col(ip - 3)), 'H', True)
        encaps = list(map(_vlan_encap, itertools.compress(tci, keyed_b)))
    return decided, keyed_b, keys, encaps
