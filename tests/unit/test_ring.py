"""The TPACKET_V3 ring's block decoding, against blocks laid out as the
kernel lays them out (``net/packet/af_packet.c``: a block descriptor, then
``tpacket3_hdr`` + ``sockaddr_ll`` + frame per packet, 16-byte aligned,
the last packet's next offset 0), and the capture's columnar reading of
them against its per-frame path (the recvmsg reader's).
"""


from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.core import capture
from netweaver_agent.core import probe
from netweaver_agent.core import ring
from netweaver_agent.core import sightings
from netweaver_agent.core import vifpath
from tests.unit import fakes
from tests import packets as pk

SESSION = 0x1234
IFACES = {3: 'eth1', 7: 'tap0', 9: 'tap1', 11: 'other'}
PACKET_HOST, PACKET_OTHERHOST, PACKET_OUTGOING = 0, 3, 4


def probe_frames(draw, n):
    proto = draw(st.sampled_from(probe.PROTOCOLS))
    size = draw(st.sampled_from([64, 64, 64, 100]))
    out = []
    for i in range(n):
        seq = i + 1
        if proto == 'tcp':
            seq = probe.tcp_ident(40000 + i % 3, seq)
        session = SESSION if draw(st.integers(0, 9)) else SESSION + 1
        f = pk.frame(proto, session, seq, size=size)
        if draw(st.integers(0, 3)) == 0:
            f = pk.reply(f)
        if draw(st.integers(0, 15)) == 0:
            f = f[:20]                          # not a probe at all
        out.append(bytes(f))
    return out


@st.composite
def blocks(draw):
    n = draw(st.integers(1, 40))
    frames = probe_frames(draw, n)
    t0 = 1_764_000_000_000_000_000
    packets = []
    t = t0
    for f in frames:
        t += draw(st.integers(0, 3 * 10**9))
        vid = draw(st.sampled_from([None] * 6 + [100, 4095]))
        packets.append((f, draw(st.sampled_from(sorted(IFACES))),
                        draw(st.sampled_from([PACKET_HOST, PACKET_OTHERHOST,
                                              PACKET_OUTGOING])), t, vid))
    return packets


@settings(max_examples=200, deadline=None)
@given(blocks())
def test_decode_block_gives_every_packet_in_order(packets):
    data = pk.ring_block(packets)
    got = []
    for run in ring.decode_block(data):
        for i in range(run.n):
            at = run.frame + i * run.stride
            got.append((data[at:at + run.caplen], run.ifindex[i],
                        run.pkttype[i], run.t_ns[i],
                        None if run.vlan is None else run.vlan[i]))
    assert got == packets


def test_equal_packets_make_one_run():
    f = pk.frame('icmp', SESSION, 1)
    packets = [(f, 3, PACKET_OTHERHOST, 10**18 + i, None) for i in range(50)]
    (run,) = ring.decode_block(pk.ring_block(packets))
    assert run.n == 50 and run.vlan is None
    assert list(run.t_ns) == [10**18 + i for i in range(50)]


def _capture():
    cap = capture.LiveCapture(SESSION, interfaces={'eth1', 'tap0', 'tap1'})
    for ifindex, name in IFACES.items():
        cap._index_of[ifindex] = cap._column_of(name)
    return cap


def _rows(batch):
    names = batch.ifnames
    return [(k, names[i], t, d, a, batch.encap.get((k, i)))
            for k, i, t, d, a in zip(batch.keys, batch.ifindex, batch.t_ns,
                                     batch.direction, batch.auth_column())]


@settings(max_examples=200, deadline=None)
@given(blocks())
def test_ring_columns_equal_the_per_frame_path(packets):
    """Runs read in columns keep exactly what the recvmsg reader's
    per-frame path keeps: keys, interfaces, times, directions, auth,
    VLAN ids; foreign counts agree."""
    data = pk.ring_block(packets)
    by_ring = _capture()
    for run in ring.decode_block(data):
        by_ring._take_run(data, run)
    by_frame = _capture()
    for frame, ifindex, pkttype, t_ns, vid in packets:
        index = by_frame._index_of[ifindex]
        if index >= 0:
            by_frame._frame(frame, 0, len(frame), index, t_ns,
                            sightings.DIR_OUT if pkttype == PACKET_OUTGOING
                            else sightings.DIR_IN, vid)
    assert _rows(by_ring.batch) == _rows(by_frame.batch)
    assert by_ring._foreign == by_frame._foreign


def test_a_run_of_probes_is_read_in_columns():
    """A block of this window's probes on wanted interfaces: every row
    kept, in order, with the kernel's times and directions."""
    packets = [(pk.frame('icmp', SESSION, i), 3 if i % 2 else 7,
                PACKET_OTHERHOST if i % 2 else PACKET_OUTGOING,
                10**18 + 1000 * i, None) for i in range(1, 65)]
    cap = _capture()
    data = pk.ring_block(packets)
    for run in ring.decode_block(data):
        cap._take_run(data, run)
    b = cap.batch
    assert list(b.keys) == [i << 1 for i in range(1, 65)]
    assert list(b.t_ns) == [10**18 + 1000 * i for i in range(1, 65)]
    assert [b.ifnames[i] for i in b.ifindex] == [
        'eth1' if i % 2 else 'tap0' for i in range(1, 65)]
    assert list(b.direction) == [sightings.DIR_IN if i % 2 else
                                 sightings.DIR_OUT for i in range(1, 65)]


def test_ring_size_holds_the_window_within_the_cap():
    small = capture.ring_bytes(10)
    assert small >= 10 * capture.SLOT_BYTES
    big = capture.ring_bytes(100_000, cap=1 << 30)
    assert big >= 100_000 * capture.SLOT_BYTES
    assert capture.ring_bytes(100_000, cap=8 << 20) == 8 << 20
    assert capture.ring_bytes(None) >= small
    block, n = ring.ring_geometry(big)
    assert block * n >= big and block % 4096 == 0


def test_run_window_sizes_the_ring_from_the_plan():
    from netweaver_agent.core import window

    made = []
    paths = [vifpath.VifPath(vif=f'tap{i}', address=f'198.18.0.{10 + i}',
                             interfaces=('eth1', 'qvo', 'qvb', f'tap{i}'))
             for i in range(3)]
    window.run_window(paths, fakes.AllSentSource(), window.WindowSettings(
        count=5, timeout_ms=5.0, max_window_ms=500.0),
        capture_class=fakes.recording_capture(made))
    # 15 probes and 15 answers, each on 4 interfaces.
    assert made[0]['expected_packets'] >= 2 * 15 * 4
