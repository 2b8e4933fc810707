"""Frames and capture files for the tests, built independently of the code.

One place for what the unit and functional tests build: probes and the
guests' replies (dpkt, as a guest's stack would answer), IPv6, VLAN,
VXLAN and Geneve frames, hping3-style SYNs, the noise a real vif carries,
randomly made and damaged frames for the fuzzers, Linux cooked (SLL,
SLL2) headers, and capture files written byte by byte (classic pcap in
either byte order and precision, pcapng blocks) or with dpkt's writer.

Test modules import this module (``from tests import packets as pk``);
no test module imports another.
"""

import decimal
import random
import socket
import struct

import dpkt
from hypothesis import strategies as st

from netweaver_agent.core import pcapngreader
from netweaver_agent.core import pcapreader
from netweaver_agent.core import probe
from netweaver_agent.core import sightings

# --------------------------------------------------------------------------
# Addresses (198.18.0.0/15 and 2001:2::/48 only).

SRC = socket.inet_aton('198.18.0.1')
DST = socket.inet_aton('198.18.0.10')
MAC_A = bytes.fromhex('020000000001')
MAC_B = bytes.fromhex('020000000002')
V4 = (SRC, DST)
V6 = (socket.inet_pton(socket.AF_INET6, '2001:2::1'),
      socket.inet_pton(socket.AF_INET6, '2001:2::a'))
UNDERLAY = (socket.inet_aton('198.18.255.1'),
            socket.inet_aton('198.18.255.2'))

GUEST = '198.18.0.10'
GUEST6 = V6[1]
SRC6 = V6[0]
LINK_LOCAL = socket.inet_pton(socket.AF_INET6, 'fe80::2')
GROUP_MAC = bytes.fromhex('333300000002')
BCAST_MAC = b'\xff' * 6

T0 = 1_763_900_000_123_456_789      # ns since the epoch (2025-11-23)
MS = 1_000_000
SESSION = 4242

# A TCP probe's own source port (see test_tcp_ports.py for the ports).
PORT = 40000


# --------------------------------------------------------------------------
# Probes and replies.

def ident(proto, n, port=PORT):
    """The seq of probe ``n``: TCP probes carry their source port in it."""
    return probe.tcp_ident(port, n) if proto == 'tcp' else n


def wire_key(proto, session, seq, reply=False):
    """The key read from an unauthenticated probe: TCP keys carry the
    ISN (``session << 16 | n`` without a secret) and no session."""
    if proto == 'tcp':
        return probe.ProbeKey(probe.TCP_SESSION, seq | session << 40, reply)
    return probe.ProbeKey(session, seq, reply)


def frame(proto, session, seq, **kwargs):
    """An IPv4 probe SRC -> DST, MAC_A -> MAC_B."""
    return probe.build_frame(proto, session, seq, SRC, DST, MAC_A, MAC_B,
                             **kwargs)


def frame4(proto, session, n, **kwargs):
    """IPv4 probe number ``n`` (TCP: its ident carries port PORT + n)."""
    return probe.build_frame(proto, session, seq_of(proto, n), V4[0],
                             V4[1], MAC_A, MAC_B, **kwargs)


def frame6(proto, session, n, **kwargs):
    """IPv6 probe number ``n`` (TCP: its ident carries port PORT + n)."""
    return probe.build_frame(proto, session, seq_of(proto, n), V6[0],
                             V6[1], MAC_A, MAC_B, **kwargs)


def seq_of(proto, n):
    """A probe's ``seq``: TCP probes carry their source port too."""
    return probe.tcp_ident(PORT + n, n) if proto == 'tcp' else n


def probes(proto, n, session=SESSION, replies=False, first=0):
    """Probe frames ``first`` .. ``first + n - 1``, each followed by its
    reply when ``replies``."""
    out = []
    for seq in range(first, first + n):
        f = frame(proto, session, ident(proto, seq))
        out.append(f)
        if replies:
            out.append(reply(f))
    return out


