"""The real Ceilometer polling agent, with our pollsters, on the lab.

Everything is real: namespaces, bridge, veth taps, the NFQUEUE delay,
libvirt's ``test:///`` driver describing the guests, the unmodified
``ceilometer-polling`` in the hypervisor namespace, its Prometheus
exporter on that namespace's loopback.  Needs root; fails (never skips)
when the lab cannot be built.
"""

import re
import time

import pytest

from netweaver_agent.agent import libvirterrors
from netweaver_agent.core import netns
from netweaver_agent.lab import agent as labagent
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import virt

DELAY_MS = 2.0
INTERVAL_S = 3
WAIT_S = 45.0
PROBE = {'probe_count': 20, 'probe_interval_ms': 1.0,
         'per_vnic_interval_ms': 8.0, 'probe_timeout_ms': 100.0,
         'max_window_ms': 2000.0}
WINDOW_RE = re.compile(r'^(\S+ \S+) .*netweaver_agent\.agent\.inspector .*'
                       r'Probe window (\d+): (\d+) vNICs')
POLLING_RE = re.compile(r'^(\S+ \S+) .*(Polling|Finished polling) pollster '
                        r'(network\.vif\.\S+) ')


def _ts(text):
    return time.mktime(time.strptime(text[:19], '%Y-%m-%d %H:%M:%S')) + \
        float('0' + text[19:])


@pytest.fixture
def agent_lab(lab_factory, tmp_path):
    """``start(lab, **write_files kwargs) -> running PollingAgent``."""
    agents = []

    def start(the_lab, wrapper=(), **kwargs):
        kwargs.setdefault('interval_s', INTERVAL_S)
        probe = dict(PROBE)
        probe.update(kwargs.pop('probe', {}))
        files = labagent.write_files(the_lab, str(tmp_path / 'agent'),
                                     probe=probe, **kwargs)
        agent = labagent.PollingAgent(files, the_lab.spec.hv_netns,
                                      wrapper=wrapper)
        agents.append(agent)
        agent.start()
        return agent

    yield start
    for agent in agents:
        agent.stop()


def test_agent_publishes_latency_of_every_guest(lab_factory, agent_lab):
    the_lab = lab_factory(guests=2, delays=(
        labspec.DelayInjection(guest=1, delay_ms=DELAY_MS),))
    expected = labagent.resource_ids(the_lab)
    sriov = virt.GuestDomain(
        index=5, name='sriov', uuid='5a1e0c3d-0000-4000-8000-00000000005f',
        vif='unused', mac='fa:16:3e:5f:00:05', address='198.18.0.205',
        interface_type='hostdev')
    agent = agent_lab(the_lab, extra_domains=(sriov,))
    series = agent.wait_for(labagent.latency_ready(set(expected.values())),
                            WAIT_S)
    by_tap = {tap: [s for s in series if s.label('resource') == rid]
              for tap, rid in expected.items()}
    delayed, plain = the_lab.guests[1].vif, the_lab.guests[0].vif
    (d,) = by_tap[delayed]
    (p,) = by_tap[plain]
    # The delay sits on the bridge between pif and tap: it is in-host.
    assert DELAY_MS * 1000 <= d.value <= DELAY_MS * 1000 + 1000, d
    assert 0 < p.value < 500, p
    for s in (d, p):
        assert s.label('unit') == 'us'
        assert s.label('type') == 'vif'
    # Guest 0 has a filterref (id = filter name), guest 1 has none.
    assert p.label('resource') == virt.GuestDomain.from_guest(
        the_lab.guests[0]).filter_name
    assert d.label('resource').endswith(f'-{the_lab.guests[1].uuid}-'
                                        f'{delayed}')
    # The other meters of the same window.
    names = {s.name for s in agent.series()}
    for meter in labagent.LATENCY_METERS:
        assert 'ceilometer_' + meter.replace('.', '_') in names, meter
    log = agent.log_text()
    assert 'Traceback' not in log
    # The SR-IOV instance: one clear line, no sample.
    (line,) = [line for line in log.splitlines()
               if f'Instance {sriov.uuid}: vNIC {sriov.mac}' in line
               and 'WARNING' in line]
    assert 'is SR-IOV hostdev' in line and 'not measurable' in line
    assert 'NotMeasurable' not in line
    assert not any(sriov.uuid in (s.label('resource') or '')
                   for s in agent.series())


