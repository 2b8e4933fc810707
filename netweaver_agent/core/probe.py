"""Probe packets: build them with dpkt, and recover their identity.

A probe is a small IPv4 or IPv6 packet sent towards an instance.  Its identity
(a 16-bit *session* chosen per probe window, and a per-window sequence
number) survives every hop inside the compute host and comes back in the
guest's answer:

* ``icmp`` (default): echo request; the payload carries ``MAGIC``, the
  session and a 32-bit sequence number.  The guest's echo reply copies the
  payload.
* ``udp``: datagram to a closed port; the payload carries the identity,
  and the guest's ICMP port unreachable quotes it back.  Guests rate-limit
  ICMP errors, so replies are sampled.
* ``tcp``: SYN; every probe has a 5-tuple of its own: its source port
  comes from the plan (a per-destination cursor, see
  :mod:`netweaver_agent.core.sources`), so no stateful firewall on the way sees
  a SYN repeated on one connection (ovs-vswitchd 3.1's userspace conntrack
  crashed on that).  In the plan a TCP probe's ``seq`` is
  :func:`tcp_ident` ``(port, n)``.  The guest answers RST/ACK (or
  SYN/ACK) with ``ack = ISN + 1``, to that port.

Authentication: tenants see their own probes, so session and sequence
number are no secret.  Each window has a random *secret*; a probe built
with it carries a *tag*, a keyed BLAKE2b of (session, sequence number,
destination address, protocol), 64 bits (:data:`AUTH_LEN`), after the
identity in the payload (ICMP echo copies it, and the ICMP port
unreachable answering a UDP probe quotes it: Linux quotes up to 576 bytes
of IPv4, 1280 of IPv6).  A TCP answer echoes only ``ISN + 1`` and the
ports, so a TCP probe's ISN *is* a keyed hash (32 bits) of (session,
``tcp_ident(port, n)``, destination) (:func:`tcp_isn`); its key on the wire
is :func:`tcp_wire_ident` ``(port, ISN)`` with no session
(:data:`TCP_SESSION`), which the matcher maps back to the plan's ``seq``.
Readers return, per sighting, an *auth* value (:func:`auth_value`: the tag
read XOR a fold of the address read, the probe's destination or the
reply's source) that the matcher compares with the one it expects for the
planned destination (:func:`expected_auth`).  Without a secret the tag is
zeros and the ISN ``session << 16 | n`` (unauthenticated probes).

Over IPv6 the same: ICMPv6 echo (``icmp``), UDP answered by an ICMPv6
port unreachable, TCP; probes carry no extension headers.

:func:`parse_frame` reads through up to two VLAN tags, VXLAN and Geneve
(the key is the inner frame's) and says how the probe was carried
(:class:`Encap`: VLAN ids, tunnel kind, VNI).  It and :func:`parse_key`
stay quiet on foreign, truncated or malformed traffic (``None``, never an
exception), as dpkt's decoders do with unknown types.
"""

import dataclasses
import hashlib
import struct

import dpkt

try:
    from netweaver_agent.core import _probebuild
except ImportError:             # not built: Tagger's and V4Builder's loops
    _probebuild = None

MAGIC = b'NWv1'
PROTOCOLS = ('icmp', 'udp', 'tcp')
DEFAULT_UDP_PORT = 33434
DEFAULT_TCP_PORT = 9
# Payload: MAGIC, session (H), seq (I), then padding.
_TAG = struct.Struct('!4sHI')
TAG_LEN = _TAG.size
# The keyed tag after the identity (ICMP/UDP), and the window secret's size.
AUTH_LEN = 8
SECRET_LEN = 32
# TCP keys carry no session: the ISN is a keyed hash.
TCP_SESSION = 0
TCP_SEQ_MASK = 0xffff
# A TCP probe's seq: this flag, its source port << 16, its ISN's low half.
TCP_IDENT = 1 << 32
# Source ports of TCP probes unless configured ([netweaver]
# tcp_source_ports): above Linux's and Windows' ephemeral ranges' starts,
# clear of the traceroute ports (33434..) that UDP probes use as
# destinations only.
DEFAULT_TCP_SOURCE_PORTS = range(33000, 61000)
# UDP destination ports read as VXLAN (IANA's, and Linux's old default).
VXLAN_PORTS = (4789, 8472)
VXLAN_HDR_LEN = 8
# Geneve (RFC 8926): UDP destination port, base header (options follow,
# their length in 4-byte words in the first byte), Ethernet payload type.
GENEVE_PORTS = (6081,)
GENEVE_HDR_LEN = 8
TUNNELS = ('vxlan', 'geneve')
MAX_VLAN_TAGS = 2
_VLAN_TAG = struct.Struct('!HH')            # TCI, next ethertype


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeKey:
    """Identity of one probe (``reply=False``) or of the guest's answer."""

    session: int
    seq: int
    reply: bool = False

    @property
    def port(self):
        """The probe's TCP source port (:func:`tcp_ident`,
        :func:`tcp_wire_ident`), else None."""
        return tcp_ident_port(self.seq)

    def as_int(self):
        """The integer key used in columnar batches: ``seq << 1 | reply``.

        The session is not part of it: a batch belongs to one session.
        """
        return (self.seq << 1) | int(self.reply)

    @classmethod
    def from_int(cls, session, key):
        return cls(session=session, seq=key >> 1, reply=bool(key & 1))


def tcp_ident(port, n):
    """The ``seq`` of a TCP probe: source ``port`` and number ``n``.

    ``TCP_IDENT | port << 16 | n``: the ISN carries the session and ``n``
    (16 bits each), the port is the probe's own; the flag keeps TCP
    identities apart from the 32-bit sequence numbers of ICMP/UDP probes.
    """
    if not 1 <= port <= 0xffff:
        raise ValueError(f"TCP probe source port {port!r} is not within "
                         "1..65535")
    if not 0 <= n <= TCP_SEQ_MASK:
        raise ValueError(
            f"TCP probe number {n!r} exceeds {TCP_SEQ_MASK}: a window "
            "carries at most 65536 TCP probes")
    return TCP_IDENT | port << 16 | n


