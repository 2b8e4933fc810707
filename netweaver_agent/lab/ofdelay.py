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
PACKET_OUT, ERROR (logged); the holding, the records and the loop are
:mod:`netweaver_agent.lab.ofhold`'s, shared with the OVN delayer.  Run as
``python -m netweaver_agent.lab.ofdelay --listen PATH --output-port N
--delay-ms D --records FILE``; it prints ``ready`` once it listens.
"""

import argparse
import functools
import os
import socket
import struct
import sys

from oslo_log import log

from netweaver_agent.lab import ofhold
from netweaver_agent.lab.ofhold import message
from netweaver_agent.lab.ofhold import OFPT_HELLO

LOG = log.getLogger(__name__)

OFPT_PACKET_IN = 10
OFPT_PACKET_OUT = 13
OFP_NO_BUFFER = 0xffffffff
OFPAT_OUTPUT = 0
OFPAT_POP_VLAN = 18
OFPXMC_OPENFLOW_BASIC = 0x8000
OFPXMT_OFB_IN_PORT = 0
_PACKET_IN = struct.Struct('!IHBBQ')
# Made beside the listening socket once the switch's HELLO arrived.
CONNECTED_SUFFIX = '.connected'


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


class Controller(ofhold.HoldingController):
    """Holds every PACKET_IN for ``delay_ns``, then sends it to
    ``out_port``; see the module.

    :param records: a text file object; one line per released packet
    """

    def __init__(self, listen_path, out_port, delay_ns, records, **kwargs):
        super().__init__(delay_ns, records, **kwargs)
        self.listen_path = listen_path
        self.out_port = out_port
        self._server = None
        self._conn = None

    def _on_message(self, msg_type, xid, body):
        if msg_type == OFPT_HELLO:
            with open(self.listen_path + CONNECTED_SUFFIX, 'w'):
                pass
        elif msg_type == OFPT_PACKET_IN:
            self.hold(parse_packet_in(body))

    def _send_back(self, conn, packet):
        in_port, frame = packet
        conn.sendall(packet_out(next(self._xid), in_port, self.out_port,
                                frame))

    def _frame_of(self, packet):
        return packet[1]

    def _open(self):
        """Listen on :attr:`listen_path`, then ready."""
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.listen_path)
        except FileNotFoundError:
            pass
        self._server.bind(self.listen_path)
        self._server.listen(1)
        self._on_ready()

    def _watched(self):
        return [self._conn or self._server]

    def _serve(self, ready):
        conn = self._conn
        if conn is None and self._server in ready:
            self._conn, _ = self._server.accept()
            self._conn.sendall(message(OFPT_HELLO, next(self._xid)))
        elif conn is not None and conn in ready:
            if not self._read(conn):
                LOG.warning('The switch closed its controller '
                            'connection; %d held packets dropped',
                            len(self._held))
                conn.close()
                self._conn, self._held, self._buf = None, [], b''
                return True
        if self._conn is not None:
            self._release_due(self._conn)
        return True

    def _close(self):
        if self._conn is not None:
            self._release_all(self._conn)
        if self._server is not None:
            self._server.close()


def build_parser():
    parser = argparse.ArgumentParser(
        prog='python -m netweaver_agent.lab.ofdelay',
        description='An OpenFlow controller holding packet-ins for a fixed '
                    'delay and recording each hold.')
    parser.add_argument('--listen', required=True,
                        help='unix socket the bridge connects to')
    parser.add_argument('--output-port', type=int, required=True,
                        help='OpenFlow port number to send packets to')
    ofhold.add_arguments(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    refusal = None
    if not 1 <= args.output_port <= 0xffffff00:
        refusal = (f"output port {args.output_port} is not an OpenFlow "
                   "port number")
    return ofhold.main(
        'labofdelay', args,
        functools.partial(Controller, args.listen, args.output_port), refusal)


if __name__ == '__main__':
    sys.exit(main())
