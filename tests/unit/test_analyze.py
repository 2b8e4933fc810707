"""``analyze_pcaps`` and ``netweaver analyze`` on files with chosen times.

Every statistic is checked exactly against the timestamps written.
"""

import json
import math
import statistics

import dpkt
import pytest

from netweaver_agent.cli import offline
from netweaver_agent.core import pcaprows
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from tests import packets as pk
from tests.command import netweaver
from tests.packets import answered
from tests.packets import eth
from tests.packets import GUEST
from tests.packets import GUEST6
from tests.packets import ip6
from tests.packets import MS
from tests.packets import noise
from tests.packets import SRC6
from tests.packets import T0
from tests.packets import write


def stats_us(values_ns):
    us = [v / 1000 for v in values_ns]
    return min(us), max(us), statistics.fmean(us), statistics.stdev(us)


@pytest.mark.parametrize('proto', ['icmp', 'udp', 'tcp'])
def test_exact_statistics_with_a_lost_probe(proto, tmp_path):
    ingress = [10_001, 20_002, 30_003, 99_999, 40_004, 7_123]
    egress = [2_000, 4_000, 6_000, 1, 8_000, 5_555]
    pif, vif = answered(proto, ingress, 50_000, egress, lose={3})
    result = offline.analyze_pcaps(write(tmp_path / 'PIF.pcap', pif),
                                   write(tmp_path / 'VIF.pcap', vif))
    rep = result.report
    # TCP keys carry no session on the wire (the ISN is a keyed hash).
    assert result.mode == 'probe' and result.session == (
        probe.TCP_SESSION if proto == 'tcp' else 4242)
    assert (rep.pif, rep.vif, rep.sent) == ('PIF', 'VIF', 6)
    kept_in = [v for i, v in enumerate(ingress) if i != 3]
    kept_eg = [v for i, v in enumerate(egress) if i != 3]
    ing, eg = rep.ingress, rep.egress
    assert (ing.count, ing.lost, eg.count, eg.lost) == (5, 1, 5, 0)
    assert (ing.min_us, ing.max_us) == (7.123, 40.004)
    assert ing.mean_us == pytest.approx(stats_us(kept_in)[2], abs=1e-9)
    assert ing.stdev_us == pytest.approx(stats_us(kept_in)[3], abs=1e-9)
    assert ing.p50_us == 20.002
    assert (eg.min_us, eg.max_us) == (2.0, 8.0)
    assert eg.mean_us == pytest.approx(stats_us(kept_eg)[2], abs=1e-9)
    assert rep.turnaround.count == 5 and rep.turnaround.mean_us == 50.0
    assert rep.ingress.loss_pct == pytest.approx(100 / 6)
    assert (result.pif.records, result.vif.records) == (11, 10)


def test_plan_takes_probes_the_pif_received_and_the_vif_saw():
    """A probe received on the pif and never seen on the vif is planned
    (it counts as lost); one the host sent out of the pif is not, nor a
    reply."""
    batch = sightings.SightingBatch(7)
    rows = [(1, 'eth0', sightings.DIR_IN, False),      # lost on the way
            (2, 'eth0', sightings.DIR_OUT, False),     # the host's own
            (3, 'eth0', sightings.DIR_UNKNOWN, False),  # a pcap: no way
            (4, 'tap0', sightings.DIR_OUT, False),     # seen on the vif
            (5, 'tap0', sightings.DIR_IN, True)]       # the guest's reply
    for seq, ifname, direction, reply in rows:
        key = probe.ProbeKey(7, seq, reply)
        pk.add_sighting(batch, sightings.Sighting(key, ifname, T0 + seq,
                                                  direction))
    assert offline.build_plan(batch, 'eth0', 'tap0') == {
        1: 'tap0', 3: 'tap0', 4: 'tap0'}


