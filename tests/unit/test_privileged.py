"""What the privsep daemon sends back survives the wire; what it is asked
to hold, send and build stays within its limits.

The batch goes through oslo.privsep's own serializer and deserializer
(msgpack over a socket pair), as between the daemon and the agent.  The
real daemon carries it in tests/functional/test_privsep.py and
test_encap.py.
"""

import threading
import time

from oslo_config import cfg
import pytest

from netweaver_agent.agent import daemonlimits
from netweaver_agent.agent import opts
from netweaver_agent.agent import privileged
from netweaver_agent.core import capture
from netweaver_agent.core import destinations
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from netweaver_agent.core import sources
from tests import packets as pk
from tests.unit import fakes


def _batch():
    batch = sightings.SightingBatch(77)
    rows = [
        # (key, interface, t_ns, direction, encap or None)
        (10 << 1, 'eth1', 1_700_000_000_000_000_001, sightings.DIR_IN,
         probe.Encap(vni=4242)),
        (10 << 1, 'vxlan-4242', 1_700_000_000_000_010_000, sightings.DIR_OUT,
         None),
        (10 << 1, 'tapaaa', 1_700_000_000_000_020_000, sightings.DIR_OUT,
         None),
        (10 << 1 | 1, 'eth1', 1_700_000_000_000_090_000, sightings.DIR_OUT,
         probe.Encap(vni=4242)),
        (11 << 1, 'eth1', 1_700_000_000_000_100_000, sightings.DIR_IN,
         probe.Encap(vlan=(200, 100))),
        (12 << 1, 'eth1', 1_700_000_000_000_200_000, sightings.DIR_IN,
         probe.Encap(vlan=(7,), vni=0xffffff)),
        # The largest key a batch holds.
        (2**64 - 1, 'tapaaa', 1_700_000_000_000_300_000, sightings.DIR_IN,
         probe.Encap(vlan=(4095,))),
    ]
    for key, ifname, t_ns, direction, encap in rows:
        index = batch.interface_index(ifname)
        batch.append(key, index, t_ns, direction)
        if encap is not None:
            batch.encap.setdefault((key, index), encap)
    return batch


def test_batch_stats_and_encapsulation_round_trip():
    sent = _batch()
    stats = capture.CaptureStats(packets=9, drops=1, probes=7, foreign=2)
    raw = fakes.through_privsep_wire(privileged.batch_to_wire(sent, stats))
    got = sightings.SightingBatch(77)
    assert privileged.batch_from_wire(raw, got) == stats
    assert list(pk.sightings_of(got)) == list(pk.sightings_of(sent))
    assert got.ifnames == sent.ifnames
    assert got.encap == sent.encap
    assert got.encap[(11 << 1, 0)].vlan == (200, 100)
    assert all(isinstance(e, probe.Encap) and isinstance(e.vlan, tuple)
               for e in got.encap.values())


def test_an_untagged_window_carries_no_encapsulation():
    sent = sightings.SightingBatch(5)
    sent.append(3 << 1, sent.interface_index('eth1'), 1, sightings.DIR_IN)
    stats = capture.CaptureStats(packets=1, drops=0, probes=1, foreign=0)
    raw = fakes.through_privsep_wire(privileged.batch_to_wire(sent, stats))
    got = sightings.SightingBatch(5)
    privileged.batch_from_wire(raw, got)
    assert got.encap == {}
    assert list(pk.sightings_of(got)) == list(pk.sightings_of(sent))


def test_the_capture_class_passes_the_vxlan_port():
    make = privileged.capture_class(privileged.netns_pctxt)
    cap = make(9, 'udp', netns_name='hv', interfaces={'eth1'},
               vxlan_port=4789)
    assert cap.vxlan_port == 4789
    assert cap.context is privileged.netns_pctxt
    assert make(9).vxlan_port is None


# --- the daemon's limits and handles (its functions, called directly) ------

LIMITS = daemonlimits.LIMITS


class _Held:
    """Stands in for what the daemon holds; records closing."""

    def __init__(self):
        self.closed = 0

    def close(self):
        self.closed += 1


def _fill(table, kind, cost=0):
    obj = _Held()
    handle = table.reserve(kind, cost=cost)
    table.fill(handle, obj, lambda o: o.close())
    return handle, obj


def test_a_wrong_kind_call_raises_and_leaves_the_handle_held():
    table = privileged.HandleTable()
    handle, obj = _fill(table, 'capture')
    with pytest.raises(ValueError, match='no prepared probes'):
        table.take(handle, 'probes')
    with pytest.raises(ValueError, match='no prepared probes'):
        table.peek(handle, 'probes')
    assert table.counts()['capture'] == 1
    assert table.take(handle, 'capture') is obj
    assert table.counts()['capture'] == 0
    with pytest.raises(ValueError, match='no open capture'):
        table.take(handle, 'capture')


