"""Probe identity: build -> bytes -> parse gives the same key, replies too."""

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from netweaver_agent.core import probe
from tests.packets import DST
from tests.packets import ethernet
from tests.packets import frame
from tests.packets import ident
from tests.packets import MAC_A
from tests.packets import PORT
from tests.packets import reply
from tests.packets import SRC
from tests.packets import wire_key


sessions = st.integers(0, 0xffff)
seqs = st.integers(0, 0xffffffff)
tcp_seqs = st.integers(0, probe.TCP_SEQ_MASK)
ports = st.integers(1, 0xffff)
sizes = st.integers(20, 300)


@given(proto=st.sampled_from(['icmp', 'udp']), session=sessions, seq=seqs,
       size=sizes)
def test_tagged_probe_and_reply_round_trip(proto, session, seq, size):
    f = frame(proto, session, seq, size=size)
    assert probe.parse_key(f) == probe.ProbeKey(session, seq)
    assert probe.parse_key(reply(f)) == probe.ProbeKey(session, seq, True)
    assert probe.parse_key(f, session) == probe.ProbeKey(session, seq)


@given(session=sessions, seq=tcp_seqs, port=ports,
       kind=st.sampled_from(['rst', 'synack']))
def test_tcp_probe_and_reply_round_trip(session, seq, port, kind):
    f = frame('tcp', session, probe.tcp_ident(port, seq))
    key = wire_key('tcp', session, probe.tcp_ident(port, seq))
    assert probe.parse_key(f) == key
    assert key.port == port
    assert probe.parse_key(reply(f, kind)) == probe.ProbeKey(
        key.session, key.seq, True)


def test_tcp_seq_0xffff_wraps_ack_into_next_session_number():
    # ack = seq + 1 carries into the session half; parse undoes it.
    f = frame('tcp', 0xffff, ident('tcp', 0xffff))
    assert probe.parse_key(reply(f)) == wire_key(
        'tcp', 0xffff, ident('tcp', 0xffff), True)


@given(session=sessions, seq=seqs)
def test_as_int_round_trip(session, seq):
    for r in (False, True):
        key = probe.ProbeKey(session, seq, r)
        assert probe.ProbeKey.from_int(session, key.as_int()) == key


# Golden bytes: the wire format is an interface (captures from other hosts,
# older agents); a change here must be deliberate.
GOLDEN = {
    'icmp': '020000000002020000000001080045000040000700004001ee86c6120001c612'
            '000a080029c504d200074e57763104d200000007' + '00' * 26,
    'udp': '020000000002020000000001080045000040000700004011ee76c6120001c612'
           '000a84d2829a002ca2974e57763104d200000007' + '00' * 26,
    'tcp': '020000000002020000000001080045000028000700004006ee99c6120001c612'
           '000a84d2000904d20007000000005002020097fe0000',
}


@pytest.mark.parametrize('proto', sorted(GOLDEN))
def test_golden_bytes(proto):
    # TCP from port 0x84d2, the port older agents derived from session 1234.
    raw = frame(proto, 1234, ident(proto, 7, port=0x84d2))
    assert raw.hex() == GOLDEN[proto]
    assert dpkt.in_cksum(raw[14:34]) == 0          # valid IP checksum
    if proto == 'icmp':
        assert dpkt.in_cksum(raw[34:]) == 0
    assert probe.parse_key(raw) == wire_key(
        proto, 1234, ident(proto, 7, port=0x84d2))


def test_foreign_traffic_is_none():
    ping = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(
        id=1, seq=1, data=b'abcdefghijklmnopqrstuvwabcdefghi'))
    # Any TCP SYN is keyed (its ISN is all there is to read); the plan,
    # or offline the source port range, tells ours (test_tcp_ports.py).
    tcp = dpkt.tcp.TCP(sport=40000, dport=22, seq=123456789,
                       flags=dpkt.tcp.TH_ACK)
    udp = dpkt.udp.UDP(sport=5353, dport=5353, data=b'x' * 20)
    for l4, p in ((ping, 1), (tcp, 6), (udp, 17)):
        ip = dpkt.ip.IP(src=SRC, dst=DST, p=p, data=l4)
        ip.len = len(ip)
        assert probe.parse_key(ethernet(bytes(ip))) is None
    arp = bytes(dpkt.ethernet.Ethernet(src=MAC_A, dst=b'\xff' * 6,
                                       type=0x0806, data=bytes(28)))
    assert probe.parse_key(arp) is None
    assert probe.parse_key(b'') is None


