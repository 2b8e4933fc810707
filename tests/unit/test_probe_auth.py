"""Probes tenants cannot forge: tags, keyed TCP ISNs, the verifying matcher.

A tenant sees its own probes (session and sequence numbers in clear) and
may send look-alikes of another vNIC's.  With the window's secret, only
sightings carrying the planned probe's tag and address count.
"""

import json
import socket

import dpkt
import pytest

from netweaver_agent.cli import offline
from netweaver_agent.core import capture
from netweaver_agent.core import latency
from netweaver_agent.core import pcapkeys
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from netweaver_agent.core import sources
from netweaver_agent.core import vifpath
from tests import packets as pk
from tests.command import netweaver

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
SESSION = 0x5151
ADDR = {4: ('198.18.0.1', '198.18.0.10', '198.18.0.11'),
        6: ('2001:2::1', '2001:2::a', '2001:2::b')}


def packed(address):
    return sources.pack_address(address)


def ident(proto, n, port=40000):
    return probe.tcp_ident(port + n, n) if proto == 'tcp' else n


def probe_frame(proto, family, n, secret=SECRET, dst=1, session=SESSION):
    src, *dsts = ADDR[family]
    return probe.build_frame(proto, session, ident(proto, n), packed(src),
                             packed(dsts[dst - 1]), pk.MAC_A, pk.MAC_B,
                             secret=secret)


def answer(frame):
    """The guest's answer, as Linux builds it (whole probe quoted)."""
    if frame[12:14] == b'\x86\xdd':
        return probe.ethernet_frame(pk.icmp6_reply(frame[14:]),
                                    dpkt.ethernet.ETH_TYPE_IP6, pk.MAC_B,
                                    pk.MAC_A)
    return pk.reply(frame)


def auth_of(frame):
    found = pcapkeys.frame_key(frame, 0, len(frame))
    assert found is not None
    return pcapkeys.frame_auth(frame, 0, len(frame))


# --- tags on the wire ---------------------------------------------------

@pytest.mark.parametrize('family', [4, 6])
@pytest.mark.parametrize('proto', probe.PROTOCOLS)
def test_tag_round_trip_probe_and_answer(proto, family):
    dst = packed(ADDR[family][1])
    f = probe_frame(proto, family, 7)
    want = probe.expected_auth(SECRET, proto, SESSION, ident(proto, 7), dst)
    assert auth_of(f) == want
    # The answer echoes (or quotes) the tag and comes from the address.
    assert auth_of(answer(f)) == want


@pytest.mark.parametrize('family', [4, 6])
@pytest.mark.parametrize('proto', ['icmp', 'udp'])
def test_wrong_secret_destination_or_seq_do_not_verify(proto, family):
    dst = packed(ADDR[family][1])
    got = auth_of(probe_frame(proto, family, 7))
    assert got == probe.expected_auth(SECRET, proto, SESSION, 7, dst)
    assert got != probe.expected_auth(OTHER, proto, SESSION, 7, dst)
    assert got != probe.expected_auth(SECRET, proto, SESSION, 8, dst)
    assert got != probe.expected_auth(SECRET, proto, SESSION ^ 1, 7, dst)
    other = packed(ADDR[family][2])
    assert got != probe.expected_auth(SECRET, proto, SESSION, 7, other)
    # The tag binds the protocol too.
    flip = 'udp' if proto == 'icmp' else 'icmp'
    assert got != probe.expected_auth(SECRET, flip, SESSION, 7, dst)
    # Without the secret the tag is zeros: nothing verifies.
    assert auth_of(probe_frame(proto, family, 7, secret=None)) != got


def test_tags_are_64_bits_and_differ_per_probe():
    dst = packed(ADDR[4][1])
    tags = {probe.probe_tag(SECRET, 'icmp', SESSION, n, dst)
            for n in range(1000)}
    assert len(tags) == 1000 and {len(t) for t in tags} == {8}


