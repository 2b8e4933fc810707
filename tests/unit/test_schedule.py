"""Probe scheduling: rate limits, spreading, the window's bound.

Pure planning (no sockets): :func:`sources.schedule` and what
:func:`window.run_window` makes of a source that stops early, with a
source and capture that stand in for the network boundary.  The same
behaviour on real namespaces is in ``tests/functional/test_scale.py``.
"""

import socket

from hypothesis import given
from hypothesis import strategies as st
import pytest

from netweaver_agent.core import capture
from netweaver_agent.core import probe
from netweaver_agent.core import sources
from netweaver_agent.core import vifpath
from netweaver_agent.core import window
from tests.unit import fakes

MS = 1_000_000
TARGETS = [f'198.18.0.{10 + i}' for i in range(8)]


def _offsets(plan, dst):
    return [p.offset_ns for p in plan.probes if p.dst_ip == dst]


# --- rate limits ----------------------------------------------------------

def test_host_interval_spaces_every_probe():
    s = sources.schedule(1, 'icmp', TARGETS[:4], 5, MS)
    offsets = [p.offset_ns for p in s.plan.probes]
    assert offsets == [i * MS for i in range(20)]
    assert s.step_ns == MS and s.skipped == 0 and s.planned == 20


def test_per_vnic_limit_spreads_probes_evenly():
    # 4 targets, one probe per target every 10 ms: a probe every 2.5 ms,
    # never a burst of 4 then a pause.
    s = sources.schedule(1, 'icmp', TARGETS[:4], 3, MS,
                         per_target_interval_ns=10 * MS)
    assert s.step_ns == 2_500_000
    offsets = [p.offset_ns for p in s.plan.probes]
    assert all(b - a == 2_500_000 for a, b in zip(offsets, offsets[1:]))
    for dst in TARGETS[:4]:
        own = _offsets(s.plan, dst)
        assert all(b - a >= 10 * MS for a, b in zip(own, own[1:]))


def test_step_rounds_up_so_the_per_vnic_limit_holds():
    assert sources.probe_step_ns(3, 0, 10) == 4
    assert sources.probe_step_ns(0, 5, 10) == 10
    with pytest.raises(ValueError, match='-1'):
        sources.probe_step_ns(2, -1, 0)


@given(n=st.integers(1, 40), count=st.integers(0, 30),
       interval=st.integers(0, 5 * MS), per=st.integers(0, 50 * MS),
       budget=st.one_of(st.none(), st.integers(-MS, 500 * MS)),
       rotate=st.integers(0, 1000))
def test_schedule_invariants(n, count, interval, per, budget, rotate):
    targets = [f'198.18.1.{i}' for i in range(n)]
    s = sources.schedule(9, 'icmp', targets, count, interval, per,
                         budget_ns=budget, rotate=rotate)
    probes = s.plan.probes
    # Rate limits: host spacing and per-target spacing always hold.
    for a, b in zip(probes, probes[1:]):
        assert b.offset_ns - a.offset_ns >= interval
    for dst in targets:
        own = _offsets(s.plan, dst)
        assert all(b - a >= per for a, b in zip(own, own[1:]))
    # The bound: nothing planned after it.
    if budget is not None and probes:
        assert probes[-1].offset_ns <= budget
    # Fair shares: whole rounds (or one partial round), never more than
    # asked for, one owner per sequence number.
    counts = [len(_offsets(s.plan, d)) for d in targets]
    assert max(counts) <= count
    if s.planned >= n:
        assert len(set(counts)) == 1
    else:
        assert max(counts) <= 1
    assert s.planned + s.skipped == count * n
    assert [p.seq for p in probes] == list(range(len(probes)))
    assert {seq: targets[i] for seq, i in s.owner.items()} == {
        p.seq: p.dst_ip for p in probes}
    if count:
        assert set(s.skipped_targets) == {
            i for i, c in enumerate(counts) if c == 0}
    else:
        # Nothing wanted: no probe, and no target counted as left out.
        assert probes == () and s.skipped_targets == ()