def test_magic_without_matching_identity_is_none():
    # An echo whose id is not the tag's session: not ours.
    f = bytearray(frame('icmp', 5, 9))
    f[38:40] = b'\x00\x06'
    assert probe.parse_key(bytes(f)) is None
    # A UDP datagram with our tag but a foreign source port.
    f = bytearray(frame('udp', 5, 9))
    f[34:36] = b'\x13\x88'
    assert probe.parse_key(bytes(f)) is None
    # A SYN with our ISN from another source port: another key.
    f = bytearray(frame('tcp', 5, ident('tcp', 9)))
    f[34:36] = b'\x13\x88'
    assert probe.parse_key(bytes(f)) == wire_key(
        'tcp', 5, probe.tcp_ident(0x1388, 9))
    # ... and from port 0: nothing.
    f[34:36] = b'\x00\x00'
    assert probe.parse_key(bytes(f)) is None


@pytest.mark.parametrize('proto', probe.PROTOCOLS)
def test_truncated_frames_are_none(proto):
    f = frame(proto, 77, ident(proto, 3))
    full = probe.parse_key(f)
    assert full == wire_key(proto, 77, ident(proto, 3))
    for cut in range(len(f)):
        key = probe.parse_key(f[:cut])
        # Either nothing, or (IP length ignored when cut) still the key.
        assert key in (None, full), cut
    # Cut inside the tag: never a key.
    tag_end = {'icmp': 52, 'udp': 52, 'tcp': 54}[proto]
    assert probe.parse_key(f[:tag_end - 1]) is None


@pytest.mark.parametrize('proto', ['icmp', 'udp'])
def test_wrong_session_is_none(proto):
    # (TCP carries no session: its keyed ISN is found through the plan.)
    f = frame(proto, 77, ident(proto, 3))
    assert probe.parse_key(f, session=78) is None
    assert probe.parse_key(reply(f), session=78) is None
    assert probe.parse_key(reply(f), session=77) == \
        probe.ProbeKey(77, ident(proto, 3), True)


def test_vlan_tagged_frame():
    inner = frame('icmp', 9, 10)
    tagged = inner[:12] + b'\x81\x00\x00\x64' + inner[12:]
    assert probe.parse_key(tagged) == probe.ProbeKey(9, 10)


def test_build_rejects_out_of_range():
    with pytest.raises(ValueError, match='16-bit'):
        frame('icmp', 0x10000, 1)
    with pytest.raises(ValueError, match='32-bit'):
        frame('icmp', 1, 1 << 32)
    with pytest.raises(ValueError, match='65536 TCP probes'):
        probe.tcp_ident(PORT, 0x10000)
    with pytest.raises(ValueError, match='source port of its own'):
        frame('tcp', 1, 7)
    with pytest.raises(ValueError, match="unknown probe protocol 'sctp'"):
        frame('sctp', 1, 1)


def _rfc1071(data):
    """RFC 1071's own loop: 16-bit big-endian words, end-around carry."""
    data = bytes(data) + b'\0' * (len(data) % 2)
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] << 8 | data[i + 1]
        total = (total & 0xffff) + (total >> 16)
    return ~total & 0xffff


@pytest.mark.parametrize('data', [
    b'', b'\0\0', b'\xff\xff', b'\xff\xff\xff\xff', b'\x12\x34\xed\xcb',
    b'\x00\x01\xff\xfe', b'\x01', b'\xff\xff\x00'])
def test_checksum_folds_as_rfc_1071_also_at_the_zeros(data):
    # A non-zero sum that is a multiple of 0xffff folds to 0xffff.
    assert probe._checksum(data) == _rfc1071(data)


@given(st.binary(max_size=200))
def test_checksum_equals_rfc_1071(data):
    assert probe._checksum(data) == _rfc1071(data)