def tcp_ident_port(seq):
    """The source port of a TCP identity (:func:`tcp_ident` or
    :func:`tcp_wire_ident`), else None."""
    if (seq >> 32) & 0xff != 1 or not (seq >> 16) & 0xffff:
        return None
    return (seq >> 16) & 0xffff


def tcp_wire_ident(port, isn):
    """The ``seq`` of a TCP key as read from the wire: ``port`` and the
    32-bit ``isn``, laid out as :func:`tcp_ident` with the ISN's high half
    above (``isn >> 16 << 40 | TCP_IDENT | port << 16 | isn & 0xffff``),
    so the port and the flag sit where :func:`tcp_ident` has them."""
    high, low = isn >> 16, isn & TCP_SEQ_MASK
    return (high << 40) | TCP_IDENT | (port << 16) | low


_PROTO_CODE = {name: i + 1 for i, name in enumerate(PROTOCOLS)}
_MAC_MSG = struct.Struct('!BHQ')


def check_secret(secret, what='probe secret'):
    """``secret`` as bytes, or ValueError (never showing it)."""
    if not isinstance(secret, (bytes, bytearray)) or \
            not 16 <= len(secret) <= 64:
        raise ValueError(f"{what}: expected 16 to 64 bytes")
    return bytes(secret)


def _mac(secret, proto, session, seq, dst_ip, size):
    msg = _MAC_MSG.pack(_PROTO_CODE[proto], session, seq) + bytes(dst_ip)
    return hashlib.blake2b(msg, key=secret, digest_size=size).digest()


def probe_tag(secret, proto, session, seq, dst_ip):
    """The :data:`AUTH_LEN`-byte tag of an ICMP/UDP probe: a keyed
    BLAKE2b of protocol, session, ``seq`` and the packed ``dst_ip``;
    zeros without a secret."""
    if secret is None:
        return bytes(AUTH_LEN)
    return _mac(secret, proto, session, seq, dst_ip, AUTH_LEN)


def tcp_isn(secret, session, seq, dst_ip):
    """The ISN of a TCP probe (``seq`` a :func:`tcp_ident`): a keyed
    hash of session, ``seq`` (port and number) and the packed ``dst_ip``,
    32 bits; ``session << 16 | n`` without a secret."""
    if secret is None:
        return (session << 16) | (seq & TCP_SEQ_MASK)
    return int.from_bytes(_mac(secret, 'tcp', session, seq, dst_ip, 4),
                          'big')


def address_fold(address):
    """64 bits standing for a packed address: an IPv4 address itself,
    an IPv6 one's (unkeyed) BLAKE2b, so no other address folds alike."""
    if len(address) == 4:
        return int.from_bytes(address, 'big')
    return int.from_bytes(hashlib.blake2b(bytes(address), digest_size=8,
                                          person=b'nw-addr').digest(),
                          'big')


def auth_value(address, tag=b''):
    """A sighting's auth: the tag read (0 when absent) XOR the fold of
    the address read (:func:`address_fold`)."""
    value = int.from_bytes(tag, 'big') if len(tag) == AUTH_LEN else 0
    return value ^ address_fold(address)


def expected_auth(secret, proto, session, seq, dst_ip):
    """The auth a genuine sighting of planned probe ``seq`` (or its
    answer) to ``dst_ip`` (packed) carries (see :func:`auth_value`)."""
    if proto == 'tcp':
        return address_fold(dst_ip)
    return auth_value(dst_ip, probe_tag(secret, proto, session, seq, dst_ip))


def udp_source_port(session):
    """The UDP source port used by probes of ``session`` (32768..65535)."""
    return 32768 | (session & 0x7fff)


def build_ip(proto, session, seq, src_ip, dst_ip, size=64, ttl=64,
             port=None, secret=None):
    """Build one probe packet (no Ethernet header) as bytes.

    IPv4, or IPv6 when the addresses are 16 bytes long (ICMPv6 echo for
    ``icmp``; the hop limit is ``ttl``).

    :param proto: one of :data:`PROTOCOLS`
    :param src_ip: source address, 4 or 16 bytes (``socket.inet_pton``)
    :param dst_ip: destination address, as long as ``src_ip``
    :param size: total IP length wanted; the payload is padded to reach it
    :param port: destination port for ``udp``/``tcp``

    For ``tcp``, ``seq`` is a :func:`tcp_ident` (source port and number).
    ``secret``: the window's (see the module docstring); None: an
    unauthenticated probe.
    """
    if not 0 <= session <= 0xffff:
        raise ValueError(f"probe session {session!r} is not a 16-bit value")
    if proto == 'tcp':
        if tcp_ident_port(seq) is None:
            raise ValueError(
                f"TCP probe sequence {seq!r} is not a tcp_ident(port, n): "
                "every TCP probe needs a source port of its own")
    elif not 0 <= seq <= 0xffffffff:
        raise ValueError(f"probe sequence {seq!r} is not a 32-bit value")
    if secret is not None:
        secret = check_secret(secret)
    if proto == 'tcp':
        tag = tcp_isn(secret, session, seq, dst_ip)
    else:
        tag = (_TAG.pack(MAGIC, session, seq & 0xffffffff) +
               probe_tag(secret, proto, session, seq, dst_ip))
    if len(dst_ip) == 16 or len(src_ip) == 16:
        return _build_ip6(proto, session, seq, tag, src_ip, dst_ip, size,
                          ttl, port)
    pad = max(0, size - 20 - 8 - TAG_LEN - AUTH_LEN)
    l4, p = _transport(proto, session, seq, tag, pad, port, ipv6=False)
    ip = dpkt.ip.IP(src=src_ip, dst=dst_ip, p=p, ttl=ttl, id=seq & 0xffff,
                    data=l4)
    ip.len = len(ip)
    return bytes(ip)