def ethernet(ip, src=MAC_B, dst=MAC_A):
    """An IPv4 packet in Ethernet (dpkt)."""
    return bytes(dpkt.ethernet.Ethernet(
        src=src, dst=dst, type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def reply(probe_frame, kind=None):
    """The guest's answer to an IPv4 probe, built with dpkt as a guest
    would.

    icmp: echo reply; udp: ICMP port unreachable quoting the probe; tcp:
    RST/ACK (``kind='synack'``: SYN/ACK) with ``ack = seq + 1``.
    """
    ip = dpkt.ethernet.Ethernet(probe_frame).data
    if ip.p == dpkt.ip.IP_PROTO_ICMP:
        echo = ip.data.data
        l4 = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHOREPLY,
                            data=dpkt.icmp.ICMP.Echo(id=echo.id, seq=echo.seq,
                                                     data=echo.data))
        p = dpkt.ip.IP_PROTO_ICMP
    elif ip.p == dpkt.ip.IP_PROTO_UDP:
        quoted = bytes(ip)
        l4 = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_UNREACH,
                            code=dpkt.icmp.ICMP_UNREACH_PORT,
                            data=dpkt.icmp.ICMP.Unreach(
                                data=dpkt.ip.IP(quoted)))
        p = dpkt.ip.IP_PROTO_ICMP
    else:
        tcp = ip.data
        flags = (dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK if kind == 'synack'
                 else dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK)
        l4 = dpkt.tcp.TCP(sport=tcp.dport, dport=tcp.sport, seq=0,
                          ack=(tcp.seq + 1) & 0xffffffff, flags=flags,
                          win=0)
        p = dpkt.ip.IP_PROTO_TCP
    out = dpkt.ip.IP(src=ip.dst, dst=ip.src, p=p, ttl=64, id=0, data=l4)
    out.len = len(out)
    return ethernet(bytes(out))


def icmp6_reply(ip6):
    """The guest's answer to an IPv6 probe (bytes of the IPv6 packet)."""
    pkt = dpkt.ip6.IP6(ip6)
    src, dst = pkt.dst, pkt.src
    if pkt.nxt == dpkt.ip.IP_PROTO_ICMP6:
        echo = pkt.data.data
        l4 = dpkt.icmp6.ICMP6(type=dpkt.icmp6.ICMP6_ECHO_REPLY,
                              data=dpkt.icmp6.ICMP6.Echo(
                                  id=echo.id, seq=echo.seq, data=echo.data))
        nxt = dpkt.ip.IP_PROTO_ICMP6
    elif pkt.nxt == 17:
        # Destination unreachable, port unreachable: 4 unused bytes, then
        # as much of the probe as fits.
        l4 = dpkt.icmp6.ICMP6(type=dpkt.icmp6.ICMP6_DST_UNREACH, code=4,
                              data=bytes(4) + bytes(ip6))
        nxt = dpkt.ip.IP_PROTO_ICMP6
    else:
        tcp = pkt.data
        l4 = dpkt.tcp.TCP(sport=tcp.dport, dport=tcp.sport,
                          ack=(tcp.seq + 1) & 0xffffffff,
                          flags=dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK)
        nxt = 6
    out = dpkt.ip6.IP6(src=src, dst=dst, nxt=nxt, hlim=64, plen=len(l4),
                       data=l4)
    return bytes(out)


def reply6(frame):
    """The guest's answer to an IPv6 probe frame, as a frame."""
    return probe.ethernet_frame(icmp6_reply(frame[14:]),
                                dpkt.ethernet.ETH_TYPE_IP6, MAC_B, MAC_A)


def answered(proto, ingress_ns, turnaround_ns, egress_ns, session=SESSION,
             lose=()):
    """pif and vif records ``[(t_ns, frame)]`` of probes with the given
    latencies (ns), one probe a millisecond from T0.

    ``lose``: sequence numbers that never reach the vif.
    """
    pif, vif = [], []
    for seq, (ing, eg) in enumerate(zip(ingress_ns, egress_ns)):
        f = frame(proto, session, ident(proto, seq))
        t = T0 + seq * MS
        pif.append((t, f))
        if seq in lose:
            continue
        r = reply(f)
        vif.append((t + ing, f))
        vif.append((t + ing + turnaround_ns, r))
        pif.append((t + ing + turnaround_ns + eg, r))
    return sorted(pif), sorted(vif)


# --------------------------------------------------------------------------
# Other traffic: hping3 SYNs, what a vif carries besides.

def hping_syn(sport, seq, ip_id, src=SRC, dst=DST):
    """A SYN as ``hping3 -S`` sends it (no tag: fingerprint mode)."""
    tcp = dpkt.tcp.TCP(sport=sport, dport=0, seq=seq,
                       flags=dpkt.tcp.TH_SYN, win=512)
    ip = dpkt.ip.IP(src=src, dst=dst, p=6, id=ip_id, ttl=64, data=tcp)
    ip.len = len(ip)
    return ethernet(bytes(ip), src=MAC_A, dst=MAC_B)


