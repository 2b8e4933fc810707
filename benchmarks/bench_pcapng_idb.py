"""pcapng files of many unnamed interface blocks: time against size.

Writes pcapng files of N interface blocks without ``if_name`` (each becomes
an interface of its own, ``<file>#i``) followed by N enhanced packet blocks
in runs of 16 that name several of them, then reads each with
:func:`pcapfile.read_pcap`.  Prints the time for 8k and 32k blocks (by
default) and their ratio: about 4 when the cost per block is constant, 16
when it grows with the number of interfaces (quadratic; 8k took 1.07 s and
32k 19.6 s before the fix).  A figure, not a test: the unit test
``test_pcapng_many_unnamed_interfaces_cost_the_same_per_block`` counts
the work instead.  Usage::

    python benchmarks/bench_pcapng_idb.py [--blocks 8192 32768] [--repeat 3]
"""

import argparse
import os
import struct
import tempfile
import time

from netweaver_agent.core import pcapfile
from netweaver_agent.core import pcapngreader
from netweaver_agent.core import probe

SESSION = 4242
T0_US = 1_763_900_000_000_000


def _block(btype, body):
    n = 12 + len(body)
    return struct.pack('<II', btype, n) + body + struct.pack('<I', n)


def write(path, n):
    """``n`` unnamed interface blocks, then ``n`` packets in runs of 16."""
    shb = struct.pack('<IIIHHq', pcapngreader.PCAPNG_SHB, 28,
                      pcapngreader.PCAPNG_BOM, 1, 0, -1)
    shb += struct.pack('<I', 28)
    idb = _block(pcapngreader.PCAPNG_IDB, struct.pack('<HHI', 1, 0, 65535))
    frame = probe.build_frame('icmp', SESSION, 0, bytes([198, 18, 0, 1]),
                              bytes([198, 18, 0, 10]), bytes(6), bytes(6))
    out = [shb, idb * n]
    for run in range(n // 16):
        f = frame + bytes(4 * (run % 2))       # runs alternate lengths
        pad = bytes(-len(f) % 4)
        for j in range(16):
            ts = T0_US + run * 16 + j
            out.append(_block(pcapngreader.PCAPNG_EPB, struct.pack(
                '<IIIII', (run + j) % 3, ts >> 32, ts & 0xffffffff, len(f),
                len(f)) + f + pad))
    with open(path, 'wb') as fh:
        fh.write(b''.join(out))
    return os.path.getsize(path)


def best_of(path, repeat):
    best = None
    for _ in range(repeat):
        t = time.perf_counter()
        pcapfile.read_pcap(path)
        dt = time.perf_counter() - t
        best = dt if best is None else min(best, dt)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--blocks', type=int, nargs=2, default=(8192, 32768),
                    metavar=('SMALL', 'LARGE'))
    ap.add_argument('--repeat', type=int, default=3)
    args = ap.parse_args()
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.blocks:
            path = os.path.join(tmp, f'idb{n}.pcapng')
            size = write(path, n)
            t = best_of(path, args.repeat)
            times.append(t)
            print(f'{n:7d} interface blocks + {n // 16 * 16} packets '
                  f'({size / 1024:.0f} KiB): {t * 1000:8.1f} ms '
                  f'({t / n * 1e6:.2f} µs per interface block)')
    small, large = args.blocks
    print(f'ratio {large}/{small} blocks: {large / small:.1f}x the blocks, '
          f'{times[1] / times[0]:.2f}x the time (linear: ~{large / small:.0f}'
          f', quadratic: ~{(large / small) ** 2:.0f})')


if __name__ == '__main__':
    main()