def _transport(proto, session, seq, tag, pad, port, ipv6):
    """The probe's transport header and data, and its protocol number.

    ``tag``: identity and tag (ICMP/UDP payload), or the ISN (TCP).
    """
    if proto == 'icmp':
        if ipv6:
            echo = dpkt.icmp6.ICMP6.Echo(id=session, seq=seq & 0xffff,
                                         data=tag + bytes(pad))
            return (dpkt.icmp6.ICMP6(type=dpkt.icmp6.ICMP6_ECHO_REQUEST,
                                     data=echo), dpkt.ip.IP_PROTO_ICMP6)
        echo = dpkt.icmp.ICMP.Echo(id=session, seq=seq & 0xffff,
                                   data=tag + bytes(pad))
        return (dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO, data=echo),
                dpkt.ip.IP_PROTO_ICMP)
    if proto == 'udp':
        l4 = dpkt.udp.UDP(sport=udp_source_port(session),
                          dport=port or DEFAULT_UDP_PORT,
                          data=tag + bytes(pad))
        l4.ulen = len(l4)
        return l4, dpkt.ip.IP_PROTO_UDP
    if proto == 'tcp':
        return (dpkt.tcp.TCP(sport=tcp_ident_port(seq),
                             dport=port or DEFAULT_TCP_PORT,
                             seq=tag,
                             flags=dpkt.tcp.TH_SYN, win=512),
                dpkt.ip.IP_PROTO_TCP)
    raise ValueError(f"unknown probe protocol {proto!r}; "
                     f"expected one of {', '.join(PROTOCOLS)}")


def _build_ip6(proto, session, seq, tag, src_ip, dst_ip, size, ttl, port):
    if len(src_ip) != 16 or len(dst_ip) != 16:
        raise ValueError(f"probe addresses {bytes(src_ip).hex()} and "
                         f"{bytes(dst_ip).hex()} are not both IPv6")
    pad = max(0, size - dpkt.ip6.IP6.__hdr_len__ - 8 - TAG_LEN - AUTH_LEN)
    l4, nxt = _transport(proto, session, seq, tag, pad, port, ipv6=True)
    # dpkt fills in the transport checksum over the IPv6 pseudo-header
    # (RFC 8200 §8.1), so the raw socket sends the packet as built.
    ip6 = dpkt.ip6.IP6(src=bytes(src_ip), dst=bytes(dst_ip), nxt=nxt,
                       hlim=ttl, plen=len(l4), data=l4)
    out = bytes(ip6)
    if nxt == dpkt.ip.IP_PROTO_UDP and out[46:48] == b'\0\0':
        # A computed UDP checksum of 0 is sent as 0xffff (RFC 768).
        out = out[:46] + b'\xff\xff' + out[48:]
    return out


# Offsets (in an IPv4 packet without options) that change with ``seq``.
_IP_ID, _IP_SUM = 4, 10
_L4 = 20
_SUM_AT = {'icmp': _L4 + 2, 'udp': _L4 + 6, 'tcp': _L4 + 16}
_TAG_SEQ = _L4 + 8 + 6          # after the ICMP/UDP header, MAGIC, session
_TAG_MAC = _TAG_SEQ + 4         # the keyed tag after the identity
_ICMP_SEQ = _L4 + 6
_TCP_SEQ = _L4 + 4
_U16 = struct.Struct('!H')
_U32 = struct.Struct('!I')


def _checksum(data):
    """Internet checksum of ``data``, to be packed big-endian (RFC 1071).

    The one's complement sum of the 16-bit words is the whole as one
    integer modulo 0xffff (2**16 is 1 modulo 0xffff), except that a sum
    that is not zero folds to 0xffff, never to 0.
    """
    if len(data) % 2:
        data = bytes(data) + b'\0'
    total = int.from_bytes(data, 'big')
    folded = total % 0xffff or (0xffff if total else 0)
    return ~folded & 0xffff


class Tagger:
    """:func:`probe_tag` of one window's probes (``secret``, ``proto``,
    ``session``), cheaper: the keyed hash's state after the key is made
    once and copied for each probe (the same tags).  :meth:`expected_many`
    does a batch in C where the optional extension ``_probebuild`` was
    built."""

    def __init__(self, secret, proto, session):
        self.secret = None if secret is None else check_secret(secret)
        self._base = None if secret is None else hashlib.blake2b(
            key=self.secret, digest_size=AUTH_LEN)
        self._code = _PROTO_CODE[proto]
        self.session = session

    def tag(self, seq, dst_ip):
        """:func:`probe_tag` of ``seq`` to packed ``dst_ip``."""
        if self._base is None:
            return bytes(AUTH_LEN)
        h = self._base.copy()
        h.update(_MAC_MSG.pack(self._code, self.session, seq) +
                 bytes(dst_ip))
        return h.digest()

    def expected(self, seq, dst_ip):
        """:func:`expected_auth` of ``seq`` to packed ``dst_ip`` (ICMP and
        UDP)."""
        return (int.from_bytes(self.tag(seq, dst_ip), 'big') ^
                address_fold(dst_ip))

    def expected_many(self, seqs, dst_ip):
        """:meth:`expected` of every int of the sequence ``seqs`` (each
        0..2**64-1) to packed ``dst_ip``: a list, in order."""
        fold = address_fold(dst_ip)
        if self._base is None:
            return [fold] * len(seqs)
        if _probebuild is not None:
            raw = _probebuild.tags(self.secret, self._code, self.session,
                                   seqs, bytes(dst_ip), AUTH_LEN)
            return [v ^ fold for v in struct.unpack(
                f'>{len(raw) // AUTH_LEN}Q', raw)]
        tag = self.tag
        return [int.from_bytes(tag(seq, dst_ip), 'big') ^ fold
                for seq in seqs]