def test_microsecond_and_big_endian_files_mix(tmp_path):
    ingress = [11_000, 12_000, 13_000]
    pif, vif = answered('icmp', ingress, 1_000, [3_000] * 3)
    result = offline.analyze_pcaps(
        write(tmp_path / 'p.pcap', pif, nano=False),
        write(tmp_path / 'v.pcap', vif, order='>'))
    # The µs file lost T0's nanoseconds (789): exactly that much longer.
    assert [result.report.ingress.min_us,
            result.report.ingress.max_us] == [11.789, 13.789]


def test_late_probe_is_lost_and_seed_bugs_are_gone(tmp_path):
    """The seed stopped at the first missing packet and kept ms only."""
    ingress = [5_432, 5_000_000, 6_789, 8_001]        # 5 ms: late
    pif, vif = answered('udp', ingress, 0, [1] * 4, lose={0})
    result = offline.analyze_pcaps(write(tmp_path / 'p.pcap', pif),
                                   write(tmp_path / 'v.pcap', vif),
                                   timeout_ms=1.0)
    ing = result.report.ingress
    assert (ing.count, ing.lost, result.report.late) == (2, 2, 1)
    assert (ing.min_us, ing.max_us) == (6.789, 8.001)


def test_session_choice(tmp_path):
    p1, v1 = answered('icmp', [10_000] * 4, 0, [0] * 4, session=1)
    p2, v2 = answered('icmp', [20_000] * 2, 0, [0] * 2, session=2)
    pif = write(tmp_path / 'p.pcap', sorted(p1 + p2))
    vif = write(tmp_path / 'v.pcap', sorted(v1 + v2))
    assert offline.analyze_pcaps(pif, vif).report.ingress.mean_us == 10.0
    two = offline.analyze_pcaps(pif, vif, session=2)
    assert two.session == 2 and two.report.ingress.mean_us == 20.0
    assert two.report.sent == 2


def test_fingerprint_mode_for_hping3_syns(tmp_path):
    pif, vif = [], []
    for i in range(20):
        syn = pk.hping_syn(2911 + i, (36550021 + i * 7919) & 0xffffffff, i)
        rst = pk.reply(syn)
        t = T0 + i * MS
        pif.append((t, syn))
        if i == 5:
            continue                                   # lost in the host
        vif += [(t + 9_000 + i, syn), (t + 60_000, rst)]
        pif.append((t + 60_000 + 3_000, rst))
    pif_path = write(tmp_path / 'p.pcap', sorted(pif))
    vif_path = write(tmp_path / 'v.pcap', sorted(vif))
    with pytest.raises(offline.AnalyzeError, match='instance.s address'):
        offline.analyze_pcaps(pif_path, vif_path)
    result = offline.analyze_pcaps(pif_path, vif_path,
                                   destination='198.18.0.10')
    rep = result.report
    assert result.mode == 'fingerprint'
    assert (rep.ingress.count, rep.ingress.lost) == (19, 1)
    assert rep.ingress.min_us == 9.0 and rep.ingress.max_us == 9.019
    assert (rep.egress.count, rep.egress.mean_us) == (19, 3.0)
    # Each RST acknowledges its SYN (ack = seq + 1): the guest's
    # turnaround, tap to tap.
    assert (rep.turnaround.count, rep.turnaround.min_us,
            rep.turnaround.max_us) == (19, 50.981, 51.0)


def test_nothing_to_match(tmp_path):
    empty = pk.write_pcap(tmp_path / 'e.pcap', [], [])
    with pytest.raises(offline.AnalyzeError, match='no netweaver probe'):
        offline.analyze_pcaps(empty, empty)
    with pytest.raises(offline.AnalyzeError, match='no netweaver probe'):
        offline.analyze_pcaps(empty, empty, mode='probe',
                              destination='198.18.0.10')


def test_same_file_names_are_told_apart(tmp_path):
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    pif, vif = answered('icmp', [10_000], 0, [0])
    result = offline.analyze_pcaps(write(tmp_path / 'a' / 'x.pcap', pif),
                                   write(tmp_path / 'b' / 'x.pcap', vif))
    assert (result.report.pif, result.report.vif) == ('pif:x', 'vif:x')
    assert result.report.ingress.count == 1


# --------------------------------------------------------------------------
# The command, as a user runs it.