# --- the window's bound ---------------------------------------------------

def test_plan_that_fits_is_untouched():
    s = sources.schedule(1, 'icmp', TARGETS, 10, MS, budget_ns=79 * MS)
    assert s.planned == 80 and s.skipped == 0 and s.rounds == 10


def test_bound_keeps_whole_rounds_for_every_vnic():
    # 8 targets × 10 probes every 1 ms need 79 ms; 50 ms allow 51 probes,
    # kept as 6 whole rounds (48): every vNIC gets 6.
    s = sources.schedule(1, 'icmp', TARGETS, 10, MS, budget_ns=50 * MS)
    assert s.planned == 48 and s.skipped == 32 and s.rounds == 6
    assert {len(_offsets(s.plan, d)) for d in TARGETS} == {6}
    assert s.plan.duration_ns <= 50 * MS
    assert s.skipped_targets == ()


def test_bound_below_one_round_rotates_who_is_left_out():
    # 3 ms allow 4 probes of a round of 8.
    a = sources.schedule(1, 'icmp', TARGETS, 10, MS, budget_ns=3 * MS)
    b = sources.schedule(2, 'icmp', TARGETS, 10, MS, budget_ns=3 * MS,
                         rotate=4)
    assert a.planned == b.planned == 4
    assert a.plan.targets() == TARGETS[:4]
    assert b.plan.targets() == TARGETS[4:]
    assert a.skipped_targets == (4, 5, 6, 7)
    assert b.skipped_targets == (0, 1, 2, 3)


def test_negative_budget_plans_nothing():
    s = sources.schedule(1, 'icmp', TARGETS, 10, MS, budget_ns=-1)
    assert s.planned == 0 and s.skipped == 80
    assert s.skipped_targets == tuple(range(8))


def test_the_plan_carries_size_port_protocol_within_a_budget():
    sched = sources.schedule(
        7, 'udp', TARGETS[:2], 3, MS, size=80, port=33434, budget_ns=2 * MS)
    plan, owner = sched.plan, sched.owner
    assert [p.dst_ip for p in plan.probes] == TARGETS[:2]
    assert owner == {0: 0, 1: 1}
    assert (plan.size, plan.port, plan.protocol) == (80, 33434, 'udp')


def test_window_bound_must_leave_room_for_the_timeout():
    with pytest.raises(ValueError, match='200.0 ms'):
        window.WindowSettings(timeout_ms=200.0, max_window_ms=150.0)
    settings = window.WindowSettings(timeout_ms=200.0, max_window_ms=1000.0)
    assert settings.send_budget_ns == 800 * MS


# --- packets of a plan ----------------------------------------------------

@pytest.mark.parametrize('protocol, port', [('icmp', None), ('udp', None),
                                            ('udp', 4000), ('tcp', 22)])
@pytest.mark.parametrize('size', [64, 65, 200])
def test_plan_packets_are_exactly_build_ip(protocol, port, size):
    s = sources.schedule(0xbeef, protocol, TARGETS[:3], 300, 0, size=size,
                         port=port)
    src = {d: f'198.18.0.{i + 1}' for i, d in enumerate(TARGETS[:3])}
    built = sources.build_packets(s.plan, src.__getitem__)
    assert [d for d, _ in built] == [p.dst_ip for p in s.plan.probes]
    for p, (_, data) in zip(s.plan.probes, built):
        assert data == probe.build_ip(
            protocol, 0xbeef, p.seq, socket.inet_aton(src[p.dst_ip]),
            socket.inet_aton(p.dst_ip), size=size, port=port)


@given(seqs=st.lists(st.integers(0, 0xffffffff), max_size=20),
       session=st.integers(0, 0xffff), protocol=st.sampled_from(
           probe.PROTOCOLS), size=st.integers(64, 300))
