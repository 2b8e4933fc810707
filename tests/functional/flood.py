"""A bounded packet flood from the lab's source namespace, at C speed.

Run as ``python -m tests.functional.flood SPEC.json`` inside the source
namespace (``ip netns exec``).  It writes prebuilt Ethernet frames to an
``AF_PACKET`` socket on ``eth0`` with ``sendmmsg(2)`` in batches, paced to
a rate, and stops at a packet count or a duration, whichever comes first
(both required).  It prints one JSON line when the flood is running and a
last one with what it sent.  Every frame goes to a lab guest's MAC and an
address inside 198.18.0.0/15.

The frames mix look-alikes of the probes of one window (``session``):
our MAGIC with a wrong session, the right session with unplanned
sequence numbers, echo replies nobody asked for (planned numbers), UDP
and TCP with our ports, and plain UDP.
"""

import ctypes
import ipaddress
import json
import socket
import struct
import sys
import time

import dpkt

from netweaver_agent.core import probe

LAB_NET = ipaddress.ip_network('198.18.0.0/15')
BATCH = 256
MAX_PACKETS = 5_000_000
MAX_DURATION_S = 30.0
UNPLANNED_SEQ = 60_000


class _IOVec(ctypes.Structure):
    _fields_ = [('iov_base', ctypes.c_void_p), ('iov_len', ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [('msg_name', ctypes.c_void_p),
                ('msg_namelen', ctypes.c_uint32),
                ('msg_iov', ctypes.POINTER(_IOVec)),
                ('msg_iovlen', ctypes.c_size_t),
                ('msg_control', ctypes.c_void_p),
                ('msg_controllen', ctypes.c_size_t),
                ('msg_flags', ctypes.c_int)]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [('msg_hdr', _MsgHdr), ('msg_len', ctypes.c_uint)]


def _tag(session, seq):
    return struct.pack('!4sHI', probe.MAGIC, session, seq)


def _icmp(kind, session, seq, pad=22):
    return dpkt.icmp.ICMP(type=kind, data=dpkt.icmp.ICMP.Echo(
        id=session, seq=seq & 0xffff, data=_tag(session, seq) + bytes(pad)))


def _ip(src, dst, l4, proto):
    ip = dpkt.ip.IP(src=socket.inet_aton(src), dst=socket.inet_aton(dst),
                    p=proto, ttl=64, data=l4)
    ip.len = len(ip)
    return ip


def look_alikes(session, planned, src, dst, rng_seq):
    """IPv4 packets that resemble probes of ``session`` and are not ours."""
    wrong = (session + 1 + rng_seq % 0xfffe) % 0xffff + 1
    seq = rng_seq % max(1, planned)
    udp_port = probe.udp_source_port(session)
    # TCP probes take their source ports from the plan (within
    # probe.DEFAULT_TCP_SOURCE_PORTS): these are never a planned one.
    tcp_port = probe.DEFAULT_TCP_SOURCE_PORTS[0] - 1 - rng_seq % 1000
    return [
        # Our MAGIC, another session.
        _ip(src, dst, _icmp(dpkt.icmp.ICMP_ECHO, wrong, seq), 1),
        # Our session, a sequence number that was never planned.
        _ip(src, dst, _icmp(dpkt.icmp.ICMP_ECHO, session,
                            UNPLANNED_SEQ + seq), 1),
        # Echo replies nobody asked for, with planned numbers.
        _ip(src, dst, _icmp(dpkt.icmp.ICMP_ECHOREPLY, session, seq), 1),
        # UDP from our source port, MAGIC of another session.
        _ip(src, dst, dpkt.udp.UDP(sport=udp_port, dport=33434,
                                   ulen=8 + 32,
                                   data=_tag(wrong, seq) + bytes(22)), 17),
        # UDP from our port, our session, unplanned number.
        _ip(src, dst, dpkt.udp.UDP(sport=udp_port, dport=33434,
                                   ulen=8 + 32,
                                   data=_tag(session, UNPLANNED_SEQ + seq)
                                   + bytes(22)), 17),
        # TCP SYN from an unplanned port, another session's ISN.
        _ip(src, dst, dpkt.tcp.TCP(sport=tcp_port, dport=9,
                                   seq=(wrong << 16) | seq,
                                   flags=dpkt.tcp.TH_SYN, win=512), 6),
        # TCP SYN from an unplanned port, our session, unplanned number.
        _ip(src, dst, dpkt.tcp.TCP(sport=tcp_port, dport=9,
                                   seq=(session << 16) | UNPLANNED_SEQ,
                                   flags=dpkt.tcp.TH_SYN, win=512), 6),
        # A planned probe's ISN from a port the plan did not give it.
        _ip(src, dst, dpkt.tcp.TCP(sport=tcp_port, dport=9,
                                   seq=(session << 16) | seq,
                                   flags=dpkt.tcp.TH_SYN, win=512), 6),
        # Plain traffic.
        _ip(src, dst, dpkt.udp.UDP(sport=40000 + seq % 1000, dport=5001,
                                   ulen=8 + 18, data=bytes(18)), 17),
    ]


def frames(spec):
    """The Ethernet frames to cycle through, from the JSON spec."""
    out = []
    src_mac = bytes.fromhex(spec['src_mac'].replace(':', ''))
    for i in range(spec.get('variety', 32)):
        for target in spec['targets']:
            dst = target['ip']
            if ipaddress.ip_address(dst) not in LAB_NET:
                raise ValueError(f"flood target {dst} is outside {LAB_NET}")
            dst_mac = bytes.fromhex(target['mac'].replace(':', ''))
            for ip in look_alikes(spec['session'], spec['planned'],
                                  spec['src_ip'], dst, i):
                out.append(bytes(dpkt.ethernet.Ethernet(
                    dst=dst_mac, src=src_mac, type=dpkt.ethernet.ETH_TYPE_IP,
                    data=ip)))
    return out


def flood(spec):
    count = int(spec['count'])
    duration = float(spec['duration_s'])
    rate = float(spec['rate_pps'])
    if not 0 < count <= MAX_PACKETS or not 0 < duration <= MAX_DURATION_S:
        raise ValueError(f"flood of {count} packets in {duration} s is not "
                         f"bounded by {MAX_PACKETS} and {MAX_DURATION_S} s")
    data = frames(spec)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((spec.get('ifname', 'eth0'), 0))
    libc = ctypes.CDLL(None, use_errno=True)
    bufs = [ctypes.create_string_buffer(f, len(f)) for f in data]
    n = len(bufs)
    iovs = (_IOVec * n)(*[_IOVec(ctypes.addressof(b), len(d))
                          for b, d in zip(bufs, data)])
    msgs = (_MMsgHdr * n)()
    for j in range(n):
        msgs[j].msg_hdr.msg_iov = ctypes.pointer(iovs[j])
        msgs[j].msg_hdr.msg_iovlen = 1
    size = ctypes.sizeof(_MMsgHdr)
    sent = errors = 0
    t0 = time.monotonic()
    print(json.dumps({'running': True, 'frames': n}), flush=True)
    end = t0 + duration
    pos = 0
    while sent < count:
        now = time.monotonic()
        if now >= end:
            break
        due = t0 + sent / rate
        if due > now:
            time.sleep(min(due - now, end - now))
            continue
        k = min(BATCH, count - sent, n - pos)
        done = libc.sendmmsg(sock.fileno(),
                             ctypes.byref(msgs, pos * size), k, 0)
        if done < 0:
            errors += 1
            time.sleep(0.001)
            continue
        sent += done
        pos = (pos + done) % n
    elapsed = time.monotonic() - t0
    sock.close()
    print(json.dumps({'sent': sent, 'elapsed_s': elapsed,
                      'rate_pps': sent / elapsed if elapsed else 0.0,
                      'errors': errors}), flush=True)


def main(argv):
    with open(argv[1], encoding='utf-8') as f:
        flood(json.load(f))


if __name__ == '__main__':
    main(sys.argv)
