"""Probe windows under a flood of look-alikes through the pif.

The lab's source floods the pif at FLOOD_PPS (``flood.py``: bounded in
count and time, to lab guests' MACs and 198.18.0.0/15 addresses) while a
window runs: our MAGIC with a wrong session, the window's session with
unplanned sequence numbers, echo replies nobody asked for, UDP and TCP
with our ports, plain UDP.  Truth: the loss rule's own packet counter
(probes dropped on purpose) and the kernel's drop counters on the path.
Nothing here asserts on speed; the flood rate reached is checked against
what the test asked, since it is the test's input.
"""

import json
import logging
import os

import pytest

from netweaver_agent.agent import privileged
from netweaver_agent.core import capture
from netweaver_agent.core import netns
from netweaver_agent.core import sightings
from netweaver_agent.core import window as probe_window
from netweaver_agent.lab import spec as labspec
from tests.functional import flood as flood_mod
from tests.functional import conftest
from tests.functional import inprocess

LOG = logging.getLogger(__name__)
FLOOD_PPS = 100_000
MIN_PPS = 50_000
FLOOD_S = 4.0
SESSION = 0x4a4a
EVERY = 5
# An address of the lab network that no guest has: flood frames to the
# lossy guest's MAC carry it, so its loss rule counts probes only.
NOBODY = '198.18.0.250'


@pytest.fixture
def cycle_factory(tmp_path):
    yield from inprocess.cycles(tmp_path)


class Flood(conftest.NetnsScript):
    """The flooder running in the source namespace; always stopped."""

    def __init__(self, the_lab, workdir, session, planned, lossy):
        targets = []
        for g in the_lab.guests:
            ip = NOBODY if g.index == lossy else g.address
            targets.append({'mac': g.mac, 'ip': ip})
        # Most of the flood ends at the hypervisor's bridge (its own MAC,
        # no address there): through the pif, and cheap for the 2 cores.
        bridge = json.loads(netns.run(
            ['ip', '-j', 'link', 'show', the_lab.layout.bridge],
            netns=the_lab.spec.hv_netns).stdout)[0]['address']
        targets += [{'mac': bridge, 'ip': NOBODY}] * (3 * len(targets))
        self.spec_path = os.path.join(workdir, 'flood.json')
        with open(self.spec_path, 'w', encoding='utf-8') as f:
            json.dump({'src_mac': the_lab.spec.src_mac,
                       'src_ip': the_lab.spec.src_address, 'targets': targets,
                       'session': session, 'planned': planned,
                       'count': int(FLOOD_PPS * FLOOD_S),
                       'duration_s': FLOOD_S, 'rate_pps': FLOOD_PPS}, f)
        super().__init__(the_lab.spec.src_netns, 'tests.functional.flood',
                         self.spec_path, FLOOD_S + 10, 'flooder')


def _link_drops(ns):
    proc = netns.run(['ip', '-s', '-j', 'link', 'show'], netns=ns)
    total = 0
    for link in json.loads(proc.stdout):
        stats = link.get('stats64', {})
        total += stats.get('rx', {}).get('dropped', 0)
        total += stats.get('tx', {}).get('dropped', 0)
    return total


def _softnet_drops():
    with open('/proc/net/softnet_stat', encoding='ascii') as f:
        return sum(int(line.split()[1], 16) for line in f)


def path_drops(the_lab):
    """Packets the kernel dropped anywhere between source and guests."""
    spaces = [the_lab.spec.src_netns, the_lab.spec.hv_netns,
              *(g.netns for g in the_lab.guests)]
    return sum(_link_drops(ns) for ns in spaces) + _softnet_drops()


def pif_rx_packets(the_lab):
    proc = netns.run(['ip', '-s', '-j', 'link', 'show', the_lab.spec.pif],
                     netns=the_lab.spec.hv_netns)
    return json.loads(proc.stdout)[0]['stats64']['rx']['packets']


def rule_drops(the_lab):
    """What the lab's loss rule dropped (its own packet counter)."""
    proc = netns.run(['iptables', '-w', '5', '-L', 'FORWARD', '-v', '-x',
                      '-n'], netns=the_lab.spec.hv_netns)
    counts = [int(line.split()[0]) for line in proc.stdout.splitlines()
              if 'statistic' in line and 'DROP' in line]
    assert len(counts) == 1, proc.stdout
    return counts[0]


def _look_alike_rows(batch, planned):
    """Rows of the window's session that are not probes or replies of it."""
    names = batch.ifnames
    unplanned = replies_in = 0
    for key, index, direction in zip(batch.keys, batch.ifindex,
                                     batch.direction):
        seq, reply = key >> 1, key & 1
        if seq >= flood_mod.UNPLANNED_SEQ:
            unplanned += 1
        elif (reply and names[index].startswith('tap')
              and direction == sightings.DIR_OUT):
            replies_in += 1
    return unplanned, replies_in