def _cycles(log):
    """Per polling cycle: how many windows and finished latency meters.

    A cycle ends where a meter it already polled is polled again (no
    timing guess: the first cycle also waits about a second for the
    privsep daemon to start).
    """
    events = []
    for line in log.splitlines():
        m = WINDOW_RE.match(line)
        if m:
            events.append((_ts(m.group(1)), 'window', m.group(2)))
            continue
        m = POLLING_RE.match(line)
        if m:
            events.append((_ts(m.group(1)), m.group(2), m.group(3)))
    events.sort()
    cycles = []
    for _t, kind, what in events:
        if not cycles or (kind == 'Polling' and
                          what in cycles[-1]['started']):
            cycles.append({'windows': 0, 'started': set(),
                           'finished': set()})
        if kind == 'window':
            cycles[-1]['windows'] += 1
        elif kind == 'Polling':
            cycles[-1]['started'].add(what)
        else:
            cycles[-1]['finished'].add(what)
    return cycles


def test_one_window_per_cycle_with_parallel_pollsters(lab_factory,
                                                      agent_lab):
    the_lab = lab_factory(guests=2)
    agent = agent_lab(the_lab, threads=0)
    meters = set(labagent.LATENCY_METERS)

    def two_complete_cycles(_series):
        done = [c for c in _cycles(agent.log_text())
                if c['finished'] == meters]
        return len(done) >= 2

    agent.wait_for(two_complete_cycles, WAIT_S)
    agent.stop()
    cycles = [c for c in _cycles(agent.log_text())
              if c['finished'] == meters]
    assert len(cycles) >= 2
    # The pollsters ran in parallel: a meter started polling while another
    # was still at it (serial ones would each finish first).
    running, overlapped = set(), False
    for line in agent.log_text().splitlines():
        m = POLLING_RE.match(line)
        if m and m.group(2) == 'Polling':
            overlapped = overlapped or bool(running - {m.group(3)})
            running.add(m.group(3))
        elif m:
            running.discard(m.group(3))
    assert overlapped, 'the latency meters were polled one at a time'
    for cycle in cycles:
        assert cycle['started'] == meters
        assert cycle['windows'] == 1, cycles


def _driver_rate():
    """Bytes per second of the test driver's fake rx counter."""
    import libvirt
    libvirterrors.quiet_libvirt()
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        guest = virt.GuestDomain(
            index=0, name='rate', uuid='00000000-0000-4000-8000-0000000000aa',
            vif='taprate', mac='fa:16:3e:00:00:aa', address='198.18.0.250')
        conn = libvirt.openReadOnly(virt.write_node(
            f'{tmp}/node.xml', [guest]))
        try:
            dom = conn.lookupByUUIDString(guest.uuid)
            t0, a = time.monotonic(), dom.interfaceStats('taprate')[0]
            time.sleep(1.0)
            t1, b = time.monotonic(), dom.interfaceStats('taprate')[0]
        finally:
            conn.close()
    return (b - a) / (t1 - t0)