# The fields of an IPv4 ICMP or UDP probe that change with its sequence
# number, between the parts that do not: IP id, IP checksum, transport
# checksum, (ICMP: echo sequence), tag sequence, keyed tag.
_VARYING = {
    'icmp': struct.Struct(f'!4sH4sH10sH2sH6sI{AUTH_LEN}s'),
    'udp': struct.Struct(f'!4sH4sH14sH6sI{AUTH_LEN}s'),
}


def _sum_mod(data):
    """The 16-bit words of ``data`` (padded to even length) summed, as one
    integer modulo 0xffff is (see :func:`_checksum`): unfolded."""
    if len(data) % 2:
        data = bytes(data) + b'\0'
    return int.from_bytes(data, 'big')


def _fold(total):
    """:func:`_checksum` of data whose word sum is ``total`` (> 0)."""
    return ~(total % 0xffff or 0xffff) & 0xffff


class V4Builder:
    """:func:`build_ip_seqs` of IPv4 ICMP/UDP probes of one window
    (``proto``, ``session``, ``size``, ``ttl``, ``port``, ``secret``), to
    any addresses: one packet built with dpkt (addresses zero), then for
    each probe the varying fields packed in one go and the checksums
    summed from the fixed part's: every varying field (addresses too)
    sits at an even offset, so each adds its value modulo 0xffff (see
    :func:`_checksum`).  The same bytes as :func:`build_ip`; the loop is
    in C where the optional extension ``_probebuild`` was built."""

    def __init__(self, proto, session, size=64, ttl=64, port=None,
                 secret=None):
        if proto not in _VARYING:
            raise ValueError(f"V4Builder builds ICMP and UDP probes, not "
                             f"{proto!r}")
        self.proto = proto
        self._tagger = Tagger(secret, proto, session)
        self._tag = self._tagger.tag
        zero = bytes(4)
        first = build_ip(proto, session, 0, zero, zero, size=size, ttl=ttl,
                         port=port, secret=secret)
        fixed = bytearray(first)
        at_sum = _SUM_AT[proto]
        for at, n in ((_IP_ID, 2), (_IP_SUM, 2), (at_sum, 2),
                      (_TAG_SEQ, 4), (_TAG_MAC, AUTH_LEN)) + (
                          ((_ICMP_SEQ, 2),) if proto == 'icmp' else ()):
            fixed[at:at + n] = bytes(n)
        self._fixed = bytes(fixed)
        self._ip_base = _sum_mod(fixed[:_L4])
        pseudo = (b'' if proto == 'icmp' else
                  bytes(8) + bytes((0, first[9])) +
                  _U16.pack(len(first) - _L4))
        self._l4_base = _sum_mod(pseudo + fixed[_L4:])
        # For _probebuild: the word sums modulo 0xffff, the same checksums
        # (2**16 is 1 modulo 0xffff).
        self._sums = (self._ip_base % 0xffff, self._l4_base % 0xffff)
        self._head = bytes(first[:_IP_ID])
        self._ip_mid = bytes(first[_IP_ID + 2:_IP_SUM])
        # After the addresses: up to the transport checksum.
        self._l4_head = bytes(first[_L4:at_sum])
        self._between = bytes(first[at_sum + 2:_ICMP_SEQ] if proto == 'icmp'
                              else b'')
        self._magic = bytes(first[(_ICMP_SEQ + 2 if proto == 'icmp' else
                                   at_sum + 2):_TAG_SEQ])
        self._tail = bytes(first[_TAG_MAC + AUTH_LEN:])
        self._pack = _VARYING[proto].pack

    def build(self, seqs, src_ip, dst_ip):
        """The packets of ``seqs`` (32-bit each) from ``src_ip`` to
        ``dst_ip`` (4 bytes each), in order."""
        src, dst = bytes(src_ip), bytes(dst_ip)
        if len(src) != 4 or len(dst) != 4:
            raise ValueError(f"probe addresses {src.hex()} and {dst.hex()} "
                             "are not both IPv4")
        if _probebuild is not None:
            tagger = self._tagger
            return _probebuild.build_v4(
                self._fixed, src, dst, seqs, self.proto == 'icmp',
                *self._sums, tagger.secret, tagger._code, tagger.session)
        addrs = int.from_bytes(src, 'big') + int.from_bytes(dst, 'big')
        ip_base = self._ip_base + addrs
        tag, pack, tail = self._tag, self._pack, self._tail
        head, ip_mid, magic = self._head, self._ip_mid, self._magic
        fold = _fold
        wire = src + dst + self._l4_head
        out = []
        if self.proto == 'icmp':
            l4_base, between = self._l4_base, self._between
            for seq in seqs:
                mac = tag(seq, dst)
                low = seq & 0xffff
                out.append(pack(
                    head, low, ip_mid, fold(ip_base + low), wire,
                    fold(l4_base + low + seq + int.from_bytes(mac, 'big')),
                    between, low, magic, seq, mac) + tail)
            return out
        # UDP: the pseudo-header holds the addresses too.
        l4_base = self._l4_base + addrs
        for seq in seqs:
            mac = tag(seq, dst)
            low = seq & 0xffff
            # A computed UDP checksum of 0 is sent as 0xffff (RFC 768).
            out.append(pack(
                head, low, ip_mid, fold(ip_base + low), wire,
                fold(l4_base + seq + int.from_bytes(mac, 'big')) or 0xffff,
                magic, seq, mac) + tail)
        return out


