"""The instances' own packets, for the passive matcher's tests.

Frames are built with dpkt (an independent encoder): TCP segments and UDP
datagrams between a guest and a peer, over IPv4 or IPv6, VLAN-tagged or
not, with a checksum the offload may have left otherwise.  Addresses are
in 198.18.0.0/15 and 2001:2::/48 only.
"""

import dpkt

GUEST = bytes([198, 18, 0, 10])
OTHER = bytes([198, 18, 0, 11])
PEER = bytes([198, 19, 0, 1])
G6 = bytes.fromhex('20010002000000000000000000000010')
P6 = bytes.fromhex('20010002000000000000000000000001')


def tcp(src, dst, sport, dport, seq, ack, payload=b'', vlan=(), sum_=0):
    """A TCP ACK segment (IP id 7) in Ethernet."""
    seg = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=ack,
                       flags=dpkt.tcp.TH_ACK, data=payload)
    return ip_frame(src, dst, seg, dpkt.ip.IP_PROTO_TCP, vlan, 7, sum_)


def udp(src, dst, sport, dport, ipid, payload=b'x', vlan=()):
    """A UDP datagram in Ethernet."""
    dg = dpkt.udp.UDP(sport=sport, dport=dport, data=payload)
    return ip_frame(src, dst, dg, dpkt.ip.IP_PROTO_UDP, vlan, ipid)


def ip_frame(src, dst, l4, proto, vlan, ipid, sum_=0):
    """``l4`` over IPv4 or IPv6 (by the address length), ``vlan`` tags
    and Ethernet; ``sum_``: a TCP checksum written over the one dpkt
    computed (IPv4)."""
    if len(src) == 16:
        pkt = dpkt.ip6.IP6(src=src, dst=dst, nxt=proto, hlim=64, data=l4)
        pkt.plen = len(bytes(l4))
        etype = dpkt.ethernet.ETH_TYPE_IP6
    else:
        pkt = dpkt.ip.IP(src=src, dst=dst, p=proto, id=ipid, data=l4)
        etype = dpkt.ethernet.ETH_TYPE_IP
    raw = bytes(pkt)
    if sum_ and len(src) == 4:
        # A checksum the offload left unfilled or filled differently.
        raw = raw[:20 + 16] + sum_.to_bytes(2, 'big') + raw[20 + 18:]
    eth = b'\x02' * 6 + b'\x04' * 6
    for vid in vlan:
        eth += b'\x81\x00' + vid.to_bytes(2, 'big')
    return eth + etype.to_bytes(2, 'big') + raw
