"""Several probes per timer wake-up, with the rates kept.

The one pacing loop (:func:`pacing.pace`: :class:`sources.LocalSource`'s,
the privsep daemon's and the SSH sender's) and the daemon's pacer run
against a fake clock whose
``sleep`` oversleeps as a loaded host does: the number of wake-ups, when
each probe leaves and how far apart one vNIC's probes are, are then exact.
"""


import pytest

from netweaver_agent.agent import daemonlimits
from netweaver_agent.agent import privileged
from netweaver_agent.core import pacing
from netweaver_agent.core import sources
from tests.unit import fakes


class Recorder(sources.LocalSource):
    """Records ``(time, destination)`` of every probe, sends nothing."""

    def __init__(self, clock):
        super().__init__(netns_name='recorder')
        self.clock = clock
        self.log = []

    def build(self, plan):
        return [(p.dst_ip, b'') for p in plan.probes]

    def _socket_for(self, dst_ip):
        return None

    def _transmit(self, sock, dst, data):
        self.log.append((self.clock.t, dst))


@pytest.fixture
def clock(monkeypatch):
    return fakes.paced_clock(monkeypatch)


def _send(clock, vifs, count, interval_ms, per_vnic_ms=0.0):
    addresses = [f'198.18.{i // 200}.{10 + i % 200}' for i in range(vifs)]
    plan = sources.schedule(1, 'icmp', addresses, count,
                            int(interval_ms * 1e6), int(per_vnic_ms * 1e6),
                            budget_ns=10**11).plan
    src = Recorder(clock)
    start = clock.t
    result = src.send(plan, start + 100.0)
    return plan, src.log, start, result


@pytest.mark.parametrize('vifs,count,interval_ms,per_vnic_ms', [
    (64, 10, 0.5, 0.0), (2, 20, 0.5, 3.0), (1, 10, 0.5, 0.0),
    (5, 10, 0.1, 1.0)])
def test_bursts_keep_each_vnics_spacing_and_the_host_rate(
        clock, vifs, count, interval_ms, per_vnic_ms):
    plan, log, start, result = _send(clock, vifs, count, interval_ms,
                                     per_vnic_ms)
    assert result.sent == len(plan.probes) == len(log)
    quantum = pacing.SEND_QUANTUM_S
    last = {}
    for p, (t, dst) in zip(plan.probes, log):
        assert dst == p.dst_ip
        due = start + p.offset_ns / 1e9
        # Never more than the quantum early.
        assert t >= due - quantum - 1e-12
        if dst in last:
            t0, off0 = last[dst]
            # One vNIC's probes at least as far apart as planned.
            assert t - t0 >= (p.offset_ns - off0) / 1e9 - 1e-12
        last[dst] = (t, p.offset_ns)
    # The host's rate over any quantum-long stretch: what the plan puts
    # in two quanta at most.
    step = interval_ms / 1000.0
    times = [t for t, _ in log]
    for i, t in enumerate(times):
        inside = sum(1 for u in times[i:] if u < t + quantum)
        assert inside <= 2 * quantum / step + 1


def test_several_probes_per_wake_up(clock):
    plan, log, _, _ = _send(clock, 64, 10, 0.5)
    # One sleep per probe before; now one per quantum's worth of them.
    assert clock.sleeps <= len(plan.probes) / 2, clock.sleeps


def test_one_vnic_alone_gets_no_burst(clock):
    """Probes to one vNIC planned closer than the quantum: never sent
    closer than planned, so one wake-up each."""
    plan, log, _, _ = _send(clock, 1, 10, 0.5)
    assert clock.sleeps >= len(plan.probes) - 1


def test_the_daemon_pacer_passes_a_burst_and_keeps_the_rate(clock):
    limits = daemonlimits.DaemonLimits(probes_per_s=1000)
    # Python's pacer (the C limiter's: tests/unit/test_sendloop.py).
    pacer = privileged._Pacer(limits, burst_s=0.005, compiled=False)
    start = clock.t
    for _ in range(100):
        pacer.wait(64)
    # A burst of 5 ms worth passes without sleeping; then 1 ms apart.
    assert clock.sleeps <= 100 - 5
    assert clock.t - start >= (100 - 5 - 1) * 0.001


def _packets(offsets_ms, dst='198.18.0.10'):
    return [pacing.Packet(int(ms * 1e6), dst, b'') for ms in offsets_ms]


def test_pace_stops_at_the_deadline_and_counts_what_is_left(clock):
    sent = []
    start = clock.t
    done = pacing.pace(_packets(range(0, 100, 10)),
                       lambda p: sent.append(clock.t), start + 0.035)
    # Due at 0, 10, 20, 30 ms: sent; 40 ms is past the deadline.
    assert (done.sent, done.failed, done.left) == (4, 0, 6)
    assert len(sent) == 4 and all(t <= start + 0.035 for t in sent)


def test_pace_counts_failures_and_keeps_the_first_errors(clock):
    def fail(p):
        raise OSError(101, 'Network is unreachable ' + 'x' * 1000)
    done = pacing.pace(_packets([0] * 9), fail, clock.t + 1.0)
    assert (done.sent, done.failed, done.left) == (0, 9, 0)
    assert len(done.errors) == pacing.MAX_ERRORS
    assert all(e.startswith('198.18.0.10: ') and
               len(e) <= pacing.MAX_ERROR_CHARS for e in done.errors)


def test_pace_never_sends_one_destination_closer_than_planned(clock):
    """A late start (the clock jumps past several offsets) is no burst to
    one destination: its packets keep their planned spacing."""
    times = []
    packets = _packets([0, 5, 10, 15])

    def late(p):
        times.append(clock.t)
        if len(times) == 1:
            clock.t += 0.020        # a stall past the next three offsets
    pacing.pace(packets, late, clock.t + 1.0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 3 and min(gaps) >= 0.005 - 1e-9, gaps