def v4_builder_fits(proto, seqs, src_ip, dst_ip):
    """Whether :class:`V4Builder` builds these probes (IPv4 ICMP/UDP,
    every sequence number a 32-bit int)."""
    return (proto in _VARYING and len(src_ip) == 4 and len(dst_ip) == 4
            and all(type(s) is int and 0 <= s <= 0xffffffff
                    for s in seqs))


def build_ip_seqs(proto, session, seqs, src_ip, dst_ip, size=64, ttl=64,
                  port=None, secret=None):
    """:func:`build_ip` for every sequence number of ``seqs``: a list.

    The same bytes, about ten times faster: one packet is built with dpkt,
    then the fields that depend on the sequence number (IP id, ICMP echo
    sequence, payload tag, TCP source port and sequence) and the checksums
    are rewritten.
    """
    seqs = list(seqs)
    if not seqs:
        return []
    if secret is not None:
        secret = check_secret(secret)
    if len(dst_ip) == 16:
        return [build_ip(proto, session, seq, src_ip, dst_ip, size=size,
                         ttl=ttl, port=port, secret=secret) for seq in seqs]
    if v4_builder_fits(proto, seqs, src_ip, dst_ip):
        return V4Builder(proto, session, size=size, ttl=ttl, port=port,
                         secret=secret).build(seqs, src_ip, dst_ip)
    first = build_ip(proto, session, seqs[0], src_ip, dst_ip, size=size,
                     ttl=ttl, port=port, secret=secret)
    out = [first]
    pseudo = bytes(src_ip) + bytes(dst_ip) + bytes((0, first[9])) + \
        _U16.pack(len(first) - _L4)
    at = _SUM_AT[proto]
    for seq in seqs[1:]:
        sport = tcp_ident_port(seq) if proto == 'tcp' else None
        if (not 0 <= seq <= 0xffffffff) if proto != 'tcp' else sport is None:
            out.append(build_ip(proto, session, seq, src_ip, dst_ip,
                                size=size, ttl=ttl, port=port,
                                secret=secret))
            continue
        buf = bytearray(first)
        _U16.pack_into(buf, _IP_ID, seq & 0xffff)
        if proto == 'tcp':
            _U16.pack_into(buf, _L4, sport)
            _U32.pack_into(buf, _TCP_SEQ,
                           tcp_isn(secret, session, seq, dst_ip))
        else:
            _U32.pack_into(buf, _TAG_SEQ, seq)
            buf[_TAG_MAC:_TAG_MAC + AUTH_LEN] = probe_tag(
                secret, proto, session, seq, dst_ip)
            if proto == 'icmp':
                _U16.pack_into(buf, _ICMP_SEQ, seq & 0xffff)
        buf[_IP_SUM:_IP_SUM + 2] = b'\0\0'
        _U16.pack_into(buf, _IP_SUM, _checksum(buf[:_L4]))
        buf[at:at + 2] = b'\0\0'
        if proto == 'icmp':
            l4sum = _checksum(buf[_L4:])
        else:
            l4sum = _checksum(pseudo + buf[_L4:])
            if l4sum == 0 and proto == 'udp':
                l4sum = 0xffff
        _U16.pack_into(buf, at, l4sum)
        out.append(bytes(buf))
    return out


def build_frame(proto, session, seq, src_ip, dst_ip, src_mac, dst_mac,
                **kwargs):
    """Build a probe as a whole Ethernet frame (for pcaps and tests).

    ``vlan``: VLAN ids to tag it with, outermost first (the outer one with
    an 802.1ad TPID when there are two); ``priority``: the tags' PCP.
    """
    vlan = kwargs.pop('vlan', ())
    priority = kwargs.pop('priority', 0)
    ip = build_ip(proto, session, seq, src_ip, dst_ip, **kwargs)
    etype = dpkt.ethernet.ETH_TYPE_IP6 if len(
        dst_ip) == 16 else dpkt.ethernet.ETH_TYPE_IP
    return ethernet_frame(ip, etype, src_mac, dst_mac, vlan, priority)


def ethernet_frame(payload, etype, src_mac, dst_mac, vlan=(), priority=0):
    """``payload`` behind an Ethernet header with VLAN tags ``vlan``."""
    if len(vlan) > MAX_VLAN_TAGS:
        raise ValueError(f"{len(vlan)} VLAN tags: at most {MAX_VLAN_TAGS}")
    tags = b''
    for i, vid in enumerate(vlan):
        if not 0 <= vid <= 0xfff:
            raise ValueError(f"VLAN id {vid!r} is not within 0..4095")
        tpid = (dpkt.ethernet.ETH_TYPE_8021AD if i == 0 and len(vlan) > 1
                else dpkt.ethernet.ETH_TYPE_8021Q)
        tags += _VLAN_TAG.pack(tpid, ((priority & 7) << 13) | vid)
    return (bytes(dst_mac) + bytes(src_mac) + tags +
            etype.to_bytes(2, 'big') + bytes(payload))


def _key_from_tag(buf, session):
    if len(buf) < TAG_LEN:
        return None
    magic, sess, seq = _TAG.unpack_from(buf, 0)
    if magic != MAGIC or (session is not None and sess != session):
        return None
    return sess, seq