@pytest.mark.parametrize('family', [4, 6])
def test_icmp_error_quoting_the_udp_probe_carries_its_tag(family):
    f = probe_frame('udp', family, 9)
    err = answer(f)
    ip_off = 14
    quoted_at = ip_off + (20 if family == 4 else 40) + 8
    # The whole probe is quoted (Linux quotes up to 576 bytes of IPv4,
    # 1280 of IPv6), so the tag sits inside the error.
    assert err[quoted_at:] == f[ip_off:]
    dst = packed(ADDR[family][1])
    assert auth_of(err) == probe.expected_auth(SECRET, 'udp', SESSION, 9,
                                               dst)
    # A stingy guest quoting only the RFC 792 minimum (IP header + 8
    # bytes): the key is gone, so is the tag.
    short = err[:quoted_at + (20 if family == 4 else 40) + 8]
    assert pcapkeys.frame_key(short, 0, len(short)) is None


@pytest.mark.parametrize('family', [4, 6])
def test_tcp_isn_is_keyed_and_found_through_the_plan(family):
    dst = packed(ADDR[family][1])
    seq = ident('tcp', 3)
    f = probe_frame('tcp', family, 3)
    isn = dpkt.ethernet.Ethernet(f).data.data.seq
    assert isn == probe.tcp_isn(SECRET, SESSION, seq, dst)
    assert isn != probe.tcp_isn(OTHER, SESSION, seq, dst)
    assert isn != probe.tcp_isn(SECRET, SESSION, ident('tcp', 4), dst)
    assert isn != probe.tcp_isn(SECRET, SESSION, seq,
                                packed(ADDR[family][2]))
    # The key read holds the port and the ISN, no session.
    key = probe.parse_key(f)
    assert key == probe.ProbeKey(
        probe.TCP_SESSION, probe.tcp_wire_ident(40003, isn))
    assert key.port == 40003
    assert probe.parse_key(answer(f)).seq == key.seq


# --- the matcher --------------------------------------------------------

PATHS = [vifpath.VifPath('tap0', None, ('eth1', 'tap0')),
         vifpath.VifPath('tap1', None, ('eth1', 'tap1'))]
ADDRESSES = {'tap0': ADDR[4][1], 'tap1': ADDR[4][2]}


def matcher(proto, plan, secret=SECRET):
    return latency.Matcher(SESSION, PATHS, plan, 10**9, protocol=proto,
                           secret=secret, addresses=ADDRESSES)


def batch_of(rows):
    """``(frame, ifname, t_ns, direction)`` rows keyed as the capture
    keys them (frame_key, frame_auth)."""
    batch = sightings.SightingBatch(SESSION)
    for f, ifname, t, d in rows:
        found = pcapkeys.frame_key(f, 0, len(f))
        if found is not None and found[0] in (SESSION, probe.TCP_SESSION):
            batch.append(found[1], batch.interface_index(ifname), t, d,
                         pcapkeys.frame_auth(f, 0, len(f)))
    return batch


def genuine(f, r, t):
    """A probe and its answer, as the host sees them (ns)."""
    return [(f, 'eth1', t, sightings.DIR_IN), (f, 'TAP', t + 10, 1),
            (r, 'TAP', t + 50, sightings.DIR_IN),
            (r, 'eth1', t + 53, sightings.DIR_OUT)]


def on(rows, tap):
    return [(f, tap if i == 'TAP' else i, t, d) for f, i, t, d in rows]


@pytest.mark.parametrize('proto', probe.PROTOCOLS)
def test_matcher_rejects_look_alikes_with_the_right_key(proto):
    """Guest 0 knows guest 1's session and sequence numbers; its
    look-alikes (earlier on the pif, earlier on the tap, fake answers)
    carry the right key but no valid tag or the wrong address."""
    f1 = probe_frame(proto, 4, 1, dst=2)
    rows = on(genuine(f1, answer(f1), 10_000), 'tap1')
    plan = {ident(proto, 1): 'tap1'}
    clean = matcher(proto, plan)
    clean.feed_batch(batch_of(rows))
    want = clean.reports()['tap1']
    assert (want.ingress.count, want.egress.count, want.rejected) == (1, 1, 0)
    # Look-alikes: no secret (zero tag / legacy ISN), another secret, and
    # a genuine probe of guest 0 re-addressed to guest 1 (its seq
    # relabelled: a tag copied from another probe).
    forged = []
    for secret in (None, OTHER):
        fake = probe_frame(proto, 4, 1, dst=2, secret=secret)
        forged += [(fake, 'eth1', 9_000, sightings.DIR_IN),
                   (fake, 'tap1', 9_500, sightings.DIR_OUT),
                   (answer(fake), 'tap1', 10_020, sightings.DIR_IN),
                   (answer(fake), 'eth1', 10_021, sightings.DIR_OUT)]
    if proto != 'tcp':
        # Guest 1's real tag, with guest 0's address as destination.
        moved = bytearray(f1)
        moved[30:34] = packed(ADDR[4][1])
        forged += [(bytes(moved), 'eth1', 9_100, sightings.DIR_IN)]
    m = matcher(proto, plan)
    m.feed_batch(batch_of(forged + rows))
    got = m.reports()['tap1']
    assert (got.ingress, got.egress, got.turnaround) == \
        (want.ingress, want.egress, want.turnaround)
    # (TCP look-alikes carry ISNs no plan holds: not even candidates.)
    assert got.rejected >= (0 if proto == 'tcp' else 6)
    assert got.authenticated
    # Unverified (no secret), the same look-alikes move the numbers.
    naive = matcher(proto, plan, secret=None)
    naive.feed_batch(batch_of(forged + rows))
    assert naive.reports()['tap1'].ingress != want.ingress


