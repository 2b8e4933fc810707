"""TCP probes: a fresh 5-tuple per probe, from a per-destination cursor.

The source port of every TCP probe comes from the plan (a cursor per
destination, kept across windows), is part of the probe's key, and is
checked against the plan live and against the configured range offline.
"""

import collections
import socket

import dpkt
import pytest
from ceilometer import service
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.agent import opts
from netweaver_agent.agent import pollsters
from netweaver_agent.agent import privileged
from netweaver_agent.cli import offline
from netweaver_agent.core import latency
from netweaver_agent.core import pcapfile
from netweaver_agent.core import pcapkeys
from netweaver_agent.core import pcaprows
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from netweaver_agent.core import sources
from netweaver_agent.core import vifpath
from tests import packets as pk

A, B = '198.18.0.10', '198.18.0.11'
SRC = '198.18.0.1'
MAC_A = bytes.fromhex('020000000001')
MAC_B = bytes.fromhex('020000000002')
SMALL = range(40000, 40010)          # ten ports: wraps after 10 probes


def first_port(_size):
    return 0


def window(cursor, count, targets=(A, B), session=0x1234):
    return sources.schedule(session, 'tcp', list(targets), count,
                            1_000_000, tcp_ports=cursor).plan


def ports_to(plan, dst):
    return [p.sport for p in plan.probes if p.dst_ip == dst]


# --- the cursor

def test_every_probe_of_a_window_has_its_own_port_recorded_in_the_plan():
    plan = window(sources.PortCursor(SMALL, start=first_port), 4)
    for dst in (A, B):
        got = ports_to(plan, dst)
        assert len(set(got)) == 4 and set(got) <= set(SMALL)
    # The port is the plan's: the packet built from it carries it, and its
    # key (what the matcher looks up) is the planned seq.
    built = sources.build_packets(plan, lambda dst: SRC)
    for p, (_dst, data) in zip(plan.probes, built):
        tcp = dpkt.ip.IP(data).data
        assert tcp.sport == p.sport
        assert tcp.flags == dpkt.tcp.TH_SYN
        # (unauthenticated: the ISN is session << 16 | n, read with the
        # port as the key; no session on the wire)
        assert probe.parse_packet_key(data) == probe.ProbeKey(
            probe.TCP_SESSION, p.seq | 0x1234 << 40)


def test_the_cursor_carries_on_across_windows_and_wraps_per_destination():
    cursor = sources.PortCursor(SMALL, start=first_port)
    seen = collections.defaultdict(list)
    for session in (1, 2, 3):
        plan = window(cursor, 4, session=session)
        for dst in (A, B):
            seen[dst].extend(ports_to(plan, dst))
    for dst in (A, B):
        walk = seen[dst]
        assert len(walk) == 12
        # No port comes back for a destination before all were used ...
        assert sorted(walk[:len(SMALL)]) == list(SMALL)
        # ... and then they come back in the same order.
        assert walk[len(SMALL):] == walk[:12 - len(SMALL)]


def test_destinations_walk_separately_and_start_at_random():
    cursor = sources.PortCursor(SMALL, start=first_port)
    window(cursor, 3, targets=(A,))
    plan = window(cursor, 3, targets=(A, B))
    assert ports_to(plan, A) == [SMALL[3], SMALL[4], SMALL[5]]
    assert ports_to(plan, B) == [SMALL[0], SMALL[1], SMALL[2]]
    starts = {sources.PortCursor(range(1, 60001)).take(A, 1)[0]
              for _ in range(20)}
    assert len(starts) > 1


def test_a_destination_listed_twice_shares_its_cursor():
    plan = window(sources.PortCursor(SMALL, start=first_port), 3,
                  targets=(A, A))
    got = ports_to(plan, A)
    assert sorted(got) == list(SMALL[:6])


def test_schedule_uses_the_process_cursor_across_windows():
    cursor = sources.tcp_port_cursor(range(50000, 50100))
    assert sources.tcp_port_cursor() is cursor
    one = sources.schedule(7, 'tcp', [A], 5, 0).plan
    two = sources.schedule(8, 'tcp', [A], 5, 0).plan
    both = ports_to(one, A) + ports_to(two, A)
    assert len(set(both)) == 10 and set(both) <= set(range(50000, 50100))
    # ICMP/UDP probes have no port of their own.
    assert {p.sport for p in sources.schedule(9, 'icmp', [A], 3, 0)
            .plan.probes} == {None}
    sources.tcp_port_cursor(probe.DEFAULT_TCP_SOURCE_PORTS)