def _tcp_key(sport, dport, tcp_seq, ack, flags, session):
    """The key of a TCP probe (SYN) or of its answer (ACK + RST or SYN).

    The probe's source port (the answer's destination port) is part of it
    (:func:`tcp_wire_ident`): the same ISN from another port is another
    key.  TCP carries no session (:data:`TCP_SESSION`; ``session`` does
    not filter): the matcher finds the probe through its plan.
    """
    if flags & dpkt.tcp.TH_SYN and not flags & dpkt.tcp.TH_ACK:
        isn, port, reply = tcp_seq, sport, False
    elif flags & dpkt.tcp.TH_ACK and flags & (dpkt.tcp.TH_RST |
                                              dpkt.tcp.TH_SYN):
        isn, port, reply = (ack - 1) & 0xffffffff, dport, True
    else:
        return None
    if not port:
        return None
    return ProbeKey(TCP_SESSION, tcp_wire_ident(port, isn), reply=reply)


def parse_ip_key(ip, session=None):
    """Recover the :class:`ProbeKey` of a parsed ``dpkt.ip.IP``, or None.

    ``session`` (optional) restricts matches to one probe window.
    """
    l4 = ip.data
    if isinstance(l4, (bytes, bytearray)):
        return None
    if ip.p == dpkt.ip.IP_PROTO_ICMP:
        if l4.type in (dpkt.icmp.ICMP_ECHO, dpkt.icmp.ICMP_ECHOREPLY):
            echo = l4.data
            if not isinstance(echo, dpkt.icmp.ICMP.Echo):
                return None
            found = _key_from_tag(echo.data, session)
            if found is None or found[0] != echo.id:
                return None
            return ProbeKey(found[0], found[1],
                            reply=l4.type == dpkt.icmp.ICMP_ECHOREPLY)
        if l4.type == dpkt.icmp.ICMP_UNREACH:
            # The guest quotes our UDP probe: IP header, UDP header, data.
            try:
                inner = dpkt.ip.IP(bytes(l4.data.data))
            except (dpkt.UnpackError, AttributeError):
                return None
            if inner.p != dpkt.ip.IP_PROTO_UDP:
                return None
            udp = inner.data
            data = udp.data if not isinstance(udp, bytes) else udp[8:]
            found = _key_from_tag(data, session)
            if found is None:
                return None
            return ProbeKey(found[0], found[1], reply=True)
        return None
    if ip.p == dpkt.ip.IP_PROTO_UDP:
        found = _key_from_tag(l4.data, session)
        if found is None or l4.sport != udp_source_port(found[0]):
            return None
        return ProbeKey(found[0], found[1], reply=False)
    if ip.p == dpkt.ip.IP_PROTO_TCP:
        return _tcp_key(l4.sport, l4.dport, l4.seq, l4.ack, l4.flags,
                        session)
    return None


# --------------------------------------------------------------------------
# IPv6, read at fixed offsets (no extension headers: probes carry none).

_IP6_HDR = struct.Struct('!BxxxHB')         # version..., payload length, nxt
_TCP_HDR = struct.Struct('!HHIIBB')         # sport dport seq ack off flags


def _ip6_payload(buf, off, end):
    """``(next header, payload start, payload end)`` of the IPv6 header at
    ``off``, or None.  The payload is cut to the payload length (0: to
    ``end``, as for jumbograms)."""
    if end - off < dpkt.ip6.IP6.__hdr_len__:
        return None
    vtc, plen, nxt = _IP6_HDR.unpack_from(buf, off)
    if vtc >> 4 != 6:
        return None
    start = off + dpkt.ip6.IP6.__hdr_len__
    return nxt, start, min(end, start + plen) if plen else end


def ip6_key(buf, off=0, end=None, session=None):
    """The :class:`ProbeKey` of the IPv6 packet at ``buf[off:end]``, or None.

    ICMPv6 echo request/reply, UDP probes and the ICMPv6 port unreachable
    quoting them, TCP SYN probes and their answers.  Packets with
    extension headers are never probes.
    """
    end = len(buf) if end is None else min(end, len(buf))
    found = _ip6_payload(buf, off, end)
    if found is None:
        return None
    nxt, l4, stop = found
    size = stop - l4
    key = None
    if nxt == dpkt.ip.IP_PROTO_ICMP6:
        if size < 8 + TAG_LEN:
            return None
        kind = buf[l4]
        if kind in (dpkt.icmp6.ICMP6_ECHO_REQUEST,
                    dpkt.icmp6.ICMP6_ECHO_REPLY):
            magic, sess, seq = _TAG.unpack_from(buf, l4 + 8)
            if magic == MAGIC and _U16.unpack_from(buf, l4 + 4)[0] == sess:
                key = ProbeKey(sess, seq, reply=kind ==
                               dpkt.icmp6.ICMP6_ECHO_REPLY)
        elif kind == dpkt.icmp6.ICMP6_DST_UNREACH:
            inner = _ip6_payload(buf, l4 + 8, stop)
            if (inner is not None and inner[0] == dpkt.ip.IP_PROTO_UDP and
                    inner[2] - inner[1] >= 8 + TAG_LEN):
                magic, sess, seq = _TAG.unpack_from(buf, inner[1] + 8)
                if magic == MAGIC:
                    key = ProbeKey(sess, seq, reply=True)
    elif nxt == dpkt.ip.IP_PROTO_UDP:
        if size < 8 + TAG_LEN:
            return None
        magic, sess, seq = _TAG.unpack_from(buf, l4 + 8)
        if (magic == MAGIC and
                _U16.unpack_from(buf, l4)[0] == udp_source_port(sess)):
            key = ProbeKey(sess, seq, reply=False)
    elif nxt == dpkt.ip.IP_PROTO_TCP:
        if size < 20:
            return None
        sport, dport, seq, ack, doff, flags = _TCP_HDR.unpack_from(buf, l4)
        if doff < 0x50:
            return None
        return _tcp_key(sport, dport, seq, ack, flags, session)
    if key is None or (session is not None and key.session != session):
        return None
    return key


