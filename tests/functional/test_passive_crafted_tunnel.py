"""A guest's UDP datagram crafted to look like a tunnel packet (to the
VXLAN or Geneve port, an IPv4 frame where the inner frame would be,
naming another guest's address) against the real kernel: the
Linux-bridge lab, the real passive capture (its endpoints read from the
hypervisor's namespace as it opens) and real sockets in the guests'
namespaces.  Neither the datagrams guest 0 sends nor those it receives
may count for guest 1, whose own traffic is matched as without them.
"""

import socket

from netweaver_agent.core import netns
from netweaver_agent.core import passive
from netweaver_agent.core import passivecapture
from netweaver_agent.core import probe
from netweaver_agent.lab import traffic as labtraffic
from tests.flows import udp

MARKER = b'MARKER-71c4-crafted-tunnel-'
CRAFTED = 20


def looks_like_a_tunnel(kind, named_src, named_dst, ipid):
    """A tunnel header (VXLAN, or Geneve with no option) and an inner
    Ethernet/IPv4/UDP frame between the ``named`` addresses."""
    head = (b'\x08\0\0\0\0\0\x07\0' if kind == 'vxlan' else
            b'\0\0\x65\x58\0\0\x07\0')
    return head + udp(named_src, named_dst, 5000, 5001, ipid,
                      MARKER * 4)


def send_crafted(netns_name, bind, to, named_src, named_dst):
    """``CRAFTED`` datagrams to each tunnel port from a socket bound to
    ``bind`` in ``netns_name``."""
    sock = netns.socket_in_netns(netns_name, socket.AF_INET,
                                 socket.SOCK_DGRAM)
    with sock:
        sock.bind((bind, 0))
        for n, (port, kind) in enumerate(sorted(
                probe.TUNNEL_PORTS.items())):
            for i in range(CRAFTED):
                # Each "inner" packet its own key (none ambiguous).
                sock.sendto(looks_like_a_tunnel(kind, named_src, named_dst,
                                                100 + n * CRAFTED + i),
                            (to, port))


def test_crafted_tunnel_packets_never_count_for_the_guest_they_name(
        lab_factory):
    the_lab = lab_factory(guests=2)
    spec = the_lab.spec
    sender, victim = the_lab.guests
    src = passive.address(spec.src_address)
    named = passive.address(victim.address)
    specs = [passive.VifSpec(g.vif, spec.pif,
                             frozenset({passive.address(g.address)}))
             for g in the_lab.guests]
    interfaces = [spec.pif] + [g.vif for g in the_lab.guests]
    with passivecapture.PassiveCapture(
            1, netns_name=spec.hv_netns, interfaces=interfaces,
            cap=100_000) as cap:
        res = labtraffic.exchange(spec.src_netns, victim.netns,
                                  victim.address, tcp_bytes=50_000,
                                  udp_count=30, payload=MARKER)
        # Out of the pif: "inner" source the victim; into the pif: "inner"
        # destination the victim.
        send_crafted(sender.netns, sender.address, spec.src_address,
                     named, src)
        send_crafted(spec.src_netns, spec.src_address, sender.address,
                     src, named)
    assert cap.stats.drops == 0 and cap.stats.over_cap == 0
    assert res.tcp_echoed == res.tcp_sent
    out = passive.match(cap.sightings, specs)
    r = out[victim.vif]
    print(f'victim: {r.packets} matched, unmatched {r.unmatched}, local '
          f'{r.local}, ambiguous {r.ambiguous}; sender: '
          f'{out[sender.vif].packets} matched, unmatched '
          f'{out[sender.vif].unmatched}')
    assert r.unmatched == 0, r
    assert r.report.ingress.count >= res.udp_received
    ports = set(probe.TUNNEL_PORTS)
    on_pif = [s for s in cap.sightings if s.ifname == spec.pif and
              s.header.flow[0] == 17 and s.header.flow[4] in ports]
    # Every crafted datagram crossed the pif, keyed on its own headers.
    assert len(on_pif) == 2 * CRAFTED * len(ports), len(on_pif)
    assert not [s for s in cap.sightings if named in s.header.flow[1:3]
                and s.ifname != victim.vif and s.header.flow[4] == 5001]
    # The sender's datagrams are its own flows, matched as any (with the
    # ICMP port unreachable each end answers some with).
    assert out[sender.vif].packets >= 2 * CRAFTED * len(ports)
    assert out[sender.vif].unmatched == 0