def test_build_ip_seqs_rewrites_the_port_of_each_probe():
    seqs = [probe.tcp_ident(40000 + 3 * i, i) for i in range(5)]
    src, dst = socket.inet_aton(SRC), socket.inet_aton(A)
    fast = probe.build_ip_seqs('tcp', 99, seqs, src, dst)
    assert fast == [probe.build_ip('tcp', 99, s, src, dst) for s in seqs]
    assert [dpkt.ip.IP(d).data.sport for d in fast] == \
        [40000 + 3 * i for i in range(5)]


@pytest.mark.parametrize('text, message', [
    ('60999-33000', 'first port <= last'),
    ('0-10', 'first port <= last'),
    ('33000-70000', 'last port <= 65535'),
    ('33000', 'not a port range'),
    ('', 'not a port range'),
])
def test_port_range_errors_name_the_option(text, message):
    with pytest.raises(ValueError, match=message) as err:
        sources.parse_port_range(text, '[netweaver] tcp_source_ports')
    assert 'tcp_source_ports' in str(err.value)


def test_port_range_is_inclusive():
    assert sources.parse_port_range(' 33000 - 33002 ') == \
        range(33000, 33003)


# --- the live matcher: the plan's port

def frame(session, seq, sport=None):
    """The planned probe ``seq``, or the same ISN from ``sport``."""
    if sport is not None:
        seq = probe.tcp_ident(sport, seq & probe.TCP_SEQ_MASK)
    return probe.build_frame('tcp', session, seq, socket.inet_aton(SRC),
                             socket.inet_aton(A), MAC_A, MAC_B)


def rst_for(syn):
    ip = dpkt.ethernet.Ethernet(syn).data
    tcp = ip.data
    out = dpkt.ip.IP(src=ip.dst, dst=ip.src, p=6, ttl=64, data=dpkt.tcp.TCP(
        sport=tcp.dport, dport=tcp.sport, ack=(tcp.seq + 1) & 0xffffffff,
        flags=dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK))
    out.len = len(out)
    return bytes(dpkt.ethernet.Ethernet(
        src=MAC_B, dst=MAC_A, type=dpkt.ethernet.ETH_TYPE_IP, data=out))


def sighted(session, rows):
    """A live-like batch: ``(frame, ifname, t_ns, direction)`` rows keyed
    as the capture keys them."""
    batch = sightings.SightingBatch(session)
    for f, ifname, t, d in rows:
        found = pcapkeys.frame_key(f, 0, len(f))
        if found is not None and found[0] in (session, probe.TCP_SESSION):
            batch.append(found[1], batch.interface_index(ifname), t, d)
    return batch


def test_right_isn_from_the_wrong_port_is_not_ours():
    session = 0x2222
    plan = window(sources.PortCursor(SMALL, start=first_port), 2,
                  targets=(A,), session=session)
    first, second = plan.probes
    wrong = next(p for p in SMALL if p not in (first.sport, second.sport))
    impostor = frame(session, first.seq, sport=wrong)
    # The impostor has exactly our ISN.
    assert (dpkt.ethernet.Ethernet(impostor).data.data.seq ==
            dpkt.ethernet.Ethernet(frame(session, first.seq)).data.data.seq)
    rows = [
        # Probe 1 enters; only an impostor with its ISN reaches the tap,
        # and answers come back to the impostor's port.
        (frame(session, first.seq), 'eth1', 1000, sightings.DIR_IN),
        (impostor, 'tap0', 1500, sightings.DIR_OUT),
        (rst_for(impostor), 'tap0', 1600, sightings.DIR_IN),
        (rst_for(impostor), 'eth1', 1700, sightings.DIR_OUT),
        # Probe 2 goes through, its answer too.
        (frame(session, second.seq), 'eth1', 2000, sightings.DIR_IN),
        (frame(session, second.seq), 'tap0', 2040, sightings.DIR_OUT),
        (rst_for(frame(session, second.seq)), 'tap0', 2100, sightings.DIR_IN),
        (rst_for(frame(session, second.seq)), 'eth1', 2103, sightings.DIR_OUT),
    ]
    matcher = latency.Matcher(
        session, [vifpath.VifPath('tap0', None, ('eth1', 'tap0'))],
        {p.seq: 'tap0' for p in plan.probes}, timeout_ns=10**9,
        protocol='tcp')
    matcher.feed_batch(sighted(session, rows))
    rep = matcher.reports()['tap0']
    assert (rep.ingress.count, rep.ingress.lost) == (1, 1)
    assert rep.ingress.max_us == 0.04
    assert (rep.egress.count, rep.egress.max_us) == (1, 0.003)
    assert rep.turnaround.count == 1


