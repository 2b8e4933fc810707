"""The daemon's send path made cheaper, with the same packets and limits.

* :class:`probe.V4Builder` (one dpkt packet per window, then the varying
  fields packed and the checksums summed) gives :func:`probe.build_ip`'s
  bytes for any addresses, sequence numbers, sizes and secrets;
* :func:`pacing.pace` hands each wake-up's packets over as one batch:
  never two to one destination, each batch a slice of the plan in order,
  failures counted per packet;
* the daemon's pacer reserves a batch's slots at once and returns only
  when the last one has come;
* a source learns every destination's source address in one entry into
  its namespace;
* the daemon checks the plan's values inline as :func:`privileged._int`
  would, and freezes what it loaded out of the garbage collector's scans.
"""

import gc
import socket

from hypothesis import given
from hypothesis import strategies as st
import pytest

from netweaver_agent.agent import daemonlimits
from netweaver_agent.agent import privileged
from netweaver_agent.core import netns
from netweaver_agent.core import pacing
from netweaver_agent.core import probe
from netweaver_agent.core import sources
from tests.unit import fakes


@pytest.fixture
def clock(monkeypatch):
    return fakes.paced_clock(monkeypatch)


_ADDR = st.integers(0, 2**32 - 1).map(lambda v: v.to_bytes(4, 'big'))


@given(seqs=st.lists(st.integers(0, 0xffffffff), min_size=1, max_size=12),
       session=st.integers(0, 0xffff),
       proto=st.sampled_from(['icmp', 'udp']),
       size=st.integers(64, 301), ttl=st.integers(1, 255),
       port=st.one_of(st.none(), st.integers(1, 0xffff)),
       secret=st.one_of(st.none(), st.binary(min_size=16, max_size=64)),
       src=_ADDR, dst=_ADDR)
def test_the_v4_builder_gives_build_ips_bytes(seqs, session, proto, size,
                                              ttl, port, secret, src, dst):
    builder = probe.V4Builder(proto, session, size=size, ttl=ttl,
                              port=port, secret=secret)
    want = [probe.build_ip(proto, session, s, src, dst, size=size, ttl=ttl,
                           port=port, secret=secret) for s in seqs]
    assert builder.build(seqs, src, dst) == want
    assert probe.build_ip_seqs(proto, session, seqs, src, dst, size=size,
                               ttl=ttl, port=port, secret=secret) == want


def test_one_v4_builder_serves_every_destination_of_a_plan():
    secret = bytes(range(32))
    builder = probe.V4Builder('icmp', 0xbeef, secret=secret)
    src = socket.inet_aton('198.18.0.1')
    for last in (10, 11, 250):
        dst = socket.inet_aton(f'198.18.0.{last}')
        assert builder.build([5, 6], src, dst) == [
            probe.build_ip('icmp', 0xbeef, s, src, dst, secret=secret)
            for s in (5, 6)]
    with pytest.raises(ValueError, match='IPv4'):
        builder.build([1], src, bytes(16))
    with pytest.raises(ValueError, match='tcp'):
        probe.V4Builder('tcp', 1)


def test_the_tagger_gives_probe_tags_and_expected_auths():
    secret = bytes(range(40))
    dst = socket.inet_aton('198.18.0.10')
    tagger = probe.Tagger(secret, 'udp', 77)
    for seq in (0, 1, 0xffffffff):
        assert tagger.tag(seq, dst) == probe.probe_tag(secret, 'udp', 77,
                                                       seq, dst)
        assert tagger.expected(seq, dst) == probe.expected_auth(
            secret, 'udp', 77, seq, dst)
    assert probe.Tagger(None, 'icmp', 1).tag(5, dst) == bytes(
        probe.AUTH_LEN)


def _plan_packets(vifs, count, step_ms):
    addresses = [f'198.18.0.{10 + i}' for i in range(vifs)]
    plan = sources.schedule(1, 'icmp', addresses, count,
                            int(step_ms * 1e6), budget_ns=10**11).plan
    return [pacing.Packet(p.offset_ns, p.dst_ip, b'x' * 64)
            for p in plan.probes]


def test_a_wake_ups_packets_go_as_one_batch_in_plan_order(clock):
    packets = _plan_packets(16, 10, 0.5)
    batches = []

    def many(batch):
        batches.append((clock.t, list(batch)))
        return []
    start = clock.t
    done = pacing.pace(packets, None, clock.t + 100.0, transmit_many=many)
    assert done.sent == len(packets) and done.left == 0
    assert [p for _, b in batches for p in b] == packets
    # Several per wake-up, one wake-up (at most) per batch.
    assert len(batches) < len(packets) / 2
    assert clock.sleeps <= len(batches)
    for t, batch in batches:
        dsts = [p.dst_ip for p in batch]
        assert len(set(dsts)) == len(dsts)
        # None more than the quantum early.
        assert all(t >= start + p.offset_ns / 1e9 - pacing.SEND_QUANTUM_S
                   - 1e-12 for p in batch)


