"""Capture CPU per packet: the TPACKET_V3 ring, recvmsg and tcpdump.

Two network namespaces of its own, joined by a veth pair (addresses in
198.18.0.0/15 only): a *generator* sends probe frames of one session
(ICMP echo, as the agent's) out of its end; in the other, three capture
processes read the same packets at the same time:

* ``ring``: :class:`capture.LiveCapture` reading its receive ring, sized
  as for a 64 vNICs x 50 probes window;
* ``recvmsg``: the same class forced to ``recvmsg`` (``use_ring=False``);
* ``tcpdump -w /dev/null`` with the same snapshot length and buffer.

Each process's CPU is read from its kernel CPU clock (``clock_gettime``
on the process's ``clock_getcpuclockid`` id, ns) just before the traffic
starts and after it stopped (the readers' close included), and divided by
the packets its socket received (the kernel's count less drops).  The
phases: *probe-shaped* (bursts of 4 at ``--pps``, default 8,000/s), then
*blasts* (as fast as the generator sends, for ``--blast-s`` seconds,
bounded in count), which show drops: with all three readers, without
recvmsg, and the ring alone from ``--senders`` generators, one per CPU
(every reader's copy of a packet is made in its sender's softirq, so one
sender with tcpdump beside the ring stays below 450k pps here).  Every
phase is bounded in time and count; the namespaces are removed on exit,
also on failure or Ctrl-C.

Run as root::

    .venv/bin/python benchmarks/bench_capture.py [--pps 8000] [--seconds 4]

Ratios are within one run; the machine's load (``uptime``) is printed next
to the absolute figures.  Targets (issue 13) are printed beside them.
"""

import argparse
import json
import mmap
import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time

TARGETS = {'ring_us_per_packet': 1.5, 'ring_vs_tcpdump': 6.0,
           'blast_drops': 0, 'blast_pps': 450_000, 'blast_s': 5.0}
# As measure.run_window would expect for 64 vNICs x 50 probes on a
# two-interface path: probes and answers on both.
EXPECTED_64x50 = 64 * 50 * 2 * 2
GEN_ADDR, CAP_ADDR, NOBODY = '198.19.250.1', '198.19.250.2', '198.19.250.3'
# Frames go to a MAC nobody has: the capture sees them as the pif sees
# probes for a guest (PACKET_OTHERHOST), the namespace's stack drops them.
GUEST_MAC = bytes.fromhex('02feedbeef01')
MAX_PACKETS = 5_000_000
SNAPLEN = 256
# PACKET_TX_RING (TPACKET_V2): frames of TX_FRAME bytes, the packet at
# TX_DATA (TPACKET2_HDRLEN - sizeof(sockaddr_ll)); status 1 = send it.
SOL_PACKET, PACKET_VERSION, PACKET_TX_RING, TPACKET_V2 = 263, 10, 13, 1
PACKET_QDISC_BYPASS = 20
TX_FRAME, TX_DATA, TX_BLOCK = 2048, 32, 1 << 20


def cpu_ns(pid):
    """CPU time of process ``pid`` (all its threads), in ns."""
    return time.clock_gettime_ns(((~pid) << 3) | 2)


def _load():
    with open('/proc/loadavg', encoding='ascii') as f:
        return ' '.join(f.read().split()[:3])


# -- the capture worker (in the capture namespace) ----------------------------

def worker(mode, session, expected):
    from netweaver_agent.core import capture
    cap = capture.LiveCapture(session, 'icmp', use_ring=mode == 'ring',
                              expected_packets=expected)
    cap.open()
    print('ready', flush=True)
    sys.stdin.readline()                 # the parent says: stop
    cap.close()
    s = cap.stats
    print(json.dumps({'reader': s.reader, 'packets': s.packets,
                      'drops': s.drops, 'probes': s.probes,
                      'foreign': s.foreign}), flush=True)
    sys.stdin.readline()                 # CPU read: may exit
    return 0


# -- the generator (in the generator namespace) -------------------------------