# --- offline: the configured range

def test_offline_tcp_from_outside_the_range_is_not_ours(tmp_path):
    session = 0x3333
    ours = range(45000, 45010)
    plan = window(sources.PortCursor(ours, start=first_port), 6,
                  targets=(A,), session=session)
    pif, vif = [], []
    t = pk.T0
    for i, p in enumerate(plan.probes):
        good = frame(session, p.seq)
        # A look-alike with the same ISN from a port outside the range,
        # on the pif (it never reaches the tap): left out, not lost.
        bad = frame(session, p.seq, sport=44999 - i)
        pif += [(t, good), (t + 10, bad)]
        vif.append((t + 30_000 + i, good))
        t += 1_000_000
    # Record by record here (fewer than pcaprows.MIN_RUN); runs: below.
    pif_path = pk.write_pcap_raw(tmp_path / 'eth1.pcap',
                                 [f for _, f in pif], [t for t, _ in pif])
    vif_path = pk.write_pcap_raw(tmp_path / 'tap0.pcap',
                                 [f for _, f in vif], [t for t, _ in vif])
    read = pcapfile.read_pcap(pif_path, tcp_ports=ours)
    assert (read.probes, read.foreign) == (6, 6)
    assert {probe.tcp_ident_port(k >> 1) for k in read.batch.keys} == \
        {p.sport for p in plan.probes}
    assert pcapfile.read_pcap(pif_path).probes == 12        # no range
    rep = offline.analyze_pcaps(pif_path, vif_path, tcp_ports=ours).report
    assert (rep.sent, rep.ingress.count, rep.ingress.lost) == (6, 6, 0)
    assert rep.ingress.min_us == 30.0 and rep.ingress.max_us == 30.005
    # Told another range, none of them is ours.
    with pytest.raises(offline.AnalyzeError, match='no netweaver probe'):
        offline.analyze_pcaps(pif_path, vif_path, mode='probe',
                              tcp_ports=range(1000, 2000))


@settings(max_examples=60, deadline=None)
@given(ports=st.lists(st.integers(1, 0xffff), min_size=pcaprows.MIN_RUN,
                      max_size=4 * pcaprows.MIN_RUN),
       bounds=st.tuples(st.integers(1, 0xffff), st.integers(1, 0xffff)),
       replies=st.booleans())
def test_offline_range_check_is_exact_in_runs(ports, bounds, replies,
                                              tmp_path_factory):
    """Equal-length records (read as columns) against any range, its
    bounds on or off byte boundaries: exactly the rows inside are kept."""
    first, last = sorted(bounds)
    allowed = range(first, last + 1)
    frames = []
    for n, port in enumerate(ports):
        f = frame(0x4444, probe.tcp_ident(port, n))
        frames.append(rst_for(f) if replies and n % 2 else f)
    path = pk.write_pcap_raw(tmp_path_factory.mktemp('r') / 'p.pcap',
                             frames, [pk.T0 + i for i in range(len(frames))])
    read = pcapfile.read_pcap(path, tcp_ports=allowed)
    want = sorted(probe.tcp_ident(p, n) | 0x4444 << 40
                  for n, p in enumerate(ports) if p in allowed)
    assert sorted(k >> 1 for k in read.batch.keys) == want
    assert read.foreign == len(ports) - len(want)


@pytest.mark.parametrize('first, last', [(33000, 60999), (0x1200, 0x12ff),
                                         (0x12ff, 0x1300), (7, 7)])
def test_offline_range_bounds_are_inclusive_in_runs(first, last, tmp_path):
    # Enough equal records to be read as columns.
    ports = [first - 1, first, first + 1, last - 1, last, last + 1] * \
        pcaprows.MIN_RUN
    frames = [frame(0x4545, probe.tcp_ident(p, n))
              for n, p in enumerate(ports)]
    path = pk.write_pcap_raw(tmp_path / 'p.pcap', frames,
                             [pk.T0 + i for i in range(len(frames))])
    read = pcapfile.read_pcap(path, tcp_ports=range(first, last + 1))
    assert sorted({probe.tcp_ident_port(k >> 1) for k in read.batch.keys}) \
        == sorted({p for p in ports if first <= p <= last})


