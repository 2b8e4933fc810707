"""Hold packets an Open vSwitch bridge sends to its controller, recording
each hold: the lab's delay where no netfilter hook sees the packets.

The userspace datapath never passes netfilter (no NFQUEUE) and the lab's
kernel has no ``tc netem``.  So, on the ovs-native layout, a flow on
``br-int`` sends the probes bound for one guest to the controller
(``actions=CONTROLLER``); this process is that controller: it listens on
a unix socket the bridge connects to (``ovs-vsctl set-controller br-int
unix:PATH``), holds each ``OFPT_PACKET_IN`` for ``delay_ms`` and sends
it back with ``OFPT_PACKET_OUT`` (pop the local VLAN tag, output to the
guest's port), writing one :class:`delayer.DelayRecord` per packet: the
probe's identity, when it arrived and when it left (``CLOCK_REALTIME``
ns, the capture's clock) and the hold (``CLOCK_MONOTONIC``).  The hold
sits between the probe's pif and tap sightings, as the NFQUEUE
delayer's does.

Only the OpenFlow 1.3 messages it needs: HELLO, ECHO, PACKET_IN,
PACKET_OUT, ERROR (logged).  Run as ``python -m
netweaver_agent.labofdelay --listen PATH --output-port N --delay-ms D
--records FILE``; it prints ``ready`` once it listens.
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

OFP_VERSION = 0x04             # OpenFlow 1.3
OFPT_HELLO = 0
OFPT_ERROR = 1
OFPT_ECHO_REQUEST = 2
OFPT_ECHO_REPLY = 3
OFPT_PACKET_IN = 10
OFPT_PACKET_OUT = 13
OFP_NO_BUFFER = 0xffffffff
OFPAT_OUTPUT = 0
OFPAT_POP_VLAN = 18
OFPXMC_OPENFLOW_BASIC = 0x8000
OFPXMT_OFB_IN_PORT = 0
_HEADER = struct.Struct('!BBHI')
_PACKET_IN = struct.Struct('!IHBBQ')
# Made beside the listening socket once the switch's HELLO arrived.
CONNECTED_SUFFIX = '.connected'


class OfDelayError(RuntimeError):
    """The controller delayer could not run."""


def message(msg_type, xid, body=b''):
    """One OpenFlow 1.3 message."""
    return _HEADER.pack(OFP_VERSION, msg_type, _HEADER.size + len(body),
                        xid) + body


def parse_packet_in(body):
    """``(in_port, frame)`` of an ``OFPT_PACKET_IN`` body."""
    if len(body) < _PACKET_IN.size + 4:
        raise ValueError(f"PACKET_IN of {len(body)} bytes is truncated")
    pos = _PACKET_IN.size
    match_type, match_len = struct.unpack_from('!HH', body, pos)
    if match_type != 1 or match_len < 4:
        raise ValueError(f"PACKET_IN match type {match_type} length "
                         f"{match_len} is not an OXM match")
    in_port = None
    oxm, end = pos + 4, pos + match_len
    while oxm + 4 <= end:
        (head,) = struct.unpack_from('!I', body, oxm)
        cls, field, length = head >> 16, (head >> 9) & 0x7f, head & 0xff
        if (cls, field, length) == (OFPXMC_OPENFLOW_BASIC,
                                    OFPXMT_OFB_IN_PORT, 4):
            (in_port,) = struct.unpack_from('!I', body, oxm + 4)
        oxm += 4 + length
    if in_port is None:
        raise ValueError('PACKET_IN match has no in_port')
    data = pos + (match_len + 7) // 8 * 8 + 2
    return in_port, body[data:]


def packet_out(xid, in_port, out_port, frame, pop_vlan=True):
    """``OFPT_PACKET_OUT`` of ``frame``: pop its VLAN tag, output."""
    actions = b''
    if pop_vlan:
        actions += struct.pack('!HH4x', OFPAT_POP_VLAN, 8)
    actions += struct.pack('!HHIH6x', OFPAT_OUTPUT, 16, out_port, 0xffff)
    return message(OFPT_PACKET_OUT, xid,
                   struct.pack('!IIH6x', OFP_NO_BUFFER, in_port,
                               len(actions)) + actions + frame)


class Controller:
    """Holds every PACKET_IN for ``delay_ns``, then sends it to
    ``out_port``; see the module.

    :param records: a text file object; one line per released packet
    """

    def __init__(self, listen_path, out_port, delay_ns, records,
                 watch_pid=None,
                 max_lifetime_s=delayer.DEFAULT_MAX_LIFETIME_S,
                 rt_priority=delayer.DEFAULT_RT_PRIORITY):
        if delay_ns < 0:
            raise ValueError(f"delay {delay_ns!r} ns is negative")
        self.listen_path = listen_path
        self.out_port = out_port
        self.delay_ns = delay_ns
        self.records = records
        self.watch_pid = watch_pid
        self.max_lifetime_s = max_lifetime_s
        self.rt_priority = rt_priority
        self._held = []
        self._order = itertools.count()
        self._xid = itertools.count(1)
        self._stop = False
        self._buf = b''

    def stop(self, *_):
        self._stop = True

    def _on_message(self, conn, msg_type, xid, body):
        if msg_type == OFPT_HELLO:
            with open(self.listen_path + CONNECTED_SUFFIX, 'w'):
                pass
        elif msg_type == OFPT_PACKET_IN:
            mono = time.monotonic_ns()
            real = time.time_ns()
            in_port, frame = parse_packet_in(body)
            heapq.heappush(self._held, (mono + self.delay_ns,
                                        next(self._order), in_port, frame,
                                        real, mono))
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
                raise OfDelayError(f"OpenFlow message of length {length}")
            if len(self._buf) < length:
                break
            body = self._buf[_HEADER.size:length]
            self._buf = self._buf[length:]
            self._on_message(conn, msg_type, xid, body)
        return True

    def _release_due(self, conn, everything=False):
        held = self._held
        while held and (everything or held[0][0] <= time.monotonic_ns()):
            _, _, in_port, frame, real, mono = heapq.heappop(held)
            conn.sendall(packet_out(next(self._xid), in_port,
                                    self.out_port, frame))
            released_real = time.time_ns()
            hold = time.monotonic_ns() - mono
            key = probe.parse_key(frame)
            if key is None:
                rec = delayer.DelayRecord(None, None, False, real,
                                          released_real, hold)
            else:
                rec = delayer.DelayRecord(key.session, key.seq, key.reply,
                                          real, released_real, hold)
            self.records.write(rec.to_line())

    def run(self, on_ready=None):
        """Listen, call ``on_ready()``, serve one switch until stopped."""
        delayer._set_timer_slack(1)
        delayer._set_realtime(self.rt_priority)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.listen_path)
        except FileNotFoundError:
            pass
        server.bind(self.listen_path)
        server.listen(1)
        old = {s: signal.signal(s, self.stop)
               for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        pidfd = None
        conn = None
        if self.watch_pid is not None:
            try:
                pidfd = os.pidfd_open(self.watch_pid)
            except ProcessLookupError:
                self._stop = True
        end = time.monotonic() + self.max_lifetime_s
        try:
            if on_ready is not None:
                on_ready()
            while not self._stop and time.monotonic() < end:
                watched = [conn or server] + ([pidfd] if pidfd else [])
                timeout = 0.2
                if self._held:
                    wait = (self._held[0][0] - time.monotonic_ns()) / 1e9
                    timeout = max(0.0, min(timeout, wait))
                ready, _, _ = select.select(watched, [], [], timeout)
                if pidfd is not None and pidfd in ready:
                    break
                if conn is None and server in ready:
                    conn, _ = server.accept()
                    conn.sendall(message(OFPT_HELLO, next(self._xid)))
                elif conn is not None and conn in ready:
                    if not self._read(conn):
                        LOG.warning('The switch closed its controller '
                                    'connection; %d held packets dropped',
                                    len(self._held))
                        conn.close()
                        conn, self._held, self._buf = None, [], b''
                        continue
                if conn is not None:
                    self._release_due(conn)
        finally:
            if conn is not None:
                try:
                    self._release_due(conn, everything=True)
                except OSError:
                    pass
                conn.close()
            self.records.flush()
            server.close()
            for sig, handler in old.items():
                signal.signal(sig, handler)
            if pidfd is not None:
                os.close(pidfd)


def build_parser():
    parser = argparse.ArgumentParser(
        prog='python -m netweaver_agent.labofdelay',
        description='An OpenFlow controller holding packet-ins for a fixed '
                    'delay and recording each hold.')
    parser.add_argument('--listen', required=True,
                        help='unix socket the bridge connects to')
    parser.add_argument('--output-port', type=int, required=True,
                        help='OpenFlow port number to send packets to')
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
        sys.stderr.write(f"labofdelay: delay {args.delay_ms} ms is not "
                         "within 0..60000\n")
        return 2
    if not 1 <= args.output_port <= 0xffffff00:
        sys.stderr.write(f"labofdelay: output port {args.output_port} is "
                         "not an OpenFlow port number\n")
        return 2
    try:
        with open(args.records, 'a', buffering=1, encoding='ascii') as rec:
            ctl = Controller(args.listen, args.output_port,
                             int(args.delay_ms * 1e6), rec,
                             watch_pid=args.watch_pid,
                             max_lifetime_s=args.max_lifetime_s,
                             rt_priority=args.rt_priority)

            def ready():
                sys.stdout.write(delayer.READY + '\n')
                sys.stdout.flush()

            ctl.run(on_ready=ready)
    except (OfDelayError, OSError, ValueError) as exc:
        sys.stderr.write(f"labofdelay: {exc}\n")
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
