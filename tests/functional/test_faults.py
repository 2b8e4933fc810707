"""Faults within a polling cycle hit only what they hit.

The real pollsters, in this process (see :mod:`inprocess`) or as the real
``ceilometer-polling``, on the namespace lab with libvirt's ``test:///``
driver.  Faults are real: a guest whose firewall drops every packet, a
domain destroyed (shut off) or destroyed and undefined (libvirt answers
"no domain") through our inspector's own connection, a tap deleted while
the window runs, the realtime clock reported stepped, an SSH probe source
that cannot be reached.  Each time the other vNICs get their samples and
the next cycle runs normally.
"""

import threading
import time

import pytest

from netweaver_agent.core import netns
from netweaver_agent.core import window as probe_window
from netweaver_agent.lab import agent as labagent
from tests.functional import inprocess
from tests.functional.inprocess import by_resource
from tests.functional.inprocess import METERS

ALL = {m.sample_name for m in METERS}
PROBE = {'probe_count': 30, 'probe_interval_ms': 1.0,
         'per_vnic_interval_ms': 10.0, 'probe_timeout_ms': 100.0,
         'max_window_ms': 3000.0}
WATCH_S = 10.0


@pytest.fixture
def cycle_factory(tmp_path):
    yield from inprocess.cycles(tmp_path)


def _meters_of(samples, rid):
    return {name for name, vols in by_resource(samples).items()
            if rid in vols}


def _tx_packets(dev):
    # /proc/thread-self/net is the namespace of the calling thread.
    with open('/proc/thread-self/net/dev', encoding='ascii') as f:
        for line in f:
            name, _, rest = line.partition(':')
            if name.strip() == dev:
                return int(rest.split()[9])
    return None


def delete_when_probed(the_lab, tap, after=5):
    """A thread deleting ``tap`` once ``after`` probes went out of it."""
    done = threading.Event()
    state = {}

    def wait_for_probes():
        base = _tx_packets(tap)
        end = time.monotonic() + WATCH_S
        while time.monotonic() < end:
            now = _tx_packets(tap)
            if now is None or now - base >= after:
                return now - base if now is not None else None
            time.sleep(0.001)
        return None

    def body():
        try:
            state['seen'] = netns.run_in_netns(the_lab.spec.hv_netns,
                                               wait_for_probes)
            netns.run(['ip', 'link', 'del', tap], netns=the_lab.spec.hv_netns)
            state['deleted_at'] = time.monotonic()
        except Exception as exc:  # reported by the test
            state['error'] = exc
        finally:
            done.set()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, done, state


def test_faults_touch_only_their_vnic_and_the_next_cycle_is_normal(
        lab_factory, cycle_factory):
    the_lab = lab_factory(guests=5)
    cycle = cycle_factory(the_lab, **PROBE)
    healthy, mute, shut, gone, deleted = range(5)
    rid = {i: cycle.resource_of(i) for i in range(5)}
    uuid = {i: g.uuid for i, g in enumerate(the_lab.guests)}

    # The guest that never answers: its kernel drops everything.
    netns.run(['iptables', '-I', 'INPUT', '-j', 'DROP'],
              netns=the_lab.guests[mute].netns)
    # libvirt: one domain shut off, one it no longer knows (it answers
    # VIR_ERR_NO_DOMAIN), while discovery still lists both.
    cycle.libvirt_view(shut_off={shut}, missing={gone})
    thread, done, state = delete_when_probed(the_lab,
                                             the_lab.guests[deleted].vif)
    try:
        samples, cache = cycle.run()
    finally:
        done.wait(WATCH_S + 5)
    assert 'error' not in state, state
    assert state.get('seen'), f'the tap saw no probe before: {state}'
    (window,) = cache.windows
    assert not window.permanent_error

    got = {i: _meters_of(samples, rid[i]) for i in range(5)}
    assert got[healthy] == ALL, got
    # No answer: ingress is measured, outgoing latency is not; no loss.
    assert got[mute] == ALL - {'network.vif.outgoing.latency'}, got
    vols = by_resource(samples)
    assert vols['network.vif.probe.loss'][rid[mute]] == 0.0
    assert got[shut] == set() and got[gone] == set(), got
    assert got[deleted] == set(), got
    log = cycle.log_text()
    assert (f'vNIC {the_lab.guests[deleted].vif}: '
            f'{the_lab.guests[deleted].vif} disappeared during probe '
            'window') in log
    assert f'Instance {uuid[shut]} not probed' in log
    assert f'Instance {uuid[gone]} not probed' in log
    assert 'Traceback' not in log
    # Every probe of the healthy and the mute vNIC was measured.
    by_vif = {m.path.vif: m.report for m in window.measurements}
    for i in (healthy, mute):
        report = by_vif[the_lab.guests[i].vif]
        assert report.ingress.count == PROBE['probe_count'], report
        assert report.ingress.lost == 0, report

    # Next cycle: faults repaired, except the deleted tap, which is gone.
    netns.run(['iptables', '-D', 'INPUT', '-j', 'DROP'],
              netns=the_lab.guests[mute].netns)
    cycle.libvirt_view()
    del cycle.records[:]
    samples, _cache = cycle.run()
    got = {i: _meters_of(samples, rid[i]) for i in range(5)}
    assert got == {healthy: ALL, mute: ALL, shut: ALL, gone: ALL,
                   deleted: set()}, got
    assert (f'vNIC {the_lab.guests[deleted].vif} of instance '
            f'{uuid[deleted]} not probed') in cycle.log_text()
    assert 'Traceback' not in cycle.log_text()


