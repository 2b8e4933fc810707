"""Passive matching of the instances' own packets (core.passive).

Frames are built with dpkt (tests/flows.py); sightings are what
the capture would give.  The matcher must pair the same packet on the pif
and the tap by fields the host keeps, whatever offload does to segments
and checksums, and must never pair two different packets.
"""

import time

import fixtures
import pytest

from netweaver_agent.agent import opts
from netweaver_agent.agent import pollsters
from netweaver_agent.core import passive
from netweaver_agent.core import passivecapture
from netweaver_agent.core import sightings
from netweaver_agent.core import vifpath
from netweaver_agent.core import window
from tests.flows import G6
from tests.flows import GUEST
from tests.flows import OTHER
from tests.flows import P6
from tests.flows import PEER
from tests.flows import tcp
from tests.flows import udp
from tests.unit import pollsterfakes as pf

IN, OUT = sightings.DIR_IN, sightings.DIR_OUT


def seen(ifname, t_ns, direction, frame):
    h = passive.parse(frame)
    assert h is not None
    return passive.Sighting(ifname, t_ns, direction, h)


VNIC = passive.VifSpec('tap0', 'eth1', frozenset({GUEST, G6}))


def one(sightings, spec=VNIC):
    return passive.match(sightings, [spec])[spec.vif]


def test_parse_keys_tcp_on_seq_ack_and_ports():
    h = passive.parse(tcp(PEER, GUEST, 4000, 80, 1000, 77, b'a' * 10))
    assert h.flow == (6, PEER, GUEST, 4000, 80)
    assert h.ident == (1000, 77)
    assert h.length == 10


def test_parse_keys_udp_on_ip_id_and_skips_vlan_tags():
    plain = passive.parse(udp(PEER, GUEST, 5, 6, 4242))
    tagged = passive.parse(udp(PEER, GUEST, 5, 6, 4242, vlan=(100, 7)))
    assert plain == tagged
    assert plain.ident == (4242, 0)


def test_ipv6_udp_has_no_key_but_tcp_has():
    assert passive.parse(udp(P6, G6, 5, 6, 1)).ident is None
    assert passive.parse(tcp(P6, G6, 5, 6, 9, 8, b'xy')).length == 2


def test_parse_reads_vxlan_inner_frame():
    inner = udp(PEER, GUEST, 5, 6, 99)
    vx = udp(bytes([198, 18, 1, 1]), bytes([198, 18, 1, 2]), 33333, 4789,
             5, payload=b'\x08\0\0\0\0\0\x07\0' + inner)
    assert passive.parse(vx) == passive.parse(inner)


def test_not_ip_is_none():
    assert passive.parse(b'\x02' * 12 + b'\x08\x06' + b'\0' * 28) is None
    assert passive.parse(b'\x02' * 10) is None


def test_ingress_and_egress_of_matched_packets():
    f_in = tcp(PEER, GUEST, 4000, 80, 1000, 5, b'q' * 100)
    f_out = tcp(GUEST, PEER, 80, 4000, 5, 1100, b'r' * 50)
    r = one([seen('eth1', 1_000, IN, f_in), seen('tap0', 4_000, OUT, f_in),
             seen('tap0', 10_000, IN, f_out),
             seen('eth1', 12_500, OUT, f_out)])
    assert r.report.protocol == 'passive'
    assert r.report.ingress.count == 1 and r.report.ingress.p50_us == 3.0
    assert r.report.egress.count == 1 and r.report.egress.p50_us == 2.5
    assert r.packets == 2
    assert r.report.ingress.lost == 0 and r.unmatched == 0


def test_checksums_differ_yet_packets_match():
    a = tcp(PEER, GUEST, 1, 2, 3, 4, b'z', sum_=0x1234)
    b = tcp(PEER, GUEST, 1, 2, 3, 4, b'z', sum_=0xbeef)
    r = one([seen('eth1', 0, IN, a), seen('tap0', 7_000, OUT, b)])
    assert r.report.ingress.count == 1


def test_idle_vnic_has_no_report():
    r = one([seen('eth1', 0, IN, udp(PEER, OTHER, 1, 2, 3))])
    assert r.report is None and r.packets == 0


