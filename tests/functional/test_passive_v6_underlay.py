"""Passive sampling of VXLAN over an IPv6 underlay, by the real kernel.

Two namespaces of this test joined by a veth pair (2001:2::/64 only),
each with a kernel VXLAN device over IPv6 (VNI 5, 198.18.5.0/24 inside).
UDP flows of many source ports go through the tunnel; the passive
capture (the real ``AF_PACKET`` socket with the real sampling filter) on
the receiving side's veth, which sees only the outer packets, must keep
exactly the flows the vif would keep: those whose *inner* ports' hash is
the sample's value (the outer source port is the kernel's hash of the
inner flow, unrelated to it), each read as its inner flow.
"""

import socket

import pytest

from netweaver_agent.core import netns
from netweaver_agent.core import passivecapture
from tests.functional.conftest import require_root
from tests.functional.conftest import unique_prefix

SAMPLE = 16
FLOWS = 256
DPORT = 5301
INNER = ('198.18.5.1', '198.18.5.2')
OUTER = ('2001:2::5:1', '2001:2::5:2')


@pytest.fixture
def tunnel():
    """``(sender namespace, receiver namespace, receiver's veth)``."""
    require_root()
    prefix = unique_prefix('v6u')
    a, b = prefix + 'a', prefix + 'b'
    veth_a, veth_b = prefix[-8:] + 'va', prefix[-8:] + 'vb'
    made = []
    try:
        for ns in (a, b):
            netns.run(['ip', 'netns', 'add', ns])
            made.append(ns)
            netns.run(['ip', 'link', 'set', 'lo', 'up'], netns=ns)
        netns.run(['ip', 'link', 'add', veth_a, 'netns', a, 'type', 'veth',
                   'peer', 'name', veth_b, 'netns', b])
        for ns, veth, outer, peer, inner, mac in (
                (a, veth_a, OUTER[0], OUTER[1], INNER[0],
                 '02:00:00:05:00:01'),
                (b, veth_b, OUTER[1], OUTER[0], INNER[1],
                 '02:00:00:05:00:02')):
            netns.run(['ip', 'addr', 'add', outer + '/64', 'dev', veth,
                       'nodad'], netns=ns)
            netns.run(['ip', 'link', 'set', veth, 'up'], netns=ns)
            netns.run(['ip', 'link', 'add', 'vx5', 'type', 'vxlan', 'id', '5',
                       'local', outer, 'remote', peer, 'dstport', '4789',
                       'dev', veth], netns=ns)
            netns.run(['ip', 'link', 'set', 'vx5', 'address', mac],
                      netns=ns)
            netns.run(['ip', 'addr', 'add', inner + '/24', 'dev', 'vx5'],
                      netns=ns)
            netns.run(['ip', 'link', 'set', 'vx5', 'up'], netns=ns)
        netns.run(['ip', 'neigh', 'replace', INNER[1], 'lladdr',
                   '02:00:00:05:00:02', 'dev', 'vx5', 'nud', 'permanent'],
                  netns=a)
        yield a, b, veth_b
    finally:
        for ns in made:
            netns.run(['ip', 'netns', 'delete', ns], check=False)


def _send_flows(ns):
    """One datagram of each of FLOWS flows (source ports 20000 on) to
    DPORT through the tunnel; the source ports sent."""
    sports = list(range(20000, 20000 + FLOWS))
    for sport in sports:
        sock = netns.socket_in_netns(ns, socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.bind((INNER[0], sport))
            sock.sendto(b'passive-v6-underlay', (INNER[1], DPORT))
    return sports


def test_vxlan_over_ipv6_sampled_on_the_inner_flow(tunnel):
    sender, receiver, veth = tunnel
    value = 3
    with passivecapture.PassiveCapture(SAMPLE, netns_name=receiver,
                                       interfaces={veth},
                                       value=value) as cap:
        sports = _send_flows(sender)
    inner = (17, socket.inet_aton(INNER[0]), socket.inet_aton(INNER[1]))
    kept = [s.header.flow for s in cap.sightings
            if s.header.flow[:3] == inner]
    want = {p for p in sports if (p ^ DPORT) % SAMPLE == value}
    assert want, 'the test sends no flow the sample keeps'
    # Every kept packet is read as its inner flow, and exactly the flows
    # whose inner ports hash to the value are kept, once each.
    assert sorted(f[3] for f in kept) == sorted(want), (
        len(kept), cap.stats)
    assert all(f[4] == DPORT for f in kept)
    assert cap.stats.drops == 0
