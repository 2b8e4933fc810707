"""Many vNICs in one polling cycle, bounded; no capture between cycles.

Real namespaces, bridge and veth taps (the lab), libvirt's ``test:///``
driver describing the guests, Ceilometer's real configuration, discovery
and inspector, our real pollsters and probe window.  Nothing here asserts
on speed (that is ``benchmarks/bench_cycle.py``): the tests check what was
sent, measured, skipped and left open.
"""

import logging
import os
import re
import threading

import pytest

from netweaver_agent.core import netns
from netweaver_agent.core import window
from tests.functional import inprocess

TRIMMED_RE = re.compile(r'sending (\d+) of 400 \((\d+) per vNIC\), (\d+) '
                        r'skipped')


# --- packet sockets ---------------------------------------------------------

def _read_packet_table():
    # /proc/thread-self/net is the namespace of the calling thread.
    with open('/proc/thread-self/net/packet', encoding='ascii') as f:
        rows = f.read().splitlines()[1:]
    return {int(row.split()[-1]) for row in rows if row.strip()}


def packet_socket_inodes(netns_name):
    """Inodes of every packet socket of namespace ``netns_name``."""
    return netns.run_in_netns(netns_name, _read_packet_table)


def own_socket_inodes():
    """Inodes of the sockets this process holds open."""
    out = set()
    for fd in os.listdir('/proc/self/fd'):
        try:
            target = os.readlink(f'/proc/self/fd/{fd}')
        except OSError:
            continue
        if target.startswith('socket:['):
            out.add(int(target[len('socket:['):-1]))
    return out


# --- the real pollsters, in this process ------------------------------------

@pytest.fixture
def cycle_factory(tmp_path):
    """``make(lab, **[netweaver] options) -> inprocess.Cycle``."""
    yield from inprocess.cycles(tmp_path)


def _by_vif(samples, meter='network.vif.latency'):
    return {s.resource_metadata['vif']: s for s in samples[meter]}


# --- tests ------------------------------------------------------------------

def test_every_vnic_of_a_busy_host_in_one_window(lab_factory, cycle_factory):
    guests, count = 64, 10
    the_lab = lab_factory(guests=guests)
    cycle = cycle_factory(the_lab, probe_count=count, probe_interval_ms=0.5,
                          probe_timeout_ms=200.0, max_window_ms=5000.0)
    samples, entry = cycle.run()
    assert len(entry.windows) == 1, 'one window for all instances'
    taps = {g.vif for g in the_lab.guests}
    for meter in samples:
        if meter != 'network.vif.outgoing.latency':
            assert set(_by_vif(samples, meter)) == taps, meter
    for tap, s in _by_vif(samples).items():
        meta = s.resource_metadata
        assert meta['probe_sent'] == count, (tap, meta)
        assert meta['probe_unseen_at_pif'] == 0, (tap, meta)
        ingress = meta['latency_ingress']
        # Drops would make probes unknown, never lost.
        assert ingress['count'] + meta['probe_unknown'] == count, (tap, meta)
        assert ingress['lost'] == 0, (tap, meta)
        assert 0 < s.volume < 5000, (tap, s.volume)
    # Interleaved: one window session for every vNIC.
    assert len({s.resource_metadata['window_session']
                for s in samples['network.vif.latency']}) == 1


def test_no_capture_socket_between_cycles(lab_factory, cycle_factory):
    the_lab = lab_factory(guests=4)
    # privsep off: the capture socket is then this process's own.
    cycle = cycle_factory(the_lab, probe_count=10, probe_interval_ms=1.0,
                          probe_timeout_ms=100.0, max_window_ms=2000.0,
                          privsep=False)
    source = cycle.inspector.source
    during = []
    send = source.send

    def watching_send(plan, deadline_s):
        # The positive control: while probes fly, our capture socket is
        # in the hypervisor's packet table, and this check sees it.
        during.append(packet_socket_inodes(the_lab.spec.hv_netns) &
                      own_socket_inodes())
        return send(plan, deadline_s)

    source.send = watching_send
    assert packet_socket_inodes(the_lab.spec.hv_netns) == set()
    for n in range(3):
        samples, _ = cycle.run()
        assert len(samples['network.vif.latency']) == 4, n
        assert len(during) == n + 1
        assert len(during[-1]) == 1, 'the window captures with one socket'
        assert not during[-1] & packet_socket_inodes(the_lab.spec.hv_netns), \
            f'capture socket still open after cycle {n}'
        # None of ours, and none at all in the hypervisor namespace.
        assert packet_socket_inodes(the_lab.spec.hv_netns) == set()
        assert not any(t.name == 'netweaver-capture'
                       for t in threading.enumerate())


def test_cycle_bound_sends_whole_rounds_and_reports_them(lab_factory,
                                                         cycle_factory):
    # 8 vNICs × 50 probes every 1 ms would need ~0.5 s; the cycle (listing
    # the vNICs, opening the capture, sending, the 100 ms timeout) may
    # last 300 ms: at most 300 - 100 - OPEN_RESERVE_S (75) ms of sending,
    # 126 probes, kept as at most 15 whole rounds of 8.  How many exactly
    # depends on how long listing took.
    the_lab = lab_factory(guests=8)
    cycle = cycle_factory(the_lab, probe_count=50, probe_interval_ms=1.0,
                          probe_timeout_ms=100.0, max_window_ms=300.0)
    # Ceilometer's log setup replaces the root handlers: listen directly.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger('netweaver_agent.core.window')
    logger.addHandler(handler)
    try:
        samples, _ = cycle.run()
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records]
    found = [m for m in map(TRIMMED_RE.search, lines) if m]
    assert len(found) == 1, lines
    planned, rounds, skipped = map(int, found[0].groups())
    most = int((300 - 100 - window.OPEN_RESERVE_S * 1000) / 1.0) + 1
    assert 1 <= rounds <= most // 8, lines
    assert (planned, skipped) == (8 * rounds, 400 - 8 * rounds)
    # The source was not cut short: the rounds stay whole.
    assert not any('by the deadline' in line for line in lines), lines
    by_vif = _by_vif(samples)
    assert set(by_vif) == {g.vif for g in the_lab.guests}
    for tap, s in by_vif.items():
        meta = s.resource_metadata
        assert meta['probe_sent'] == rounds, (tap, meta)
        assert meta['probe_unseen_at_pif'] == 0, (tap, meta)
        assert meta['latency_ingress']['count'] + \
            meta['probe_unknown'] == rounds, (tap, meta)


def test_window_below_one_round_skips_vnics_in_turn(lab_factory):
    # 6 vNICs, a probe every 20 ms, 50 ms of sending: 3 probes fit, so 3
    # vNICs are probed and 3 skipped, and another session starts elsewhere.
    the_lab = lab_factory(guests=6)
    settings = window.WindowSettings(count=5, interval_ms=20.0,
                                     timeout_ms=50.0, max_window_ms=100.0)
    paths = the_lab.paths()
    source = the_lab.layout.source()
    try:
        first = window.run_window(paths, source, settings,
                                  capture_netns=the_lab.spec.hv_netns,
                                  session=6)
        second = window.run_window(paths, source, settings,
                                   capture_netns=the_lab.spec.hv_netns,
                                   session=9)
    finally:
        source.close()
    taps = [g.vif for g in the_lab.guests]
    assert sorted(first.reports) == sorted(taps[0:3])
    assert sorted(second.reports) == sorted(taps[3:6])
    for w in (first, second):
        assert w.skipped == 27
        assert len(w.skipped_vnics) == 3
        for r in w.reports.values():
            assert r.sent == 1
            assert r.ingress.count + r.unknown == 1