def eth(payload, etype, dst=MAC_B, src=MAC_A):
    """``payload`` behind an Ethernet header, by hand."""
    return dst + src + struct.pack('!H', etype) + payload


def ip4(src, dst, proto, l4, ip_id=1):
    """An IPv4 packet (addresses as strings), TTL 1."""
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst),
                    p=proto, id=ip_id, ttl=1, data=l4)
    ip.len = len(ip)
    return bytes(ip)


def ip6(src, dst, nxt, l4):
    """An IPv6 packet (addresses as bytes), hop limit 255."""
    return bytes(dpkt.ip6.IP6(src=src, dst=dst, nxt=nxt, hlim=255,
                              plen=len(bytes(l4)), data=l4))


def noise():
    """What a vif and a pif carry besides the traffic measured: each frame
    is the same on both (so the old fingerprint matched it)."""
    igmp = struct.pack('!BBH4s', 0x16, 0, 0, socket.inet_aton('224.0.0.251'))
    rs = bytes([133, 0, 0, 0]) + bytes(4)
    ns = bytes([135, 0, 0, 0]) + bytes(4) + GUEST6
    mld = bytes([143, 0, 0, 0]) + bytes(4)
    hbh_mld = bytes([58, 0, 5, 2, 0, 0, 1, 0]) + mld   # router alert
    dhcp = dpkt.udp.UDP(sport=68, dport=67, data=bytes(240))
    dhcp.ulen = len(dhcp)
    return [
        # The guest's IGMP report (from the instance's address!).
        eth(ip4(GUEST, '224.0.0.22', 2, igmp), dpkt.ethernet.ETH_TYPE_IP,
            dst=bytes.fromhex('01005e000016')),
        # The same, unicast MAC and all (a broken switch): still IGMP.
        eth(ip4(GUEST, '198.18.0.1', 2, igmp, ip_id=9),
            dpkt.ethernet.ETH_TYPE_IP),
        # Router solicitation, neighbour solicitation, MLD report.
        eth(ip6(LINK_LOCAL, socket.inet_pton(socket.AF_INET6, 'ff02::2'),
                58, rs), dpkt.ethernet.ETH_TYPE_IP6, dst=GROUP_MAC),
        eth(ip6(SRC6, GUEST6, 58, ns), dpkt.ethernet.ETH_TYPE_IP6),
        eth(ip6(LINK_LOCAL, socket.inet_pton(socket.AF_INET6, 'ff02::16'),
                0, hbh_mld), dpkt.ethernet.ETH_TYPE_IP6, dst=GROUP_MAC),
        # ARP who-has, DHCP discover (broadcast) and renewal (unicast).
        eth(struct.pack('!HHBBH6s4s6s4s', 1, 0x0800, 6, 4, 1, MAC_A,
                        socket.inet_aton(GUEST), bytes(6),
                        socket.inet_aton('198.18.0.1')), 0x0806,
            dst=BCAST_MAC),
        eth(ip4('0.0.0.0', '255.255.255.255', 17, dhcp),
            dpkt.ethernet.ETH_TYPE_IP, dst=BCAST_MAC),
        eth(ip4(GUEST, '198.18.0.1', 17, dhcp, ip_id=3),
            dpkt.ethernet.ETH_TYPE_IP),
        # Traffic of another instance.
        hping_syn(3007, 1007, 507, dst=socket.inet_aton('198.18.0.20')),
    ]


# --------------------------------------------------------------------------
# Tunnels, tags and cooked headers.

def vxlan(frame, vni, v6_underlay=False, port=4789):
    """``frame`` inside VXLAN/UDP/IP/Ethernet, as a VTEP would send it."""
    payload = struct.pack('!B3xI', 0x08, vni << 8) + frame
    return udp_underlay(payload, port, v6_underlay)


