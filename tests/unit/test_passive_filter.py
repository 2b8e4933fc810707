"""The passive sampling filter (capture.passive_filter) in a classic-BPF
interpreter: whole flows kept or refused alike on every interface (plain,
VLAN-tagged, inside VXLAN/Geneve, every GSO segment), and the snapshot
ending where the transport header ends, so no payload byte is kept."""

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.core import capture
from netweaver_agent.core import passive
from netweaver_agent.core import probe
from tests import flows
from tests.flows import G6
from tests.flows import GUEST
from tests.flows import P6
from tests.flows import PEER
from tests.flows import tcp
from tests.flows import udp
from tests.unit.bpf import run_bpf as run

MARKER = b'PAYLOAD-MARKER-7f3a'


# Tunnel endpoints: an IPv4 underlay, and an IPv6 one.
VTEPS = {False: (bytes([198, 18, 1, 1]), bytes([198, 18, 1, 2])),
         True: (bytes.fromhex('20010002000000000000000000000101'),
                bytes.fromhex('20010002000000000000000000000102'))}


def vxlan(inner, sport=33333, v6_underlay=False):
    return udp(*VTEPS[v6_underlay], sport, 4789,
               5, payload=b'\x08\0\0\0\0\0\x07\0' + inner)


def geneve(inner, opt_words=2, v6_underlay=False):
    gen = bytes([opt_words, 0]) + b'\x65\x58' + b'\0\0\x07\0'
    return udp(*VTEPS[v6_underlay], 40000, 6081,
               5, payload=gen + b'\x01' * (4 * opt_words) + inner)


def kept_by_python(frame, sample, value):
    h = passive.parse(frame)
    proto, src, dst, sport, dport = h.flow
    if proto in (6, 17):            # (no later fragments here)
        return (sport ^ dport) % sample == value
    return (src[-1] ^ dst[-1]) % sample == value


ports = st.integers(0, 65535)


def passive_tunnel_ports():
    return set(probe.TUNNEL_PORTS)


@settings(max_examples=300, deadline=None)
# UDP to a tunnel port is read as the tunnel (a non-VXLAN datagram to 4789
# is left unparsed, by design): plain flows use the other ports.
@given(sport=ports,
       dport=ports.filter(lambda p: p not in passive_tunnel_ports()),
       seq=st.integers(0, 2**32 - 1),
       size=st.integers(0, 200), bits=st.integers(0, 8),
       v6=st.booleans(), proto=st.sampled_from(['tcp', 'udp']))
def test_flow_kept_alike_everywhere_and_no_payload(
        sport, dport, seq, size, bits, v6, proto):
    sample = 1 << bits
    src, dst = (P6, G6) if v6 else (PEER, GUEST)
    body = (MARKER * 20)[:size]
    if proto == 'tcp':
        f = tcp(src, dst, sport, dport, seq, 1, body)
        segs = [tcp(src, dst, sport, dport, (seq + i) % 2**32, 1, body[i:])
                for i in range(0, size, 64)]
    else:
        f = udp(src, dst, sport, dport, seq & 0xffff, body)
        segs = []
    value = (sport ^ dport) % sample
    for v in (value, (value + 1) % sample):
        prog = capture.passive_filter(sample, v)
        want = kept_by_python(f, sample, v)
        framings = [f, f[:12] + b'\x81\x00\x00\x64' + f[12:]] + segs
        if not v6:
            framings += [vxlan(f), geneve(f), geneve(f, 0)]
        # Over an IPv6 underlay too: sampled on the inner frame.
        framings += [vxlan(f, v6_underlay=True), geneve(f, v6_underlay=True),
                     geneve(f, 0, v6_underlay=True)]
        for g in framings:
            snap = run(prog, g)
            assert bool(snap) == want, g.hex()
            if snap:
                assert snap == len(g) - len(body) or g in segs
                assert MARKER[:4] not in g[:snap]
                hdr = passive.parse(g[:snap])
                assert hdr is not None and hdr.flow == passive.parse(g).flow
        if sample == 1:
            break


def test_snapshot_ends_at_the_transport_header():
    body = MARKER * 3
    f = tcp(PEER, GUEST, 1, 2, 3, 4, body)
    assert run(capture.passive_filter(1), f) == len(f) - len(body)
    u = udp(PEER, GUEST, 1, 2, 3, body)
    assert run(capture.passive_filter(1), u) == len(u) - len(body)
    v = vxlan(u)
    assert run(capture.passive_filter(1), v) == len(v) - len(body)
    v = vxlan(u, v6_underlay=True)
    assert run(capture.passive_filter(1), v) == len(v) - len(body)


def test_icmp_sampled_by_addresses():
    import dpkt
    echo = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(
        id=1, seq=2, data=MARKER))
    f = flows.ip_frame(PEER, GUEST, echo, 1, (), 9)
    h = (PEER[-1] ^ GUEST[-1]) % 4
    assert run(capture.passive_filter(4, h), f) == len(f) - len(MARKER)
    assert run(capture.passive_filter(4, (h + 1) % 4), f) == 0


def test_not_ip_refused():
    arp = b'\xff' * 6 + b'\x02' * 6 + b'\x08\x06' + b'\0' * 28
    assert run(capture.passive_filter(1), arp) == 0


@pytest.mark.parametrize('sample,value', [
    (0, 0), (3, 0), (96, 0), (1 << 17, 0), (True, 0), (4, 4), (4, -1),
    ('64', 0)])
def test_bad_sample_names_itself(sample, value):
    with pytest.raises(ValueError, match='sample'):
        capture.passive_filter(sample, value)


@settings(max_examples=300, deadline=None)
@given(sport=ports, dport=st.sampled_from([53, 4789, 6081, 80]),
       size=st.integers(0, 40), v6=st.booleans(),
       proto=st.sampled_from(['tcp', 'udp', 'vxlan', 'frag', 'opts']),
       cut=st.integers(0, 80), pad=st.integers(0, 7))
def test_parse_at_equals_parse(sport, dport, size, v6, proto, cut, pad):
    """The ring reader's no-copy parse gives what parse gives, for any
    frame, cut anywhere (headers-only snapshots), at any offset."""
    src, dst = (P6, G6) if v6 else (PEER, GUEST)
    body = b'b' * size
    if proto == 'tcp':
        f = tcp(src, dst, sport, dport, 7, 9, body)
    else:
        f = udp(src, dst, sport, dport, 1234, body)
    if proto == 'vxlan' and not v6:
        f = vxlan(f)
    elif proto == 'frag' and not v6:
        f = f[:20] + b'\x00\x10' + f[22:]       # a later fragment
    elif proto == 'opts' and not v6:
        f = f[:14] + b'\x46' + f[15:]           # IHL 6
    f = f[:len(f) - cut] if cut < len(f) else f[:1]
    buf = b'\xee' * pad + f + b'\xee' * 9
    ports_ = passive.probe.tunnel_ports()
    assert passive.parse_at(buf, pad, len(f), ports_) == passive.parse(f)