def test_a_handle_being_opened_cannot_be_used():
    table = privileged.HandleTable()
    handle = table.reserve('capture')
    with pytest.raises(ValueError):
        table.peek(handle, 'capture')
    table.release(handle)
    assert table.counts()['capture'] == 0


def test_handles_captures_and_prepared_bytes_are_capped():
    limits = LIMITS.lowered(handles=3, captures=2, prepared_bytes=1000)
    table = privileged.HandleTable(limits)
    _fill(table, 'capture')
    _fill(table, 'capture')
    with pytest.raises(daemonlimits.LimitError, match='captures'):
        table.reserve('capture')
    with pytest.raises(daemonlimits.LimitError, match='bytes'):
        table.reserve('probes', cost=1001)
    handle, _ = _fill(table, 'probes', cost=600)
    with pytest.raises(daemonlimits.LimitError, match='handles'):
        table.reserve('probes', cost=1)
    table.take(handle, 'probes')
    wide = privileged.HandleTable(limits.lowered(captures=1))
    _fill(wide, 'probes', cost=600)
    with pytest.raises(daemonlimits.LimitError, match='bytes'):
        # The bytes are counted over every prepared handle together.
        wide.reserve('probes', cost=600)


def test_the_threads_a_capture_would_start_are_capped():
    table = privileged.HandleTable(LIMITS.lowered(threads=1))
    # The reaper (started by the first handle) is one of its own threads.
    _fill(table, 'probes')
    with pytest.raises(daemonlimits.LimitError, match='threads'):
        table.reserve('capture')


def test_what_is_held_too_long_is_closed_by_one_reaper():
    table = privileged.HandleTable(hold_s=0.0)
    objs = [_fill(table, kind)[1] for kind in ('capture', 'probes',
                                               'capture')]
    reapers = [t for t in threading.enumerate()
               if t.name == 'netweaver-privsep-reaper']
    deadline = time.monotonic() + 10
    while any(o.closed == 0 for o in objs) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [o.closed for o in objs] == [1, 1, 1]
    assert table.counts() == {'capture': 0, 'probes': 0, 'bytes': 0}
    # One reaper per table, however many handles.
    assert len([t for t in threading.enumerate()
                if t.name == 'netweaver-privsep-reaper']) <= len(reapers)


def test_limits_are_only_lowered():
    assert LIMITS.lowered(probes_per_s=LIMITS.probes_per_s * 10) == LIMITS
    low = LIMITS.lowered(handles=2, captures=None)
    assert low.handles == 2 and low.captures == LIMITS.captures
    with pytest.raises(ValueError):
        LIMITS.lowered(handles=0)


def _wire(n, step_ns, dst='198.18.0.10'):
    return [(i, dst, i * step_ns) for i in range(n)]


def test_the_plan_is_refused_faster_than_the_daemons_rate():
    step = LIMITS.min_step_ns(64)
    assert len(privileged._plan(7, 'icmp', 64, None,
                                _wire(3, step)).probes) == 3
    with pytest.raises(ValueError, match='probe offset'):
        privileged._plan(7, 'icmp', 64, None, _wire(3, step - 1))
    # Big probes: the byte rate is the tighter one.
    big = LIMITS.min_step_ns(1500)
    assert big > step
    with pytest.raises(ValueError, match='probe offset'):
        privileged._plan(7, 'icmp', 1500, None, _wire(3, big - 1))


def test_the_plan_is_refused_beyond_the_probes_memory_allows():
    small = LIMITS.lowered(probes_per_window=5)
    with pytest.raises(daemonlimits.LimitError, match='at most 5'):
        privileged._plan(7, 'icmp', 64, None, _wire(6, 10**6), limits=small)
    assert LIMITS.max_planned(1500) < LIMITS.max_planned(64)
    assert LIMITS.max_planned(1500) * (1500 + daemonlimits.PROBE_OVERHEAD_B) \
        <= LIMITS.prepared_bytes


def test_the_daemon_checks_every_destination_before_building():
    policy = privileged._policy(None, ['198.18.0.0/24'])
    for dst in ('198.18.1.10', '127.0.0.1', '169.254.169.254',
                '224.0.0.1', '255.255.255.255', '0.0.0.0', 'ff02::1',
                '198.18.0.255'):
        with pytest.raises(destinations.RefusedDestination):
            privileged._plan(7, 'icmp', 64, None,
                             [(0, '198.18.0.10', 0), (1, dst, 10**6)],
                             policy)
    # The host's own stack needs probe networks; a namespace does not.
    with pytest.raises(destinations.RefusedDestination,
                       match='probe_networks'):
        privileged._plan(7, 'icmp', 64, None, _wire(1, 0),
                         privileged._policy(None, None))
    plan = privileged._plan(7, 'icmp', 64, None, _wire(2, 10**6),
                            privileged._policy('src', None))
    # One string per destination, not one per probe.
    assert plan.probes[0].dst_ip is plan.probes[1].dst_ip
    with pytest.raises(ValueError, match='CIDR'):
        privileged._policy(None, '198.18.0.0/24')


