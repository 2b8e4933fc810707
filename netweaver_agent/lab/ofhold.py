"""What the lab's two OpenFlow delayers share: hold packets a switch
sends to its controller for a fixed delay, send them back, record each
hold.

:mod:`netweaver_agent.lab.ofdelay` (ovs-native: ``OFPT_PACKET_IN`` back
as ``OFPT_PACKET_OUT``) and :mod:`netweaver_agent.lab.ovndelay` (OVN:
``NXT_PACKET_IN2`` back as ``NXT_RESUME``) differ only in how they meet
the switch and what the packets look like.  Here: OpenFlow message
framing (ECHO answered, ERROR logged), the packets held in arrival order
until their delay is over, one :class:`delayer.DelayRecord` per released
packet (the probe's identity, or with ``--keys passive`` the packet's
passive key as a :class:`delayer.PassiveHold`; when it arrived and left
in ``CLOCK_REALTIME`` ns, the capture's clock, and the hold in
``CLOCK_MONOTONIC``), the serve loop (timer slack, SCHED_FIFO, signals,
the watched pid, the lifetime) and the common command line.
"""

import heapq
import itertools
import os
import select
import signal
import struct
import sys
import time

from oslo_log import log

from netweaver_agent.core import passive
from netweaver_agent.core import probe
from netweaver_agent.lab import delayer

LOG = log.getLogger(__name__)

OFP_VERSION = 0x04             # OpenFlow 1.3 (the Nicira messages work
OFPT_HELLO = 0                 # with any version)
OFPT_ERROR = 1
OFPT_ECHO_REQUEST = 2
OFPT_ECHO_REPLY = 3
HEADER = struct.Struct('!BBHI')
MAX_DELAY_MS = 60000
# The longest the loop sleeps with nothing held.
POLL_S = 0.2


class OfHoldError(RuntimeError):
    """An OpenFlow delayer could not run."""


def message(msg_type, xid, body=b''):
    """One OpenFlow message."""
    return HEADER.pack(OFP_VERSION, msg_type, HEADER.size + len(body),
                       xid) + body