def geneve_option(cls, kind, data):
    """One Geneve TLV option (``data``: a multiple of 4 bytes)."""
    return struct.pack('!HBB', cls, kind, len(data) // 4) + data


# OVN's option: class 0x0102 (Open vSwitch), type 0x80, 4 bytes of
# logical ingress/egress port keys.
OVN_OPTION = geneve_option(0x0102, 0x80, b'\x00\x01\x00\x02')


def geneve(frame, vni, options=OVN_OPTION, v6_underlay=False, port=6081,
           first=None, ptype=0x6558):
    """``frame`` inside Geneve/UDP/IP/Ethernet (RFC 8926), ``options``
    after the 8-byte base header.  ``first``: the first byte as given
    (version and option length), for damaged headers."""
    if first is None:
        first = len(options) // 4
    payload = struct.pack('!BBHI', first, 0, ptype, vni << 8) + options
    return udp_underlay(payload + frame, port, v6_underlay)


def udp_underlay(payload, port, v6_underlay):
    """``payload`` in UDP to ``port`` over IPv4 or IPv6 and Ethernet."""
    udp = dpkt.udp.UDP(sport=54321, dport=port, data=payload)
    udp.ulen = len(udp)
    if v6_underlay:
        ip = dpkt.ip6.IP6(src=V6[0], dst=V6[1], nxt=17, hlim=64,
                          plen=len(udp), data=udp)
        etype = dpkt.ethernet.ETH_TYPE_IP6
    else:
        ip = dpkt.ip.IP(src=UNDERLAY[0], dst=UNDERLAY[1], p=17, ttl=64,
                        data=udp)
        ip.len = len(ip)
        etype = dpkt.ethernet.ETH_TYPE_IP
    return probe.ethernet_frame(bytes(ip), etype, MAC_A, MAC_B)


def tagged(frame, *vids):
    """``frame`` with 802.1Q tags (802.1ad outermost when two)."""
    tags = b''
    for n, vid in enumerate(vids):
        tpid = dpkt.ethernet.ETH_TYPE_8021AD if n == 0 and len(vids) > 1 else \
            dpkt.ethernet.ETH_TYPE_8021Q
        tags += struct.pack('!HH', tpid, vid)
    return frame[:12] + tags + frame[12:]


# The kernel's packet types (linux/if_packet.h), as cooked headers carry.
PKT_HOST, PKT_BROADCAST, PKT_MULTICAST, PKT_OUTGOING = 0, 1, 2, 4


def pkttype(frame, outgoing=False):
    """The packet type a cooked capture gives ``frame``."""
    if frame[0] & 1:
        return PKT_BROADCAST if frame[:6] == b'\xff' * 6 else PKT_MULTICAST
    return PKT_OUTGOING if outgoing else PKT_HOST


def to_sll(frame, outgoing=False):
    """The Ethernet frame as tcpdump -i any writes it (LINUX_SLL): the
    cooked header's protocol is the frame's first ethertype, so a VLAN tag
    follows the header (libpcap puts back the tag the kernel took out)."""
    return struct.pack('!HHH8sH', pkttype(frame, outgoing), 1, 6,
                       frame[6:12] + b'\0\0', *struct.unpack(
                           '!H', frame[12:14])) + frame[14:]


def to_sll2(frame, outgoing=False):
    """The Ethernet frame as LINUX_SLL2 (interface index 3)."""
    return struct.pack('!HHIHBB8s', *struct.unpack('!H', frame[12:14]), 0,
                       3, 1, pkttype(frame, outgoing), 6,
                       frame[6:12] + b'\0\0') + frame[14:]


def cooked(frame, v2=False):
    """``frame`` as ``tcpdump -i any`` writes it (Linux cooked v1/v2)."""
    return to_sll2(frame) if v2 else to_sll(frame)


# --------------------------------------------------------------------------
# Random and damaged frames (the fuzzers').

# Offsets worth damaging: Ethernet type and tags, IPv4/IPv6 header fields
# (version, lengths, fragment, protocol/next header), transport headers,
# ICMP type, the tag (magic, session, seq), quoted headers, the VXLAN
# header and the inner frame's headers.
HOT = sorted({12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
              *range(30, 64), 66, 67, 70, 73, 76, 78, 80, 82, 84, 86, 90,
              94, 98, 102})

MEAN_BYTES = (0, 1, 3, 6, 8, 17, 44, 58, 128, 129, 0x45, 0x60, 0x81, 0x86,
              0x88, 0xdd, 0xff)


def secret_of(rnd):
    """A window secret (tagged probes, keyed TCP ISNs), or None."""
    return rnd.randbytes(probe.SECRET_LEN) if rnd.random() < 0.5 else None


def make_frame(rnd):
    """A probe or reply frame, maybe tagged, maybe inside VXLAN."""
    proto = rnd.choice(probe.PROTOCOLS)
    six = rnd.random() < 0.5
    session = rnd.randrange(0x10000)
    seq = rnd.randrange(0x10000 if proto == 'tcp' else 1 << 32)
    if proto == 'tcp' and hasattr(probe, 'tcp_ident'):
        seq = probe.tcp_ident(rnd.randrange(1, 0x10000), seq)
    size = rnd.randrange(20, 141)
    src, dst = V6 if six else V4
    ip = probe.build_ip(proto, session, seq, src, dst, size=size,
                        secret=secret_of(rnd))
    if rnd.random() < 0.5:
        if six:
            ip = icmp6_reply(ip)
        else:
            ip = reply(probe.ethernet_frame(ip, dpkt.ethernet.ETH_TYPE_IP,
                                            MAC_A, MAC_B),
                       rnd.choice(['rst', 'synack']))[14:]
    if not six and rnd.random() < 0.2:
        ip = bytearray(ip)
        kind = rnd.choice(['frag0', 'fragN', 'opts'])
        if kind == 'frag0':
            ip[6] |= 0x20                           # more fragments
        elif kind == 'fragN':
            ip[6:8] = struct.pack('!H', rnd.randrange(1, 0x2000))
        else:
            words = rnd.randrange(1, 11)
            ip = (bytes([0x40 | (5 + words)]) + ip[1:20] +
                  bytes(4 * words) + ip[20:])
        ip = bytes(ip)
    etype = dpkt.ethernet.ETH_TYPE_IP6 if six else dpkt.ethernet.ETH_TYPE_IP
    vlan = tuple(rnd.randrange(4096) for _ in range(rnd.randrange(3)))
    frame = probe.ethernet_frame(ip, etype, MAC_A, MAC_B, vlan=vlan)
    tunnel = rnd.random()
    if tunnel < 0.2:
        frame = vxlan(frame, rnd.randrange(1 << 24),
                      v6_underlay=rnd.random() < 0.5,
                      port=rnd.choice(probe.VXLAN_PORTS))
    elif tunnel < 0.4:
        options = b''.join(
            geneve_option(rnd.randrange(0x10000), rnd.randrange(256),
                          rnd.randbytes(4 * rnd.randrange(4)))
            for _ in range(rnd.randrange(4)))
        frame = geneve(frame, rnd.randrange(1 << 24), options=options,
                       v6_underlay=rnd.random() < 0.5)
    return frame


def damage(rnd, frame):
    """``frame`` with bytes changed, lengths lied about, cut or padded."""
    f = bytearray(frame)
    for _ in range(rnd.randrange(5)):
        at = rnd.choice(HOT) if rnd.random() < 0.6 else \
            rnd.randrange(max(1, len(f)))
        if at < len(f):
            f[at] = rnd.choice(MEAN_BYTES) if rnd.random() < 0.5 else \
                rnd.randrange(256)
    if rnd.random() < 0.25:
        f = f[:rnd.randrange(len(f) + 1)]
    if rnd.random() < 0.15:
        f += rnd.randbytes(rnd.randrange(1, 25))
    return bytes(f)


# Each input is built from one drawn seed: hypothesis picks (and
# derandomizes) the seeds, plain ``random`` spends them.  Drawing every
# choice through hypothesis costs ~10x the time of the checks.
randoms = st.integers(0, (1 << 64) - 1).map(random.Random)

# Offsets where a changed byte makes a probe frame interesting.
INTERESTING = [12, 13, 14, 16, 17, 20, 21, 23, 34, 35, 36, 37, 38, 39, 40,
               41, 42, 43, 46, 47, 48, 49, 50, 51, 56, 57, 62, 63, 70, 74]


@st.composite
def probe_frames(draw):
    """Probes and replies of every protocol, some damaged, tagged, cut
    short or padded."""
    proto = draw(st.sampled_from(probe.PROTOCOLS))
    session = draw(st.integers(0, 0xffff))
    seq = draw(st.integers(0, 0xffff if proto == 'tcp' else 0xffffffff))
    if proto == 'tcp':
        seq = probe.tcp_ident(draw(st.integers(1, 0xffff)), seq)
    f = frame(proto, session, seq, size=draw(st.integers(20, 120)))
    if draw(st.booleans()):
        f = reply(f, draw(st.sampled_from(['rst', 'synack'])))
    f = bytearray(f)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.one_of(st.sampled_from(INTERESTING),
                            st.integers(0, len(f) - 1)))
        if at < len(f):
            f[at] = draw(st.integers(0, 255))
    if draw(st.integers(0, 5)) == 0:
        f = f[:12] + b'\x81\x00\x00\x07' + f[12:]
    if draw(st.integers(0, 5)) == 0:
        f = f[:draw(st.integers(0, len(f)))]
    if draw(st.integers(0, 5)) == 0:
        f += bytes(draw(st.integers(1, 20)))      # Ethernet padding
    return bytes(f)