def test_prepare_refuses_before_reserving_or_building():
    before = privileged._table.counts()
    with pytest.raises(destinations.RefusedDestination):
        privileged._dispatch('prepare_probes', (
            None, 7, 'icmp', 64, None, _wire(2, 10**6, '224.0.0.1'),
            ['198.18.0.0/15']))
    with pytest.raises(daemonlimits.LimitError):
        privileged._dispatch('prepare_probes', (
            None, 7, 'icmp', 1500, None,
            _wire(LIMITS.max_planned(1500) + 1, 10**6),
            ['198.18.0.0/15']))
    assert privileged._table.counts() == before


def test_a_bad_send_deadline_leaves_the_prepared_probes_held():
    handle, obj = _fill(privileged._table, 'probes')
    try:
        for deadline in (float('nan'), float('inf'), True, 'soon',
                         time.monotonic() + 10 * privileged.MAX_HOLD_S):
            with pytest.raises(ValueError, match='send deadline'):
                privileged._dispatch('send_probes', (handle, deadline))
        assert privileged._table.kind_of(handle) == 'probes'
    finally:
        privileged._table.take(handle, 'probes')


def test_discarding_a_capture_handle_is_an_error_and_closes_nothing():
    handle, obj = _fill(privileged._table, 'capture')
    try:
        with pytest.raises(ValueError, match='no prepared probes'):
            privileged._dispatch('discard_probes', (handle,))
        with pytest.raises(ValueError, match='no prepared probes'):
            privileged._dispatch('send_probes', (handle, time.monotonic()))
        assert obj.closed == 0
        assert privileged._table.kind_of(handle) == 'capture'
    finally:
        privileged._table.take(handle, 'capture')
    # A handle that is gone (sent, expired) is discarded quietly.
    assert privileged._dispatch('discard_probes', (handle,)) is None


def test_settings_beyond_the_daemons_limits_are_named_at_start_up():
    fast = LIMITS.min_step_ns(1500) / 1e6 / 2
    (msg,) = daemonlimits.settings_problems(fast, 1500, 1000.0, 100.0)
    assert 'probe_interval_ms' in msg and 'probe_size = 1500' in msg
    # Many probes at the daemon's own rate over a long window.
    step_ms = LIMITS.min_step_ns(64) / 1e6
    window_ms = step_ms * LIMITS.max_planned(64) * 2
    (msg,) = daemonlimits.settings_problems(step_ms, 64, window_ms, 100.0)
    assert 'max_window_ms' in msg and str(LIMITS.max_planned(64)) in msg
    assert daemonlimits.settings_problems(1.0, 64, 10000.0, 200.0) == []


def test_the_suggested_fix_passes_the_check():
    step_ms = LIMITS.min_step_ns(64) / 1e6
    window_ms = step_ms * LIMITS.max_planned(64) * 3
    (msg,) = daemonlimits.settings_problems(step_ms, 64, window_ms, 100.0)
    interval = float(msg.split('raise probe_interval_ms to at least ')[1]
                     .split()[0])
    window = float(msg.split('max_window_ms to at most ')[1].split()[0])
    assert daemonlimits.settings_problems(interval * 1.0001, 64,
                                          window_ms, 100.0) == []
    assert daemonlimits.settings_problems(step_ms, 64, window, 100.0) == []


def test_the_agents_side_refuses_before_calling_the_daemon(monkeypatch):
    calls = []
    monkeypatch.setattr(privileged, 'call',
                        lambda *args: calls.append(args) or 1)
    src = privileged.PrivsepLocalSource(
        context=privileged.capture_pctxt,
        policy=destinations.policy(['198.18.0.0/24']))
    plan = _plan_to(['198.18.0.10', '198.18.9.10'])
    with pytest.raises(destinations.RefusedDestination, match='198.18.9'):
        src.prepare(plan)
    assert calls == []
    # 'local' with no probe networks sends nothing.
    with pytest.raises(destinations.RefusedDestination):
        privileged.PrivsepLocalSource().prepare(_plan_to(['198.18.0.10']))
    assert calls == []
    src.prepare(_plan_to(['198.18.0.10']))
    (call,) = calls
    # The daemon gets the probe networks, then the window's secret.
    assert call[1] == 'prepare_probes' and call[-2] == ['198.18.0.0/24']


