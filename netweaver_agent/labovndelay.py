"""Hold packets in the middle of OVN's pipeline, recording each hold: the
OVN lab's delay truth.

The userspace datapath never passes netfilter (no NFQUEUE) and the lab's
kernel has no ``tc netem``.  On the OVN layout a flow in ``br-int``'s
table 0, above ovn-controller's, takes the probes the lab source marked
for the delayed guest (their IP TTL) as they enter from the tunnel (or
the localnet patch port) and *pauses* them:
``controller(pause,id=N)``, then ``mod_nw_ttl`` back and
``resubmit(,0)``.  This process is the controller: it holds each paused
packet (``NXT_PACKET_IN2`` with its continuation) for ``delay_ms`` and
resumes it unchanged (``NXT_RESUME``: OVS carries on with the flow's
remaining actions, with the packet's tunnel metadata, registers and
conntrack state intact, so OVN's whole pipeline, ACLs included, still
applies).  This is the mechanism ovn-controller itself uses for its
``pinctrl`` actions.

The connection does not disturb ovn-controller: it is a *service*
connection to the bridge's management socket (no ``Controller`` row, so
ovs-vswitchd flushes no flow), asks for asynchronous messages (a nonzero
miss length), and takes its own controller id, so it receives only the
packet-ins of ``controller(id=N)`` actions and ovn-controller none of
them.

One :class:`delayer.DelayRecord` per packet, as the NFQUEUE delayer
writes: the probe's identity, when it arrived and left
(``CLOCK_REALTIME`` ns, the capture's clock) and the hold
(``CLOCK_MONOTONIC``).  Run as ``python -m netweaver_agent.labovndelay
--connect PATH --controller-id N --delay-ms D --records FILE``; it prints
``ready`` once the switch has applied its settings.
"""

import argparse
import heapq
import itertools
import os
import select
import signal
import socket
import struct
import sys
import time

from oslo_log import log

from netweaver_agent import delayer
from netweaver_agent import probe

LOG = log.getLogger(__name__)

OFP_VERSION = 0x04             # OpenFlow 1.3 (the Nicira messages work
OFPT_HELLO = 0                 # with any version)
OFPT_ERROR = 1
OFPT_ECHO_REQUEST = 2
OFPT_ECHO_REPLY = 3
OFPT_EXPERIMENTER = 4
OFPT_SET_CONFIG = 9
OFPT_BARRIER_REQUEST = 20
OFPT_BARRIER_REPLY = 21
OFPCML_NO_BUFFER = 0xffff
NX_VENDOR_ID = 0x00002320
NXT_SET_PACKET_IN_FORMAT = 16
NXT_SET_CONTROLLER_ID = 20
NXT_RESUME = 28
NXT_PACKET_IN2 = 30
NXPIF_NXT_PACKET_IN2 = 2
NXPINT_PACKET = 0
_HEADER = struct.Struct('!BBHI')
_NX = struct.Struct('!II')
_PROP = struct.Struct('!HH')
MAX_CONTROLLER_ID = 0xffff
CONNECT_TIMEOUT_S = 10.0


class OvnDelayError(RuntimeError):
    """The pause/resume delayer could not run."""


def message(msg_type, xid, body=b''):
    """One OpenFlow message."""
    return _HEADER.pack(OFP_VERSION, msg_type, _HEADER.size + len(body),
                        xid) + body


def nx_message(subtype, xid, body=b''):
    """One Nicira extension message."""
    return message(OFPT_EXPERIMENTER, xid,
                   _NX.pack(NX_VENDOR_ID, subtype) + body)


