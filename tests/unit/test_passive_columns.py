"""The passive capture's columnar reading of TPACKET_V3 ring runs
(passive.parse_run, PassiveCapture._take_run) against the full per-frame
parse: the same headers, sightings and counts for any run of equal-length
frames, whether the fixed-offset fast path takes it or not."""

import random

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.core import passive
from netweaver_agent.core import passivecapture
from netweaver_agent.core import probe
from netweaver_agent.core import ring
from netweaver_agent.core import sightings
from tests import flows
from tests import packets as pk
from tests.unit import fakes

IFACES = {3: 'eth1', 7: 'tap0', 9: 'tap1', 11: 'other'}
KINDS = ('tcp4', 'udp4', 'icmp4', 'tcp6', 'udp6', 'tagged', 'vxlan',
         'frag', 'opts', 'tunnelport', 'probe')
PLAIN = ('tcp4', 'udp4', 'icmp4', 'tcp6', 'udp6')


def addr(rnd, v6):
    if v6:
        return bytes.fromhex('20010002') + rnd.randbytes(12)
    return bytes([198, 18 + rnd.randrange(2)]) + rnd.randbytes(2)


def make(rnd, kind, size):
    """One frame of ``kind`` with random fields (tests/flows builders)."""
    v6 = kind in ('tcp6', 'udp6')
    src, dst = addr(rnd, v6), addr(rnd, v6)
    sport = rnd.randrange(65536)
    dport = rnd.choice([rnd.randrange(65536), 80, 53, 443])
    if dport in probe.TUNNEL_PORTS:
        dport += 1
    body = rnd.randbytes(size)
    if kind == 'probe':
        return pk.make_frame(rnd)
    if kind in ('tcp4', 'tcp6'):
        return maybe_df(rnd, flows.tcp(src, dst, sport, dport,
                                       rnd.randrange(2**32),
                                       rnd.randrange(2**32), body))
    if kind == 'icmp4':
        import dpkt
        echo = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(
            id=sport, seq=dport, data=body))
        return maybe_df(rnd, flows.ip_frame(src, dst, echo, 1, (),
                                            rnd.randrange(65536)))
    if kind == 'tunnelport':
        dport = rnd.choice(sorted(probe.TUNNEL_PORTS))
    f = maybe_df(rnd, flows.udp(src, dst, sport, dport,
                                rnd.randrange(65536), body))
    if kind == 'tagged':
        f = f[:12] + b'\x81\x00\x00\x07' + f[12:]
    elif kind == 'vxlan':
        f = pk.vxlan(f, rnd.randrange(1 << 24))
    elif kind == 'frag':
        f = f[:20] + bytes([rnd.randrange(32), rnd.randrange(1, 256)]) + f[22:]
    elif kind == 'opts':
        f = f[:14] + b'\x46' + f[15:]
    return f


def maybe_df(rnd, f):
    """Don't-fragment set on half the IPv4 frames (as most real ones)."""
    if f[12:14] == b'\x08\x00' and rnd.random() < 0.5:
        f = f[:20] + bytes([f[20] | 0x40]) + f[21:]
    return f


@st.composite
def runs(draw):
    """Equal-length frames as the ring lays a run: one kind (or mixed:
    any kinds, or protocols of one IP version), cut to one snapshot
    length."""
    rnd = random.Random(draw(st.integers(0, 2**32)))
    n = draw(st.integers(1, 12))
    mixed = draw(st.sampled_from([None, KINDS, ('tcp4', 'udp4', 'icmp4'),
                                  ('tcp6', 'udp6')]))
    kind = draw(st.sampled_from(KINDS))
    size = draw(st.integers(0, 40))
    frames = [make(rnd, rnd.choice(mixed) if mixed else kind, size)
              for _ in range(n)]
    caplen = min(len(f) for f in frames) - draw(st.integers(0, 30))
    caplen = max(caplen, 1)
    return [f[:caplen] for f in frames], kind, mixed


