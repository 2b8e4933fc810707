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
(``CLOCK_MONOTONIC``); the holding, the records and the loop are
:mod:`netweaver_agent.lab.ofhold`'s, shared with the ovs-native
delayer.  Run as ``python -m netweaver_agent.lab.ovndelay
--connect PATH --controller-id N --delay-ms D --records FILE``; it prints
``ready`` once the switch has applied its settings.
"""

import argparse
import functools
import socket
import struct
import sys
import time

from oslo_log import log

from netweaver_agent.lab import ofhold
from netweaver_agent.lab.ofhold import message
from netweaver_agent.lab.ofhold import OFPT_HELLO

LOG = log.getLogger(__name__)

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
_NX = struct.Struct('!II')
_PROP = struct.Struct('!HH')
MAX_CONTROLLER_ID = 0xffff
CONNECT_TIMEOUT_S = 10.0


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


class Controller(ofhold.HoldingController):
    """Holds every paused packet for ``delay_ns``, then resumes it; see
    the module.

    :param records: a text file object; one line per released packet
    """

    first_xid = 100

    def __init__(self, connect_path, controller_id, delay_ns, records,
                 **kwargs):
        super().__init__(delay_ns, records, **kwargs)
        self.connect_path = connect_path
        self.setup = setup_messages(controller_id)
        self._conn = None

    def _on_message(self, msg_type, xid, body):
        if msg_type == OFPT_EXPERIMENTER and len(body) >= _NX.size:
            vendor, subtype = _NX.unpack_from(body)
            if (vendor, subtype) == (NX_VENDOR_ID, NXT_PACKET_IN2):
                self.hold(body[_NX.size:])
        elif msg_type == OFPT_BARRIER_REPLY and self._on_ready:
            ready, self._on_ready = self._on_ready, None
            ready()

    def _send_back(self, conn, packet):
        conn.sendall(nx_message(NXT_RESUME, next(self._xid), packet))

    def _frame_of(self, packet):
        try:
            return packet_of(packet)
        except ValueError:
            return None

    def _open(self):
        """Connect, send the settings; ready once the switch answers
        their barrier."""
        end = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.connect(self.connect_path)
                break
            except OSError as exc:
                conn.close()
                if time.monotonic() > end:
                    raise ofhold.OfHoldError(
                        f"cannot connect to {self.connect_path}: "
                        f"{exc}") from exc
                time.sleep(0.05)
        self._conn = conn
        for msg in self.setup:
            conn.sendall(msg)

    def _watched(self):
        return [self._conn]

    def _serve(self, ready):
        if self._conn in ready and not self._read(self._conn):
            LOG.warning('The switch closed the connection; %d held '
                        'packets dropped', len(self._held))
            self._held = []
            return False
        self._release_due(self._conn)
        return True

    def _close(self):
        if self._conn is not None:
            self._release_all(self._conn)


def build_parser():
    parser = argparse.ArgumentParser(
        prog='python -m netweaver_agent.lab.ovndelay',
        description='Hold packets an OVN br-int pauses to this controller '
                    'for a fixed delay, resume them, record each hold.')
    parser.add_argument('--connect', required=True,
                        help="the bridge's management socket (unix path)")
    parser.add_argument('--controller-id', type=int, required=True,
                        help='the id of controller(id=N) actions to serve')
    ofhold.add_arguments(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return ofhold.main(
        'labovndelay', args,
        functools.partial(Controller, args.connect, args.controller_id))


if __name__ == '__main__':
    sys.exit(main())