def test_reply_from_another_address_is_rejected():
    f1 = probe_frame('icmp', 4, 1, dst=2)
    r = bytearray(answer(f1))
    r[26:30] = packed(ADDR[4][1])          # the answer's source: guest 0
    m = matcher('icmp', {1: 'tap1'})
    m.feed_batch(batch_of([(f1, 'eth1', 100, 0), (f1, 'tap1', 110, 1),
                           (bytes(r), 'tap1', 150, 0),
                           (bytes(r), 'eth1', 160, 1)]))
    rep = m.reports()['tap1']
    assert rep.ingress.count == 1 and rep.egress.count == 0
    assert rep.rejected == 2


def test_verification_once_per_probe_not_per_row():
    plan = {n: ('tap0', 'tap1')[n % 2] for n in range(10)}
    rows = []
    for n in range(10):
        f = probe_frame('icmp', 4, n, dst=1 + n % 2)
        rows += on(genuine(f, answer(f), 1000 * n), ('tap0', 'tap1')[n % 2])
        rows += [(f, 'eth1', 1000 * n + 1, sightings.DIR_IN)] * 3   # copies
    m = matcher('icmp', plan)
    m.feed_batch(batch_of(rows))
    assert m.verifications == 10           # 70 rows, 10 probes
    reps = m.reports()
    assert sum(r.ingress.count for r in reps.values()) == 10


def test_tcp_keys_are_found_through_the_plan_isns():
    seqs = [ident('tcp', n) for n in range(4)]
    plan = {s: 'tap0' for s in seqs}
    rows = []
    for n in range(4):
        f = probe_frame('tcp', 4, n)
        rows += on(genuine(f, answer(f), 1000 * n), 'tap0')
    m = matcher('tcp', plan)
    m.feed_batch(batch_of(rows))
    rep = m.reports()['tap0']
    assert (rep.ingress.count, rep.egress.count, rep.rejected) == (4, 4, 0)
    # The right port with a guessed ISN is no key of the plan.
    ip = dpkt.ethernet.Ethernet(probe_frame('tcp', 4, 0)).data
    ip.data.seq ^= 1
    ip.data.sum = 0
    fake = pk.ethernet(bytes(ip))
    m2 = matcher('tcp', plan)
    m2.feed_batch(batch_of([(fake, 'eth1', 1, 0), (fake, 'tap0', 2, 1)]))
    assert m2.reports()['tap0'].ingress.count == 0


def test_matcher_needs_every_address_with_a_secret():
    with pytest.raises(ValueError, match='tap1'):
        latency.Matcher(SESSION, PATHS, {1: 'tap1'}, 10**9, secret=SECRET,
                        addresses={'tap0': ADDR[4][1]})
    with pytest.raises(ValueError, match='16 to 64 bytes'):
        latency.Matcher(SESSION, PATHS, {1: 'tap1'}, 10**9, secret=b'short',
                        addresses=ADDRESSES)


def test_the_secret_is_never_shown():
    plan = sources.schedule(SESSION, 'icmp', [ADDR[4][1]], 2, 0,
                            secret=SECRET).plan
    assert plan.secret == SECRET
    assert SECRET.hex() not in repr(plan) and repr(SECRET) not in repr(plan)
    # build_packets tags with the plan's secret.
    (_, data), _ = sources.build_packets(plan, lambda d: ADDR[4][0])
    f = pk.ethernet(data)
    assert auth_of(f) == probe.expected_auth(
        SECRET, 'icmp', SESSION, plan.probes[0].seq, packed(ADDR[4][1]))