def test_a_new_plan_discards_the_one_prepared_before(monkeypatch):
    calls = []
    monkeypatch.setattr(privileged, 'call',
                        lambda ctx, op, *args: calls.append(op) or
                        ([1, 0, []] if op == 'send_probes' else 5))
    ctx = privileged.capture_pctxt
    monkeypatch.setattr(ctx, 'channel', object())
    src = privileged.PrivsepLocalSource('src', context=ctx)
    src.prepare(_plan_to(['198.18.0.10']))
    src.send(_plan_to(['198.18.0.11']), time.monotonic() + 1)
    assert calls == ['prepare_probes', 'discard_probes', 'prepare_probes',
                     'send_probes']
    src.prepare(_plan_to(['198.18.0.10']))
    src.discard()
    src.discard()
    assert calls[-2:] == ['prepare_probes', 'discard_probes']


def _plan_to(targets):
    return sources.schedule(9, 'icmp', targets, 1, 10**6).plan


def _conf(**values):
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf([])
    for name, value in values.items():
        conf.set_override(name, value, group=opts.GROUP)
    return conf


def test_the_agent_refuses_options_beyond_the_daemons_limits_at_start():
    step_ms = LIMITS.min_step_ns(64) / 1e6
    window_ms = step_ms * LIMITS.max_planned(64) * 2
    bad = dict(probe_interval_ms=step_ms, max_window_ms=window_ms)
    for source in ('local', 'netns:lab-src'):
        (msg,) = opts.problems(_conf(probe_source=source, **bad))
        assert 'max_window_ms' in msg and 'privsep' in msg
    # The daemon does not send for ssh://, nor without privsep.
    assert opts.problems(_conf(probe_source='ssh://p@198.18.0.1', **bad)) \
        == []
    assert opts.problems(_conf(privsep=False, **bad)) == []
    assert opts.problems(_conf()) == []


def test_the_agent_refuses_a_bad_probe_network_at_start():
    (msg,) = opts.problems(_conf(probe_networks=['198.18.0.0/15',
                                                 '198.18.0.1/24']))
    assert 'probe_networks' in msg and "'198.18.0.1/24'" in msg
    assert opts.problems(_conf(probe_networks=['198.18.0.0/15',
                                               '2001:2::/48'])) == []


def test_the_agents_side_does_not_send_a_plan_the_daemon_would_refuse(
        monkeypatch):
    calls = []
    monkeypatch.setattr(privileged, 'call',
                        lambda *args: calls.append(args) or 1)
    src = privileged.PrivsepLocalSource('src', context=privileged.netns_pctxt)
    one = sources.PlannedProbe(seq=0, dst_ip='198.18.0.10', offset_ns=0)
    for size in (64, 1500):
        most = LIMITS.max_planned(size)
        plan = sources.ProbePlan(session=9, protocol='icmp', size=size,
                                 probes=(one,) * (most + 1))
        with pytest.raises(daemonlimits.LimitError, match=f'at most {most}'):
            src.prepare(plan)
    assert calls == []


def test_the_daemons_own_probe_networks_narrow_the_agents(tmp_path):
    path = tmp_path / 'ceilometer.conf'
    path.write_text('[netweaver]\nprobe_networks = 198.18.0.0/28, '
                    '2001:2::/64\n')
    conf = cfg.ConfigOpts()
    conf(['--config-file', str(path)])
    configured = privileged.configured_networks(conf)
    assert [str(n) for n in configured] == ['198.18.0.0/28', '2001:2::/64']
    narrow = privileged._narrowed
    nets = destinations.parse_networks
    # The agent's wider network is cut to the configured one, a narrower
    # one kept; without the agent's, the configured ones apply.
    assert narrow(nets(['198.18.0.0/24']), configured) == nets(
        ['198.18.0.0/28'])
    assert narrow(nets(['198.18.0.4/30', '2001:2::/48']), configured) == \
        nets(['198.18.0.4/30', '2001:2::/64'])
    assert narrow((), configured) == configured
    assert narrow(nets(['198.19.0.0/24']), ()) == nets(['198.19.0.0/24'])
    with pytest.raises(destinations.RefusedDestination, match='configured'):
        narrow(nets(['198.19.0.0/24']), configured)


def test_no_configured_networks_and_a_bad_one(tmp_path):
    conf = cfg.ConfigOpts()
    conf([])
    assert privileged.configured_networks(conf) == ()
    path = tmp_path / 'bad.conf'
    path.write_text('[netweaver]\nprobe_networks = 198.18.0.1/24\n')
    conf = cfg.ConfigOpts()
    conf(['--config-file', str(path)])
    with pytest.raises(ValueError, match='198.18.0.1/24'):
        privileged.configured_networks(conf)