class HoldingController:
    """Holds packets for ``delay_ns``, then sends them back, one record
    each; see the module.  A subclass says how it meets the switch
    (:meth:`_open`, :meth:`_watched`, :meth:`_serve`, :meth:`_close`),
    which messages carry packets (:meth:`_on_message`, calling
    :meth:`hold`) and how a held packet goes back (:meth:`_send_back`,
    :meth:`_frame_of`).

    :param records: a text file object; one line per released packet
    """

    first_xid = 1

    def __init__(self, delay_ns, records, watch_pid=None,
                 max_lifetime_s=delayer.DEFAULT_MAX_LIFETIME_S,
                 rt_priority=delayer.DEFAULT_RT_PRIORITY, keys='probe'):
        if delay_ns < 0:
            raise ValueError(f"delay {delay_ns!r} ns is negative")
        if keys not in delayer.KEYS:
            raise ValueError(f"record keys {keys!r}: expected one of "
                             f"{', '.join(delayer.KEYS)}")
        self.delay_ns = delay_ns
        self.keys = keys
        self.records = records
        self.watch_pid = watch_pid
        self.max_lifetime_s = max_lifetime_s
        self.rt_priority = rt_priority
        self._held = []
        self._order = itertools.count()
        self._xid = itertools.count(self.first_xid)
        self._stop = False
        self._buf = b''
        self._on_ready = None

    def stop(self, *_):
        self._stop = True

    def hold(self, packet):
        """Keep ``packet`` (what :meth:`_send_back` takes) for the
        delay, from now."""
        mono = time.monotonic_ns()
        real = time.time_ns()
        heapq.heappush(self._held, (mono + self.delay_ns,
                                    next(self._order), packet, real, mono))

    def _on_message(self, msg_type, xid, body):
        raise NotImplementedError

    def _send_back(self, conn, packet):
        raise NotImplementedError

    def _frame_of(self, packet):
        """The Ethernet frame of a held ``packet``, or None."""
        raise NotImplementedError

    def _read(self, conn):
        """Read what ``conn`` has; False once the switch closed it."""
        chunk = conn.recv(65536)
        if not chunk:
            return False
        self._buf += chunk
        while len(self._buf) >= HEADER.size:
            _, msg_type, length, xid = HEADER.unpack_from(self._buf)
            if length < HEADER.size:
                raise OfHoldError(f"OpenFlow message of length {length}")
            if len(self._buf) < length:
                break
            body = self._buf[HEADER.size:length]
            self._buf = self._buf[length:]
            if msg_type == OFPT_ECHO_REQUEST:
                conn.sendall(message(OFPT_ECHO_REPLY, xid, body))
            elif msg_type == OFPT_ERROR:
                LOG.warning('OpenFlow error from the switch: %s', body.hex())
            else:
                self._on_message(msg_type, xid, body)
        return True

    def _release_due(self, conn, everything=False):
        held = self._held
        while held and (everything or held[0][0] <= time.monotonic_ns()):
            _, _, packet, real, mono = heapq.heappop(held)
            # Released as it is handed back, read before: a controller
            # descheduled after its send would record a release later
            # than the packet reached the guest's tap.
            released_real = time.time_ns()
            hold = time.monotonic_ns() - mono
            self._send_back(conn, packet)
            frame = self._frame_of(packet)
            if self.keys == 'passive':
                rec = delayer.PassiveHold(
                    None if frame is None else passive.parse(frame), real,
                    released_real, hold)
                self.records.write(rec.to_line())
                continue
            key = None if frame is None else probe.parse_key(frame)
            if key is None:
                rec = delayer.DelayRecord(None, None, False, real,
                                          released_real, hold)
            else:
                rec = delayer.DelayRecord(key.session, key.seq, key.reply,
                                          real, released_real, hold)
            self.records.write(rec.to_line())

    def _release_all(self, conn):
        """At the end: send back what is still held, close ``conn``."""
        try:
            self._release_due(conn, everything=True)
        except OSError:
            pass
        conn.close()

    def _open(self):
        """Meet the switch; :attr:`_on_ready` once ready."""
        raise NotImplementedError

    def _watched(self):
        """The sockets the loop waits on."""
        raise NotImplementedError

    def _serve(self, ready):
        """Serve the ``ready`` sockets; False to stop."""
        raise NotImplementedError

    def _close(self):
        raise NotImplementedError

    def run(self, on_ready=None):
        """Meet the switch, call ``on_ready()`` once ready, serve until
        stopped, the watched process ends or the lifetime is over."""
        delayer._set_timer_slack(1)
        delayer._set_realtime(self.rt_priority)
        self._on_ready = on_ready or (lambda: None)
        old = {s: signal.signal(s, self.stop)
               for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        pidfd = None
        try:
            if self.watch_pid is not None:
                try:
                    pidfd = os.pidfd_open(self.watch_pid)
                except ProcessLookupError:
                    self._stop = True
            self._open()
            end = time.monotonic() + self.max_lifetime_s
            while not self._stop and time.monotonic() < end:
                watched = self._watched() + ([pidfd] if pidfd else [])
                timeout = POLL_S
                if self._held:
                    wait = (self._held[0][0] - time.monotonic_ns()) / 1e9
                    timeout = max(0.0, min(timeout, wait))
                ready, _, _ = select.select(watched, [], [], timeout)
                if pidfd is not None and pidfd in ready:
                    break
                if not self._serve(ready):
                    break
        finally:
            self._close()
            self.records.flush()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if pidfd is not None:
                os.close(pidfd)


def add_arguments(parser):
    """The delayers' common options, after each one's own."""
    parser.add_argument('--delay-ms', type=float, required=True,
                        help='how long to hold each packet')
    parser.add_argument('--records', required=True,
                        help='file to append one line per packet to')
    parser.add_argument('--watch-pid', type=int,
                        help='exit when this process ends')
    parser.add_argument('--max-lifetime-s', type=float,
                        default=delayer.DEFAULT_MAX_LIFETIME_S,
                        help='exit after this many seconds')
    parser.add_argument('--keys', choices=delayer.KEYS, default='probe',
                        help="record each packet's probe identity "
                             "(default) or its passive key (passive "
                             "mode's truth)")
    parser.add_argument('--rt-priority', type=int,
                        default=delayer.DEFAULT_RT_PRIORITY,
                        help='SCHED_FIFO priority, 0 for none')


def main(prog, args, build, refusal=None):
    """Run a delayer from its parsed ``args``: ``build(delay_ns, records,
    **common)`` makes the controller; it prints ``ready`` once ready.
    Exit 2 for a delay out of range or the caller's ``refusal`` (in that
    order), 1 if it could not run, else 0."""
    if not 0 <= args.delay_ms <= MAX_DELAY_MS:
        refusal = f"delay {args.delay_ms} ms is not within 0..{MAX_DELAY_MS}"
    if refusal is not None:
        sys.stderr.write(f"{prog}: {refusal}\n")
        return 2
    try:
        with open(args.records, 'a', buffering=1, encoding='ascii') as rec:
            ctl = build(int(args.delay_ms * 1e6), rec,
                        watch_pid=args.watch_pid,
                        max_lifetime_s=args.max_lifetime_s,
                        rt_priority=args.rt_priority, keys=args.keys)

            def ready():
                sys.stdout.write(delayer.READY + '\n')
                sys.stdout.flush()

            ctl.run(on_ready=ready)
    except (OfHoldError, OSError, ValueError) as exc:
        sys.stderr.write(f"{prog}: {exc}\n")
        return 1
    return 0