def test_build_ip_seqs_equals_build_ip(seqs, session, protocol, size):
    if protocol == 'tcp':
        # Each TCP probe from a port of its own (0 -> 1: ports start at 1).
        seqs = [probe.tcp_ident(max(1, s >> 16), s & probe.TCP_SEQ_MASK)
                for s in seqs]
    src, dst = socket.inet_aton('198.18.0.1'), socket.inet_aton('198.18.0.9')
    assert probe.build_ip_seqs(protocol, session, seqs, src, dst,
                               size=size) == [
        probe.build_ip(protocol, session, s, src, dst, size=size)
        for s in seqs]


# --- run_window with a source that stops early ----------------------------

class StoppingSource(sources.ProbeSource):
    """Sends nothing; says it tried the first ``tried`` probes."""

    name = 'fake'

    def __init__(self, tried):
        self.tried = tried
        self.prepared = self.plan = None

    def prepare(self, plan):
        self.prepared = plan

    def send(self, plan, deadline_s):
        self.plan = plan
        return sources.SendResult(sent=min(self.tried, len(plan.probes)))


def _paths(n):
    return [vifpath.VifPath(vif=f'tap{i}', address=TARGETS[i],
                            interfaces=('eth1', f'tap{i}'))
            for i in range(n)]


@pytest.fixture
def silent(monkeypatch):
    monkeypatch.setattr(capture, 'LiveCapture', fakes.SilentCapture)


def test_probes_not_sent_are_not_reported(silent):
    source = StoppingSource(tried=6)
    settings = window.WindowSettings(count=5, interval_ms=0.01,
                                     timeout_ms=1.0, max_window_ms=100.0)
    w = window.run_window(_paths(4), source, settings, session=5)
    assert source.prepared is source.plan
    assert w.wanted == 20 and w.skipped == 14
    assert w.trimmed
    assert {v: r.sent for v, r in w.reports.items()} == {
        'tap0': 2, 'tap1': 2, 'tap2': 1, 'tap3': 1}
    for r in w.reports.values():
        assert r.unseen_at_pif == r.sent      # nothing seen, nothing lost
        assert r.ingress.lost == 0


def test_vnics_without_a_probe_have_no_report(silent):
    w = window.run_window(_paths(4), StoppingSource(tried=2),
                          window.WindowSettings(count=5, timeout_ms=1.0,
                                                max_window_ms=100.0),
                          session=4)
    assert sorted(w.reports) == ['tap0', 'tap1']
    assert w.skipped_vnics == ('tap2', 'tap3')


def test_trimmed_plan_is_logged(silent, caplog):
    settings = window.WindowSettings(count=50, interval_ms=1.0,
                                     timeout_ms=10.0, max_window_ms=30.0)
    source = StoppingSource(tried=10 ** 6)
    w = window.run_window(_paths(4), source, settings, session=8)
    # 20 ms of sending at 1 ms: 21 probes fit, 5 whole rounds of 4.
    assert len(source.plan.probes) == 20
    assert w.skipped == 180 and set(w.reports) == {p.vif for p in _paths(4)}
    assert all(r.sent == 5 for r in w.reports.values())
    assert 'sending 20 of 200 (5 per vNIC), 180 skipped' in caplog.text


def test_deadline_already_passed_is_an_error_naming_the_window(silent):
    with pytest.raises(ValueError, match='no probe fits'):
        window.run_window(_paths(2), StoppingSource(tried=1),
                          window.WindowSettings(timeout_ms=1.0,
                                                max_window_ms=100.0),
                          session=3, deadline_s=0.0)


def test_the_timeout_outlasts_a_held_probe_and_its_answer():
    """One formula for the lab's windows and its agent: the default when
    nothing is held, else longer than a probe and its answer both held."""
    default = window.WindowSettings().timeout_ms
    assert window.timeout_for_delay_ms(0.0) == default
    for delay_ms in (1.0, 60.0, 2000.0):
        timeout = window.timeout_for_delay_ms(delay_ms)
        assert timeout > 2 * delay_ms and timeout >= default