def parse_packet_key(packet, session=None):
    """The :class:`ProbeKey` of an IP packet (IPv4 or IPv6, no link
    header), or None; never an exception."""
    try:
        if packet and packet[0] >> 4 == 6:
            return ip6_key(packet, 0, len(packet), session)
        return parse_ip_key(dpkt.ip.IP(bytes(packet)), session)
    except _PARSE_ERRORS:
        return None


def ip_auth(buf, ip, end, etype):
    """The auth (:func:`auth_value`) of the probe or answer in the IP
    packet at ``buf[ip:end]`` (``etype``: :data:`dpkt.ethernet.ETH_TYPE_IP` or
    :data:`dpkt.ethernet.ETH_TYPE_IP6`), or None when no address can be read.

    The address is the probe's destination or the answer's source (the
    outer one of an ICMP error); the tag is read where the probe carries
    it (ICMP echo and UDP payloads, the UDP probe an ICMP error quotes),
    when the packet holds all of it; TCP has none (its ISN is a key).
    """
    if etype == dpkt.ethernet.ETH_TYPE_IP:
        if ip + 20 > end:
            return None
        hl = (buf[ip] & 0x0f) * 4
        total = _U16.unpack_from(buf, ip + 2)[0]
        stop = min(end, ip + total) if total else end
        proto = buf[ip + 9]
        src, dst = bytes(buf[ip + 12:ip + 16]), bytes(buf[ip + 16:ip + 20])
        l4 = ip + hl
        icmp, echo_req, echo_rep, unreach, inner_hl = (
            dpkt.ip.IP_PROTO_ICMP, dpkt.icmp.ICMP_ECHO,
            dpkt.icmp.ICMP_ECHOREPLY, dpkt.icmp.ICMP_UNREACH, None)
    elif etype == dpkt.ethernet.ETH_TYPE_IP6:
        if ip + dpkt.ip6.IP6.__hdr_len__ > end:
            return None
        plen = _U16.unpack_from(buf, ip + 4)[0]
        l4 = ip + dpkt.ip6.IP6.__hdr_len__
        stop = min(end, l4 + plen) if plen else end
        proto = buf[ip + 6]
        src, dst = bytes(buf[ip + 8:ip + 24]), bytes(buf[ip + 24:ip + 40])
        icmp, echo_req, echo_rep, unreach, inner_hl = (
            dpkt.ip.IP_PROTO_ICMP6, dpkt.icmp6.ICMP6_ECHO_REQUEST,
            dpkt.icmp6.ICMP6_ECHO_REPLY, dpkt.icmp6.ICMP6_DST_UNREACH,
            dpkt.ip6.IP6.__hdr_len__)
    else:
        return None
    tag_at = None
    if l4 >= stop:
        return None
    if proto == icmp:
        kind = buf[l4]
        if kind == echo_req:
            addr, tag_at = dst, l4 + 8 + TAG_LEN
        elif kind == echo_rep:
            addr, tag_at = src, l4 + 8 + TAG_LEN
        elif kind == unreach:
            inner = l4 + 8
            if inner >= stop:
                return None
            hl_in = inner_hl or (buf[inner] & 0x0f) * 4
            addr, tag_at = src, inner + hl_in + 8 + TAG_LEN
        else:
            return None
    elif proto == dpkt.ip.IP_PROTO_UDP:
        addr, tag_at = dst, l4 + 8 + TAG_LEN
    elif proto == dpkt.ip.IP_PROTO_TCP:
        if l4 + 14 > stop:
            return None
        flags = buf[l4 + 13]
        addr = dst if flags & dpkt.tcp.TH_SYN and \
            not flags & dpkt.tcp.TH_ACK else src
    else:
        return None
    tag = b''
    if tag_at is not None and tag_at + AUTH_LEN <= stop:
        tag = bytes(buf[tag_at:tag_at + AUTH_LEN])
    return auth_value(addr, tag)


def packet_auth(packet):
    """:func:`ip_auth` of an IP packet (no link header), or None."""
    if not packet:
        return None
    etype = (dpkt.ethernet.ETH_TYPE_IP6 if packet[0] >> 4 == 6 else
             dpkt.ethernet.ETH_TYPE_IP)
    return ip_auth(packet, 0, len(packet), etype)


# --------------------------------------------------------------------------
# Frames: VLAN tags, VXLAN and Geneve around the probe.

@dataclasses.dataclass(frozen=True, slots=True)
class Encap:
    """How a frame carried a probe where it was seen.

    ``vlan``: the VLAN ids of the frame's tags, outermost first (an
    802.1ad S-tag, then the 802.1Q C-tag); ``()`` untagged.  ``vni``: the
    virtual network identifier when the probe travelled inside a tunnel
    packet (its key is the inner frame's), else None.  ``tunnel``: which
    tunnel (one of :data:`TUNNELS`); ``'vxlan'`` when a VNI is given
    without it, None without a VNI.
    """

    vlan: tuple = ()
    vni: int | None = None
    tunnel: str | None = None

    def __post_init__(self):
        if self.vni is None:
            if self.tunnel is not None:
                raise ValueError(f"tunnel {self.tunnel!r} without a VNI")
        elif self.tunnel is None:
            object.__setattr__(self, 'tunnel', 'vxlan')
        elif self.tunnel not in TUNNELS:
            raise ValueError(f"unknown tunnel {self.tunnel!r}; expected "
                             f"one of {', '.join(TUNNELS)}")


NO_ENCAP = Encap()
_PARSE_ERRORS = (dpkt.Error, ValueError, struct.error, AttributeError,
                 IndexError, TypeError, KeyError)


def _vxlan_inner(data):
    """``(vni, inner frame)`` of a VXLAN payload (after UDP), or None."""
    if (len(data) < VXLAN_HDR_LEN + dpkt.ethernet.ETH_HDR_LEN or
            not data[0] & 0x08):
        return None
    return int.from_bytes(data[4:7], 'big'), data[VXLAN_HDR_LEN:]