# --- the privsep daemon: the plan hands over each probe's port

def test_the_daemon_takes_each_probes_port_from_the_plan():
    plan = window(sources.PortCursor(SMALL, start=first_port), 2)
    checked = privileged._plan(plan.session, 'tcp', 64, None,
                               [(p.seq, p.dst_ip, p.offset_ns)
                                for p in plan.probes])
    assert [p.sport for p in checked.probes] == \
        [p.sport for p in plan.probes]
    with pytest.raises(ValueError, match='probe sequence 7 '):
        privileged._plan(1, 'tcp', 64, None, [(7, A, 0)])
    with pytest.raises(ValueError, match='probe sequence'):
        privileged._plan(1, 'icmp', 64, None, [(plan.probes[0].seq, A, 0)])


# --- start-up: enough ports for the SYN_SENT timeout

def conf_with(**overrides):
    conf = service.prepare_service([], [])
    opts.register_opts(conf)
    for name, value in overrides.items():
        conf.set_override(name, value, group=opts.GROUP)
    return conf


def test_windows_within_the_syn_sent_timeout():
    # One window per cycle: every 600 s -> 1 within 120 s; 60 s -> 2;
    # 45 s -> 3 (at 0, 45, 90); two intervals: their windows add up.
    assert sources.tcp_ports_needed(20, [600]) == 20
    assert sources.tcp_ports_needed(20, [60]) == 40
    assert sources.tcp_ports_needed(20, [45]) == 60
    assert sources.tcp_ports_needed(20, [60, 600]) == 60
    assert sources.tcp_ports_needed(20, []) == 0


def test_start_up_refuses_tcp_that_would_reuse_ports():
    conf = conf_with(probe_protocol='tcp', probe_count=60,
                     tcp_source_ports='33000-33099')
    with pytest.raises(pollsters.TcpPortsError) as err:
        pollsters.check_tcp_ports(conf, intervals=[60])
    text = str(err.value)
    for name in ('probe_protocol = tcp', 'probe_count = 60',
                 'tcp_source_ports = 33000-33099', 'holds 100',
                 'needs 120 ports', 'polling interval 60 s', '120 s'):
        assert name in text, name
    # Enough ports, a longer interval, or another protocol: accepted.
    assert pollsters.check_tcp_ports(conf, intervals=[120]) == \
        range(33000, 33100)
    assert pollsters.check_tcp_ports(
        conf_with(probe_protocol='tcp', probe_count=50,
                  tcp_source_ports='33000-33099'), intervals=[60])
    assert pollsters.check_tcp_ports(
        conf_with(probe_protocol='icmp', probe_count=60,
                  tcp_source_ports='33000-33099'), intervals=[1])
    bad = conf_with(tcp_source_ports='5-1')
    with pytest.raises(pollsters.TcpPortsError,
                       match=r'\[netweaver\] tcp_source_ports'):
        pollsters.check_tcp_ports(bad, intervals=[600])


def test_the_polling_interval_comes_from_polling_yaml(tmp_path):
    path = tmp_path / 'polling.yaml'
    path.write_text(
        'sources:\n'
        '  - name: fast\n    interval: 5\n    meters: [cpu]\n'
        '  - name: latency\n    interval: 30\n'
        '    meters: [network.vif.latency, network.vif.probe.loss]\n'
        '  - name: all\n    interval: 300\n    meters: ["*"]\n')
    conf = conf_with()
    conf.set_override('cfg_file', str(path), group='polling')
    assert pollsters.polling_intervals(conf) == (30, 300)
    conf.set_override('cfg_file', str(tmp_path / 'missing.yaml'),
                      group='polling')
    assert pollsters.polling_intervals(conf) == (1,)


def test_the_pollsters_refuse_to_load_and_say_why(tmp_path):
    path = tmp_path / 'polling.yaml'
    path.write_text('sources:\n  - name: l\n    interval: 10\n'
                    '    meters: [network.vif.latency]\n')
    conf = conf_with(probe_protocol='tcp', probe_count=100,
                     tcp_source_ports='33000-33999', privsep=False)
    conf.set_override('cfg_file', str(path), group='polling')
    with pytest.raises(pollsters.TcpPortsError, match='needs 1200 ports'):
        pollsters.new_inspector(conf)
