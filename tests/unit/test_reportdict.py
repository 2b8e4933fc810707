"""One report, its two published shapes: ``--json`` and resource_metadata.

Both are read by others (scripts, dashboards, alarms): their keys and
values are pinned here from the same report, literally.
"""

import json
import types

from netweaver_agent.agent import inspector
from netweaver_agent.cli import report as cli_report
from netweaver_agent.core import latency
from netweaver_agent.core import passive
from netweaver_agent.core import reportdict
from netweaver_agent.core import vifpath

STATS = {'count', 'lost', 'min_us', 'max_us', 'mean_us', 'stdev_us',
         'p50_us', 'p90_us', 'p99_us'}
PATH = vifpath.VifPath(vif='tap1', address='198.18.0.10',
                       interfaces=('eth1', 'qvo1', 'qvb1', 'tap1'),
                       via=(('br-int',), (), ('qbr1',)))


def one_report(vlan=(200, 100)):
    ingress = latency.DirectionStats.from_ns([5000, 7000, 9000], lost=1)
    egress = latency.DirectionStats.from_ns([2000])
    return latency.LatencyReport(
        vif='tap1', pif='eth1', protocol='icmp', sent=6, ingress=ingress,
        egress=egress, turnaround=latency.DirectionStats(),
        hops=tuple(latency.HopStats(a, b, egress) for a, b in
                   zip(PATH.interfaces, PATH.interfaces[1:])),
        unseen_at_pif=2, late=3, unknown=4, vlan=vlan, vni=42,
        tunnel='geneve', anomalies=5, rejected=7,
        histograms=(('ingress', (0, 0, 0, 3)),))


def test_json_shape():
    rep = one_report()
    out = json.loads(json.dumps(cli_report.report_to_dict(rep)))
    assert list(out) == [
        'vnic', 'pif', 'protocol', 'sent', 'unseen_at_pif', 'late',
        'unknown', 'anomalies', 'filtered', 'vlan', 'vni', 'tunnel',
        'histogram_edges_us', 'ingress', 'egress', 'turnaround', 'hops']
    assert (out['vnic'], out['pif'], out['protocol'], out['sent']) == (
        'tap1', 'eth1', 'icmp', 6)
    assert (out['unseen_at_pif'], out['late'], out['unknown'],
            out['anomalies'], out['filtered']) == (2, 3, 4, 5, False)
    assert (out['vlan'], out['vni'], out['tunnel']) == (
        [200, 100], 42, 'geneve')
    assert out['histogram_edges_us'] == list(latency.HISTOGRAM_EDGES_US)
    for direction in ('ingress', 'egress', 'turnaround'):
        assert set(out[direction]) == STATS | {'loss_pct', 'histogram'}
    assert out['ingress']['histogram'] == [0, 0, 0, 3]
    # No histogram: empty buckets, one per edge.
    assert out['egress']['histogram'] == [0] * len(
        latency.HISTOGRAM_EDGES_US)
    assert out['ingress']['count'] == 3 and out['ingress']['lost'] == 1
    assert out['ingress']['loss_pct'] == 25.0
    assert out['ingress']['p50_us'] == 7.0
    assert [(h['src'], h['dst']) for h in out['hops']] == [
        ('eth1', 'qvo1'), ('qvo1', 'qvb1'), ('qvb1', 'tap1')]
    for hop in out['hops']:
        assert set(hop) == STATS | {'src', 'dst', 'loss_pct'}
    assert cli_report.report_to_dict(one_report(vlan=()))['vlan'] == []


