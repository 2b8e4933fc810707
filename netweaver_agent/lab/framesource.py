"""A probe source writing whole Ethernet frames, VLAN tags included.

Where no VLAN device can tag the probes (a kernel without the 802.1Q
module, as the lab's), :class:`FrameSource` builds each probe as
:class:`sources.LocalSource` does, puts an Ethernet header with 802.1Q
(and 802.1ad) tags in front of it, and writes the frame to an
``AF_PACKET`` socket bound to one interface: the kernel sends it as is,
with no routing and no neighbour lookup (the destination MACs are given).
"""

import socket

import dpkt
from oslo_log import log

from netweaver_agent.core import netns
from netweaver_agent.core import pacing
from netweaver_agent.core import probe
from netweaver_agent.core import sources

LOG = log.getLogger(__name__)

# A protocol of 0: the socket sends, and receives nothing.
_NO_RECEIVE = 0


class FrameSource(sources.LocalSource):
    """Sends probes as tagged Ethernet frames out of ``ifname``.

    :param netns_name: namespace of ``ifname`` (None: this one)
    :param src_mac: the frames' source MAC (``aa:bb:...``)
    :param macs: ``{destination address: MAC}`` of every target
    :param vlan: VLAN ids, outermost first (two: an 802.1ad S-tag first)
    :param priority: the tags' priority code point (0..7)
    """

    def __init__(self, netns_name, ifname, src_mac, macs, vlan=(),
                 priority=0):
        super().__init__(netns_name=netns_name)
        if not 0 <= priority <= 7:
            raise ValueError(f"VLAN priority {priority!r} is not 0..7")
        for vid in vlan:
            if not 0 <= vid <= 0xfff:
                raise ValueError(f"VLAN id {vid!r} is not within 0..4095")
        if len(vlan) > probe.MAX_VLAN_TAGS:
            raise ValueError(f"{len(vlan)} VLAN tags: at most "
                             f"{probe.MAX_VLAN_TAGS}")
        self.ifname = ifname
        self.src_mac = _mac_bytes(src_mac)
        self.macs = {a: _mac_bytes(m) for a, m in macs.items()}
        self.vlan = tuple(vlan)
        self.priority = priority
        tags = '.'.join(str(v) for v in self.vlan) or 'untagged'
        self.name = f'frames:{netns_name or "-"}/{ifname}/vlan {tags}'
        self._packet_sock = None

    def _socket_for(self, dst_ip):
        if dst_ip not in self.macs:
            raise sources.SourceError(
                f"probe source {self.name} has no MAC for {dst_ip}")
        if self._packet_sock is None:
            try:
                sock = netns.socket_in_netns(
                    self.netns_name, socket.AF_PACKET,
                    socket.SOCK_RAW, _NO_RECEIVE)
            except PermissionError as exc:
                raise sources.SourceError(
                    f"probe source {self.name}: a packet socket needs "
                    f"CAP_NET_RAW: {exc}") from exc
            try:
                sock.bind((self.ifname, _NO_RECEIVE))
            except OSError as exc:
                sock.close()
                raise sources.SourceError(
                    f"probe source {self.name}: cannot bind to interface "
                    f"{self.ifname}: {exc}") from exc
            self._packet_sock = sock
        return self._packet_sock

    def build(self, plan):
        """The frames of ``plan`` as ``[(dst_ip, bytes)]``, in plan order."""
        out = []
        for dst, packet in super().build(plan):
            etype = (dpkt.ethernet.ETH_TYPE_IP6 if pacing.family_of(dst) ==
                     socket.AF_INET6 else dpkt.ethernet.ETH_TYPE_IP)
            out.append((dst, probe.ethernet_frame(
                packet, etype, self.src_mac, self.macs[dst], self.vlan,
                self.priority)))
        return out

    def _transmit(self, sock, dst, data):
        sock.send(data)

    def close(self):
        if self._packet_sock is not None:
            self._packet_sock.close()
            self._packet_sock = None
        super().close()


def _mac_bytes(mac):
    try:
        raw = bytes.fromhex(mac.replace(':', ''))
    except ValueError:
        raw = b''
    if len(raw) != 6:
        raise ValueError(f"invalid MAC address {mac!r}")
    return raw