@pytest.mark.parametrize('proto', probe.PROTOCOLS)
def test_fast_path_reads_the_same_auth_as_frame_auth(proto):
    """A run of probes to two guests and answers from them (columns)."""
    frames = []
    for n in range(40):
        f = probe_frame(proto, 4, n, dst=1 + n % 2)
        frames.append(answer(f) if n % 4 == 1 else f)
    size = len(frames[0])
    same = [f for f in frames if len(f) == size]
    buf = b''.join(same)
    found = pcapkeys.run_keys(buf, 0, size, len(same), size)
    assert found is not None and found.all_ok
    for i in range(len(same)):
        assert found.auth[i] == pcapkeys.frame_auth(buf, i * size, size)


def test_socket_family_helpers():
    assert probe.address_fold(socket.inet_aton('198.18.0.10')) == \
        int.from_bytes(socket.inet_aton('198.18.0.10'), 'big')
    six = socket.inet_pton(socket.AF_INET6, '2001:2::a')
    assert 0 <= probe.address_fold(six) < 1 << 64


# --- netweaver analyze --key -----------------------------------------------

def pcaps(tmp_path, proto='icmp', forge=True, n=6):
    """pif/vif captures of ``n`` tagged probes to guest 1 (10 µs in,
    20 µs turnaround, 3 µs out), and, with ``forge``, look-alikes a
    tenant could add: untagged copies on the vif 1 ms early and answers
    on the pif (vif before pif: negative if matched)."""
    pif, vif = [], []
    t = pk.T0
    for k in range(n):
        f = probe_frame(proto, 4, k)
        r = answer(f)
        pif += [(t, f), (t + 10_033, r)]
        vif += [(t + 10_000, f), (t + 10_030, r)]
        if forge:
            fake = probe_frame(proto, 4, k, secret=None)
            vif.append((t - 1_000_000, fake))
            pif.append((t + 10_001, answer(fake)))
        t += 1_000_000
    out = []
    for name, rows in (('eth1', pif), ('tap1', vif)):
        rows.sort(key=lambda row: row[0])
        out.append(pk.write_pcap_raw(tmp_path / f'{name}.pcap',
                                     [f for _, f in rows],
                                     [t for t, _ in rows]))
    return out


def test_analyze_with_the_key_rejects_look_alikes(tmp_path):
    pif, vif = pcaps(tmp_path)
    naive = offline.analyze_pcaps(pif, vif)
    assert not naive.authenticated
    # Unverified, the look-alikes win (earliest sighting): every ingress
    # is negative (anomaly), the egress 1 ns.
    assert naive.report.anomalies > 0 and naive.report.ingress.count == 0
    got = offline.analyze_pcaps(pif, vif, destination=ADDR[4][1],
                                key=SECRET)
    rep = got.report
    assert got.authenticated and rep.authenticated
    assert (rep.ingress.count, rep.ingress.min_us, rep.ingress.max_us) == \
        (6, 10.0, 10.0)
    assert (rep.egress.count, rep.egress.min_us) == (6, 0.003)
    assert rep.anomalies == 0 and rep.rejected == 12
    # The wrong key verifies nothing.
    wrong = offline.analyze_pcaps(pif, vif, destination=ADDR[4][1],
                                  key=OTHER).report
    assert wrong.ingress.count == 0 and wrong.rejected == 36      # all


def test_analyze_key_needs_the_address_and_the_tcp_plan(tmp_path):
    pif, vif = pcaps(tmp_path, forge=False)
    with pytest.raises(offline.AnalyzeError, match='--destination'):
        offline.analyze_pcaps(pif, vif, key=SECRET)
    (tmp_path / 'tcp').mkdir()
    tpif, tvif = pcaps(tmp_path / 'tcp', proto='tcp', forge=False)
    with pytest.raises(offline.AnalyzeError, match='plan'):
        offline.analyze_pcaps(tpif, tvif, destination=ADDR[4][1],
                              key=SECRET)
    # With the plan that sent them (netweaver measure), TCP verifies.
    plan = sources.ProbePlan(
        session=SESSION, protocol='tcp', secret=SECRET,
        probes=tuple(sources.PlannedProbe(ident('tcp', k), ADDR[4][1], k)
                     for k in range(6)))
    rep = offline.analyze_pcaps(tpif, tvif, destination=ADDR[4][1],
                                key=SECRET, plan=plan).report
    assert (rep.ingress.count, rep.egress.count, rep.sent) == (6, 6, 6)
    assert rep.authenticated