def setup_messages(controller_id):
    """What the connection sends first: hello, asynchronous messages on,
    its controller id, packet-in2 (continuations), then a barrier."""
    if not 1 <= controller_id <= MAX_CONTROLLER_ID:
        raise ValueError(f"controller id {controller_id!r} is not within "
                         f"1..{MAX_CONTROLLER_ID} (0 is ovn-controller's)")
    return [message(OFPT_HELLO, 1),
            message(OFPT_SET_CONFIG, 2, struct.pack('!HH', 0,
                                                    OFPCML_NO_BUFFER)),
            nx_message(NXT_SET_CONTROLLER_ID, 3,
                       struct.pack('!6xH', controller_id)),
            nx_message(NXT_SET_PACKET_IN_FORMAT, 4,
                       struct.pack('!I', NXPIF_NXT_PACKET_IN2)),
            message(OFPT_BARRIER_REQUEST, 5)]


def packet_of(properties):
    """The packet (``NXPINT_PACKET``) among packet-in2 ``properties``."""
    pos = 0
    while pos + _PROP.size <= len(properties):
        ptype, plen = _PROP.unpack_from(properties, pos)
        if plen < _PROP.size or pos + plen > len(properties):
            raise ValueError(f"packet-in2 property of length {plen} at "
                             f"{pos} overruns {len(properties)} bytes")
        if ptype == NXPINT_PACKET:
            return properties[pos + _PROP.size:pos + plen]
        pos += (plen + 7) // 8 * 8
    raise ValueError('packet-in2 carries no packet')


