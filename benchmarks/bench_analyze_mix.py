"""Reading everyday traffic: ``netweaver analyze`` beside ``tcpdump``.

Writes its own capture of N records (default 1,000,000) of the traffic a
pif carries besides probes -- TCP with options (data, ACKs, handshakes,
resets), UDP (DNS and others), ICMP echo, ARP, IPv6 (TCP, UDP, ICMPv6),
802.1Q-tagged frames, lengths 60-1514, a fifth of it to or from the
instance -- as a nanosecond pcap, and the instance's share of it as the
vif's capture (7 µs later).  Then times:

a) ``pcapfile.read_capture`` in probe mode (``analyze`` without ``-d``);
b) the same with fingerprints of the rest (auto mode with ``-d``: one
   read);
c) fingerprint mode alone (``--fingerprint -d``);
d) the whole command, ``netweaver analyze --json PIF VIF -d IP``;
e) ``tcpdump -r PIF -w /dev/null`` (reading and writing every record, no
   decoding: the floor of any reader).

a)-c) and e) run on the pcap and on the same records as pcapng
(``epb_flags`` on every block, as dumpcap writes).

Prints wall and CPU seconds and records/s (by CPU time: on a loaded
machine wall time mostly measures the neighbours).  A figure, not a
test: nothing here asserts on speed.  ``--python DIR`` runs a)-c) with
the package found in DIR instead (e.g. an older commit from ``git
archive``), for a before/after figure.  Usage::

    python benchmarks/bench_analyze_mix.py [--packets N] [--keep DIR]
"""

import argparse
import os
import random
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

T0 = 1_763_900_000_000_000_000
GUEST = '198.18.0.10'
HOSTS = ['198.18.0.%d' % i for i in range(20, 60)]
HOSTS6 = ['2001:2::%x' % i for i in range(0x20, 0x40)]
GUEST6 = '2001:2::a'
MACS = [bytes([2, 0, 0, 0, 0, i]) for i in range(1, 30)]
POOL = 4096


