"""Passive capture CPU per sampled packet beside probe capture's, one run.

Uses bench_capture's two namespaces (generator and capture, one veth pair,
198.19.250.0/29) and its generator of probe-shaped frames (ICMP echo of one
session to a MAC nobody has).  In the capture namespace two readers see
the same packets at the same time:

* ``ring``: :class:`capture.LiveCapture` (probe mode's capture, ring);
* ``passive``: :class:`passivecapture.PassiveCapture` keeping every flow
  (sample 1: each of these packets is a sampled packet), headers only,
  each kept packet turned into a :class:`passive.Sighting`.

CPU is each process's kernel CPU clock over the traffic (close included),
divided by the packets its socket got.  Bounded in time and count;
namespaces removed on exit.  Run as root::

    .venv/bin/python benchmarks/bench_passive.py [--pps 8000] [--seconds 4]

Issue 14's target: passive <= 1.5x the ring's CPU per packet.
"""

import argparse
import json
import os
import secrets
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_capture as bc  # noqa: E402

TARGET_RATIO = 1.5


def worker(mode, session, expected):
    if mode == 'ring':
        return bc.worker('ring', session, expected)
    from netweaver_agent.core import passivecapture
    cap = passivecapture.PassiveCapture(1, cap=expected)
    cap.open()
    print('ready', flush=True)
    sys.stdin.readline()
    cap.close()
    s = cap.stats
    print(json.dumps({'reader': 'passive', 'packets': s.packets,
                      'drops': s.drops, 'kept': s.kept,
                      'over_cap': s.over_cap}), flush=True)
    sys.stdin.readline()
    return 0


def phase(nss, pps, burst, seconds):
    session = secrets.randbelow(0xfffe) + 1
    me = [sys.executable, os.path.abspath(__file__)]
    expected = int(pps * seconds) + 1000
    procs = {m: subprocess.Popen(
        bc._in(nss.cap, me + ['--worker', m, '--session', str(session),
                              '--expected', str(expected)]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for m in ('ring', 'passive')}
    try:
        for m, p in procs.items():
            if p.stdout.readline().strip() != 'ready':
                raise RuntimeError(f'{m} reader did not start')
        time.sleep(0.2)
        cpu0 = {m: bc.cpu_ns(p.pid) for m, p in procs.items()}
        gen = subprocess.run(
            bc._in(nss.gen, [sys.executable, bc.__file__, '--generate',
                             '--session', str(session), '--pps', str(pps),
                             '--burst', str(burst), '--seconds',
                             str(seconds)]),
            capture_output=True, text=True, timeout=seconds + 60,
            check=True)
        sent = json.loads(gen.stdout)
        time.sleep(0.1)
        out = {}
        for m, p in procs.items():
            p.stdin.write('stop\n')
            p.stdin.flush()
            out[m] = json.loads(p.stdout.readline())
            out[m]['cpu_s'] = (bc.cpu_ns(p.pid) - cpu0[m]) / 1e9
            p.stdin.write('exit\n')
            p.stdin.flush()
            p.wait(timeout=30)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return sent, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--pps', type=int, default=8000)
    parser.add_argument('--burst', type=int, default=4)
    parser.add_argument('--seconds', type=float, default=4.0)
    parser.add_argument('--worker', choices=['ring', 'passive'],
                        help=argparse.SUPPRESS)
    parser.add_argument('--session', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--expected', type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.session, args.expected)
    if not 0 < args.seconds <= 60 or not 0 < args.pps <= 200_000:
        parser.error('--seconds within (0, 60], --pps within (0, 200000]')
    nss = bc.Namespaces()
    load0 = bc._load()
    try:
        nss.build()
        sent, out = phase(nss, args.pps, args.burst, args.seconds)
    finally:
        nss.teardown()
    load1 = bc._load()
    print(f'load average before {load0}, after {load1} '
          f'({os.cpu_count()} CPUs)')
    print(f"{sent['sent']} probe-shaped packets in {sent['seconds']:.2f} s")
    per = {}
    for m in ('ring', 'passive'):
        x = out[m]
        got = x['packets'] - x['drops']
        per[m] = x['cpu_s'] * 1e6 / max(got, 1)
        print(f"  {m:8} {per[m]:7.2f} us CPU/packet ({x['cpu_s'] * 1000:.1f}"
              f" ms over {got} packets, {x['drops']} dropped)")
    print(f"  passive/ring {per['passive'] / per['ring']:.2f}x "
          f"(target <= {TARGET_RATIO}x)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