# --------------------------------------------------------------------------
# Keys and rows, as the reference parser and a read file give them.

def key_of(frame):
    """What pcapkeys.frame_key must give: parse_frame's answer, with the
    Encap third when the frame was tagged or VXLAN."""
    found = probe.parse_frame(frame)
    if found is None:
        return None
    key, encap = found
    if encap == probe.NO_ENCAP:
        return key.session, key.as_int()
    return key.session, key.as_int(), encap


def add_sighting(batch, seen):
    """Append one :class:`sightings.Sighting` to ``batch`` (a row at a
    time, as no reader fills a batch)."""
    batch.append(seen.key.as_int(), batch.interface_index(seen.ifname),
                 seen.t_ns, seen.direction, seen.auth)


def sightings_of(batch):
    """The rows of ``batch`` as :class:`sightings.Sighting` objects."""
    for k, i, t, d, a in zip(batch.keys, batch.ifindex, batch.t_ns,
                             batch.direction, batch.auth_column()):
        yield sightings.Sighting(probe.ProbeKey.from_int(batch.session, k),
                                 batch.ifnames[i], t, d, a)


def rows(read):
    """The batch as ``[(ifname, key_int, t_ns, direction)]``, sorted."""
    b = read.batch
    return sorted((b.ifnames[i], k, t, d) for k, i, t, d in
                  zip(b.keys, b.ifindex, b.t_ns, b.direction))


