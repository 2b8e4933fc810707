"""A cycle's link table: ``ip -j link show`` + JSON against one rtnetlink dump.

Each polling cycle the topology reads the links of the host (or of the
capture namespace): names, masters, veth peers.  This builds a namespace
of its own holding N veth links (N/2 pairs, no address), then times the
CPU of one read, user and system (the kernel's work of a dump is system
time of whoever reads it), of this process (all its threads) and its
children (``getrusage``):

* ``ip``: ``ip -n NS -j link show`` plus :class:`topology.IpLinks`
  parsing its JSON here;
* ``ip netns exec``: the same through ``ip netns exec NS ip -j link
  show``, as the agent ran it for a capture namespace before;
* ``rtnl``: :class:`topology.IpLinks` from one in-process rtnetlink dump
  (:mod:`netweaver_agent.agent.rtnl`: socket, parse, table);

the median of ``--repeat`` reads, and the ratio to ``rtnl``.  The
namespace is removed at the end, also on failure.  Needs root.  A
figure, not a test: tests/functional/test_rtnl.py checks both give the
same table.  Usage::

    python benchmarks/bench_links.py [--links 128 1000] [--repeat 20]
"""

import argparse
import os
import resource
import secrets
import statistics
import subprocess

from netweaver_agent.agent import topology
from netweaver_agent.core import netns


def build(ns, links):
    subprocess.run(['ip', 'netns', 'add', ns], check=True)
    batch = ''.join(f'link add b{n}a type veth peer name b{n}b\n'
                    for n in range(links // 2))
    subprocess.run(['ip', '-n', ns, '-batch', '-'], input=batch, text=True,
                   check=True, timeout=600)


def usage():
    """``(user, system)`` CPU seconds of this process and its children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + kids.ru_utime, own.ru_stime + kids.ru_stime)


def cpu_of(read, repeat):
    """Median ``(total, user, system)`` CPU seconds of ``read()``, this
    process (all its threads) and its children."""
    runs = []
    for _ in range(repeat):
        user, system = usage()
        read()
        after = usage()
        runs.append((after[0] - user, after[1] - system))
    return (statistics.median(user + system for user, system in runs),
            statistics.median(user for user, _ in runs),
            statistics.median(system for _, system in runs))


def by_ip(argv, ns):
    text = subprocess.run(argv, check=True, capture_output=True, text=True,
                          timeout=60).stdout
    return topology.IpLinks(text=text, where=ns)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--links', type=int, nargs='+', default=[128, 1000])
    parser.add_argument('--repeat', type=int, default=20)
    args = parser.parse_args()
    for links in args.links:
        ns = f'nwbenchlinks{os.getpid()}{secrets.token_hex(2)}'
        try:
            build(ns, links)
            count = len(topology.IpLinks(ns).names())
            reads = {
                'ip': lambda: by_ip(['ip', '-n', ns, '-j', 'link', 'show'],
                                    ns),
                'ip netns exec': lambda: by_ip(
                    netns.netns_argv(ns, ['ip', '-j', 'link', 'show']), ns),
                'rtnl': lambda: topology.IpLinks(ns),
            }
            cpu = {name: cpu_of(read, args.repeat)
                   for name, read in reads.items()}
        finally:
            subprocess.run(['ip', 'netns', 'del', ns], check=False)
        print(f'{count} links ({links // 2} veth pairs), median of '
              f'{args.repeat} reads, CPU per read:')
        for name, (total, user, system) in cpu.items():
            print(f'  {name:>14}: {total * 1e3:8.2f} ms (user '
                  f'{user * 1e3:6.2f}, system {system * 1e3:6.2f})   '
                  f'{total / cpu["rtnl"][0]:5.1f}x rtnl')


if __name__ == '__main__':
    main()