def test_unmatched_is_counted_never_loss():
    r = one([seen('eth1', 0, IN, udp(PEER, GUEST, 1, 2, 3)),
             seen('eth1', 5, IN, udp(PEER, GUEST, 1, 2, 4)),
             seen('tap0', 900, OUT, udp(PEER, GUEST, 1, 2, 4))])
    assert r.unmatched == 1
    assert r.report.ingress.lost == 0 and r.report.ingress.count == 1


def test_traffic_never_crossing_the_pif_is_local():
    # Another instance on the host, and the host's DHCP answer.
    r = one([seen('tap0', 0, OUT, udp(OTHER, GUEST, 1, 2, 3)),
             seen('tap0', 0, OUT,
                  udp(bytes([198, 18, 0, 2]), GUEST, 67, 68, 9)),
             seen('tap0', 0, IN, udp(GUEST, OTHER, 2, 1, 4))])
    assert r.local == 3 and r.unmatched == 0 and r.packets == 0
    assert r.report.ingress.count == 0


def test_retransmission_is_ambiguous_and_dropped():
    f = tcp(PEER, GUEST, 4000, 80, 1000, 5, b'q' * 100)
    r = one([seen('eth1', 0, IN, f), seen('tap0', 3_000, OUT, f),
             seen('eth1', 200_000, IN, f), seen('tap0', 203_000, OUT, f)])
    assert r.ambiguous == 1
    assert r.report.ingress.count == 0
    assert r.unmatched == 0 and r.local == 0


def test_lookalike_on_one_side_makes_the_key_ambiguous():
    f = udp(PEER, GUEST, 1, 2, 77)
    r = one([seen('eth1', 0, IN, f), seen('eth1', 10, IN, f),
             seen('tap0', 3_000, OUT, f)])
    assert r.ambiguous == 1 and r.report.ingress.count == 0
    assert r.local == 0


def test_gro_super_packet_matches_first_segment_rest_covered():
    mss = 1448
    big = tcp(PEER, GUEST, 4000, 80, 10_000, 5, b'd' * (4 * mss))
    segs = [tcp(PEER, GUEST, 4000, 80, 10_000 + i * mss, 5, b'd' * mss)
            for i in range(4)]
    r = one([seen('eth1', 0, IN, big)] +
            [seen('tap0', 5_000 + i, OUT, s) for i, s in enumerate(segs)])
    assert r.report.ingress.count == 1
    assert r.report.ingress.min_us == 5.0
    assert r.covered == 3 and r.local == 0 and r.unmatched == 0


def test_segments_on_pif_super_packet_on_tap():
    mss = 1000
    big = tcp(PEER, GUEST, 4000, 80, 2**32 - 1500, 5, b'd' * (3 * mss))
    segs = [tcp(PEER, GUEST, 4000, 80, (2**32 - 1500 + i * mss) % 2**32, 5,
                b'd' * mss) for i in range(3)]
    r = one([seen('eth1', i, IN, s) for i, s in enumerate(segs)] +
            [seen('tap0', 9_000, OUT, big)])
    assert r.report.ingress.count == 1
    assert r.covered == 2 and r.unmatched == 0


def test_different_ack_is_not_covered():
    big = tcp(PEER, GUEST, 4000, 80, 100, 5, b'd' * 3000)
    seg = tcp(PEER, GUEST, 4000, 80, 1100, 6, b'd' * 1000)
    r = one([seen('eth1', 0, IN, big), seen('tap0', 9, OUT, seg)])
    assert r.covered == 0 and r.local == 1 and r.unmatched == 1


def test_negative_is_an_anomaly_not_a_value():
    f = udp(PEER, GUEST, 1, 2, 3)
    r = one([seen('eth1', 5_000, IN, f), seen('tap0', 1_000, OUT, f)])
    assert r.report.ingress.count == 0 and r.report.anomalies == 1


def test_other_vnics_traffic_never_counts_here():
    f = udp(PEER, OTHER, 1, 2, 3)
    spec2 = passive.VifSpec('tap1', 'eth1', frozenset({OTHER}))
    out = passive.match([seen('eth1', 0, IN, f), seen('tap1', 4_000, OUT, f),
                         seen('tap0', 4_000, OUT, udp(PEER, GUEST, 1, 2, 3))],
                        [VNIC, spec2])
    assert out['tap1'].report.ingress.count == 1
    assert out['tap0'].report.ingress.count == 0
    assert out['tap0'].local == 1 and out['tap0'].unmatched == 0