def test_metadata_shape():
    rep = one_report()
    window = types.SimpleNamespace(capture=types.SimpleNamespace(drops=8),
                                   session=9, duration_ns=1_500_000)
    md = inspector.latency_metadata(rep, PATH, window, 'netns:src')
    assert set(md) == {
        'probe_protocol', 'probe_source', 'probe_address', 'probe_sent',
        'probe_unseen_at_pif', 'probe_late', 'probe_unknown',
        'probe_anomalies', 'probe_rejected', 'probe_filtered', 'pif',
        'vif', 'vlan', 'vni', 'tunnel', 'latency_ingress',
        'latency_egress', 'latency_turnaround', 'latency_hops',
        'path_unseen', 'capture_drops', 'window_session', 'window_ms'}
    assert (md['probe_protocol'], md['probe_source'], md['probe_address'],
            md['probe_sent']) == ('icmp', 'netns:src', '198.18.0.10', 6)
    assert (md['probe_unseen_at_pif'], md['probe_late'],
            md['probe_unknown'], md['probe_anomalies'],
            md['probe_rejected'], md['probe_filtered']) == (
        2, 3, 4, 5, 7, False)
    assert (md['pif'], md['vif'], md['vlan'], md['vni'], md['tunnel']) == (
        'eth1', 'tap1', [200, 100], 42, 'geneve')
    for direction in ('ingress', 'egress', 'turnaround'):
        assert set(md[f'latency_{direction}']) == STATS
    assert md['latency_ingress']['p50_us'] == 7.0
    assert [(h['src'], h['dst'], h['via']) for h in md['latency_hops']] == [
        ('eth1', 'qvo1', ['br-int']), ('qvo1', 'qvb1', []),
        ('qvb1', 'tap1', ['qbr1'])]
    for hop in md['latency_hops']:
        assert set(hop) == STATS | {'src', 'dst', 'via'}
    assert md['path_unseen'] == ['br-int', 'qbr1']
    assert (md['capture_drops'], md['window_session'], md['window_ms']) == (
        8, 9, 1.5)
    untagged = inspector.latency_metadata(one_report(vlan=()), PATH,
                                          window, 'local')
    assert untagged['vlan'] is None


def test_both_shapes_carry_the_same_figures():
    """What both publish is equal, whatever the key is called there."""
    rep = one_report()
    window = types.SimpleNamespace(capture=types.SimpleNamespace(drops=0),
                                   session=1, duration_ns=1)
    out = cli_report.report_to_dict(rep)
    md = inspector.latency_metadata(rep, PATH, window, 'local')
    pairs = [('pif', 'pif'), ('protocol', 'probe_protocol'),
             ('sent', 'probe_sent'), ('unseen_at_pif', 'probe_unseen_at_pif'),
             ('late', 'probe_late'), ('unknown', 'probe_unknown'),
             ('anomalies', 'probe_anomalies'), ('filtered', 'probe_filtered'),
             ('vlan', 'vlan'), ('vni', 'vni'), ('tunnel', 'tunnel')]
    for json_key, md_key in pairs:
        assert out[json_key] == md[md_key], (json_key, md_key)
    for direction in ('ingress', 'egress', 'turnaround'):
        assert {k: out[direction][k] for k in STATS} == \
            md[f'latency_{direction}']


def test_passive_metadata_has_the_probe_keys_and_the_passive_counts():
    stats = latency.DirectionStats.from_ns([3000, 5000])
    result = passive.PassiveResult(
        'tap1', latency.LatencyReport(
            vif='tap1', pif='eth1', protocol=passive.PROTOCOL, sent=0,
            ingress=stats, egress=stats,
            turnaround=latency.DirectionStats(), anomalies=2),
        packets=3, unmatched=1, local=0, ambiguous=0, covered=2,
        unkeyable=0)
    pw = types.SimpleNamespace(
        sample=16, duration_ns=2_000_000,
        stats=types.SimpleNamespace(over_cap=1, drops=4))
    md = reportdict.passive_metadata(result, PATH, pw)
    probe_window = types.SimpleNamespace(
        capture=types.SimpleNamespace(drops=0), session=1, duration_ns=1)
    probe_keys = set(inspector.latency_metadata(one_report(), PATH,
                                                probe_window, 'local'))
    assert set(md) == probe_keys | {
        'passive_packets', 'passive_unmatched', 'passive_local',
        'passive_ambiguous', 'passive_covered', 'passive_unkeyable',
        'passive_sample', 'passive_over_cap'}
    assert (md['probe_protocol'], md['probe_source'], md['probe_sent'],
            md['window_session'], md['vlan'], md['latency_hops']) == (
        'passive', None, 0, None, None, [])
    assert (md['probe_anomalies'], md['capture_drops'], md['window_ms'],
            md['passive_packets'], md['passive_over_cap']) == (
        2, 4, 2.0, 3, 1)
    assert md['latency_ingress']['mean_us'] == 4.0