class Controller:
    """Holds every paused packet for ``delay_ns``, then resumes it; see
    the module.

    :param records: a text file object; one line per released packet
    """

    def __init__(self, connect_path, controller_id, delay_ns, records,
                 watch_pid=None,
                 max_lifetime_s=delayer.DEFAULT_MAX_LIFETIME_S,
                 rt_priority=delayer.DEFAULT_RT_PRIORITY):
        if delay_ns < 0:
            raise ValueError(f"delay {delay_ns!r} ns is negative")
        self.connect_path = connect_path
        self.setup = setup_messages(controller_id)
        self.delay_ns = delay_ns
        self.records = records
        self.watch_pid = watch_pid
        self.max_lifetime_s = max_lifetime_s
        self.rt_priority = rt_priority
        self._held = []
        self._order = itertools.count()
        self._xid = itertools.count(100)
        self._stop = False
        self._buf = b''
        self._ready = None

    def stop(self, *_):
        self._stop = True

    def _on_message(self, conn, msg_type, xid, body):
        if msg_type == OFPT_EXPERIMENTER and len(body) >= _NX.size:
            vendor, subtype = _NX.unpack_from(body)
            if (vendor, subtype) == (NX_VENDOR_ID, NXT_PACKET_IN2):
                mono = time.monotonic_ns()
                real = time.time_ns()
                props = body[_NX.size:]
                heapq.heappush(self._held, (mono + self.delay_ns,
                                            next(self._order), props,
                                            real, mono))
        elif msg_type == OFPT_BARRIER_REPLY and self._ready:
            ready, self._ready = self._ready, None
            ready()
        elif msg_type == OFPT_ECHO_REQUEST:
            conn.sendall(message(OFPT_ECHO_REPLY, xid, body))
        elif msg_type == OFPT_ERROR:
            LOG.warning('OpenFlow error from the switch: %s', body.hex())

    def _read(self, conn):
        chunk = conn.recv(65536)
        if not chunk:
            return False
        self._buf += chunk
        while len(self._buf) >= _HEADER.size:
            _, msg_type, length, xid = _HEADER.unpack_from(self._buf)
            if length < _HEADER.size:
                raise OvnDelayError(f"OpenFlow message of length {length}")
            if len(self._buf) < length:
                break
            body = self._buf[_HEADER.size:length]
            self._buf = self._buf[length:]
            self._on_message(conn, msg_type, xid, body)
        return True

    def _release_due(self, conn, everything=False):
        held = self._held
        while held and (everything or held[0][0] <= time.monotonic_ns()):
            _, _, props, real, mono = heapq.heappop(held)
            conn.sendall(nx_message(NXT_RESUME, next(self._xid), props))
            released_real = time.time_ns()
            hold = time.monotonic_ns() - mono
            try:
                key = probe.parse_key(packet_of(props))
            except ValueError:
                key = None
            if key is None:
                rec = delayer.DelayRecord(None, None, False, real,
                                          released_real, hold)
            else:
                rec = delayer.DelayRecord(key.session, key.seq, key.reply,
                                          real, released_real, hold)
            self.records.write(rec.to_line())

    def _connect(self):
        end = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(self.connect_path)
                return conn
            except OSError as exc:
                conn.close()
                if time.monotonic() > end:
                    raise OvnDelayError(
                        f"cannot connect to {self.connect_path}: "
                        f"{exc}") from exc
                time.sleep(0.05)

    def run(self, on_ready=None):
        """Connect, configure, call ``on_ready()`` once the switch has
        applied it, serve until stopped or the switch goes."""
        delayer._set_timer_slack(1)
        delayer._set_realtime(self.rt_priority)
        old = {s: signal.signal(s, self.stop)
               for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        pidfd = None
        conn = self._connect()
        self._ready = on_ready or (lambda: None)
        if self.watch_pid is not None:
            try:
                pidfd = os.pidfd_open(self.watch_pid)
            except ProcessLookupError:
                self._stop = True
        end = time.monotonic() + self.max_lifetime_s
        try:
            for msg in self.setup:
                conn.sendall(msg)
            while not self._stop and time.monotonic() < end:
                watched = [conn] + ([pidfd] if pidfd else [])
                timeout = 0.2
                if self._held:
                    wait = (self._held[0][0] - time.monotonic_ns()) / 1e9
                    timeout = max(0.0, min(timeout, wait))
                ready, _, _ = select.select(watched, [], [], timeout)
                if pidfd is not None and pidfd in ready:
                    break
                if conn in ready and not self._read(conn):
                    LOG.warning('The switch closed the connection; %d held '
                                'packets dropped', len(self._held))
                    self._held = []
                    break
                self._release_due(conn)
        finally:
            try:
                self._release_due(conn, everything=True)
            except OSError:
                pass
            conn.close()
            self.records.flush()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if pidfd is not None:
                os.close(pidfd)


def build_parser():
    parser = argparse.ArgumentParser(
        prog='python -m netweaver_agent.labovndelay',
        description='Hold packets an OVN br-int pauses to this controller '
                    'for a fixed delay, resume them, record each hold.')
    parser.add_argument('--connect', required=True,
                        help="the bridge's management socket (unix path)")
    parser.add_argument('--controller-id', type=int, required=True,
                        help='the id of controller(id=N) actions to serve')
    parser.add_argument('--delay-ms', type=float, required=True,
                        help='how long to hold each packet')
    parser.add_argument('--records', required=True,
                        help='file to append one line per packet to')
    parser.add_argument('--watch-pid', type=int,
                        help='exit when this process ends')
    parser.add_argument('--max-lifetime-s', type=float,
                        default=delayer.DEFAULT_MAX_LIFETIME_S,
                        help='exit after this many seconds')
    parser.add_argument('--rt-priority', type=int,
                        default=delayer.DEFAULT_RT_PRIORITY,
                        help='SCHED_FIFO priority, 0 for none')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not 0 <= args.delay_ms <= 60000:
        sys.stderr.write(f"labovndelay: delay {args.delay_ms} ms is not "
                         "within 0..60000\n")
        return 2
    try:
        with open(args.records, 'a', buffering=1, encoding='ascii') as rec:
            ctl = Controller(args.connect, args.controller_id,
                             int(args.delay_ms * 1e6), rec,
                             watch_pid=args.watch_pid,
                             max_lifetime_s=args.max_lifetime_s,
                             rt_priority=args.rt_priority)

            def ready():
                sys.stdout.write(delayer.READY + '\n')
                sys.stdout.flush()

            ctl.run(on_ready=ready)
    except (OvnDelayError, OSError, ValueError) as exc:
        sys.stderr.write(f"labovndelay: {exc}\n")
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