def test_ipv6_udp_counted_unkeyable():
    f = udp(P6, G6, 1, 2, 0)
    r = one([seen('eth1', 0, IN, f), seen('tap0', 10, OUT, f)])
    assert r.unkeyable == 2 and r.packets == 0


def test_ipv4_later_fragments_keyed_by_id_and_offset():
    a = passive.parse(udp(PEER, GUEST, 1, 2, 3))
    raw = bytearray(udp(PEER, GUEST, 1, 2, 3))
    raw[14 + 6:14 + 8] = (185).to_bytes(2, 'big')
    b = passive.parse(bytes(raw))
    assert b.ident == (3, 185) and b.flow[3:] == (0, 0)
    assert (a.flow, a.ident) != (b.flow, b.ident)


@pytest.mark.parametrize('pif,vif,addr', [
    ('eth1', 'eth1', GUEST), ('', 'tap0', GUEST), ('eth1', 'tap0', b'x'),
    ('eth1', '', GUEST)])
def test_bad_vif_spec_names_it(pif, vif, addr):
    with pytest.raises(passive.PassiveError, match=f"vNIC {vif!r}"):
        passive.VifSpec(vif, pif, frozenset({addr}))


def test_shared_vif_refused():
    s2 = passive.VifSpec('tap0', 'eth1', frozenset({OTHER}))
    with pytest.raises(passive.PassiveError, match='tap0'):
        passive.match([], [VNIC, s2])


def test_address_parsing():
    assert passive.address('198.18.0.10') == GUEST
    assert passive.address('2001:2::10') == G6
    with pytest.raises(passive.PassiveError, match='nope'):
        passive.address('nope')


def test_parse_reads_geneve_inner_frame_after_options():
    inner = tcp(PEER, GUEST, 5, 6, 1, 2, b'k')
    opts = b'\x01\x02\x80\x01' + b'\0' * 4           # one 8-byte option
    gen = bytes([2, 0]) + b'\x65\x58' + b'\0\0\x07\0' + opts + inner
    outer = udp(bytes([198, 18, 1, 1]), bytes([198, 18, 1, 2]), 40000,
                6081, 5, payload=gen)
    assert passive.parse(outer) == passive.parse(inner)


# --- [netweaver] mode in the pollsters ---------------------------------------

A_ADDR = bytes([198, 18, 1, 10])        # tapaaa's guest (test_pollsters)


class FakePassive:
    """Stands in for window.run_passive_window: tapaaa's guest received
    2 packets (3 and 5 us in the host) and sent 1 (4 us), one more packet
    to it never reached its tap; TAP_B's guest is idle.  Matched by the
    real passive.match."""

    def __init__(self):
        self.calls = []

    def __call__(self, paths, sample, window_ms, max_packets, **kw):
        self.calls.append((list(paths), sample, window_ms, max_packets, kw))
        s = [seen('eth1', 0, IN, udp(PEER, A_ADDR, 1, 2, 10)),
             seen('tapaaa', 3_000, OUT, udp(PEER, A_ADDR, 1, 2, 10)),
             seen('eth1', 10, IN, udp(PEER, A_ADDR, 1, 2, 11)),
             seen('tapaaa', 5_010, OUT, udp(PEER, A_ADDR, 1, 2, 11)),
             seen('eth1', 20, IN, udp(PEER, A_ADDR, 1, 2, 12)),
             seen('tapaaa', 100, IN, udp(A_ADDR, PEER, 2, 1, 13)),
             seen('eth1', 4_100, OUT, udp(A_ADDR, PEER, 2, 1, 13))]
        return window.PassiveWindowResult(
            results=passive.match(s, window.passive_specs(paths)),
            stats=passivecapture.PassiveStats(kept=len(s)), sample=sample,
            duration_ns=1_000_000)


