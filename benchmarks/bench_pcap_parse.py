"""How fast a capture file becomes sightings: three ways, one run each.

Writes a pcap (nanosecond timestamps) of N ICMP probes, then reads it:

a) per-packet dpkt objects: ``dpkt.pcap.Reader`` + ``Ethernet`` + the
   probe's key from the decoded packet (``probe.parse_ip_key``);
b) our fast path: ``pcapfile.read_pcap`` (columns);
c) the seed's way: ``tcpdump -tttt -nn -r FILE`` as text, each line split
   into columns, sequence number and timestamp picked out.

Prints packets/s for each and the ratios b/a and b/c, and for reference
dpkt's reader alone (records, no decoding, no keys).  A figure, not a
test: nothing here asserts on speed.  Usage::

    python benchmarks/bench_pcap_parse.py [--packets N] [--keep FILE]
"""

import argparse
import datetime
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

import dpkt

from netweaver_agent.core import pcapfile
from netweaver_agent.core import pcapreader
from netweaver_agent.core import probe

SESSION = 4242
T0 = 1_763_900_000_000_000_000


def write_probes(path, n):
    """``n`` ICMP echo probes, 10 µs apart, valid checksums."""
    src, dst = socket.inet_aton('198.18.0.1'), socket.inet_aton('198.18.0.10')
    mac_a, mac_b = bytes.fromhex('020000000001'), bytes.fromhex('020000000002')
    template = bytearray(probe.build_frame('icmp', SESSION, 0, src, dst,
                                           mac_a, mac_b))
    rec = struct.Struct('<IIII')
    size = len(template)
    chunks = [struct.pack('<IHHiIII', pcapreader.PCAP_MAGIC_NS, 2, 4, 0, 0,
                          65535, 1)]
    for seq in range(n):
        f = template
        struct.pack_into('!H', f, 18, seq & 0xffff)          # IP id
        struct.pack_into('!H', f, 24, 0)
        struct.pack_into('!H', f, 24, dpkt.in_cksum(bytes(f[14:34])))
        struct.pack_into('!H', f, 40, seq & 0xffff)          # echo seq
        struct.pack_into('!I', f, 48, seq)                   # tag seq
        struct.pack_into('!H', f, 36, 0)
        struct.pack_into('!H', f, 36, dpkt.in_cksum(bytes(f[34:])))
        sec, ns = divmod(T0 + seq * 10_000, 10 ** 9)
        chunks.append(rec.pack(sec, ns, size, size) + bytes(f))
        if len(chunks) > 65536:
            _flush(path, chunks)
            chunks = []
    _flush(path, chunks)


def _flush(path, chunks):
    with open(path, 'ab') as f:
        f.write(b''.join(chunks))


def per_packet_dpkt(path):
    keys, times = [], []
    with open(path, 'rb') as f:
        for ts, buf in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(buf)
            key = probe.parse_ip_key(eth.data) \
                if isinstance(eth.data, dpkt.ip.IP) else None
            if key is not None:
                keys.append(key.as_int())
                times.append(int(ts * 10 ** 9))       # ts is a Decimal
    return len(keys)


def dpkt_reader_alone(path):
    """Reference: dpkt's record loop with no decoding at all."""
    with open(path, 'rb') as f:
        return sum(1 for _ in dpkt.pcap.Reader(f))


def fast_path(path):
    return pcapfile.read_pcap(path).probes


def seed_way(path):
    """tcpdump's text, split into columns (the seed's ``analyze()``).

    tcpdump prints local time; the benchmark runs with TZ=UTC.
    """
    out = subprocess.run(
        ['tcpdump', '-tttt', '-nn', '--time-stamp-precision=nano', '-r',
         path], capture_output=True, text=True, check=True).stdout
    seen = {}
    lines = 0
    for line in out.splitlines():
        cols = line.split()
        # 2025-11-23 12:53:20.000000000 IP a > b: ICMP echo request, id 4242,
        # seq 7, length 44  (the ICMP sequence: 16 bits, it wraps)
        seq = int(cols[12].rstrip(','))
        day = datetime.datetime.strptime(cols[0], '%Y-%m-%d')
        hms, frac = cols[1].split('.')
        h, m, s = map(int, hms.split(':'))
        t_ns = (int(day.replace(tzinfo=datetime.timezone.utc).timestamp()) +
                h * 3600 + m * 60 + s) * 10 ** 9 + int(frac)
        seen[seq] = t_ns
        lines += 1
    return lines


def timed(func, path):
    start = time.perf_counter()
    count = func(path)
    return count, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--packets', type=int, default=1_000_000)
    parser.add_argument('--keep', metavar='FILE',
                        help='write the pcap here and keep it')
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix='bench-pcap-')
    try:
        path = args.keep or os.path.join(tmp, 'probes.pcap')
        if os.path.exists(path):
            os.unlink(path)
        start = time.perf_counter()
        write_probes(path, args.packets)
        print(f'wrote {args.packets} probes ({os.path.getsize(path)} '
              f'bytes) in {time.perf_counter() - start:.1f} s; '
              f'{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, '
              f'dpkt {dpkt.__version__}')
        rates = {}
        for label, func in (('a) per-packet dpkt objects', per_packet_dpkt),
                            ('b) pcapfile fast path', fast_path),
                            ('c) seed: tcpdump -tttt text', seed_way)):
            count, secs = timed(func, path)
            rates[label[0]] = args.packets / secs
            print(f'{label:32s} {count:>9d} sightings in {secs:7.2f} s: '
                  f'{args.packets / secs / 1e6:6.3f} M packets/s')
        count, secs = timed(dpkt_reader_alone, path)
        print(f'{"(reference: dpkt reader alone)":32s} {count:>9d} records '
              f'in {secs:7.2f} s:    {args.packets / secs / 1e6:6.3f} M/s')
        print(f'b/a = {rates["b"] / rates["a"]:.1f}x   '
              f'b/c = {rates["b"] / rates["c"]:.1f}x')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
