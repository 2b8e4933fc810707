"""What the optional C extension ``_probebuild`` saves per probe window.

Two costs of a polling cycle that are arithmetic on the probes, each timed
with the extension and with the Python loops (``probe._probebuild`` set to
None), in one run:

a) building the IPv4 probes: :class:`probe.V4Builder` ``build`` for every
   destination of a window (``--vnics`` x ``--probes``, ICMP or UDP, with
   a secret), and the whole of the daemon's :func:`sources.build_packets`
   of the window's scheduled plan;
b) the matcher's expected auths: a :class:`latency.Matcher` fed one
   window's sightings (pif in, vif out, reply vif in, reply pif out per
   probe) with the window's secret, and, alone,
   :meth:`probe.Tagger.expected_many` over every vNIC's planned probes.

Prints the median thread CPU time (ms) of each, the per-probe µs and the
ratio.  A figure, not a test: nothing here asserts on speed.  Usage::

    python benchmarks/bench_probebuild.py [--vnics 64] [--probes 50]
"""

import argparse
import os
import socket
import statistics
import time

from netweaver_agent.core import latency
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from netweaver_agent.core import sources
from netweaver_agent.core import vifpath

SESSION = 4242
SRC = socket.inet_aton('198.19.0.1')


def cpu_ms(func, repeat):
    """Median thread CPU time of ``func()`` (ms)."""
    times = []
    for _ in range(repeat):
        start = time.thread_time()
        func()
        times.append(time.thread_time() - start)
    return statistics.median(times) * 1e3


def window(vnics, probes):
    """``(addresses, {vif: [seq]})`` of a window: probe ``n`` of each
    vNIC in turn, as the scheduler interleaves them."""
    addresses = {f'tap{i}': f'198.18.{1 + i // 200}.{1 + i % 200}'
                 for i in range(vnics)}
    seqs = {v: [] for v in addresses}
    seq = 1
    for _ in range(probes):
        for v in addresses:
            seqs[v].append(seq)
            seq += 1
    return addresses, seqs


def build_all(proto, secret, addresses, seqs):
    builder = probe.V4Builder(proto, SESSION, secret=secret)
    for v, address in addresses.items():
        builder.build(seqs[v], SRC, socket.inet_aton(address))


def plan_of(proto, secret, addresses, probes):
    return sources.schedule(SESSION, proto, list(addresses.values()),
                            probes, 10**6, budget_ns=10**12,
                            secret=secret).plan


def sightings_of(proto, secret, addresses, seqs):
    """One window's sightings: each probe and its answer on pif and vif,
    with the auths a genuine capture reads."""
    batch = sightings.SightingBatch(SESSION)
    pif = batch.interface_index('eth1')
    for v, address in addresses.items():
        vif = batch.interface_index(v)
        dst = socket.inet_aton(address)
        for n, seq in enumerate(seqs[v]):
            auth = probe.expected_auth(secret, proto, SESSION, seq, dst)
            t = 1000 * seq
            for key, where, dt, direction in (
                    (seq << 1, pif, 0, sightings.DIR_IN),
                    (seq << 1, vif, 10, sightings.DIR_OUT),
                    (seq << 1 | 1, vif, 50, sightings.DIR_IN),
                    (seq << 1 | 1, pif, 53, sightings.DIR_OUT)):
                batch.append(key, where, t + dt, direction, auth)
    return batch


def match(proto, secret, addresses, seqs, batch):
    paths = [vifpath.VifPath(v, None, ('eth1', v)) for v in addresses]
    plan = {s: v for v, numbers in seqs.items() for s in numbers}
    m = latency.Matcher(SESSION, paths, plan, 10**9, protocol=proto,
                        secret=secret, addresses=addresses)
    m.feed_batch(batch)
    return m


def expected_all(proto, secret, addresses, seqs):
    tagger = probe.Tagger(secret, proto, SESSION)
    for v, address in addresses.items():
        tagger.expected_many(seqs[v], socket.inet_aton(address))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--vnics', type=int, default=64)
    parser.add_argument('--probes', type=int, default=50)
    parser.add_argument('--proto', choices=('icmp', 'udp'), default='icmp')
    parser.add_argument('--repeat', type=int, default=15)
    args = parser.parse_args()
    extension = probe._probebuild
    if extension is None:
        raise SystemExit('netweaver_agent.core._probebuild was not built '
                         '(python setup.py build_ext --inplace)')
    secret = os.urandom(probe.SECRET_LEN)
    addresses, seqs = window(args.vnics, args.probes)
    n = args.vnics * args.probes
    batch = sightings_of(args.proto, secret, addresses, seqs)
    plan = plan_of(args.proto, secret, addresses, args.probes)
    cases = {
        'build (V4Builder.build)':
            lambda: build_all(args.proto, secret, addresses, seqs),
        'daemon build (sources.build_packets)':
            lambda: sources.build_packets(plan, lambda dst: '198.19.0.1'),
        'expected auths (Tagger.expected_many)':
            lambda: expected_all(args.proto, secret, addresses, seqs),
        'matcher (Matcher + feed_batch)':
            lambda: match(args.proto, secret, addresses, seqs, batch),
    }
    print(f'{args.vnics} vNICs x {args.probes} probes = {n} {args.proto} '
          f'probes, {len(batch)} sightings; median CPU of {args.repeat}')
    for name, func in cases.items():
        figures = {}
        for path, module in (('python', None), ('C', extension)):
            probe._probebuild = module
            try:
                figures[path] = cpu_ms(func, args.repeat)
            finally:
                probe._probebuild = extension
        print(f'{name:40s} python {figures["python"]:7.2f} ms '
              f'({figures["python"] * 1e3 / n:5.2f} us/probe)   '
              f'C {figures["C"]:7.2f} ms '
              f'({figures["C"] * 1e3 / n:5.2f} us/probe)   '
              f'x{figures["python"] / figures["C"]:.1f}')


if __name__ == '__main__':
    main()