class TestModes(pf.PollsterTestCase):
    """The pollsters' fixture (fake inspector, sysfs, probe window) and
    a faked passive window."""

    def setUp(self):
        super().setUp()
        self.passive = FakePassive()
        self.useFixture(fixtures.MockPatch(
            'netweaver_agent.core.window.run_passive_window',
            side_effect=self.passive))

    def all_samples(self, mode):
        self.CONF.set_override('mode', mode, group='netweaver')
        out = {}
        for name, (factory, _unit) in pf.METERS.items():
            pollsters.INSPECTOR.reset()
            for s in self.samples(factory):
                out.setdefault(name, {})[s.resource_metadata['vif']] = s
        return out

    def test_probe_is_the_default_and_runs_no_passive_window(self):
        assert self.CONF.netweaver.mode == 'probe'
        out = self.all_samples('probe')
        assert not self.passive.calls
        assert out['network.vif.latency']['tapaaa'].volume == 20.0
        md = out['network.vif.latency']['tapaaa'].resource_metadata
        assert not any(k.startswith('passive') or k == 'other_result'
                       for k in md)

    def test_passive_sends_nothing_and_measures_the_traffic(self):
        out = self.all_samples('passive')
        assert not self.run_window.called
        lat = out['network.vif.latency']
        assert set(lat) == {'tapaaa'}          # TAP_B idle: no sample
        assert lat['tapaaa'].volume == 4.0     # mean of 3 and 5 us
        assert out['network.vif.outgoing.latency']['tapaaa'].volume == 4.0
        assert 'network.vif.probe.loss' not in out
        md = lat['tapaaa'].resource_metadata
        assert md['probe_protocol'] == 'passive'
        assert md['passive_packets'] == 3
        assert md['passive_unmatched'] == 1
        assert md['latency_ingress']['lost'] == 0
        paths, sample, window_ms, cap, _kw = self.passive.calls[0]
        assert (sample, window_ms, cap) == (
            self.CONF.netweaver.passive_sample,
            self.CONF.netweaver.passive_window_ms,
            self.CONF.netweaver.passive_max_packets)

    def test_both_takes_probes_where_they_reached_else_passive(self):
        self.window.reports['tapaaa'] = pf.report('tapaaa', [], lost=5)
        self.window.reports[pf.TAP_B] = pf.report(pf.TAP_B,
                                                  [40_000])
        out = self.all_samples('both')
        lat = out['network.vif.latency']
        assert set(lat) == {'tapaaa', pf.TAP_B}
        a, b = lat['tapaaa'], lat[pf.TAP_B]
        assert a.resource_metadata['probe_protocol'] == 'passive'
        assert a.volume == 4.0
        assert a.resource_metadata['other_result']['probe_sent'] == 5
        assert b.resource_metadata['probe_protocol'] == 'icmp'
        assert b.volume == 40.0
        assert b.resource_metadata['other_result'] is not None
        # Loss comes from probes only: the probed vNIC.
        assert set(out['network.vif.probe.loss']) == {pf.TAP_B}

    def test_passive_measures_vnics_no_probe_may_reach(self):
        # probe_networks excludes both guests: probe mode measures none.
        self.CONF.set_override('probe_networks', ['198.19.0.0/16'],
                               group='netweaver')
        assert not self.all_samples('probe')
        out = self.all_samples('passive')
        assert out['network.vif.latency']['tapaaa'].volume == 4.0

    def test_both_probes_what_it_may_and_the_rest_passively(self):
        self.CONF.set_override('probe_networks', ['198.18.1.11/32'],
                               group='netweaver')
        self.window.reports[pf.TAP_B] = pf.report(pf.TAP_B,
                                                  [40_000])
        out = self.all_samples('both')
        lat = out['network.vif.latency']
        assert lat['tapaaa'].resource_metadata['probe_protocol'] == \
            'passive'
        assert lat['tapaaa'].resource_metadata['other_result'] is None
        assert lat[pf.TAP_B].resource_metadata['probe_protocol'] == \
            'icmp'
        # Only the admitted vNIC was in the probe window.
        assert {p.vif for call in self.window.calls for p in call} == \
            {pf.TAP_B}

    def test_both_fits_probes_and_passive_window_in_the_cycle(self):
        # A passive window longer than the cycle allows: the probes end
        # early enough to leave it room, and it must end by the deadline.
        self.CONF.set_override('max_window_ms', 3000.0, group='netweaver')
        self.CONF.set_override('passive_window_ms', 2000.0,
                               group='netweaver')
        before = time.monotonic()
        self.all_samples('both')
        after = time.monotonic()
        cycle_s = self.CONF.netweaver.max_window_ms / 1000.0
        passive_s = self.CONF.netweaver.passive_window_ms / 1000.0
        assert self.passive.calls and self.window.deadlines
        for (_p, _s, _ms, _cap, kw), probe_deadline in zip(
                self.passive.calls, self.window.deadlines):
            assert before + cycle_s <= kw['deadline_s'] <= after + cycle_s
            assert probe_deadline <= kw['deadline_s'] - passive_s

    def test_both_leaves_out_probes_when_the_passive_window_fills_it(self):
        self.CONF.set_override('max_window_ms', 1000.0, group='netweaver')
        self.CONF.set_override('passive_window_ms', 1000.0,
                               group='netweaver')
        out = self.all_samples('both')
        assert not self.window.calls
        assert self.passive.calls
        assert 'network.vif.probe.loss' not in out
        assert 'passive_window_ms' in self.log.output

    def test_passive_sample_must_be_a_power_of_two(self):
        self.CONF.set_override('passive_sample', 48, group='netweaver')
        with self.assertRaisesRegex(opts.OptionsError, 'passive_sample'):
            opts.validate(self.CONF)


