"""Passive matching through a NAT between the pif and the vif
(core.passive: a floating IP, DVR).

A 1:1 NAT keeps the peer's address, the ports and the key within the
flow (TCP seq/ack, IPv4 id) and rewrites the vNIC's own address: the
pif sees the outside (floating) address, the vif the inside (fixed) one.
The matcher learns the outside address from packets the guest itself
sent, never from what anyone else can put on the pif or on the vif.
"""

import fixtures

from netweaver_agent.core import passive
from netweaver_agent.core import passivecapture
from netweaver_agent.core import sightings
from netweaver_agent.core import window
from tests.flows import GUEST
from tests.flows import OTHER
from tests.flows import PEER
from tests.flows import tcp
from tests.flows import udp
from tests.unit import pollsterfakes as pf

IN, OUT = sightings.DIR_IN, sightings.DIR_OUT
FLOATING = bytes([198, 19, 0, 50])      # the vNIC's outside address
ELSEWHERE = bytes([198, 19, 0, 77])
VNIC = passive.VifSpec('tap0', 'eth1', frozenset({GUEST}))
NEIGHBOUR = passive.VifSpec('tap1', 'eth1', frozenset({OTHER}))


def seen(ifname, t_ns, direction, frame):
    h = passive.parse(frame)
    assert h is not None
    return passive.Sighting(ifname, t_ns, direction, h)


def natted_exchange(outside=FLOATING, t0=0):
    """A TCP exchange of the guest with PEER through a 1:1 NAT: a segment
    in (pif: to ``outside``, 7 us to the tap) and an ACK out (tap, 3 us
    to the pif: from ``outside``), then a UDP datagram each way."""
    return [
        seen('eth1', t0, IN, tcp(PEER, outside, 4000, 80, 100, 9, b'q' * 9)),
        seen('tap0', t0 + 7_000, OUT,
             tcp(PEER, GUEST, 4000, 80, 100, 9, b'q' * 9)),
        seen('tap0', t0 + 10_000, IN, tcp(GUEST, PEER, 80, 4000, 9, 109)),
        seen('eth1', t0 + 13_000, OUT,
             tcp(outside, PEER, 80, 4000, 9, 109)),
        seen('eth1', t0 + 20_000, IN, udp(PEER, outside, 53, 5353, 41)),
        seen('tap0', t0 + 27_000, OUT, udp(PEER, GUEST, 53, 5353, 41)),
        seen('tap0', t0 + 30_000, IN, udp(GUEST, PEER, 5353, 53, 42)),
        seen('eth1', t0 + 33_000, OUT, udp(outside, PEER, 5353, 53, 42))]


def test_one_to_one_nat_is_matched_on_the_fields_it_keeps():
    r = passive.match(natted_exchange(), [VNIC])['tap0']
    rep = r.report
    assert (rep.ingress.count, rep.egress.count) == (2, 2)
    assert rep.ingress.min_us == rep.ingress.max_us == 7.0
    assert rep.egress.min_us == rep.egress.max_us == 3.0
    assert r.translated == r.packets == 4
    assert (r.unmatched, r.local, r.ambiguous, rep.anomalies) == (0, 0, 0, 0)
    assert r.not_measurable is None


def test_nat_is_learnt_from_what_the_guest_sent_only():
    # Only the way in: the pif's packets to an address no vNIC has teach
    # nothing (anyone can send them), the tap's packet stays local.
    s = natted_exchange()
    ingress_only = [x for x in s if (x.ifname, x.direction) in
                    (('eth1', IN), ('tap0', OUT))]
    r = passive.match(ingress_only, [VNIC])['tap0']
    assert r.packets == r.translated == 0
    assert (r.local, r.unmatched) == (2, 0)


