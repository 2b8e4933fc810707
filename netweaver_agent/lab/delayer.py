"""Hold the packets of one NFQUEUE for a fixed time, recording each hold.

The lab's injected delay where the kernel has no ``tc netem``: an
iptables rule in the hypervisor's namespace sends the probes bound for one
guest to an NFQUEUE, and this process (run inside that namespace with
``ip netns exec``) gives each one its ACCEPT verdict ``delay_ms`` later.

For every packet it writes one :class:`DelayRecord` line to its records
file: the probe's identity (:func:`probe.parse_ip_key` on the IP packet),
when the delayer got it and when it let it go, as ``CLOCK_REALTIME``
nanoseconds (the clock of the kernel's capture timestamps, so a record
sits between the probe's pif and vif sightings), and the hold itself
measured on ``CLOCK_MONOTONIC`` (immune to clock steps).  The hold is the
delay the lab injected: the truth a measurement is checked against.

Held packets wait in a heap, so overlapping probes are each held for the
full delay; one Python handler still costs tens of microseconds per
packet, so the lab spaces probes to a delayed guest by a few ms.

With ``--keys passive`` (passive mode's truth) it records instead each
packet's passive key (:func:`passive.parse_ip`: flow, TCP seq/ack or IPv4
id, TCP payload length) as a :class:`PassiveHold` line, for every packet
the queue gets: the guest's own traffic as well as probes.

Run as ``python -m netweaver_agent.lab.delayer --queue N --delay-ms D
--records FILE``; it prints ``ready`` on stdout once the queue is bound.
"""

import argparse
import ctypes
import ctypes.util
import dataclasses
import heapq
import itertools
import os
import select
import signal
import sys
import time

from oslo_log import log

from netweaver_agent.core import passive
from netweaver_agent.core import probe

LOG = log.getLogger(__name__)

READY = 'ready'
KEYS = ('probe', 'passive')
PR_SET_TIMERSLACK = 29
DEFAULT_MAX_LIFETIME_S = 24 * 3600
QUEUE_MAX_LEN = 4096
DEFAULT_RT_PRIORITY = 10


class DelayerError(RuntimeError):
    """The delayer could not run or its records could not be read."""


@dataclasses.dataclass(frozen=True, slots=True)
class DelayRecord:
    """One packet the delayer held.

    ``session``/``seq`` are None for a packet that is not a probe.
    ``received_ns``/``released_ns`` are CLOCK_REALTIME (ns since the
    epoch); ``hold_ns`` is their difference measured on CLOCK_MONOTONIC.
    """

    session: int | None
    seq: int | None
    reply: bool
    received_ns: int
    released_ns: int
    hold_ns: int

    @property
    def key(self):
        """The :class:`probe.ProbeKey`, or None for a foreign packet."""
        if self.session is None:
            return None
        return probe.ProbeKey(self.session, self.seq, self.reply)

    def to_line(self):
        ident = ('- - -' if self.session is None else
                 f'{self.session} {self.seq} {int(self.reply)}')
        return (f'{ident} {self.received_ns} {self.released_ns} '
                f'{self.hold_ns}\n')

    @classmethod
    def from_line(cls, line):
        fields = line.split()
        if len(fields) != 6:
            raise ValueError(f"delay record {line!r} has {len(fields)} "
                             "fields, expected 6")
        session, seq, reply = fields[:3]
        received, released, hold = (int(f) for f in fields[3:])
        if session == '-':
            return cls(None, None, False, received, released, hold)
        return cls(int(session), int(seq), reply == '1', received, released,
                   hold)


@dataclasses.dataclass(frozen=True, slots=True)
class PassiveHold:
    """One packet the delayer held, by its passive key (``--keys
    passive``): ``header`` a :class:`passive.Header` (None: not IP)."""

    header: passive.Header | None
    received_ns: int
    released_ns: int
    hold_ns: int

    def to_line(self):
        h = self.header
        if h is None:
            key = 'P - - - - - - - -'
        else:
            proto, src, dst, sport, dport = h.flow
            ident = ('- -' if h.ident is None else
                     f'{h.ident[0]} {h.ident[1]}')
            key = (f'P {proto} {src.hex()} {dst.hex()} {sport} {dport} '
                   f'{ident} {h.length}')
        return (f'{key} {self.received_ns} {self.released_ns} '
                f'{self.hold_ns}\n')

    @classmethod
    def from_line(cls, line):
        f = line.split()
        if len(f) != 12 or f[0] != 'P':
            raise ValueError(f"passive hold record {line!r}: expected 12 "
                             "fields starting with P")
        times = [int(x) for x in f[9:]]
        if f[1] == '-':
            return cls(None, *times)
        ident = None if f[6] == '-' else (int(f[6]), int(f[7]))
        header = passive.Header(
            (int(f[1]), bytes.fromhex(f[2]), bytes.fromhex(f[3]), int(f[4]),
             int(f[5])), ident, int(f[8]))
        return cls(header, *times)