def test_cli_table_json_and_seed_line(tmp_path):
    pif, vif = answered('tcp', [10_000, 30_000], 1_000, [2_000, 2_000])
    p = write(tmp_path / 'eth0.pcap', pif)
    v = write(tmp_path / 'tap0.pcap', vif)
    proc = netweaver('analyze', p, v)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert 'eth0 → tap0 (probe mode, unauthenticated)' in out
    assert "{'average': 20.0, 'minimum': 10.0, 'maximum': 30.0, " \
           "'stdev': 14.142135623730951}" in out
    proc = netweaver('analyze', '--json', p, v)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data['report']['ingress']['count'] == 2
    assert data['summary']['average'] == 20.0
    assert math.isclose(data['report']['egress']['mean_us'], 2.0)
    assert data['pif']['records'] == 4 and data['vif']['matched'] == 4


@pytest.mark.parametrize('content, message', [
    (b'', 'PIF.pcap: empty file'),
    (b'garbage!' * 10, 'PIF.pcap: not a pcap or pcapng file'),
    (b'\xd4\xc3\xb2\xa1' + bytes(8), 'PIF.pcap: truncated pcap file header'),
])
def test_cli_bad_file_one_clear_line(content, message, tmp_path):
    bad = tmp_path / 'PIF.pcap'
    bad.write_bytes(content)
    good = write(tmp_path / 'v.pcap', answered('icmp', [1], 0, [0])[1])
    proc = netweaver('analyze', bad, good)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert lines[0].startswith('netweaver analyze: ')
    assert 'Traceback' not in proc.stderr and proc.stdout == ''


def test_cli_missing_file(tmp_path):
    proc = netweaver('analyze', tmp_path / 'nope.pcap', tmp_path / 'v.pcap')
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f'netweaver analyze: {tmp_path}/nope.pcap: cannot read: '
        'No such file or directory')


def test_pcap_error_is_a_value_error():
    # Callers catching ValueError (bad input) also catch file errors.
    assert issubclass(pcaprows.PcapError, ValueError)


# --------------------------------------------------------------------------
# Fingerprint mode on real-world files: noise, tunnels, out-of-order pairs.

def hping_pair(n=20, vif_first=(), lose=(), pif_first=()):
    """hping3 SYNs to GUEST and its RSTs, with every noise frame on both
    sides, the guest's noise seen on the vif first (as it would be).

    ``vif_first``: SYNs whose vif sighting comes 5 µs before the pif's;
    ``pif_first``: SYNs whose RST leaves the pif 2 µs before the vif.
    """
    pif, vif = [], []
    for i in range(n):
        syn = pk.hping_syn(2911 + i, (36550021 + i * 7919) & 0xffffffff, i)
        rst = pk.reply(syn)
        t = T0 + i * MS
        pif.append((t, syn))
        if i in lose:
            continue
        vif.append((t - 5_000 if i in vif_first else t + 9_000 + i, syn))
        vif.append((t + 60_000, rst))
        pif.append((t + (58_000 if i in pif_first else 63_000), rst))
    for j, frame in enumerate(noise()):
        t = T0 + (n + j) * MS
        vif.append((t, frame))
        pif.append((t + 20_000, frame))
    return pif, vif


def test_fingerprint_counts_only_traffic_to_and_from_the_instance(tmp_path):
    pif, vif = hping_pair(vif_first={4}, lose={7}, pif_first={12})
    result = offline.analyze_pcaps(write(tmp_path / 'p.pcap', sorted(pif)),
                                   write(tmp_path / 'v.pcap', sorted(vif)),
                                   destination=GUEST)
    rep = result.report
    assert result.mode == 'fingerprint'
    assert rep.sent == 20                       # the SYNs, nothing else
    assert (rep.ingress.count, rep.ingress.lost) == (18, 1)
    assert rep.anomalies == 2                   # SYN 4 in, RST 12 out
    assert rep.ingress.min_us == 9.0 and rep.ingress.max_us == 9.019
    assert (rep.egress.count, rep.egress.min_us, rep.egress.max_us) == \
        (18, 3.0, 3.0)
    assert (rep.vni, rep.tunnel) == (None, None)
    # Every noise frame is in both files and matched by neither.
    assert result.pif.probes == 20 + 19 and result.vif.probes == 19 + 19
    assert result.pif.foreign == len(noise())