def test_a_packet_received_on_the_pif_never_teaches_a_nat():
    # The guest's datagram never left the pif (to a local peer); a
    # packet with its fields arrives from outside from another address:
    # anyone can send that, so it names no outside address.
    s = [seen('tap0', 0, IN, udp(GUEST, PEER, 5, 6, 77)),
         seen('eth1', 2_000, IN, udp(ELSEWHERE, PEER, 5, 6, 77)),
         seen('eth1', 3_000, IN, udp(PEER, ELSEWHERE, 6, 5, 78)),
         seen('tap0', 4_000, OUT, udp(PEER, GUEST, 6, 5, 78))]
    r = passive.match(s, [VNIC])['tap0']
    assert r.translated == r.packets == 0
    assert r.local == 2


def test_a_packet_to_the_outside_address_never_seen_on_the_tap_is_unmatched():
    s = natted_exchange() + [
        seen('eth1', 50_000, IN, udp(PEER, FLOATING, 53, 5353, 43))]
    r = passive.match(s, [VNIC])['tap0']
    assert (r.packets, r.unmatched) == (4, 1)


def test_nat_of_one_vnic_leaves_the_other_alone():
    other = [seen('eth1', 0, IN, udp(PEER, OTHER, 1, 2, 5)),
             seen('tap1', 2_000, OUT, udp(PEER, OTHER, 1, 2, 5))]
    alone = passive.match(other, [VNIC, NEIGHBOUR])['tap1']
    both = passive.match(natted_exchange() + other, [VNIC, NEIGHBOUR])
    assert both['tap1'] == alone
    assert both['tap1'].translated == 0
    assert both['tap0'].translated == 4


def test_a_lookalike_sent_from_elsewhere_does_not_make_a_vnic_look_natted():
    # The guest's packets leave the pif as they are; a copy of one sent
    # out of the pif from another address (a spoofing guest) changes
    # nothing: what matched exactly is not asked about NAT.
    plain = [
        seen('tap0', 0, IN, tcp(GUEST, PEER, 80, 4000, 9, 109)),
        seen('eth1', 3_000, OUT, tcp(GUEST, PEER, 80, 4000, 9, 109)),
        seen('eth1', 10_000, IN, tcp(PEER, GUEST, 4000, 80, 109, 9, b'x')),
        seen('tap0', 12_000, OUT, tcp(PEER, GUEST, 4000, 80, 109, 9, b'x'))]
    crafted = [
        seen('eth1', 3_500, OUT, tcp(ELSEWHERE, PEER, 80, 4000, 9, 109)),
        seen('eth1', 9_000, IN, tcp(PEER, ELSEWHERE, 4000, 80, 109, 9,
                                    b'x'))]
    before = passive.match(plain, [VNIC])['tap0']
    after = passive.match(plain + crafted, [VNIC])['tap0']
    assert after == before
    assert after.translated == 0 and after.packets == 2


def test_another_vnics_address_on_the_pif_never_teaches_a_nat():
    # The guest's packet to a local peer (never leaves the pif) and a
    # packet with the same fields sent out from the neighbour's own
    # address: the neighbour's, not a NAT's outside.
    s = [seen('tap0', 0, IN, udp(GUEST, PEER, 5, 6, 77)),
         seen('eth1', 2_000, OUT, udp(OTHER, PEER, 5, 6, 77)),
         seen('eth1', 5_000, IN, udp(PEER, OTHER, 6, 5, 78)),
         seen('tap0', 6_000, OUT, udp(PEER, GUEST, 6, 5, 78))]
    r = passive.match(s, [VNIC, NEIGHBOUR])['tap0']
    assert r.translated == r.packets == 0
    assert r.local == 2


def test_a_copy_of_a_natted_packet_from_a_second_address_teaches_nothing():
    copy = [seen('eth1', 13_500, OUT, tcp(ELSEWHERE, PEER, 80, 4000, 9, 109))]
    # Another packet (the UDP datagram) teaches the outside address: the
    # copy from elsewhere changes nothing.
    assert (passive.match(natted_exchange() + copy, [VNIC]) ==
            passive.match(natted_exchange(), [VNIC]))
    # The ACK alone: its fields leave the pif from two addresses, which
    # is the NAT's is unknown; nothing learnt, the tap's packets local.
    tcp_only = [x for x in natted_exchange() if x.header.flow[0] == 6]
    r = passive.match(tcp_only + copy, [VNIC])['tap0']
    assert r.translated == r.packets == 0
    assert r.local == 2


