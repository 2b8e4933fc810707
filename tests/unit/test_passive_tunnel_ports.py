"""A tenant's plain UDP to a tunnel port (4789, 8472, 6081) in the passive
sampling filter (capture.passive_filter, in the classic-BPF interpreter)
and in passive.parse: with no IP frame inside it is sampled and keyed on
its own ports like any UDP flow, while a real VXLAN or Geneve packet is
still sampled and keyed on its inner headers."""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.core import capture
from netweaver_agent.core import passive
from netweaver_agent.core import probe
from tests import packets as pk
from tests.flows import GUEST
from tests.flows import PEER
from tests.flows import udp
from tests.unit.bpf import run_bpf as run

TUNNEL_PORTS = sorted(probe.TUNNEL_PORTS)
NOT_IP = st.integers(0, 0xffff).filter(lambda e: e not in (0x0800, 0x86dd))


def plain(sport, dport, payload):
    return udp(PEER, GUEST, sport, dport, 9, payload)


def outer_flow(sport, dport):
    return (17, PEER, GUEST, sport, dport)


@settings(max_examples=300, deadline=None)
@given(sport=st.integers(0, 65535), dport=st.sampled_from(TUNNEL_PORTS),
       payload=st.binary(max_size=80), etype=NOT_IP, bits=st.integers(0, 6),
       geneve_opts=st.integers(0, 63))
def test_plain_udp_to_a_tunnel_port_is_sampled_on_its_ports(
        sport, dport, payload, etype, bits, geneve_opts):
    """Any datagram whose would-be inner ethertype is not IP (or that is
    too short to hold one): kept by its ports' hash, cut after the UDP
    header, keyed as plain UDP."""
    inner_at = 8 + (geneve_opts * 4 if probe.TUNNEL_PORTS[dport] ==
                    'geneve' else 0) + 12
    if payload:
        payload = bytes([geneve_opts]) + payload[1:]
    if len(payload) >= inner_at + 2:
        payload = (payload[:inner_at] + etype.to_bytes(2, 'big') +
                   payload[inner_at + 2:])
    f = plain(sport, dport, payload)
    sample = 1 << bits
    value = (sport ^ dport) % sample
    snap = run(capture.passive_filter(sample, value), f)
    assert snap == len(f) - len(payload)
    assert passive.parse(f[:snap]) == passive.parse(f)
    h = passive.parse(f)
    assert h.flow == outer_flow(sport, dport) and h.ident == (9, 0)
    if sample > 1:
        assert run(capture.passive_filter(sample, (value + 1) % sample),
                   f) == 0


@settings(max_examples=200, deadline=None)
@given(sport=st.integers(0, 65535), dport=st.integers(1, 65535),
       port=st.sampled_from(TUNNEL_PORTS), bits=st.integers(1, 6))
def test_real_tunnel_still_sampled_on_its_inner_frame(sport, dport, port,
                                                      bits):
    inner = plain(sport, dport, b'inner payload')
    if probe.TUNNEL_PORTS[port] == 'geneve':
        f = pk.geneve(inner, 5, port=port)
    else:
        f = pk.vxlan(inner, 5, port=port)
    sample = 1 << bits
    value = (sport ^ dport) % sample
    snap = run(capture.passive_filter(sample, value), f)
    assert snap == len(f) - len(b'inner payload')
    assert passive.parse(f[:snap]).flow == outer_flow(sport, dport)
    assert passive.parse(f).flow == outer_flow(sport, dport)
    assert run(capture.passive_filter(sample, (value + 1) % sample), f) == 0


def test_a_tunnel_port_flow_matches_pif_to_vif():
    """End to end: the same datagram on the pif and on the vif pairs, as
    any UDP flow does."""
    f = plain(40000, 4789, b'\x00' * 40)
    snap = run(capture.passive_filter(1), f)
    h = passive.parse(f[:snap])
    seen = [passive.Sighting('eth1', 1000, 0, h),
            passive.Sighting('tap0', 1500, 1, h)]
    spec = passive.VifSpec('tap0', 'eth1', frozenset({GUEST}))
    result = passive.match(seen, [spec])['tap0']
    assert result.packets == 1 and result.unmatched == 0
    assert result.report.ingress.count == 1