def test_one_destination_never_gets_two_packets_in_one_batch(clock):
    # One destination, planned closer than the quantum: one per batch,
    # spaced as planned.
    packets = _plan_packets(1, 8, 0.5)
    batches = []
    pacing.pace(packets, None, clock.t + 100.0,
                transmit_many=lambda b: batches.append(
                    (clock.t, list(b))) or [])
    assert [len(b) for _, b in batches] == [1] * len(packets)
    times = [t for t, _ in batches]
    assert min(b - a for a, b in zip(times, times[1:])) >= 0.0005 - 1e-12


def test_failures_in_a_batch_count_per_packet(clock):
    packets = _plan_packets(4, 3, 0.5)

    def many(batch):
        return [(p, OSError(101, 'unreachable')) for p in batch[1:]]
    done = pacing.pace(packets, None, clock.t + 100.0, transmit_many=many)
    assert done.sent + done.failed == len(packets) and done.failed > 0
    assert done.errors and done.errors[0].endswith('unreachable')


def test_the_daemon_pacer_holds_a_batch_until_its_last_slot(clock):
    limits = daemonlimits.DaemonLimits(probes_per_s=1000)
    pacer = privileged._Pacer(limits, burst_s=0.0, compiled=False)
    start = clock.t
    pacer.wait(64, 10)
    # Ten slots 1 ms apart: the batch leaves at the tenth.
    assert clock.t - start >= 0.009 - 1e-12
    pacer.wait(64, 1)
    assert clock.t - start >= 0.010 - 1e-12


def test_the_daemon_source_paces_each_batch(clock, monkeypatch):
    waits = []
    monkeypatch.setattr(privileged._pacer, 'wait',
                        lambda nbytes, n=1: waits.append((nbytes, n)))
    src = privileged._DaemonSource(netns_name='recorder')
    sent = []

    class Sock:
        def sendto(self, data, where):
            sent.append(where[0])
    socks = {'198.18.0.10': Sock(), '198.18.0.11': Sock()}
    batch = [pacing.Packet(0, '198.18.0.10', b'a' * 64),
             pacing.Packet(0, '198.18.0.11', b'b' * 80)]
    assert src._send_batch(socks, batch) == []
    assert waits == [(80, 2)] and sent == ['198.18.0.10', '198.18.0.11']


def test_source_addresses_are_learnt_in_one_namespace_entry(monkeypatch):
    entries = []

    def run_in_netns(name, func, *args):
        entries.append(name)
        return {d: ('198.18.0.1' if d != '198.18.0.99' else
                    OSError(101, 'Network is unreachable'))
                for d in args[0]}
    monkeypatch.setattr(netns, 'run_in_netns', run_in_netns)
    src = sources.LocalSource('src')
    dsts = [f'198.18.0.{10 + i}' for i in range(50)]
    src.source_addresses(dsts + dsts[:5])
    assert entries == ['src']
    assert all(src.source_address(d) == '198.18.0.1' for d in dsts)
    src.source_addresses(dsts)
    assert entries == ['src']       # known: no second entry
    with pytest.raises(sources.SourceError, match=r'198\.18\.0\.99'):
        src.source_addresses(['198.18.0.99'])


def test_building_a_plan_enters_the_namespace_once(monkeypatch):
    entries = []

    def run_in_netns(name, func, *args):
        entries.append(name)
        return func(*args) if func is not sources._source_addresses else {
            d: '198.18.0.1' for d in args[0]}
    monkeypatch.setattr(netns, 'run_in_netns', run_in_netns)
    dsts = [f'198.18.0.{10 + i}' for i in range(20)]
    plan = sources.schedule(5, 'icmp', dsts, 3, 10**6).plan
    built = sources.LocalSource('src').build(plan)
    assert len(built) == len(plan.probes) and entries == ['src']


@pytest.mark.parametrize('bad', [
    (True, '198.18.0.10', 0), (-1, '198.18.0.10', 0),
    (2**32, '198.18.0.10', 0), ('5', '198.18.0.10', 0),
    (5, '198.18.0.10', True), (5, '198.18.0.10', 1.5),
    (5, b'198.18.0.10', 0)])
def test_the_daemons_inline_checks_refuse_what_int_refuses(bad):
    with pytest.raises(ValueError):
        privileged._plan(7, 'icmp', 64, None, [bad],
                         privileged._policy('src', None))


def test_the_daemon_freezes_what_it_loaded_on_its_first_call(monkeypatch):
    monkeypatch.setattr(privileged, '_FROZEN', [])
    gc.unfreeze()
    try:
        privileged._dispatch('status', ())
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