def geneve_inner_offset(data, off=0, end=None):
    """Where the inner Ethernet frame of the Geneve header at
    ``data[off:]`` starts, or None.

    Version 0 only, protocol type Ethernet
    (:data:`dpkt.ethernet.ETH_TYPE_TEB`); the options (``Opt Len``
    4-byte words) are skipped; the inner frame must hold at least an
    Ethernet header before ``end``.
    """
    end = len(data) if end is None else end
    if end - off < GENEVE_HDR_LEN:
        return None
    first = data[off]
    if first >> 6 or _U16.unpack_from(
            data, off + 2)[0] != dpkt.ethernet.ETH_TYPE_TEB:
        return None
    inner = off + GENEVE_HDR_LEN + (first & 0x3f) * 4
    return inner if inner + dpkt.ethernet.ETH_HDR_LEN <= end else None


def _geneve_inner(data):
    """``(vni, inner frame)`` of a Geneve payload (after UDP), or None."""
    inner = geneve_inner_offset(data)
    if inner is None:
        return None
    return int.from_bytes(data[4:7], 'big'), data[inner:]


TUNNEL_PORTS = {**{p: 'vxlan' for p in VXLAN_PORTS},
                **{p: 'geneve' for p in GENEVE_PORTS}}


def tunnel_ports(vxlan_port=None, geneve_port=None):
    """``{UDP port: 'vxlan'/'geneve'}``: :data:`TUNNEL_PORTS` and the
    configured ports (a host's tunnels may use others)."""
    ports = dict(TUNNEL_PORTS)
    if vxlan_port:
        ports[vxlan_port] = 'vxlan'
    if geneve_port:
        ports[geneve_port] = 'geneve'
    return ports


def tunnel_kind(dport, tunnels=None):
    """``'vxlan'``/``'geneve'`` for a UDP destination port, else None.

    ``tunnels``: ``{port: kind}`` (see :func:`tunnel_ports`); None: the
    standard ports.
    """
    return (TUNNEL_PORTS if tunnels is None else tunnels).get(dport)


def _tunnel_inner(kind, payload):
    """``(kind, vni, inner frame)`` of a tunnel's UDP payload, or None."""
    if kind is None:
        return None
    found = (_vxlan_inner if kind == 'vxlan' else _geneve_inner)(payload)
    return None if found is None else (kind, *found)


def _frame_key(buf, session, decap, tunnels=None):
    """``(ProbeKey, Encap)`` of an Ethernet frame, or None (may raise)."""
    if len(buf) < dpkt.ethernet.ETH_HDR_LEN:
        return None
    off = dpkt.ethernet.ETH_HDR_LEN
    etype, = _U16.unpack_from(buf, 12)
    vlan = ()
    while etype in (dpkt.ethernet.ETH_TYPE_8021Q,
                    dpkt.ethernet.ETH_TYPE_8021AD):
        if len(vlan) == MAX_VLAN_TAGS or off + 4 > len(buf):
            return None
        tci, etype = _VLAN_TAG.unpack_from(buf, off)
        vlan += (tci & 0x0fff,)
        off += 4
    tunnel = None
    if etype == dpkt.ethernet.ETH_TYPE_IP:
        ip = dpkt.ip.IP(bytes(buf[off:]))
        key = parse_ip_key(ip, session)
        if (key is None and decap and ip.p == dpkt.ip.IP_PROTO_UDP and
                isinstance(ip.data, dpkt.udp.UDP)):
            tunnel = _tunnel_inner(tunnel_kind(ip.data.dport, tunnels),
                                   bytes(ip.data.data))
    elif etype == dpkt.ethernet.ETH_TYPE_IP6:
        key = ip6_key(buf, off, len(buf), session)
        if key is None and decap:
            found = _ip6_payload(buf, off, len(buf))
            if (found is not None and found[0] == dpkt.ip.IP_PROTO_UDP and
                    found[2] - found[1] >= 8):
                tunnel = _tunnel_inner(
                    tunnel_kind(_U16.unpack_from(buf, found[1] + 2)[0],
                                tunnels),
                    bytes(buf[found[1] + 8:found[2]]))
    else:
        return None
    if tunnel is not None:
        inner = _frame_key(tunnel[2], session, decap=False)
        if inner is None:
            return None
        return inner[0], Encap(vlan=vlan, vni=tunnel[1], tunnel=tunnel[0])
    if key is None:
        return None
    return key, (Encap(vlan=vlan) if vlan else NO_ENCAP)


def parse_frame(frame, session=None, tunnels=None):
    """``(ProbeKey, Encap)`` of an Ethernet frame, or None.

    Up to :data:`MAX_VLAN_TAGS` VLAN tags are read (their ids go into the
    :class:`Encap`), then IPv4 or IPv6.  A UDP packet to a VXLAN port
    (:data:`VXLAN_PORTS`) or a Geneve port (:data:`GENEVE_PORTS`) that is
    not itself a probe is opened: the key is the inner frame's, and the
    :class:`Encap` holds the tunnel kind and the VNI (``tunnels``: other
    ports, see :func:`tunnel_ports`).  Foreign,
    truncated or malformed frames give None, never an exception.
    """
    try:
        return _frame_key(frame, session, decap=True, tunnels=tunnels)
    except _PARSE_ERRORS:
        return None


def parse_key(frame, session=None):
    """Recover the :class:`ProbeKey` of an Ethernet frame, or None.

    Foreign, truncated or malformed frames give None, never an exception.
    VLAN tags, VXLAN and Geneve are read through (see :func:`parse_frame`).
    """
    found = parse_frame(frame, session)
    return None if found is None else found[0]