# --------------------------------------------------------------------------
# Classic pcap, written by hand (any byte order, precision, version or
# link type) or with dpkt's writer.

def pcap(records, order='<', nano=False, version=(2, 4), linktype=1,
         snaplen=65535, swapped=False):
    """A classic pcap from ``[(sec, frac, frame)]`` or ``[(sec, frac,
    frame, wire_len)]`` (fields as written; ``wire_len``: the frame's
    length on the wire, when it was cut short).  ``swapped``: each record
    header holds the wire length before the captured length, as pcap
    writers did before version 2.3."""
    magic = pcapreader.PCAP_MAGIC_NS if nano else pcapreader.PCAP_MAGIC_US
    out = [struct.pack(order + 'IHHiIII', magic, *version, 0, 0, snaplen,
                       linktype)]
    for sec, frac, frame, *wire in records:
        lengths = (len(frame), wire[0] if wire else len(frame))
        if swapped:
            lengths = lengths[::-1]
        out.append(struct.pack(order + 'IIII', sec, frac, *lengths) + frame)
    return b''.join(out)


def pcap_of(frames, times, order='<', nano=True, linktype=1):
    """A classic pcap of ``frames`` seen at ``times`` (ns)."""
    unit = 1 if nano else 1000
    return pcap([(t // 10 ** 9, t % 10 ** 9 // unit, f)
                 for f, t in zip(frames, times)], order, nano,
                linktype=linktype)


def write_pcap_raw(path, frames, times, order='<', nano=True, linktype=1):
    """A classic pcap written by hand (any byte order or link type)."""
    with open(path, 'wb') as f:
        f.write(pcap_of(frames, times, order, nano, linktype))
    return str(path)


def write_pcap(path, frames, times, nano=True):
    """A classic pcap written by dpkt's writer."""
    with open(path, 'wb') as f:
        w = dpkt.pcap.Writer(f, nano=nano)
        for frame, t in zip(frames, times):
            w.writepkt_time(frame, decimal.Decimal(t) / 10 ** 9)
    return str(path)


def write(path, records, nano=True, order='<'):
    """A classic pcap of ``[(t_ns, frame)]`` records."""
    return write_pcap_raw(path, [f for _, f in records],
                          [t for t, _ in records], order=order, nano=nano)


# --------------------------------------------------------------------------
# pcapng, block by block.

def block(order, btype, body):
    """One pcapng block (``body`` as given: pad it to 4 bytes yourself)."""
    n = 12 + len(body)
    return struct.pack(order + 'II', btype, n) + body + \
        struct.pack(order + 'I', n)


def option(order, code, value):
    """One pcapng option, padded to 4 bytes."""
    pad = (-len(value)) % 4
    return struct.pack(order + 'HH', code, len(value)) + value + bytes(pad)


END_OF_OPTIONS = 0


def shb(order='<', version=(1, 0)):
    """A section header block (section length unknown)."""
    return block(order, pcapngreader.PCAPNG_SHB,
                 struct.pack(order + 'IHHq', pcapngreader.PCAPNG_BOM, *version,
                             -1))


def idb(order, name, tsresol=None, linktype=1, tsoffset=None):
    """An interface description block named ``name``."""
    opts = option(order, 2, name.encode())
    if tsresol is not None:
        opts += option(order, 9, bytes([tsresol]))
    if tsoffset is not None:
        opts += option(order, 14, struct.pack(order + 'q', tsoffset))
    opts += struct.pack(order + 'HH', END_OF_OPTIONS, 0)
    return block(order, pcapngreader.PCAPNG_IDB,
                 struct.pack(order + 'HHI', linktype, 0, 65535) + opts)


def epb(order, iface, ts, frame, flags=None):
    """An enhanced packet block at ``ts`` (units of the interface's
    resolution), with an epb_flags option when ``flags`` is given."""
    pad = (-len(frame)) % 4
    body = struct.pack(order + 'IIIII', iface, ts >> 32, ts & 0xffffffff,
                       len(frame), len(frame)) + frame + bytes(pad)
    if flags is not None:
        body += option(order, 2, struct.pack(order + 'I', flags))
        body += struct.pack(order + 'HH', END_OF_OPTIONS, 0)
    return block(order, pcapngreader.PCAPNG_EPB, body)


def pcapng(frames, times, order='<', tsresol=9, linktype=1, flags=None):
    """A pcapng file of one interface ``eth0``: ``frames`` at ``times``
    (ns), ``flags``: each record's epb_flags, or none."""
    unit = 10 ** (9 - tsresol)
    blocks = [shb(order), idb(order, 'eth0', tsresol=tsresol,
                              linktype=linktype)]
    for i, (f, t) in enumerate(zip(frames, times)):
        blocks.append(epb(order, 0, t // unit, f,
                          None if flags is None else flags[i]))
    return b''.join(blocks)


# TPACKET_V3 ring blocks, as the kernel lays them out (net/packet/
# af_packet.c, SOCK_RAW on Ethernet): a block descriptor, then per packet
# tpacket3_hdr + sockaddr_ll + frame, 16-byte aligned, the last packet's
# next offset 0.
RING_BLOCK_HDR = 48
RING_TP3_HDR = 48
RING_SLL = 20
RING_MAC = ((RING_TP3_HDR + RING_SLL + 16 + 15) & ~15) - 14


def ring_block(packets, size=1 << 16):
    """One ring block of ``packets``: ``(frame, ifindex, pkttype, t_ns,
    vid or None)``."""
    block = bytearray(size)
    off = RING_BLOCK_HDR
    prev = None
    for frame, ifindex, pkt_type, t_ns, vid in packets:
        status = 1 | (0x10 if vid is not None else 0)
        hdr = struct.pack('@IIIIIIHHIIHH8x', 0, t_ns // 10**9,
                          t_ns % 10**9, len(frame), len(frame), status,
                          RING_MAC, RING_MAC + 14, 0, vid or 0,
                          0x8100 if vid else 0, 0)
        sll = struct.pack('@HHiHBB8s', 17, 0, ifindex, 1, pkt_type, 6,
                          b'\0' * 8)
        block[off:off + RING_TP3_HDR] = hdr
        block[off + RING_TP3_HDR:off + RING_TP3_HDR + RING_SLL] = sll
        block[off + RING_MAC:off + RING_MAC + len(frame)] = frame
        if prev is not None:
            struct.pack_into('@I', block, prev, off - prev)
        prev = off
        off += (RING_MAC + len(frame) + 15) & ~15
    struct.pack_into('@IIIIII', block, 0, 3, 0, 1, len(packets),
                     RING_BLOCK_HDR, off)
    return bytes(block[:off])