class Recorder:
    """A ``capture_in`` that records the window it was asked for."""

    def __init__(self):
        self.window_ms = []

    def __call__(self, netns_name, interfaces, sample, window_ms,
                 max_packets, vxlan_port, geneve_port):
        self.window_ms.append(window_ms)
        return [], passivecapture.PassiveStats()


PATHS = [vifpath.VifPath(vif='tap0', address='198.18.1.10',
                         interfaces=('eth1', 'tap0'))]


def test_passive_window_is_cut_to_the_deadline():
    rec = Recorder()
    deadline = time.monotonic() + 0.5
    pw = window.run_passive_window(PATHS, 1, 5000.0, 10, capture_in=rec,
                                   deadline_s=deadline)
    assert rec.window_ms[0] == int(pw.window_ms)
    assert 0 < pw.window_ms <= 500.0 - window.PASSIVE_OPEN_RESERVE_S * 1e3
    # No deadline: the whole window.
    pw = window.run_passive_window(PATHS, 1, 20.0, 10, capture_in=rec)
    assert rec.window_ms[-1] == 20 and pw.window_ms == 20.0


def test_passive_window_refuses_a_deadline_already_past():
    rec = Recorder()
    with pytest.raises(ValueError, match='deadline'):
        window.run_passive_window(PATHS, 1, 100.0, 10, capture_in=rec,
                                  deadline_s=time.monotonic())
    assert not rec.window_ms
    with pytest.raises(ValueError, match='deadline_s'):
        window.passive_window_within(10.0, float('nan'))


def test_parse_ip_equals_parse_of_the_frame():
    for f in (tcp(PEER, GUEST, 1, 2, 3, 4, b'abc'), udp(PEER, GUEST, 5, 6, 7),
              tcp(P6, G6, 1, 2, 3, 4, b'x')):
        assert passive.parse_ip(f[14:]) == passive.parse(f)
    assert passive.parse_ip(b'') is None
    assert passive.parse_ip(b'\x50' + b'\0' * 30) is None


def test_delayer_passive_hold_lines_round_trip():
    from netweaver_agent.lab import delayer
    h = passive.parse(tcp(PEER, GUEST, 4000, 80, 2**32 - 1, 5, b'abc'))
    u6 = passive.parse(udp(P6, G6, 1, 2, 0))
    for header in (h, u6, None):
        rec = delayer.PassiveHold(header, 10, 2_000_020, 2_000_010)
        assert delayer.PassiveHold.from_line(rec.to_line()) == rec
    with pytest.raises(ValueError, match='12 fields'):
        delayer.PassiveHold.from_line('7 12 0 1 2 3\n')


def test_delay_injection_record_is_checked():
    from netweaver_agent.lab import spec
    assert spec.DelayInjection(guest=0, delay_ms=1).record == 'probe'
    with pytest.raises(ValueError, match='record'):
        spec.DelayInjection(guest=0, delay_ms=1, record='all')


def test_reading_leaves_the_collector_as_it_found_it():
    import gc

    class NoBlocks:
        def blocks(self):
            return iter(())

    cap = passivecapture.PassiveCapture(1)
    cap._ring = NoBlocks()
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            cap._read_ring()
            assert gc.isenabled() == enabled
        finally:
            gc.enable()