def _csum(data):
    if len(data) % 2:
        data += b'\0'
    s = sum(struct.unpack('!%dH' % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff


def ipv4(src, dst, proto, payload, ip_id):
    head = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(payload), ip_id,
                       0x4000, 64, proto, 0, socket.inet_aton(src),
                       socket.inet_aton(dst))
    head = head[:10] + struct.pack('!H', _csum(head)) + head[12:]
    return 0x0800, head + payload


def ipv6(src, dst, nxt, payload):
    return 0x86dd, struct.pack(
        '!IHBB16s16s', 6 << 28, len(payload), nxt, 64,
        socket.inet_pton(socket.AF_INET6, src),
        socket.inet_pton(socket.AF_INET6, dst)) + payload


def tcp(sport, dport, seq, ack, flags, data=b''):
    # Options: NOP NOP timestamps (12 bytes), as Linux sends them.
    opts = b'\x01\x01\x08\x0a' + struct.pack('!II', seq & 0xffff, 7)
    return struct.pack('!HHIIBBHHH', sport, dport, seq, ack, 0x80, flags,
                       502, 0, 0) + opts + data


def udp(sport, dport, data):
    return struct.pack('!HHHH', sport, dport, 8 + len(data), 0) + data


def ethernet(etype_payload, rnd, vlan=None):
    etype, payload = etype_payload
    dst, src = rnd.sample(MACS, 2)
    tag = b'' if vlan is None else struct.pack('!HH', 0x8100, vlan)
    frame = dst + src + tag + struct.pack('!H', etype) + payload
    return frame + bytes(max(0, 60 - len(frame)))


def everyday_frame(rnd):
    """One frame of the mix; True when the instance sent or gets it."""
    ours = rnd.random() < 0.2
    peer, other = rnd.choice(HOSTS), rnd.choice(HOSTS)
    a, b = (peer, GUEST) if ours else (peer, other)
    if rnd.random() < 0.5:
        a, b = b, a
    pick = rnd.random()
    sport, dport = rnd.randrange(32768, 61000), rnd.choice([22, 80, 443])
    seq, ack = rnd.randrange(1 << 32), rnd.randrange(1 << 32)
    if pick < 0.45:         # TCP data, 66..1514 bytes on the wire
        size = rnd.choice([rnd.randrange(1, 1448), 1448, 1448])
        ip = ipv4(a, b, 6, tcp(sport, dport, seq, ack, 0x18,
                               rnd.randbytes(size)), rnd.randrange(65536))
    elif pick < 0.60:       # pure ACKs
        ip = ipv4(a, b, 6, tcp(sport, dport, seq, ack, 0x10),
                  rnd.randrange(65536))
    elif pick < 0.63:       # handshakes and resets
        flags = rnd.choice([0x02, 0x12, 0x14, 0x04, 0x11])
        ip = ipv4(a, b, 6, tcp(sport, dport, seq, ack, flags),
                  rnd.randrange(65536))
    elif pick < 0.73:       # UDP: DNS, NTP, syslog
        port = rnd.choice([53, 123, 514, 5353])
        ip = ipv4(a, b, 17, udp(rnd.randrange(1024, 65536), port,
                                rnd.randbytes(rnd.randrange(20, 400))),
                  rnd.randrange(65536))
    elif pick < 0.78:       # ping
        ip = ipv4(a, b, 1, struct.pack('!BBHHH', rnd.choice([0, 8]), 0, 0,
                                       77, rnd.randrange(65536)) +
                  rnd.randbytes(56), rnd.randrange(65536))
    elif pick < 0.81:       # ARP
        return ethernet((0x0806, struct.pack(
            '!HHBBH6s4s6s4s', 1, 0x0800, 6, 4, 1, MACS[0],
            socket.inet_aton(a), bytes(6), socket.inet_aton(b))), rnd), ours
    else:                   # IPv6
        a6, b6 = (rnd.choice(HOSTS6), GUEST6 if ours else rnd.choice(HOSTS6))
        kind = rnd.random()
        if kind < 0.6:
            ip = ipv6(a6, b6, 6, tcp(sport, dport, seq, ack, 0x18,
                                     rnd.randbytes(rnd.randrange(1, 1428))))
        elif kind < 0.8:
            ip = ipv6(a6, b6, 17, udp(sport, 53, rnd.randbytes(60)))
        else:
            ip = ipv6(a6, b6, 58, struct.pack('!BBHHH', 128, 0, 0, 9,
                                              rnd.randrange(65536)) +
                      rnd.randbytes(56))
    vlan = rnd.randrange(1, 4095) if rnd.random() < 0.09 else None
    return ethernet(ip, rnd, vlan), ours


def write_mix(path, vif_path, n, seed=15):
    """The pif capture of ``n`` records and the vif's share of it."""
    rnd = random.Random(seed)
    pool = [everyday_frame(rnd) for _ in range(POOL)]
    head = struct.pack('<IHHiIII', 0xa1b23c4d, 2, 4, 0, 0, 262144, 1)
    rec = struct.Struct('<IIII')
    with open(path, 'wb') as pif, open(vif_path, 'wb') as vif:
        pif.write(head)
        vif.write(head)
        t = T0
        chunk, vchunk = [], []
        for i in range(n):
            frame, ours = pool[rnd.randrange(POOL)]
            t += rnd.randrange(200, 2000)
            sec, ns = divmod(t, 10 ** 9)
            chunk.append(rec.pack(sec, ns, len(frame), len(frame)) + frame)
            if ours:
                sec, ns = divmod(t + 7_000, 10 ** 9)
                vchunk.append(rec.pack(sec, ns, len(frame), len(frame)) +
                              frame)
            if len(chunk) >= 65536:
                pif.write(b''.join(chunk))
                vif.write(b''.join(vchunk))
                chunk, vchunk = [], []
        pif.write(b''.join(chunk))
        vif.write(b''.join(vchunk))


def write_pcapng(pcap_path, path):
    """The same records as pcapng (one interface, ns resolution), each
    enhanced packet block with an ``epb_flags`` option (in/out
    alternating), as dumpcap writes them: blocks of every length."""
    data = open(pcap_path, 'rb').read()
    shb = struct.pack('<IIIHHqI', 0x0a0d0d0a, 28, 0x1a2b3c4d, 1, 0, -1, 28)
    body = struct.pack('<HHI', 1, 0, 262144) + struct.pack(
        '<HHB3xHH', 9, 1, 9, 0, 0)
    idb = struct.pack('<II', 1, 12 + len(body)) + body + struct.pack(
        '<I', 12 + len(body))
    head = struct.Struct('<IIII')
    with open(path, 'wb') as out:
        out.write(shb + idb)
        o, i, chunk = 24, 0, []
        while o < len(data):
            sec, ns, cap, orig = head.unpack_from(data, o)
            frame = data[o + 16:o + 16 + cap]
            o += 16 + cap
            ts = sec * 10 ** 9 + ns
            opts = struct.pack('<HHIHH', 2, 4, 1 + i % 2, 0, 0)
            blen = 32 + cap + (-cap) % 4 + len(opts)
            chunk.append(struct.pack('<IIIIIII', 6, blen, 0, ts >> 32,
                                     ts & 0xffffffff, cap, orig) + frame +
                         bytes((-cap) % 4) + opts + struct.pack('<I', blen))
            i += 1
            if len(chunk) >= 65536:
                out.write(b''.join(chunk))
                chunk = []
        out.write(b''.join(chunk))


_READERS = r'''
import sys, time
from netweaver_agent.core import pcapfile
path, n = sys.argv[1], int(sys.argv[2])
modes = [('a) probes (analyze)', {}),
         ('b) probes + fingerprints (analyze -d, one read)',
          dict(fingerprint=True, dst_ip='198.18.0.10')),
         ('c) fingerprints (analyze --fingerprint -d)',
          dict(fingerprint=True, dst_ip='198.18.0.10', probes=False))]
try:
    from netweaver_agent.core import pcapwalk
    print('   (record walk: %s)' % ('C' if pcapwalk.compiled() else 'Python'))
except ImportError:
    print('   (record walk: Python, before pcapwalk)')
for name, kw in modes:
    read = getattr(pcapfile, 'read_capture', None)
    if read is None:            # before read_capture: read_pcap only
        if 'b)' in name:
            start, cpu = time.perf_counter(), time.process_time()
            pcapfile.read_pcap(path)
            pcapfile.read_pcap(path, fingerprint=True,
                               dst_ip='198.18.0.10')
            took = time.perf_counter() - start
            cpu = time.process_time() - cpu
            print(f'{name:52s} {took:6.2f} s {cpu:6.2f} s '
                  f'{n / cpu / 1e6:5.2f} M/s (two reads)')
            continue
        kw = {k: v for k, v in kw.items() if k != 'probes'}
        read = pcapfile.read_pcap
    start, cpu = time.perf_counter(), time.process_time()
    read(path, **kw)
    took = time.perf_counter() - start
    cpu = time.process_time() - cpu
    print(f'{name:52s} {took:6.2f} s {cpu:6.2f} s {n / cpu / 1e6:5.2f} M/s')
'''


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--packets', type=int, default=1_000_000)
    parser.add_argument('--keep', metavar='DIR',
                        help='write the captures here and keep them')
    parser.add_argument('--python', metavar='DIR',
                        help='also time a)-c) with the package in DIR')
    args = parser.parse_args()
    tmp = args.keep or tempfile.mkdtemp(prefix='nw-mix-')
    pif, vif = os.path.join(tmp, 'pif.pcap'), os.path.join(tmp, 'vif.pcap')
    try:
        start = time.perf_counter()
        write_mix(pif, vif, args.packets)
        size = os.path.getsize(pif)
        print(f'wrote {args.packets:,} records, {size / 1e6:.0f} MB '
              f'({time.perf_counter() - start:.1f} s); vif share '
              f'{os.path.getsize(vif) / 1e6:.0f} MB')
        ng = os.path.join(tmp, 'pif.pcapng')
        write_pcapng(pif, ng)
        print(f'and as pcapng (epb_flags on every block): '
              f'{os.path.getsize(ng) / 1e6:.0f} MB')
        n = args.packets
        env = dict(os.environ)
        print(f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} '
              'CPUs')
        print(f'{"":52s} {"wall":>8s} {"CPU":>8s} {"by CPU":>9s}')
        for name, path in (('pcap', pif), ('pcapng', ng)):
            # Before and after in turn, so both meet the same load.
            print(f'{name}, this tree:')
            # From the capture's directory: '' on sys.path must not be a
            # tree.
            subprocess.run([sys.executable, '-c', _READERS, path, str(n)],
                           check=True, env=env, cwd=tmp)
            print(f'{name}, this tree with the Python loops '
                  '(NETWEAVER_PCAPWALK=python):')
            subprocess.run([sys.executable, '-c', _READERS, path, str(n)],
                           check=True, cwd=tmp,
                           env={**env, 'NETWEAVER_PCAPWALK': 'python'})
            if args.python:
                print(f'{name}, package in {args.python}:')
                subprocess.run([sys.executable, '-c', _READERS, path,
                                str(n)], check=True, cwd=tmp,
                               env={**env, 'PYTHONPATH': args.python})
        start, cpu = time.perf_counter(), _children_cpu()
        proc = subprocess.run([sys.executable, '-m',
                               'netweaver_agent.cli.main',
                               'analyze', '--json', pif, vif, '-d', GUEST],
                              capture_output=True, text=True)
        took, cpu = time.perf_counter() - start, _children_cpu() - cpu
        print(f'{"d) netweaver analyze --json PIF VIF -d IP":52s} '
              f'{took:6.2f} s {cpu:6.2f} s (both files, exit '
              f'{proc.returncode})')
        tcpdump = shutil.which('tcpdump')
        if tcpdump is None:
            print('e) tcpdump: not installed')
            return
        for name, path in (('PIF', pif), ('PIF.pcapng', ng)):
            start, cpu = time.perf_counter(), _children_cpu()
            subprocess.run([tcpdump, '-r', path, '-w', '/dev/null'],
                           check=True, capture_output=True)
            took, cpu = time.perf_counter() - start, _children_cpu() - cpu
            label = f'e) tcpdump -r {name} -w /dev/null'
            print(f'{label:52s} {took:6.2f} s {cpu:6.2f} s '
                  f'{n / cpu / 1e6:5.2f} M/s')
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