def test_delta_meters_are_untouched_by_our_pollsters(lab_factory,
                                                     agent_lab):
    rate = _driver_rate()
    the_lab = lab_factory(guests=2)
    rid = labagent.resource_ids(the_lab)[the_lab.guests[0].vif]
    agent = agent_lab(the_lab, interval_s=4, meters=(
        'network.incoming.bytes', 'network.incoming.bytes.delta',
        *labagent.LATENCY_METERS))
    totals, deltas = [], []

    def enough(series):
        for s in series:
            if s.label('resource') != rid:
                continue
            if s.name == 'ceilometer_network_incoming_bytes':
                if not totals or totals[-1] != s.value:
                    totals.append(s.value)
            elif s.name == 'ceilometer_network_incoming_bytes_delta':
                if s.value and (not deltas or deltas[-1] != s.value):
                    deltas.append(s.value)
        return len(totals) >= 4 and len(deltas) >= 3

    agent.wait_for(enough, WAIT_S + 20, poll_s=0.25)
    assert 'Probe window' in agent.log_text()
    # Each delta is exactly the growth of the cumulative counter between
    # Ceilometer's own polls (both come from one inspect_vnics call of
    # the shared inspector): nobody else read that inspector in between,
    # or the delta would be short by the bytes counted since.
    growth = [b - a for a, b in zip(totals, totals[1:])]
    assert set(deltas) <= set(growth), (deltas, growth)
    # And it is the driver's rate times the polling interval (but the
    # first: the first cycle waited for the privsep daemon to start, so
    # the next one came that much sooner after it).
    for delta in deltas[1:]:
        assert abs(delta - rate * 4) <= 0.02 * rate * 4, (delta, rate)


def test_loss_is_published_and_filtered_probes_are_not_loss(lab_factory,
                                                            agent_lab):
    the_lab = lab_factory(guests=2, losses=(
        labspec.LossInjection(guest=0, every=4),))
    lossy, blocked = the_lab.guests
    # A "security group" dropping every probe to guest 1 on the bridge
    # (bridge netfilter is on: the loss injection needs it too).
    netns.run(['iptables', '-I', 'FORWARD', '1', '-m', 'physdev',
               '--physdev-out', blocked.vif, '-p', 'icmp', '--icmp-type',
               'echo-request', '-j', 'DROP'], netns=the_lab.spec.hv_netns)
    ids = labagent.resource_ids(the_lab)
    agent = agent_lab(the_lab)

    def ready(series):
        loss = [s for s in series
                if s.name == 'ceilometer_network_vif_probe_loss']
        return loss if ('filtered before the tap' in agent.log_text()
                        and loss) else None

    loss = agent.wait_for(ready, WAIT_S)
    by_id = {s.label('resource'): s.value for s in loss}
    # 20 probes per window, every 4th dropped after the pif: 25 %.
    assert by_id == {ids[lossy.vif]: 25.0}
    log = agent.log_text()
    assert f'Instance {blocked.uuid} vNIC {blocked.vif}: 20 probes' in log
    assert 'security group rule create --ingress --protocol icmp' in log
    latency = {s.label('resource') for s in
               agent.series('ceilometer_network_vif_latency')}
    assert latency == {ids[lossy.vif]}


def test_without_cap_net_raw_the_pollsters_stop_cleanly(
        lab_factory, agent_lab):
    the_lab = lab_factory(guests=1)
    rid = labagent.resource_ids(the_lab)[the_lab.guests[0].vif]
    agent = agent_lab(
        the_lab, meters=('network.incoming.bytes',
                         *labagent.LATENCY_METERS),
        wrapper=('setpriv', '--inh-caps=-net_raw',
                 '--bounding-set=-net_raw', '--'))

    def two_cycles(series):
        log = agent.log_text()
        return (log.count('Finished polling pollster network.incoming.bytes '
                          'in the context') >= 2
                and all(f'Prevent pollster {m} from polling' in log
                        for m in labagent.LATENCY_METERS))

    agent.wait_for(two_cycles, WAIT_S)
    log = agent.log_text()
    disabled = [line for line in log.splitlines()
                if 'netweaver latency pollsters disabled' in line]
    assert len(disabled) == 1, disabled
    assert 'CAP_NET_RAW' in disabled[0]
    assert 'Traceback' not in log
    names = {(s.name, s.label('resource')) for s in agent.series()}
    assert ('ceilometer_network_incoming_bytes', rid) in names
    assert not any(n.startswith('ceilometer_network_vif') for n, _ in names)
