"""A guest forging another guest's latency, in the Linux-bridge lab.

Guest 0 reads the window's session and tag from its own probe and writes
look-alikes of guest 1's probes (to guest 1's MAC, from the source's
address) and answers (from guest 1's address, out of the pif) for every
sequence number of the window, while the window runs (``forger.py``).
Unverified, those rows move guest 1's numbers (the landed matcher
published −78,725 µs).  With the window's secret, guest 1's report equals
a clean window's within normal variation, and every sighting the matcher
accepted for guest 1 comes from a probe the source really sent (tcpdump
in the source's namespace) and guest 1's own answer.
"""

import json
import logging
import os
import subprocess
import time

import pytest

from netweaver_agent.core import latency
from netweaver_agent.core import netns
from netweaver_agent.core import pcapfile
from netweaver_agent.core import probe
from netweaver_agent.core import sources
from netweaver_agent.core import window as probe_window
from tests.functional import conftest
from tests.functional import inprocess

LOG = logging.getLogger(__name__)
COUNT = 40
FORGE_S = 4.0
MAX_FRAMES = 100_000
# Between two passes over the window's sequence numbers: a forgery, not
# a flood (test_flood.py is that), so the capture keeps every packet.
PAUSE_S = 0.02


class Forger(conftest.NetnsScript):
    """forger.py in guest 0's namespace; always stopped."""

    def __init__(self, the_lab, workdir, protocol):
        attacker, victim = the_lab.guests
        spec = {'iface': 'eth0', 'own_ip': attacker.address,
                'own_mac': attacker.mac, 'victim_ip': victim.address,
                'victim_mac': victim.mac, 'src_ip': the_lab.spec.src_address,
                'src_mac': the_lab.spec.src_mac, 'protocol': protocol,
                'seq_max': 2 * COUNT + 10, 'duration_s': FORGE_S,
                'max_frames': MAX_FRAMES, 'pause_s': PAUSE_S}
        self.path = os.path.join(workdir, 'forger.json')
        with open(self.path, 'w', encoding='utf-8') as f:
            json.dump(spec, f)
        super().__init__(attacker.netns, 'tests.functional.forger',
                         self.path, FORGE_S + 10, 'forger')


class SourceDump:
    """tcpdump of what the source sends to guest 1 (nanosecond pcap)."""

    def __init__(self, the_lab, path):
        self.path = path
        victim = the_lab.guests[1].address
        self.argv = netns.netns_argv(the_lab.spec.src_netns, [
            'tcpdump', '-i', 'eth0', '-w', path, '-U', '-Z', 'root',
            '--time-stamp-precision=nano', '-c', '100000',
            f'src host {the_lab.spec.src_address} and dst host {victim}'])
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 10
        line = ''
        while time.monotonic() < end and 'listening on' not in line:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                break
        if 'listening on' not in line:
            self.proc.kill()
            self.proc.communicate()
            pytest.fail(f'tcpdump did not start: {line}')
        return self

    def __exit__(self, *exc):
        time.sleep(0.2)
        self.proc.send_signal(2)
        try:
            self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        return False


def window(the_lab, protocol):
    settings = probe_window.WindowSettings(
        protocol=protocol, count=COUNT, interval_ms=1.0,
        per_vnic_interval_ms=4.0, timeout_ms=100.0, max_window_ms=2000.0)
    return probe_window.run_window(the_lab.paths(), the_lab.layout.source(),
                                   settings,
                                   capture_netns=the_lab.spec.hv_netns)


def unverified(result, the_lab, protocol):
    """The attack window matched as the landed matcher did: no secret,
    the same plan (each genuine probe's vNIC)."""
    paths = the_lab.paths()
    taps = {p.interfaces[-1]: p.vif for p in paths}
    plan = {seq: taps[name] for (seq, reply), seen in result.accepted.items()
            if not reply for name in seen if name in taps}
    m = latency.Matcher(result.session, [p for p in paths], plan,
                        100 * 10**6, protocol=protocol)
    m.feed_batch(result.batch)
    return m.reports()


def describe(rep):
    i, e = rep.ingress, rep.egress
    return (f'in n={i.count} lost={i.lost} min={i.min_us} '
            f'mean={i.mean_us} max={i.max_us}; eg n={e.count} lost={e.lost} '
            f'min={e.min_us} mean={e.mean_us} max={e.max_us}; '
            f'anomalies={rep.anomalies} rejected={rep.rejected}')