def generate(session, pps, burst, seconds, ifname='eth0'):
    """Send probe frames out of ``ifname``: ``pps`` per second in bursts
    of ``burst`` (0: as fast as possible), for ``seconds``, at most
    MAX_PACKETS.  Prints the number sent."""
    from netweaver_agent.core import probe
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((ifname, 0))
    src_mac = sock.getsockname()[4]
    frames = [probe.build_frame('icmp', session, seq,
                                socket.inet_aton(GEN_ADDR),
                                socket.inet_aton(NOBODY), src_mac, GUEST_MAC)
              for seq in range(1, 4097)]
    send = sock.send
    sent = 0
    start = time.monotonic()
    end = start + seconds
    step = burst / pps if pps else 0.0
    due = start
    i = 0
    while sent < MAX_PACKETS:
        now = time.monotonic()
        if now >= end:
            break
        if step:
            if now < due:
                time.sleep(due - now)
            due += step
        for f in frames[i:i + burst]:
            try:
                send(f)
            except BlockingIOError:
                continue
            sent += 1
        i = (i + burst) % (len(frames) - burst)
    print(json.dumps({'sent': sent, 'seconds': time.monotonic() - start}))
    return 0


def blast(session, seconds, ifname='eth0'):
    """As many probe frames as the kernel takes, out of ``ifname``, for
    ``seconds`` (at most MAX_PACKETS): a PACKET_TX_RING is filled once
    and handed back to the kernel whole, one ``send`` per ring."""
    from netweaver_agent.core import probe
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((ifname, 0))
    src_mac = sock.getsockname()[4]
    sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V2)
    sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
    blocks = 4
    frames = blocks * TX_BLOCK // TX_FRAME
    sock.setsockopt(SOL_PACKET, PACKET_TX_RING, struct.pack(
        'IIII', TX_BLOCK, blocks, TX_FRAME, frames))
    ring = mmap.mmap(sock.fileno(), blocks * TX_BLOCK, mmap.MAP_SHARED,
                     mmap.PROT_READ | mmap.PROT_WRITE)
    for i in range(frames):
        f = probe.build_frame('icmp', session, i + 1,
                              socket.inet_aton(GEN_ADDR),
                              socket.inet_aton(NOBODY), src_mac, GUEST_MAC)
        at = i * TX_FRAME
        struct.pack_into('II', ring, at, 0, len(f))
        ring[at + TX_DATA:at + TX_DATA + len(f)] = f
    ready = b'\x01' * frames
    sent = 0
    start = time.monotonic()
    end = start + seconds
    try:
        while sent < MAX_PACKETS and time.monotonic() < end:
            # Every frame's status (its low byte): send it.
            ring[0::TX_FRAME] = ready
            sock.send(b'')
            while ring[0::TX_FRAME].count(0) != frames:
                # The kernel gives frames back once on the wire.
                time.sleep(0.0001)
            sent += frames
    finally:
        ring.close()
        sock.close()
    print(json.dumps({'sent': sent, 'seconds': time.monotonic() - start}))
    return 0


# -- the parent ---------------------------------------------------------------

def _run(argv, **kwargs):
    return subprocess.run(argv, check=True, capture_output=True, text=True,
                          timeout=30, **kwargs)


class Namespaces:
    """Generator and capture namespaces and their veth pair."""

    def __init__(self):
        tag = f'nwbcap{os.getpid()}{secrets.token_hex(2)}'
        self.gen, self.cap = f'{tag}-gen', f'{tag}-cap'

    def build(self):
        for ns in (self.gen, self.cap):
            _run(['ip', 'netns', 'add', ns])
        _run(['ip', '-n', self.gen, 'link', 'add', 'eth0', 'type', 'veth',
              'peer', 'name', 'eth0', 'netns', self.cap])
        for ns, addr in ((self.gen, GEN_ADDR), (self.cap, CAP_ADDR)):
            _run(['ip', '-n', ns, 'addr', 'add', f'{addr}/29', 'dev',
                  'eth0'])
            _run(['ip', '-n', ns, 'link', 'set', 'eth0', 'up'])
            _run(['ip', '-n', ns, 'link', 'set', 'lo', 'up'])

    def teardown(self):
        for ns in (self.gen, self.cap):
            subprocess.run(['ip', 'netns', 'del', ns], capture_output=True,
                           timeout=30, check=False)


def _in(ns, argv):
    return ['ip', 'netns', 'exec', ns, *argv]