def test_a_stepped_clock_voids_one_cycle_only(
        lab_factory, cycle_factory, monkeypatch):
    the_lab = lab_factory(guests=2)
    cycle = cycle_factory(the_lab, **PROBE)
    real = probe_window.clock_offset_ns
    # CLOCK_REALTIME - CLOCK_MONOTONIC as read before and after the first
    # window: 40 ms apart, as if NTP had stepped the clock meanwhile.
    readings = [40_000_000, 0]

    def stepped_once():
        return readings.pop() if readings else real()

    monkeypatch.setattr(probe_window, 'clock_offset_ns', stepped_once)

    samples, cache = cycle.run()
    assert all(found == [] for found in samples.values()), samples
    assert not cache.permanent_error()
    lines = [r.getMessage() for r in cycle.records
             if 'discarded' in r.getMessage()]
    assert len(lines) == 1, lines
    assert 'CLOCK_REALTIME stepped by 40.000 ms' in lines[0]
    assert 'no latency this cycle' in lines[0]

    samples, _cache = cycle.run()
    rids = {cycle.resource_of(i) for i in range(2)}
    for name in ALL:
        assert {s.resource_id for s in samples[name]} == rids, name


def test_unreachable_ssh_source_skips_cycles_and_the_agent_goes_on(
        lab_factory, tmp_path):
    # The real ceilometer-polling in the hypervisor namespace; its probe
    # source is an address of the management network where no host is.
    the_lab = lab_factory(guests=1, mgmt=True)
    nobody = '198.19.0.99'
    rid = labagent.resource_ids(the_lab)[the_lab.guests[0].vif]
    files = labagent.write_files(
        the_lab, str(tmp_path / 'agent'), interval_s=3,
        meters=('network.incoming.bytes', *labagent.LATENCY_METERS),
        probe={'probe_source': f'ssh://root@{nobody}:2222',
               'ssh_connect_timeout_s': 1.0,
               'ssh_known_hosts_file': str(tmp_path / 'known_hosts'),
               'probe_count': 5})
    (tmp_path / 'known_hosts').write_text('')
    agent = labagent.PollingAgent(files, the_lab.spec.hv_netns)
    agent.start()
    try:
        def two_failed_cycles(_series):
            return agent.log_text().count('Probe source ssh://') >= 2

        agent.wait_for(two_failed_cycles, 45.0)
        series = agent.series()
    finally:
        agent.stop()
    log = agent.log_text()
    failed = [line for line in log.splitlines()
              if 'Probe source ssh://' in line]
    assert all(nobody in line and 'no latency this cycle' in line
               for line in failed), failed
    assert 'pollsters disabled' not in log and 'Traceback' not in log
    names = {(s.name, s.label('resource')) for s in series}
    assert ('ceilometer_network_incoming_bytes', rid) in names
    assert not any(n.startswith('ceilometer_network_vif') for n, _ in names)