def test_cli_says_unauthenticated_without_key(tmp_path):
    pif, vif = pcaps(tmp_path)
    plain = netweaver('analyze', pif, vif, '--json')
    assert plain.returncode == 0, plain.stderr
    got = json.loads(plain.stdout)
    assert (got['authenticated'], got['authentication']) == \
        (False, 'unauthenticated')
    text = netweaver('analyze', pif, vif).stdout
    assert 'unauthenticated' in text
    keyed = netweaver('analyze', pif, vif, '-d', ADDR[4][1], '--key',
                      SECRET.hex(), '--json')
    got = json.loads(keyed.stdout)
    assert (got['authenticated'], got['rejected']) == (True, 12)
    assert got['report']['ingress']['count'] == 6
    text = netweaver('analyze', pif, vif, '-d', ADDR[4][1], '--key',
                     SECRET.hex()).stdout
    assert 'authenticated, 12 rejected' in text
    bad = netweaver('analyze', pif, vif, '-d', ADDR[4][1], '--key', 'zz')
    assert bad.returncode == 1 and '--key' in bad.stderr
    assert 'zz' not in bad.stderr.replace('--key', '')


@pytest.mark.parametrize('family', [4, 6])
@pytest.mark.parametrize('proto', probe.PROTOCOLS)
def test_fast_builder_tags_every_probe_as_build_ip(proto, family):
    src, dst = packed(ADDR[family][0]), packed(ADDR[family][1])
    seqs = [ident(proto, n) for n in range(1, 9)]
    fast = probe.build_ip_seqs(proto, SESSION, seqs, src, dst,
                               secret=SECRET)
    assert fast == [probe.build_ip(proto, SESSION, s, src, dst,
                                   secret=SECRET) for s in seqs]
    assert len(set(fast)) == len(seqs)


def test_rejected_look_alikes_reach_the_samples_metadata():
    import types

    from netweaver_agent.agent import inspector
    f1 = probe_frame('icmp', 4, 1, dst=2)
    fake = probe_frame('icmp', 4, 1, dst=2, secret=OTHER)
    m = matcher('icmp', {1: 'tap1'})
    m.feed_batch(batch_of([(fake, 'eth1', 50, 0), (f1, 'eth1', 100, 0),
                           (f1, 'tap1', 110, 1)]))
    rep = m.reports()['tap1']
    assert rep.rejected == 1 and rep.ingress.count == 1
    window = types.SimpleNamespace(
        capture=capture.CaptureStats(3, 0, 3, 0), session=SESSION,
        duration_ns=10 ** 6)
    path = vifpath.VifPath(vif='tap1', address=ADDR[4][2],
                           interfaces=('eth1', 'tap1'))
    md = inspector.latency_metadata(rep, path, window, 'local')
    assert md['probe_rejected'] == 1


def test_capture_keeps_tcp_of_the_plans_ports_only():
    """TCP keys carry no session: other handshakes on the host are told
    apart by the plan's source ports (40000..40003 here)."""
    cap = capture.LiveCapture(SESSION, 'tcp', tcp_ports=[40000, 40002])
    rows = []
    for n in range(4):
        f = probe_frame('tcp', 4, n)
        rows += [f, answer(f)]
    for f in rows:
        cap._frame(f, 0, len(f), cap.batch.interface_index('eth1'), 1, 0,
                   None)
    ports = sorted({(k >> 17) & 0xffff for k in cap.batch.keys})
    assert ports == [40000, 40002] and cap._foreign == 4
    everything = capture.LiveCapture(SESSION, 'tcp')
    for f in rows:
        everything._frame(f, 0, len(f), 0, 1, 0, None)
    assert len(everything.batch) == 8
    # ICMP rows of another session stay foreign.
    other = probe_frame('icmp', 4, 1, session=SESSION + 1)
    cap._frame(other, 0, len(other), 0, 1, 0, None)
    assert cap._foreign == 5
