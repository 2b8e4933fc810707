"""The matcher, fed sightings by hand: exact reports, whatever the order."""

import random

import pytest

from netweaver_agent.core import capture
from netweaver_agent.core import latency
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from netweaver_agent.core import vifpath
from tests import packets as pk

SESSION = 4242
US = 1000  # ns


def sighting(seq, ifname, t_ns, reply=False, direction=sightings.DIR_IN):
    return sightings.Sighting(probe.ProbeKey(SESSION, seq, reply), ifname,
                              t_ns, direction)


def feed(matcher, row):
    """One :class:`sightings.Sighting`, as the readers give rows: a batch
    of its own."""
    batch = sightings.SightingBatch(row.key.session)
    pk.add_sighting(batch, row)
    matcher.feed_batch(batch)


def one_path_matcher(plan_seqs, timeout_ns=10_000 * US, hops=()):
    spec = vifpath.VifPath('tap0', None, ('eth0', *hops, 'tap0'))
    return latency.Matcher(SESSION, [spec], {s: 'tap0' for s in plan_seqs},
                           timeout_ns)


def round_trip(seq, t0, ingress_ns, turnaround_ns, egress_ns):
    """The four sightings of one answered probe."""
    t_vif = t0 + ingress_ns
    r_vif = t_vif + turnaround_ns
    return [sighting(seq, 'eth0', t0),
            sighting(seq, 'tap0', t_vif, direction=sightings.DIR_OUT),
            sighting(seq, 'tap0', r_vif, reply=True),
            sighting(seq, 'eth0', r_vif + egress_ns, reply=True,
                     direction=sightings.DIR_OUT)]


def test_exact_statistics_in_any_order():
    rows = []
    for seq, (ing, eg) in enumerate([(10, 2), (20, 4), (30, 6), (40, 8)]):
        rows += round_trip(seq, 1_000_000_000 + seq * 1000 * US,
                           ing * US, 50 * US, eg * US)
    random.Random(7).shuffle(rows)
    m = one_path_matcher(range(4))
    for row in rows:
        feed(m, row)
    rep = m.reports()['tap0']
    assert rep.sent == 4 and rep.unseen_at_pif == 0 and not rep.filtered
    ing = rep.ingress
    assert (ing.count, ing.lost) == (4, 0)
    assert (ing.min_us, ing.max_us, ing.mean_us) == (10.0, 40.0, 25.0)
    assert ing.p50_us == 25.0
    assert ing.p90_us == pytest.approx(37.0)
    assert ing.p99_us == pytest.approx(39.7)
    assert ing.stdev_us == pytest.approx(12.909944487)
    assert rep.egress.mean_us == 5.0 and rep.egress.count == 4
    assert rep.turnaround.mean_us == 50.0


def test_duplicates_keep_the_first_timestamp():
    m = one_path_matcher([0])
    for row in round_trip(0, 5_000 * US, 7 * US, 1 * US, 1 * US):
        feed(m, row)
    # The same probe seen again later on both interfaces changes nothing.
    feed(m, sighting(0, 'eth0', 9_000 * US))
    feed(m, sighting(0, 'tap0', 9_500 * US, direction=sightings.DIR_OUT))
    assert m.reports()['tap0'].ingress.mean_us == 7.0


def test_missing_vif_sighting_is_lost_not_skipped():
    m = one_path_matcher(range(10))
    for seq in range(10):
        feed(m, sighting(seq, 'eth0', seq * 1000 * US))
        if seq % 5:
            feed(m, sighting(seq, 'tap0', seq * 1000 * US + 12 * US))
    rep = m.reports()['tap0']
    assert (rep.ingress.count, rep.ingress.lost) == (8, 2)
    assert rep.ingress.loss_pct == 20.0
    assert not rep.filtered


def test_all_lost_is_reported_as_filtered():
    m = one_path_matcher(range(3))
    for seq in range(3):
        feed(m, sighting(seq, 'eth0', seq * US))
    rep = m.reports()['tap0']
    assert rep.filtered and rep.ingress.lost == 3 and rep.ingress.count == 0
    assert rep.ingress.mean_us is None


def test_late_sighting_counts_as_lost():
    m = one_path_matcher([0, 1], timeout_ns=100 * US)
    feed(m, sighting(0, 'eth0', 0))
    feed(m, sighting(0, 'tap0', 50 * US))
    feed(m, sighting(1, 'eth0', 0))
    feed(m, sighting(1, 'tap0', 150 * US))
    rep = m.reports()['tap0']
    assert (rep.ingress.count, rep.ingress.lost, rep.late) == (1, 1, 1)


def test_probe_sent_out_of_the_pif_does_not_count_as_ingress():
    """The host's own outgoing copy on the pif is not a received probe."""
    m = one_path_matcher([0])
    feed(m, sighting(0, 'eth0', 0, direction=sightings.DIR_OUT))
    feed(m, sighting(0, 'tap0', 30 * US))
    rep = m.reports()['tap0']
    assert rep.unseen_at_pif == 1 and rep.ingress.count == 0
    assert rep.entered_pif == 0