@pytest.mark.parametrize('protocol', ['icmp', 'udp'])
def test_guest_cannot_forge_another_guests_latency(
        lab_factory, tmp_path, protocol):
    the_lab = lab_factory(guests=2)
    victim = the_lab.guests[1]
    clean = window(the_lab, protocol).reports[victim.vif]
    src_pcap = str(tmp_path / 'src.pcap')
    with SourceDump(the_lab, src_pcap):
        with Forger(the_lab, str(tmp_path), protocol) as forger:
            result = window(the_lab, protocol)
    attacked = result.reports[victim.vif]
    naive = unverified(result, the_lab, protocol)[victim.vif]
    figures = (f'{protocol}: forger {forger.result}\n clean    '
               f'{describe(clean)}\n attacked {describe(attacked)}\n '
               f'unverified {describe(naive)}')
    LOG.info('%s', figures)
    print(figures)
    # The attack ran: guest 0 read the window's session and sent
    # look-alikes for guest 1's sequence numbers during the window...
    assert forger.result['sniffed'], figures
    assert forger.result['session'] == result.session, figures
    assert forger.result['sent'] > 0, figures
    # ... which the capture saw, with guest 1's keys, and the matcher
    # rejected.
    assert attacked.rejected > 0, figures
    # Unverified, they would have moved guest 1's numbers.
    assert (naive.anomalies, naive.ingress, naive.egress) != \
        (attacked.anomalies, attacked.ingress, attacked.egress), figures
    # Guest 1's report is a clean window's, within normal variation.
    pairs = [(attacked.ingress, clean.ingress)]
    for rep in (clean, attacked):
        assert rep.authenticated
        assert (rep.ingress.count, rep.ingress.lost) == (COUNT, 0), figures
        assert rep.anomalies == 0, figures
        assert rep.ingress.min_us > 0, figures
    if protocol == 'icmp':
        pairs.append((attacked.egress, clean.egress))
        for rep in (clean, attacked):
            assert (rep.egress.count, rep.egress.lost) == (COUNT, 0), \
                figures
    # (UDP: guests rate-limit ICMP errors, so egress is sampled; the
    # forged UDP probes guest 1 answers use up its budget, so fewer
    # samples, never forged ones: checked below with every sighting.)
    for a, c in pairs:
        # Same path, same host: a forged sighting would be far off (ms
        # early or late); normal variation on this loaded machine is not.
        assert a.min_us > 0, figures
        assert a.mean_us <= 5 * c.mean_us + 100, figures
        assert a.p50_us >= c.p50_us / 5 - 5, figures
    # Every sighting accepted for guest 1 comes from a probe the source
    # sent (tcpdump in its namespace) and guest 1's own answer: in path
    # order, each after the source sent it.
    sent = pcapfile.read_pcap(src_pcap, session=result.session).batch
    t_src = {}
    for key, t in zip(sent.keys, sent.t_ns):
        t_src.setdefault(key >> 1, t)
    mine = [(seq, reply, seen) for (seq, reply), seen in
            result.accepted.items() if seq in t_src]
    assert {seq for seq, reply, _ in mine if not reply} == set(t_src), \
        figures
    pif, tap = the_lab.spec.pif, victim.vif
    for seq, reply, seen in mine:
        t0 = t_src[seq]
        if not reply:
            assert t0 <= seen[pif] <= seen[tap] < t0 + 10**8, (seq, seen)
        else:
            probe_seen = result.accepted[(seq, False)]
            assert probe_seen[tap] <= seen[tap] <= seen[pif], (seq, seen)
    # The rows rejected carried guest 1's keys (look-alikes), never the
    # auth of a probe the source sent.
    genuine = dict(zip((k >> 1 for k in sent.keys), sent.auth_column()))
    want = {seq: probe.expected_auth(
        result.secret, protocol, result.session, seq,
        sources.pack_address(victim.address)) for seq in t_src}
    assert genuine == want, 'the source sent tagged probes'
    names = result.batch.ifnames
    forged = sum(1 for k, i, a in zip(result.batch.keys,
                                      result.batch.ifindex,
                                      result.batch.auth_column())
                 if (k >> 1) in want and a != want[k >> 1]
                 and names[i] in (pif, tap))
    assert forged > 0, figures


@pytest.fixture
def cycle_factory(tmp_path):
    yield from inprocess.cycles(tmp_path)


def test_forgery_through_the_real_pollsters(lab_factory, cycle_factory,
                                            tmp_path):
    """The same attack while our pollsters poll (privsep daemon building
    and tagging the probes): guest 1's published samples are a clean
    cycle's, and its window rejected the look-alikes."""
    the_lab = lab_factory(guests=2)
    cycle = cycle_factory(the_lab, probe_count=COUNT, probe_interval_ms=1.0,
                          probe_timeout_ms=100.0, max_window_ms=2000.0)
    victim = cycle.resource_of(1)
    tap = the_lab.guests[1].vif

    def poll():
        samples, cache = cycle.run()
        (window,) = cache.windows
        reports = {m.path.vif: m.report for m in window.measurements}
        return inprocess.by_resource(samples), reports[tap]

    clean, clean_rep = poll()
    with Forger(the_lab, str(tmp_path), 'icmp') as forger:
        attacked, rep = poll()

    def mine(samples):
        return {m: v[victim] for m, v in samples.items() if victim in v}

    figures = (f'forger {forger.result}\n clean {describe(clean_rep)}\n '
               f'attacked {describe(rep)}\n samples clean {mine(clean)}'
               f'\n samples attacked {mine(attacked)}')
    LOG.info('%s', figures)
    print(figures)
    assert forger.result['sniffed'] and forger.result['sent'] > 0, figures
    assert rep.authenticated and rep.rejected > 0, figures
    assert (rep.ingress.count, rep.ingress.lost, rep.anomalies) == \
        (COUNT, 0, 0), figures
    assert rep.egress.count == COUNT, figures
    for meter in ('network.vif.latency', 'network.vif.outgoing.latency'):
        a, c = attacked[meter][victim], clean[meter][victim]
        assert 0 < a <= 5 * c + 100, (meter, figures)
        assert a >= c / 5 - 5, (meter, figures)
    assert attacked['network.vif.probe.loss'][victim] == 0.0, figures
