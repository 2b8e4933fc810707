"""UDP to a tunnel port is read as a tunnel only between the host's own
tunnel endpoints and others (core.passive, core.passivecapture): a guest's
datagram crafted to look like VXLAN or Geneve, its "inner" addresses
naming another vNIC, is keyed on its own headers and never counts for the
vNIC it names."""

import socket

from netweaver_agent.core import passive
from netweaver_agent.core import passivecapture
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from tests import packets as pk
from tests.flows import GUEST
from tests.flows import OTHER
from tests.flows import PEER
from tests.flows import udp

IN, OUT = sightings.DIR_IN, sightings.DIR_OUT
HOST_VTEP = pk.UNDERLAY[1]
PORTS = probe.tunnel_ports()


def crafted(src, dst, named_src, named_dst, port=4789):
    """A guest's plain UDP datagram from ``src`` to ``dst`` holding what
    looks like a VXLAN header and an inner frame between the ``named``
    addresses."""
    inner = udp(named_src, named_dst, 5, 6, 77)
    return udp(src, dst, 40000, port, 9,
               b'\x08\0\0\0\0\0\x07\0' + inner)


def test_a_real_tunnel_to_or_from_the_host_endpoint_is_read_inside():
    inner = udp(PEER, GUEST, 5, 6, 99)
    for frame in (pk.vxlan(inner, 7), pk.geneve(inner, 7)):
        for ends in ({HOST_VTEP}, {pk.UNDERLAY[0]}):
            assert passive.parse(frame, PORTS, ends) == passive.parse(inner)


def test_a_crafted_tunnel_elsewhere_is_keyed_on_its_own_headers():
    f = crafted(OTHER, PEER, GUEST, PEER)
    h = passive.parse(f, PORTS, frozenset({HOST_VTEP}))
    assert h.flow == (17, OTHER, PEER, 40000, 4789)
    # Without the endpoints (offline, unknown) it reads as a tunnel.
    assert passive.parse(f, PORTS).flow[1] == GUEST


def test_parse_run_and_parse_ip_decide_alike():
    frames = [crafted(OTHER, PEER, GUEST, PEER)] * 5
    ends = frozenset({HOST_VTEP})
    size = max(map(len, frames))
    buf = b''.join(f.ljust(size, b'\0') for f in frames)
    heads = passive.parse_run(buf, 0, size, 5, len(frames[0]), PORTS,
                              endpoints=ends)
    assert {h.flow for h in heads} == {(17, OTHER, PEER, 40000, 4789)}
    assert passive.parse_ip(frames[0][14:], PORTS, ends).flow[1] == OTHER


def test_a_crafted_tunnel_never_counts_for_the_vnic_it_names():
    """Guest OTHER sends a datagram naming GUEST as the inner source out
    of the pif; the source sends one to OTHER naming GUEST as the inner
    destination.  GUEST's result is as without them."""
    ends = frozenset({HOST_VTEP})
    out_f = crafted(OTHER, PEER, GUEST, PEER)
    in_f = crafted(PEER, OTHER, PEER, GUEST)

    def seen(ifname, t, d, f):
        return passive.Sighting(ifname, t, d, passive.parse(f, PORTS, ends))

    own = [seen('eth1', 0, IN, udp(PEER, GUEST, 1, 2, 3)),
           seen('tap0', 2_000, OUT, udp(PEER, GUEST, 1, 2, 3))]
    tricks = [seen('tap1', 10, IN, out_f), seen('eth1', 900, OUT, out_f),
              seen('eth1', 1_000, IN, in_f), seen('tap1', 1_900, OUT, in_f)]
    specs = [passive.VifSpec('tap0', 'eth1', frozenset({GUEST})),
             passive.VifSpec('tap1', 'eth1', frozenset({OTHER}))]
    before = passive.match(own, specs)
    after = passive.match(own + tricks, specs)
    assert after['tap0'] == before['tap0']
    assert after['tap0'].unmatched == 0
    # The sender's own datagrams: matched as any UDP flow of its.
    assert after['tap1'].packets == 2 and after['tap1'].unmatched == 0


def test_local_addresses_of_this_namespace():
    found = passivecapture.local_addresses()
    assert socket.inet_aton('127.0.0.1') in found
    assert all(len(a) in (4, 16) for a in found)


def test_the_capture_reads_its_endpoints_when_it_opens_unless_given():
    given = passivecapture.PassiveCapture(1, endpoints=[HOST_VTEP])
    assert given.endpoints == frozenset({HOST_VTEP})
    assert passivecapture.PassiveCapture(1).endpoints is None