def lay_out(frames, lead, pad):
    stride = len(frames[0]) + pad
    buf = b'\xee' * lead + b''.join(f + b'\xee' * pad for f in frames)
    return buf[:len(buf) - pad], lead, stride


@settings(max_examples=400, deadline=None)
@given(run=runs(), lead=st.integers(0, 9), pad=st.integers(0, 40))
def test_fast_path_gives_the_full_parse_keys(run, lead, pad):
    frames, kind, mixed = run
    buf, first, stride = lay_out(frames, lead, pad)
    caplen = len(frames[0])
    ports = probe.tunnel_ports()
    want = [passive.parse(f) for f in frames]
    got = passive.parse_run(buf, first, stride, len(frames), caplen, ports)
    assert got == want
    lazy = passive.parse_run(buf, first, stride, len(frames), caplen, ports,
                             lazy=True)
    assert list(lazy) == want
    fast = passive._columns(buf, first, stride, len(frames), caplen, ports)
    fast = None if fast is None else list(fast)
    assert fast is None or fast == want
    if (kind in PLAIN and not mixed and len(frames) >= 4 and
            None not in want and caplen >= 58):
        # Not vacuous: the common frames take the fixed-offset path.
        assert fast is not None


def sightings_by_frame(blocks, wanted, cap):
    """What the per-frame reader gave: each packet on a wanted interface
    parsed alone, while fewer than ``cap`` were kept when its run began
    (``blocks``: each block's runs, each a list of packets);
    ``(sightings, unparsed, over_cap)``."""
    out, unparsed, over = [], 0, 0
    for runs_ in blocks:
        for run in runs_:
            room = max(cap - len(out), 0)
            over += max(len(run) - room, 0)
            for frame, ifindex, pkttype, t_ns, _vid in run[:room]:
                name = IFACES[ifindex]
                if wanted is not None and name not in wanted:
                    continue
                h = passive.parse(frame)
                if h is None:
                    unparsed += 1
                    continue
                out.append(passive.Sighting(
                    name, t_ns, sightings.DIR_OUT if pkttype == 4
                    else sightings.DIR_IN, h))
    return out, unparsed, over


@settings(max_examples=150, deadline=None)
@given(first=runs(), second=runs(), seed=st.integers(0, 2**32),
       wanted=st.sampled_from([None, ('eth1', 'tap0'), ('tap1',)]),
       cap=st.integers(1, 30), same_if=st.booleans(),
       over_wire=st.booleans())
def test_capture_rows_equal_the_per_frame_reader(first, second, seed,
                                                 wanted, cap, same_if,
                                                 over_wire):
    """Two blocks read in turn (the sightings made once all are read):
    the per-frame reader's sightings, counts and cap, in order; or, as
    the privsep daemon hands them over (``over_wire``: the rows made from
    the columns, through privsep's serialisation and back), the same."""
    rnd = random.Random(seed)
    cap_ = passivecapture.PassiveCapture(1, interfaces=wanted, cap=cap)
    cap_._names.update(IFACES)
    blocks, total = [], 0
    for frames, _kind, _mixed in (first, second):
        packets = [(f, 3 if same_if else rnd.choice(sorted(IFACES)),
                    rnd.choice([0, 3, 4]), 10**18 + rnd.randrange(10**9),
                    None) for f in frames]
        total += len(packets)
        data = pk.ring_block(packets)
        runs_ = []
        for r in ring.decode_block(data):
            runs_.append(packets[sum(map(len, runs_)):][:r.n])
            cap_._take_run(data, r)
        blocks.append(runs_)
    want, unparsed, over = sightings_by_frame(blocks, wanted, cap)
    if over_wire:
        cap_.stats = passivecapture.PassiveStats(packets=total, kept=len(
            want))
        raw = cap_.wire()
        assert raw == passivecapture.to_wire(want, cap_.stats)
        got, stats = passivecapture.from_wire(fakes.through_privsep_wire(
            raw))
        assert (got, stats) == (want, cap_.stats)
    else:
        assert cap_.sightings == want
    assert (cap_._unparsed, cap_._over, cap_._read) == (
        unparsed, over, total)