@pytest.mark.parametrize('tunnel', ['vxlan', 'geneve'])
@pytest.mark.parametrize('where', ['pif', 'vif', 'both'])
def test_fingerprint_reads_through_tunnels(tmp_path, tunnel, where):
    def wrap(records):
        if tunnel == 'vxlan':
            return [(t, pk.vxlan(f, 4242)) for t, f in records]
        return [(t, pk.geneve(f, 4242, options=pk.OVN_OPTION * 6))
                for t, f in records]
    pif, vif = hping_pair(vif_first={2})
    if where in ('pif', 'both'):
        pif = wrap(pif)
    if where in ('vif', 'both'):
        vif = wrap(vif)
    result = offline.analyze_pcaps(write(tmp_path / 'p.pcap', sorted(pif)),
                                   write(tmp_path / 'v.pcap', sorted(vif)),
                                   destination=GUEST)
    rep = result.report
    assert rep.sent == 20 and rep.anomalies == 1
    assert (rep.ingress.count, rep.ingress.lost) == (19, 0)
    assert rep.ingress.min_us == 9.0
    assert rep.egress.count == 20 and rep.egress.min_us == 3.0
    if where == 'vif':
        assert (rep.vni, rep.tunnel) == (None, None)
    else:
        assert (rep.vni, rep.tunnel) == (4242, tunnel)


def test_fingerprint_ipv6_with_router_solicitations(tmp_path):
    pif, vif = [], []
    for i in range(6):
        def echo(kind):
            return dpkt.icmp6.ICMP6(type=kind, data=dpkt.icmp6.ICMP6.Echo(
                id=77, seq=i, data=b'x' * 16))
        req = eth(ip6(SRC6, GUEST6, 58, echo(128)), dpkt.ethernet.ETH_TYPE_IP6)
        rep = eth(ip6(GUEST6, SRC6, 58, echo(129)), dpkt.ethernet.ETH_TYPE_IP6)
        t = T0 + i * MS
        pif += [(t, req), (t + 40_000, rep)]
        vif += [(t + 10_000, req), (t + 30_000, rep)]
    for j, frame in enumerate(noise()):
        vif.append((T0 + (10 + j) * MS, frame))
        pif.append((T0 + (10 + j) * MS + 7_000, frame))
    result = offline.analyze_pcaps(
        write(tmp_path / 'p.pcap', sorted(pif)),
        write(tmp_path / 'v.pcap', sorted(vif)), destination='2001:2::a')
    r = result.report
    assert (r.sent, r.anomalies) == (6, 0)
    assert (r.ingress.count, r.ingress.mean_us) == (6, 10.0)
    assert (r.egress.count, r.egress.mean_us) == (6, 10.0)


def test_cli_fingerprint_shows_anomalies_and_the_vni(tmp_path):
    pif, vif = hping_pair(vif_first={3, 5})
    pif = [(t, pk.geneve(f, 99)) for t, f in pif]
    p = write(tmp_path / 'eth1.pcap', sorted(pif))
    v = write(tmp_path / 'tap0.pcap', sorted(vif))
    proc = netweaver('analyze', '--fingerprint', '-d', GUEST, p, v)
    assert proc.returncode == 0, proc.stderr
    assert 'geneve vni 99' in proc.stdout
    assert '20 sent' in proc.stdout
    assert '2 anomalies' in proc.stdout
    assert '-' not in ''.join(
        line.split()[3] for line in proc.stdout.splitlines()
        if line.strip().startswith(('ingress', 'egress')))
    proc = netweaver('analyze', '--fingerprint', '-d', GUEST, '--json', p, v)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)['report']
    assert (out['anomalies'], out['vni'], out['tunnel']) == (2, 99,
                                                             'geneve')
    assert out['ingress']['count'] == 18 and out['ingress']['min_us'] > 0
