"""The capture's kernel filter narrowed to one window's probes and answers.

The program runs in the small classic-BPF interpreter of
:mod:`tests.unit.test_encap_parse`.  It must never refuse what user space
(:func:`pcapkeys.frame_key`) keeps for the window, whatever the frame
(hypothesis: probes, answers, damaged, tagged, truncated, padded), and it
must refuse other sessions' probes and tenants' own pings and datagrams.
"""

import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.core import capture
from netweaver_agent.core import pcapkeys
from netweaver_agent.core import probe
from tests import packets as pk
from tests.packets import frame4
from tests.packets import frame6
from tests.packets import probe_frames as frames
from tests.packets import reply6
from tests.unit.bpf import run_bpf

SESSION = 0x2345
ADDRS = (bytes([198, 18, 0, 1]), bytes([198, 18, 0, 10]))


def ours_and_answers(proto, session, vlan=()):
    f4 = frame4(proto, session, 3, vlan=vlan)
    f6 = frame6(proto, session, 3, vlan=vlan)
    out = [f4, f6]
    if not vlan:
        out += [pk.reply(f4), reply6(f6)]
    return out


@pytest.mark.parametrize('proto', ['icmp', 'udp'])
@pytest.mark.parametrize('vlan', [(), (5,), (6, 5)])
def test_the_windows_probes_pass_and_others_do_not(proto, vlan):
    prog = capture.bpf_filter(proto, session=SESSION)
    for f in ours_and_answers(proto, SESSION, vlan):
        assert run_bpf(prog, f) == capture.SNAPLEN, f.hex()
    for other in (SESSION + 1, SESSION ^ 0x8000):
        for f in ours_and_answers(proto, other, vlan):
            assert run_bpf(prog, f) == 0, f.hex()


@pytest.mark.parametrize('proto', ['icmp', 'udp'])
def test_tenants_own_traffic_does_not_pass(proto):
    prog = capture.bpf_filter(proto, session=SESSION)
    ping = frame4('icmp', SESSION, 3)
    # The same ICMP id, no tag: a guest's ping that happens to match.
    untagged = bytearray(ping)
    untagged[42:52] = bytes(10)
    assert run_bpf(prog, bytes(untagged)) == 0
    # A datagram from the probes' source port, without the tag.
    dgram = bytearray(frame4('udp', SESSION, 3))
    dgram[42:46] = b'DATA'
    assert run_bpf(prog, bytes(dgram)) == 0


def test_udp_mode_keeps_tunnels_for_user_space():
    inner = frame4('udp', SESSION, 3)
    for port in (4789, 7777):
        outer = pk.vxlan(inner, 42, port=port)
        prog = capture.bpf_filter('udp', vxlan_port=7777, session=SESSION)
        assert run_bpf(prog, outer) == capture.SNAPLEN


def test_no_session_and_no_tcp_ports_are_not_narrowed():
    for proto in probe.PROTOCOLS:
        assert capture.bpf_filter(proto) == capture.bpf_filter(
            proto, session=None)
    assert capture.bpf_filter('tcp', session=SESSION) == \
        capture.bpf_filter('tcp')


@settings(max_examples=800, deadline=None)
@given(frames(), st.sampled_from(['icmp', 'udp']),
       st.sampled_from([None, 4789]))
def test_nothing_user_space_keeps_is_refused(frame, proto, vxlan_port):
    found = pcapkeys.frame_key(frame, 0, len(frame))
    broad = capture.bpf_filter(proto, vxlan_port=vxlan_port)
    if found is None or not run_bpf(broad, frame):
        return
    narrow = capture.bpf_filter(proto, vxlan_port=vxlan_port,
                                session=found[0])
    assert run_bpf(narrow, frame) == capture.SNAPLEN, frame.hex()


def test_tcp_keeps_the_plans_ports_only():
    ports = range(40000, 40010)
    prog = capture.bpf_filter('tcp', session=SESSION, tcp_ports=ports)
    for vlan in ((), (5,)):
        for port in (ports[0], ports[-1]):
            syn = probe.build_frame('tcp', SESSION, probe.tcp_ident(port, 1),
                                    *ADDRS, pk.MAC_A, pk.MAC_B, vlan=vlan)
            assert run_bpf(prog, syn) == capture.SNAPLEN
            if not vlan:
                assert run_bpf(prog, pk.reply(syn)) == capture.SNAPLEN
                six = frame6('tcp', SESSION, 1)
                assert run_bpf(capture.bpf_filter(
                    'tcp', tcp_ports=[40001]), six) == capture.SNAPLEN
        for port in (ports[0] - 1, ports[-1] + 1):
            syn = probe.build_frame('tcp', SESSION, probe.tcp_ident(port, 1),
                                    *ADDRS, pk.MAC_A, pk.MAC_B, vlan=vlan)
            assert run_bpf(prog, syn) == 0
            if not vlan:
                assert run_bpf(prog, pk.reply(syn)) == 0


@settings(max_examples=400, deadline=None)
@given(frames(), st.sampled_from([None, 4789]))
def test_tcp_nothing_of_the_plans_ports_is_refused(frame, vxlan_port):
    found = pcapkeys.frame_key(frame, 0, len(frame))
    broad = capture.bpf_filter('tcp', vxlan_port=vxlan_port)
    if found is None or not found[1] >> 33 or not run_bpf(broad, frame):
        return
    port = probe.tcp_ident_port(found[1] >> 1)
    narrow = capture.bpf_filter('tcp', vxlan_port=vxlan_port,
                                tcp_ports=[port])
    assert run_bpf(narrow, frame) == capture.SNAPLEN, frame.hex()