def test_nat_rewriting_ports_is_reported_not_measurable():
    s = [seen('eth1', 0, IN, tcp(PEER, FLOATING, 4000, 61001, 100, 9, b'q')),
         seen('tap0', 7_000, OUT, tcp(PEER, GUEST, 4000, 80, 100, 9, b'q')),
         seen('tap0', 10_000, IN, tcp(GUEST, PEER, 80, 4000, 9, 101)),
         seen('eth1', 13_000, OUT, tcp(FLOATING, PEER, 61001, 4000, 9, 101))]
    r = passive.match(s, [VNIC])['tap0']
    assert r.packets == 0           # no latency from pairs NAT rewrote
    assert r.not_measurable is not None
    assert 'ports' in r.not_measurable
    assert '198.19.0.50' in r.not_measurable


def test_nat_reasons_and_counts_reach_the_metadata():
    from netweaver_agent.core import reportdict
    pw = window.PassiveWindowResult(
        results={}, stats=passivecapture.PassiveStats(), sample=1,
        duration_ns=1)
    # The guest's own address reached too (not through the NAT).
    plain = [seen('eth1', 60_000, IN, udp(PEER, GUEST, 7, 8, 9)),
             seen('tap0', 61_000, OUT, udp(PEER, GUEST, 7, 8, 9))]
    r = passive.match(natted_exchange() + plain, [VNIC])['tap0']
    md = reportdict.passive_summary(r, pw)
    assert (md['passive_translated'], md['passive_packets']) == (4, 5)
    assert 'passive_not_measurable' not in md
    idle = reportdict.passive_summary(passive.PassiveResult('tap0', None),
                                      pw)
    assert 'passive_translated' not in idle
    why = passive.PassiveResult('tap0', None, not_measurable='a reason')
    assert reportdict.passive_summary(why, pw)[
        'passive_not_measurable'] == 'a reason'


A_ADDR = bytes([198, 18, 1, 10])        # tapaaa's guest (test_pollsters)


class PortRewritingNat:
    """Stands in for window.run_passive_window: tapaaa's guest sits behind
    a NAT that rewrites its ports."""

    def __call__(self, paths, sample, window_ms, max_packets, **kw):
        s = [seen('eth1', 0, IN, tcp(PEER, FLOATING, 1, 61000, 5, 6, b'a')),
             seen('tapaaa', 3_000, OUT, tcp(PEER, A_ADDR, 1, 2, 5, 6, b'a')),
             seen('tapaaa', 4_000, IN, tcp(A_ADDR, PEER, 2, 1, 6, 7)),
             seen('eth1', 5_000, OUT, tcp(FLOATING, PEER, 61000, 1, 6, 7))]
        return window.PassiveWindowResult(
            results=passive.match(s, window.passive_specs(paths)),
            stats=passivecapture.PassiveStats(kept=len(s)), sample=sample,
            duration_ns=1_000_000)


class TestNotMeasurableLogged(pf.PollsterTestCase):

    def setUp(self):
        super().setUp()
        self.useFixture(fixtures.MockPatch(
            'netweaver_agent.core.window.run_passive_window',
            side_effect=PortRewritingNat()))

    def test_a_warning_names_the_vnic_and_the_reason(self):
        logs = self.useFixture(fixtures.FakeLogger(
            name='netweaver_agent.agent.inspector'))
        self.CONF.set_override('mode', 'passive', group='netweaver')
        factory, _unit = pf.METERS['network.vif.latency']
        assert not self.samples(factory)    # nothing matched: no sample
        assert 'tapaaa' in logs.output
        assert 'not measurable passively' in logs.output
        assert 'rewrites the ports' in logs.output