def _start_readers(nss, session, expected, modes, procs, tcpdump=True):
    """Start the readers of ``modes`` (and tcpdump) into ``procs``
    (``{mode: Popen}``, filled as each starts: the caller stops them all,
    also when one fails to start)."""
    me = [sys.executable, os.path.abspath(__file__)]
    for mode in modes:
        procs[mode] = subprocess.Popen(
            _in(nss.cap, me + ['--worker', mode, '--session', str(session),
                               '--expected', str(expected)]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for mode in modes:
        line = procs[mode].stdout.readline()
        if line.strip() != 'ready':
            raise RuntimeError(f'{mode} reader did not start: {line!r}')
    if tcpdump:
        _start_tcpdump(nss, expected, procs)
    time.sleep(0.2)


def _start_tcpdump(nss, expected, procs):
    """Start ``tcpdump -w /dev/null`` into ``procs``, once listening."""
    kib = -(-2 * expected * (SNAPLEN + 96) // 1024)
    procs['tcpdump'] = subprocess.Popen(
        _in(nss.cap, ['tcpdump', '-i', 'eth0', '-nn', '-s', str(SNAPLEN),
                      '-B', str(kib), '-Z', 'root',
                      '--time-stamp-precision=nano', '-w', '/dev/null',
                      'icmp']),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = procs['tcpdump'].stderr
    line = err.readline()
    while line and 'listening on' not in line:
        line = err.readline()
    if not line:
        raise RuntimeError('tcpdump did not start')


def _stop_readers(procs, cpu0):
    out = {}
    for mode in [m for m in ('ring', 'recvmsg') if m in procs]:
        p = procs[mode]
        p.stdin.write('stop\n')
        p.stdin.flush()
        out[mode] = json.loads(p.stdout.readline())
        out[mode]['cpu_s'] = (cpu_ns(p.pid) - cpu0[mode]) / 1e9
        p.stdin.write('exit\n')
        p.stdin.flush()
        p.wait(timeout=30)
    t = procs.get('tcpdump')
    if t is None:
        return out
    cpu = (cpu_ns(t.pid) - cpu0['tcpdump']) / 1e9
    t.send_signal(signal.SIGINT)
    _, err = t.communicate(timeout=30)
    got = re.search(r'(\d+) packets received by filter', err)
    dropped = re.search(r'(\d+) packets dropped by kernel', err)
    received = int(got.group(1)) if got else 0
    drops = int(dropped.group(1)) if dropped else 0
    out['tcpdump'] = {'reader': 'tcpdump -w /dev/null', 'cpu_s': cpu,
                      'packets': received, 'drops': drops}
    return out


def _generate(nss, session, pps, burst, seconds, senders=1):
    """Run ``senders`` generators at once (each pinned to its own CPU
    when more than one): ``{'sent': total, 'seconds': the longest}``."""
    me = [sys.executable, os.path.abspath(__file__), '--generate',
          '--session', str(session), '--pps', str(pps), '--burst',
          str(burst), '--seconds', str(seconds)]
    cpus = sorted(os.sched_getaffinity(0))
    gens = []
    try:
        for i in range(senders):
            pin = (['--cpu', str(cpus[i % len(cpus)])] if senders > 1
                   else [])
            gens.append(subprocess.Popen(
                _in(nss.gen, me + pin), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True))
        outs = []
        for g in gens:
            out, err = g.communicate(timeout=seconds + 60)
            if g.returncode:
                raise RuntimeError(f'generator failed: {err.strip()}')
            outs.append(json.loads(out))
    finally:
        for g in gens:
            if g.poll() is None:
                g.kill()
                g.wait(timeout=30)
    return {'sent': sum(o['sent'] for o in outs),
            'seconds': max(o['seconds'] for o in outs),
            'senders': senders}


def phase(nss, name, pps, burst, seconds, expected,
          modes=('ring', 'recvmsg'), tcpdump=True, senders=1):
    session = secrets.randbelow(0xfffe) + 1
    procs = {}
    try:
        _start_readers(nss, session, expected, modes, procs, tcpdump)
        cpu0 = {m: cpu_ns(p.pid) for m, p in procs.items()}
        sent = _generate(nss, session, pps, burst, seconds, senders)
        time.sleep(0.1)
        result = _stop_readers(procs, cpu0)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    return {'phase': name, 'sent': sent, 'readers': result}


def report(results, load_before, load_after):
    print(f'load average before {load_before}, after {load_after} '
          f'({os.cpu_count()} CPUs)')
    for r in results:
        sent = r['sent']
        print(f"{r['phase']}: {sent['sent']} packets sent in "
              f"{sent['seconds']:.2f} s "
              f"({sent['sent'] / sent['seconds']:.0f} pps)")
        per = {}
        for mode in ('ring', 'recvmsg', 'tcpdump'):
            x = r['readers'].get(mode)
            if x is None:
                continue
            got = x['packets'] - x['drops']
            per[mode] = x['cpu_s'] * 1e6 / max(got, 1)
            print(f"  {mode:8} {per[mode]:7.2f} us CPU/packet  "
                  f"({x['cpu_s'] * 1000:.1f} ms over {got} packets, "
                  f"{x['drops']} dropped)")
        ratios = []
        if 'recvmsg' in per:
            ratios.append(f"recvmsg/ring {per['recvmsg'] / per['ring']:.1f}x")
        if 'tcpdump' in per:
            ratios.append(f"ring/tcpdump {per['ring'] / per['tcpdump']:.1f}x")
        print(f"  ratios: {', '.join(ratios) or '- (the ring alone)'} "
              f"(targets: ring <= {TARGETS['ring_us_per_packet']} us, "
              f"<= {TARGETS['ring_vs_tcpdump']}x tcpdump; blast drops "
              f"{TARGETS['blast_drops']} at >= {TARGETS['blast_pps']} pps "
              f"for >= {TARGETS['blast_s']} s)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--pps', type=int, default=8000)
    parser.add_argument('--burst', type=int, default=4)
    parser.add_argument('--seconds', type=float, default=4.0)
    parser.add_argument('--blast-s', type=float, default=5.0)
    parser.add_argument('--no-blast', action='store_true')
    parser.add_argument('--json', action='store_true')
    parser.add_argument('--worker', choices=['ring', 'recvmsg'],
                        help=argparse.SUPPRESS)
    parser.add_argument('--generate', action='store_true',
                        help=argparse.SUPPRESS)
    parser.add_argument('--session', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--cpu', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--senders', type=int,
                        default=min(2, len(os.sched_getaffinity(0))),
                        help='TX-ring generators at once in the last '
                        'blast, the ring alone (each pinned to a CPU of '
                        'its own when more than one; default: 2, or 1 on '
                        'one CPU)')
    parser.add_argument('--expected', type=int, default=EXPECTED_64x50,
                        help='sightings the ring is sized for')
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.session, args.expected)
    if args.generate:
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        if not args.pps:
            return blast(args.session, min(args.seconds, 60.0))
        return generate(args.session, args.pps, args.burst,
                        min(args.seconds, 60.0))
    if os.geteuid() != 0:
        print('bench_capture needs root (it builds network namespaces)',
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))
    nss = Namespaces()
    try:
        nss.build()
        before = _load()
        results = [phase(nss, f'probe-shaped ({args.pps} pps, bursts of '
                         f'{args.burst})', args.pps, args.burst,
                         args.seconds, args.expected)]
        if not args.no_blast:
            results.append(phase(nss, 'blast (a TX ring, as fast as the '
                                 'kernel sends)', 0, 64, args.blast_s,
                                 args.expected))
            results.append(phase(nss, 'blast without the recvmsg reader '
                                 '(its CPU slows the sender)', 0, 64,
                                 args.blast_s, args.expected,
                                 modes=('ring',)))
            # tcpdump's socket costs the sender's CPU too (its copy of
            # every packet is made in the sender's softirq): without it,
            # the generator reaches the rates a blast is meant to show.
            results.append(phase(nss, 'blast, the ring alone (no other '
                                 'reader: the sender at its fastest)', 0,
                                 64, args.blast_s, args.expected,
                                 modes=('ring',), tcpdump=False,
                                 senders=args.senders))
        after = _load()
        if args.json:
            json.dump({'load': [before, after], 'results': results},
                      sys.stdout, indent=1)
            print()
        else:
            report(results, before, after)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        nss.teardown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