def _read(path, parse):
    """``parse(line)`` of every complete line written to ``path`` so far."""
    try:
        with open(path, encoding='ascii') as f:
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise DelayerError(f"cannot read delay records {path!r}: "
                           f"{exc}") from exc
    out = []
    for number, line in enumerate(data.split('\n')[:-1], 1):
        try:
            out.append(parse(line))
        except ValueError as exc:
            raise DelayerError(f"{path}:{number}: {exc}") from exc
    return out


def read_passive_records(path):
    """Every complete :class:`PassiveHold` written to ``path`` so far."""
    return _read(path, PassiveHold.from_line)


def read_records(path):
    """Every complete :class:`DelayRecord` written to ``path`` so far."""
    return _read(path, DelayRecord.from_line)


def packet_key(payload):
    """The probe key of an IPv4 or IPv6 packet's bytes, or None."""
    return probe.parse_packet_key(payload)


def _set_realtime(priority):
    """Run SCHED_FIFO so that a queued packet wakes us at once.

    The delayer sleeps in select() nearly all the time; the kernel's RT
    throttling (sched_rt_runtime_us) still bounds it.  Without the
    privilege it stays a normal process, with later wake-ups.
    """
    if not priority:
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        return True
    except (OSError, AttributeError) as exc:
        LOG.debug('delayer stays SCHED_OTHER: %s', exc)
        return False