def test_reply_received_on_the_pif_is_not_egress():
    m = one_path_matcher([0])
    for row in round_trip(0, 0, 5 * US, 5 * US, 5 * US)[:3]:
        feed(m, row)
    feed(m, sighting(0, 'eth0', 99 * US, reply=True,
                     direction=sightings.DIR_IN))
    rep = m.reports()['tap0']
    assert rep.egress.count == 0 and rep.egress.lost == 1


def test_hops_in_path_order():
    m = one_path_matcher([0, 1], hops=('br-int',))
    for seq in (0, 1):
        feed(m, sighting(seq, 'eth0', 0))
        feed(m, sighting(seq, 'br-int', (3 + seq) * US))
        feed(m, sighting(seq, 'tap0', (10 + seq) * US))
    rep = m.reports()['tap0']
    assert [(h.src, h.dst) for h in rep.hops] == [('eth0', 'br-int'),
                                                  ('br-int', 'tap0')]
    assert rep.hops[0].stats.mean_us == 3.5
    assert rep.hops[1].stats.mean_us == 7.0
    assert rep.ingress.mean_us == 10.5


def test_foreign_sessions_sequences_and_interfaces_are_ignored():
    m = one_path_matcher([0])
    feed(m, sightings.Sighting(probe.ProbeKey(SESSION + 1, 0), 'eth0', 0))
    feed(m, sighting(77, 'eth0', 0))
    feed(m, sighting(0, 'eth1', 0))
    rep = m.reports()['tap0']
    assert rep.unseen_at_pif == 1


def test_two_vnics_are_kept_apart():
    specs = [vifpath.VifPath('tap0', None, ('eth0', 'tap0')),
             vifpath.VifPath('tap1', None, ('eth0', 'tap1'))]
    m = latency.Matcher(SESSION, specs, {0: 'tap0', 1: 'tap1'}, 10**9)
    feed(m, sighting(0, 'eth0', 0))
    feed(m, sighting(0, 'tap0', 5 * US))
    feed(m, sighting(1, 'eth0', 0))
    feed(m, sighting(1, 'tap1', 9 * US))
    # A probe showing up on the wrong tap is not counted for either.
    feed(m, sighting(0, 'tap1', 1 * US))
    reps = m.reports()
    assert reps['tap0'].ingress.mean_us == 5.0
    assert reps['tap1'].ingress.mean_us == 9.0


def test_batch_and_objects_give_the_same_report():
    rows = []
    for seq in range(50):
        rows += round_trip(seq, seq * 10**6, (seq % 7 + 1) * US, 20 * US,
                           (seq % 3 + 1) * US)
    batch = sightings.SightingBatch(SESSION)
    for row in rows:
        pk.add_sighting(batch, row)
    a = one_path_matcher(range(50))
    a.feed_batch(batch)
    b = one_path_matcher(range(50))
    for row in pk.sightings_of(batch):
        feed(b, row)
    assert a.reports() == b.reports()


def test_plan_for_unknown_vnic_is_an_error_naming_it():
    with pytest.raises(ValueError, match='tap9'):
        latency.Matcher(SESSION,
                        [vifpath.VifPath('tap0', None, ('e', 'tap0'))],
                        {0: 'tap9'}, 1)


def test_statistics_of_one_value_and_of_none():
    one = latency.DirectionStats.from_ns([1500])
    assert (one.min_us, one.max_us, one.stdev_us, one.p99_us) == (
        1.5, 1.5, 0.0, 1.5)
    none = latency.DirectionStats.from_ns([], lost=3)
    assert none.count == 0 and none.lost == 3 and none.loss_pct == 100.0


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert latency.percentile(values, 50) == 3.0
    assert latency.percentile(values, 90) == pytest.approx(4.6)
    with pytest.raises(ValueError):
        latency.percentile(values, 101)


def test_capture_drops_make_missing_probes_unknown_not_lost():
    spec = vifpath.VifPath('tap0', None, ('eth0', 'tap0'))
    m = latency.Matcher(SESSION, [spec], {0: 'tap0', 1: 'tap0'}, 10**9,
                        capture_dropped=True)
    feed(m, sighting(0, 'eth0', 0))
    feed(m, sighting(0, 'tap0', 4 * US))
    feed(m, sighting(1, 'eth0', 0))
    rep = m.reports()['tap0']
    assert (rep.ingress.count, rep.ingress.lost, rep.unknown) == (1, 0, 1)


# --------------------------------------------------------------------------
# One clock: a packet seen out of path order is an anomaly, never a value.