@pytest.mark.parametrize('protocol', ['icmp', 'udp', 'tcp'])
def test_flood_of_look_alikes_makes_no_false_match(lab_factory, tmp_path,
                                                   protocol):
    the_lab = lab_factory(guests=2, losses=(
        labspec.LossInjection(guest=1, every=EVERY, protocol=protocol),))
    ctx = privileged.netns_pctxt
    try:
        privileged.status(ctx)       # the daemon starts before the flood
        count = 50
        settings = probe_window.WindowSettings(
            protocol=protocol, count=count, interval_ms=1.0,
            timeout_ms=100.0, max_window_ms=1000.0)
        planned = count * len(the_lab.guests)
        source = privileged.PrivsepLocalSource(the_lab.spec.src_netns,
                                               context=ctx)
        drops_before = path_drops(the_lab)
        with Flood(the_lab, str(tmp_path), SESSION, planned, lossy=1):
            rx_before = pif_rx_packets(the_lab)
            result = probe_window.run_window(
                the_lab.paths(), source, settings,
                capture_netns=the_lab.spec.hv_netns, session=SESSION,
                capture_class=privileged.capture_class(ctx))
            rx = pif_rx_packets(the_lab) - rx_before
        drops = path_drops(the_lab) - drops_before
    finally:
        privileged.stop()
    injected = rule_drops(the_lab)
    # The flood's rate through the pif while the window ran.
    rate = rx / (result.duration_ns / 1e9)
    figures = (f'{protocol}: flood {rate:.0f} pps, path drops {drops}, '
               f'capture {result.capture}, injected {injected}')
    unplanned, replies_in = _look_alike_rows(result.batch, planned)
    figures += (f', look-alike rows of the session: {unplanned} unplanned, '
                f'{replies_in} replies towards guests; reports '
                + '; '.join(f'{r.vif} in={r.ingress.count} '
                            f'lost={r.ingress.lost} unknown={r.unknown} '
                            f'unseen={r.unseen_at_pif} '
                            f'replies={r.turnaround.count}'
                            for r in result.reports.values()))
    LOG.info('%s', figures)
    assert rate >= MIN_PPS, figures
    # The look-alikes did reach the capture as rows of the window (ICMP
    # and UDP ones of other sessions, and TCP ones from outside the
    # plan's source ports, are kept out by the kernel filter)...
    assert unplanned > 0, figures
    if protocol == 'icmp':
        assert replies_in > 0, figures
    # ...and none of them was taken for a probe or a reply.
    dropped = result.capture.drops > 0
    reports = {r.vif: r for r in result.reports.values()}
    for guest in the_lab.guests:
        r = reports[guest.vif]
        ing = r.ingress
        assert r.sent == count, (r, figures)
        assert ing.count + ing.lost + r.unknown + r.unseen_at_pif == count
        if not dropped:
            assert r.unknown == 0 and r.unseen_at_pif == 0, (r, figures)
        truth = injected if guest.index == 1 else 0
        # Every probe dropped on purpose is lost (or, if the capture
        # dropped packets, of unknown fate); nothing else is lost but
        # what the kernel counted as dropped on the path.
        assert truth <= ing.lost + r.unknown + r.unseen_at_pif, (r, figures)
        assert ing.lost <= truth + drops, (r, figures)
        assert ing.count >= count - truth - drops - r.unknown - \
            r.unseen_at_pif, (r, figures)
        assert 0 < ing.min_us and ing.max_us < settings.timeout_ms * 1000
        # Replies only for probes that reached the guest, after them.
        turn = r.turnaround
        assert turn.count <= ing.count, (r, figures)
        if turn.count:
            assert turn.min_us > 0, (r, figures)
        assert r.egress.count + r.egress.lost <= ing.count, (r, figures)
        if protocol != 'udp':          # ICMP errors are rate-limited
            assert r.egress.lost <= drops, (r, figures)
            assert turn.count >= ing.count - drops, (r, figures)


def test_capture_drops_give_unknown_fate_not_loss(lab_factory,
                                                  cycle_factory,
                                                  tmp_path, monkeypatch):
    # The real pollsters, capturing in this process (privsep off) with
    # recvmsg (as where the kernel gives no ring: the ring would not drop
    # here) and a receive buffer of the kernel's minimum: under the flood
    # the capture itself drops packets.
    monkeypatch.setattr(capture, 'RCVBUF_BYTES', 1)
    monkeypatch.setattr(capture.LiveCapture, 'USE_RING', False)
    the_lab = lab_factory(guests=2, losses=(
        labspec.LossInjection(guest=1, every=EVERY, protocol='icmp'),))
    count = 100
    cycle = cycle_factory(the_lab, privsep=False, probe_count=count,
                          probe_interval_ms=0.5, probe_timeout_ms=100.0,
                          max_window_ms=3000.0)
    with Flood(the_lab, str(tmp_path), SESSION, 2 * count, lossy=1):
        samples, cache = cycle.run()
    injected = rule_drops(the_lab)
    (window,) = cache.windows
    reports = {m.path.vif: m for m in window.measurements}
    assert reports, cycle.log_text()
    drops = {m.metadata['capture_drops'] for m in reports.values()}
    (capture_drops,) = drops
    assert capture_drops > 0, cycle.log_text()
    unknown = sum(m.report.unknown for m in reports.values())
    # The probes the lab dropped on purpose are unknown, or unseen at the
    # pif when the capture dropped their first sighting too (the drops
    # come in bursts: one guest's probes may all have missed the pif).
    lossy = reports[the_lab.guests[1].vif].report
    assert injected > 0
    assert lossy.unknown + lossy.unseen_at_pif >= injected, (
        injected, [m.report for m in reports.values()])
    for m in reports.values():
        assert m.metadata['probe_unknown'] == m.report.unknown
        # Probes missing on the vif while the capture dropped are never
        # counted as lost, not even the lossy guest's.
        assert m.report.ingress.lost == m.report.late == 0, m.report
    LOG.info('forced capture drops: %d dropped, %d unknown, reports %s',
             capture_drops, unknown, [m.report for m in reports.values()])
    loss = inprocess.by_resource(samples)['network.vif.probe.loss']
    assert set(loss.values()) <= {0.0}, loss
    log = cycle.log_text()
    assert (f'the capture dropped {capture_drops} packets; {unknown} '
            'probes of unknown fate') in log, log
    assert 'Capture dropped' in log