def _set_timer_slack(ns):
    """Ask for precise wake-ups (the default slack is 50 µs)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
        libc.prctl(PR_SET_TIMERSLACK, ctypes.c_ulong(ns), 0, 0, 0)
    except OSError:
        pass


class Delayer:
    """Holds every packet of NFQUEUE ``queue_num`` for ``delay_ns``.

    :param records: a text file object; one line per released packet
    :param watch_pid: exit when this process ends (None: never)
    :param max_lifetime_s: exit after this long, whatever happens
    :param keys: ``'probe'`` (records :class:`DelayRecord`) or
        ``'passive'`` (records :class:`PassiveHold`)
    """

    def __init__(self, queue_num, delay_ns, records, watch_pid=None,
                 max_lifetime_s=DEFAULT_MAX_LIFETIME_S,
                 rt_priority=DEFAULT_RT_PRIORITY, keys='probe'):
        if delay_ns < 0:
            raise ValueError(f"delay {delay_ns!r} ns is negative")
        if keys not in KEYS:
            raise ValueError(f"delayer keys {keys!r}: expected one of "
                             f"{', '.join(KEYS)}")
        self.keys = keys
        self.queue_num = queue_num
        self.delay_ns = delay_ns
        self.records = records
        self.watch_pid = watch_pid
        self.max_lifetime_s = max_lifetime_s
        self.rt_priority = rt_priority
        self._held = []
        self._order = itertools.count()
        self._stop = False

    def _on_packet(self, pkt):
        mono = time.monotonic_ns()
        real = time.time_ns()
        if self.keys == 'passive':
            key = passive.parse_ip(pkt.get_payload())
        else:
            key = packet_key(pkt.get_payload())
        heapq.heappush(self._held, (mono + self.delay_ns, next(self._order),
                                    pkt, key, real, mono))

    def _release(self, pkt, key, received_real, received_mono):
        released_real = time.time_ns()
        released_mono = time.monotonic_ns()
        pkt.accept()
        if self.keys == 'passive':
            rec = PassiveHold(key, received_real, released_real,
                              released_mono - received_mono)
        elif key is None:
            rec = DelayRecord(None, None, False, received_real,
                              released_real, released_mono - received_mono)
        else:
            rec = DelayRecord(key.session, key.seq, key.reply,
                              received_real, released_real,
                              released_mono - received_mono)
        self.records.write(rec.to_line())

    def _release_due(self):
        held = self._held
        while held and held[0][0] <= time.monotonic_ns():
            _, _, pkt, key, real, mono = heapq.heappop(held)
            self._release(pkt, key, real, mono)

    def stop(self, *_):
        self._stop = True

    def run(self, on_ready=None):
        """Bind the queue, call ``on_ready()``, hold packets until stopped."""
        from netfilterqueue import NetfilterQueue

        _set_timer_slack(1)
        _set_realtime(self.rt_priority)
        queue = NetfilterQueue()
        try:
            queue.bind(self.queue_num, self._on_packet, max_len=QUEUE_MAX_LEN)
        except OSError as exc:
            raise DelayerError(
                f"cannot bind NFQUEUE {self.queue_num}: {exc} (needs "
                "CAP_NET_ADMIN)") from exc
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        old = {s: signal.signal(s, self.stop)
               for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        pidfd = None
        if self.watch_pid is not None:
            try:
                pidfd = os.pidfd_open(self.watch_pid)
            except ProcessLookupError:
                self._stop = True
        try:
            fd = queue.get_fd()
            watched = [fd, wake_r] + ([pidfd] if pidfd is not None else [])
            end = time.monotonic() + self.max_lifetime_s
            if on_ready is not None:
                on_ready()
            while not self._stop:
                now = time.monotonic()
                if now >= end:
                    LOG.warning('Delayer on queue %(q)d reached its '
                                'lifetime of %(s)d s', {
                                    'q': self.queue_num,
                                    's': self.max_lifetime_s})
                    break
                timeout = min(1.0, end - now)
                if self._held:
                    wait = (self._held[0][0] - time.monotonic_ns()) / 1e9
                    timeout = max(0.0, min(timeout, wait))
                ready, _, _ = select.select(watched, [], [], timeout)
                if fd in ready:
                    queue.run(block=False)
                if pidfd is not None and pidfd in ready:
                    break
                if wake_r in ready:
                    os.read(wake_r, 512)
                self._release_due()
        finally:
            # Let what is held go at once rather than dropping it.
            while self._held:
                _, _, pkt, key, real, mono = heapq.heappop(self._held)
                self._release(pkt, key, real, mono)
            self.records.flush()
            queue.unbind()
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            for f in (wake_r, wake_w, pidfd):
                if f is not None:
                    os.close(f)


def build_parser():
    parser = argparse.ArgumentParser(
        prog='python -m netweaver_agent.lab.delayer',
        description='Hold the packets of an NFQUEUE for a fixed delay and '
                    'record each hold.')
    parser.add_argument('--queue', type=int, required=True,
                        help='NFQUEUE number to bind')
    parser.add_argument('--delay-ms', type=float, required=True,
                        help='how long to hold each packet')
    parser.add_argument('--records', required=True,
                        help='file to append one line per packet to')
    parser.add_argument('--watch-pid', type=int,
                        help='exit when this process ends')
    parser.add_argument('--max-lifetime-s', type=float,
                        default=DEFAULT_MAX_LIFETIME_S,
                        help='exit after this many seconds')
    parser.add_argument('--rt-priority', type=int,
                        default=DEFAULT_RT_PRIORITY,
                        help='SCHED_FIFO priority, 0 for none (default '
                             f'{DEFAULT_RT_PRIORITY})')
    parser.add_argument('--keys', choices=KEYS, default='probe',
                        help="what each record names: the probe's "
                             "identity (default) or every packet's passive "
                             "key (passive mode's truth)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not 0 <= args.queue <= 0xffff:
        sys.stderr.write(f"delayer: queue {args.queue} is not 0..65535\n")
        return 2
    if not 0 <= args.delay_ms <= 60000:
        sys.stderr.write(
            f"delayer: delay {args.delay_ms} ms is not within 0..60000\n")
        return 2
    try:
        with open(args.records, 'a', buffering=1, encoding='ascii') as rec:
            delayer = Delayer(args.queue, int(args.delay_ms * 1e6), rec,
                              watch_pid=args.watch_pid,
                              max_lifetime_s=args.max_lifetime_s,
                              rt_priority=args.rt_priority, keys=args.keys)

            def ready():
                sys.stdout.write(READY + '\n')
                sys.stdout.flush()

            delayer.run(on_ready=ready)
    except (DelayerError, OSError) as exc:
        sys.stderr.write(f"delayer: {exc}\n")
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