def test_vif_before_pif_is_an_anomaly_not_a_negative_latency():
    m = one_path_matcher(range(4))
    t0 = 1_000_000_000
    rows = round_trip(0, t0, 10 * US, 50 * US, 4 * US)
    rows += round_trip(1, t0 + 1000 * US, 20 * US, 50 * US, 6 * US)
    # Probe 2 on the tap 30 µs before the pif; its reply is in order.
    rows += [sighting(2, 'eth0', t0 + 2000 * US),
             sighting(2, 'tap0', t0 + 1970 * US, direction=sightings.DIR_OUT),
             sighting(2, 'tap0', t0 + 2100 * US, reply=True),
             sighting(2, 'eth0', t0 + 2108 * US, reply=True,
                      direction=sightings.DIR_OUT)]
    # Probe 3 in order; its reply leaves the pif 5 µs before the tap saw it.
    rows += [sighting(3, 'eth0', t0 + 3000 * US),
             sighting(3, 'tap0', t0 + 3040 * US, direction=sightings.DIR_OUT),
             sighting(3, 'tap0', t0 + 3100 * US, reply=True),
             sighting(3, 'eth0', t0 + 3095 * US, reply=True,
                      direction=sightings.DIR_OUT)]
    for row in rows:
        feed(m, row)
    rep = m.reports()['tap0']
    assert rep.anomalies == 2
    ing, eg = rep.ingress, rep.egress
    assert (ing.count, ing.lost, ing.min_us, ing.max_us) == (3, 0, 10.0,
                                                             40.0)
    assert (eg.count, eg.lost, eg.min_us, eg.max_us) == (3, 0, 4.0, 8.0)
    for stats in (ing, eg, rep.turnaround):
        assert stats.min_us >= 0
    # Turnaround of probe 2 (its tap sightings are in order) still counts.
    assert rep.turnaround.count == 4


def test_reply_before_its_probe_and_hops_out_of_order_are_anomalies():
    m = one_path_matcher([0, 1], hops=('qvo', 'qvb'))
    t0 = 5_000_000_000
    # Probe 0: qvb before qvo, though the tap is after the pif.
    for name, dt in (('eth0', 0), ('qvo', 300), ('qvb', 290), ('tap0', 310)):
        feed(m, sighting(0, name, t0 + dt * US))
    # Probe 1 fine, but the tap sees the guest's reply before the probe.
    for name, dt in (('eth0', 1000), ('qvo', 1200), ('qvb', 1205),
                     ('tap0', 1215)):
        feed(m, sighting(1, name, t0 + dt * US))
    feed(m, sighting(1, 'tap0', t0 + 1214 * US, reply=True))
    feed(m, sighting(1, 'eth0', t0 + 1220 * US, reply=True,
                     direction=sightings.DIR_OUT))
    rep = m.reports()['tap0']
    assert rep.anomalies == 2
    assert (rep.ingress.count, rep.ingress.min_us) == (1, 215.0)
    assert [h.stats.count for h in rep.hops] == [1, 1, 1]
    assert [h.stats.min_us for h in rep.hops] == [200.0, 5.0, 10.0]
    assert (rep.egress.count, rep.egress.min_us) == (1, 6.0)
    assert rep.turnaround.count == 0


def test_anomalies_reach_the_report_json_and_metadata():
    import types

    from netweaver_agent.agent import inspector
    from netweaver_agent.cli import report
    m = one_path_matcher([0, 1])
    for row in round_trip(0, 10 ** 9, 10 * US, 5 * US, 2 * US):
        feed(m, row)
    feed(m, sighting(1, 'eth0', 2 * 10 ** 9))
    feed(m, sighting(1, 'tap0', 2 * 10 ** 9 - 7 * US,
                     direction=sightings.DIR_OUT))
    rep = m.reports()['tap0']
    assert rep.anomalies == 1 and rep.ingress.count == 1
    assert report.report_to_dict(rep)['anomalies'] == 1
    assert '1 anomalies' in report.format_table({'tap0': rep})
    clean = one_path_matcher([0])
    assert 'anomal' not in report.format_table(
        {'tap0': clean.reports()['tap0']})
    window = types.SimpleNamespace(capture=capture.CaptureStats(1, 0, 1, 0),
                                   session=SESSION, duration_ns=10 ** 6)
    path = vifpath.VifPath(vif='tap0', address='198.18.0.10',
                           interfaces=('eth0', 'tap0'))
    md = inspector.latency_metadata(rep, path, window, 'local')
    assert md['probe_anomalies'] == 1
    assert md['tunnel'] is None


def test_the_tunnel_kind_reaches_the_report():
    from netweaver_agent.cli import report
    batch = sightings.SightingBatch(SESSION)
    pif, tap = batch.interface_index('eth0'), batch.interface_index('tap0')
    gen = probe.Encap(vni=77, tunnel='geneve')
    for seq in range(3):
        batch.append(seq << 1, pif, 1000 * seq, sightings.DIR_IN)
        batch.append(seq << 1, tap, 1000 * seq + 10, sightings.DIR_OUT)
        batch.encap[(seq << 1, pif)] = gen
    m = one_path_matcher(range(3))
    m.feed_batch(batch)
    rep = m.reports()['tap0']
    assert (rep.vni, rep.tunnel) == (77, 'geneve')
    assert report.report_to_dict(rep)['tunnel'] == 'geneve'
    assert 'geneve vni 77' in report.format_table({'tap0': rep})
