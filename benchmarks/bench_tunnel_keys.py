"""How fast probes inside VXLAN and Geneve become keys, against plain ones.

For each carriage (plain Ethernet/IPv4, VXLAN, Geneve with 8 and 24 bytes
of options, all over an IPv4 underlay) writes a pcap of N ICMP probes and
reads it three ways:

a) ``probe.parse_frame`` per frame (dpkt objects: the reference parser);
b) ``pcapkeys.frame_key`` per frame (fixed offsets; tunnels opened in
   place);
c) ``pcapfile.read_pcap`` of the whole file (probe mode), and in
   fingerprint mode (``--fingerprint -d``) for the same frames.

Prints frames/s for each.  A figure, not a test: nothing here asserts on
speed.  Usage::

    python benchmarks/bench_tunnel_keys.py [--packets N]
"""

import argparse
import os
import socket
import struct
import tempfile
import time

import dpkt

from netweaver_agent.core import pcapfile
from netweaver_agent.core import pcapkeys
from netweaver_agent.core import pcapreader
from netweaver_agent.core import probe

SESSION = 4242
T0 = 1_763_900_000_000_000_000
SRC, DST = socket.inet_aton('198.18.0.1'), socket.inet_aton('198.18.0.10')
UNDER = socket.inet_aton('198.18.255.1'), socket.inet_aton('198.18.255.2')
MAC_A, MAC_B = bytes.fromhex('020000000001'), bytes.fromhex('020000000002')
OVN_OPTION = struct.pack('!HBB', 0x0102, 0x80, 1) + b'\x00\x01\x00\x02'


def udp_ipv4(payload, dport):
    """``payload`` in UDP/IPv4/Ethernet between two tunnel endpoints (the
    checksums are not checked by any reader here)."""
    udp = struct.pack('!HHHH', 54321, dport, 8 + len(payload), 0) + payload
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 0, 0, 64, 17,
                     0, *UNDER) + udp
    return MAC_B + MAC_A + b'\x08\x00' + ip


def carriages():
    def vxlan(f):
        return udp_ipv4(struct.pack('!B3xI', 0x08, 4242 << 8) + f, 4789)

    def geneve(options):
        def wrap(f):
            head = struct.pack('!BBHI', len(options) // 4, 0,
                               dpkt.ethernet.ETH_TYPE_TEB,
                               4242 << 8)
            return udp_ipv4(head + options + f, 6081)
        return wrap
    return {'plain': lambda f: f, 'vxlan': vxlan,
            'geneve+8': geneve(OVN_OPTION),
            'geneve+24': geneve(OVN_OPTION * 3)}


def write_pcap(path, frames):
    rec = struct.Struct('<IIII')
    chunks = [struct.pack('<IHHiIII', pcapreader.PCAP_MAGIC_NS, 2, 4, 0, 0,
                          65535, 1)]
    for i, f in enumerate(frames):
        sec, ns = divmod(T0 + i * 10_000, 10 ** 9)
        chunks.append(rec.pack(sec, ns, len(f), len(f)) + f)
    with open(path, 'wb') as out:
        out.write(b''.join(chunks))


def rate(n, func):
    start = time.perf_counter()
    func()
    return n / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--packets', type=int, default=100_000)
    args = parser.parse_args()
    n = args.packets
    inner = [probe.build_frame('icmp', SESSION, seq, SRC, DST, MAC_A, MAC_B)
             for seq in range(n)]
    print(f'{n} ICMP probes per carriage; frames/s (thousands)')
    print(f'{"carriage":<12}{"parse_frame":>12}{"frame_key":>12}'
          f'{"read_pcap":>12}{"fingerprint":>12}')
    with tempfile.TemporaryDirectory(prefix='nw-bench-') as tmp:
        for name, wrap in carriages().items():
            frames = [wrap(f) for f in inner]
            path = os.path.join(tmp, f'{name}.pcap')
            write_pcap(path, frames)
            a = rate(n, lambda: [probe.parse_frame(f) for f in frames])
            b = rate(n, lambda: [pcapkeys.frame_key(f, 0, len(f))
                                 for f in frames])
            c = rate(n, lambda: pcapfile.read_pcap(path))
            d = rate(n, lambda: pcapfile.read_pcap(
                path, fingerprint=True, dst_ip='198.18.0.10'))
            print(f'{name:<12}' + ''.join(f'{x / 1000:>12.0f}'
                                          for x in (a, b, c, d)))


if __name__ == '__main__':
    main()
