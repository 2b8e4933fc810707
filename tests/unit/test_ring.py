"""The TPACKET_V3 ring's block decoding, against blocks laid out as the
kernel lays them out (``net/packet/af_packet.c``: a block descriptor, then
``tpacket3_hdr`` + ``sockaddr_ll`` + frame per packet, 16-byte aligned,
the last packet's next offset 0), and the capture's columnar reading of
them against its per-frame path (the recvmsg reader's); then the whole
reader (``LiveCapture._read_ring``) on a ring of such blocks in memory of
its own, read in place or decoded, with the C walk and without.
"""

import array
import mmap

import pytest
from hypothesis import given
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.core import capture
from netweaver_agent.core import pcapwalk
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


def _feed_frames(cap, packets):
    """``cap`` fed ``packets`` one frame at a time, as the recvmsg reader
    feeds them (``_index_of`` must know their interfaces)."""
    for frame, ifindex, pkttype, t_ns, vid in packets:
        index = cap._index_of[ifindex]
        if index >= 0:
            cap._frame(frame, 0, len(frame), index, t_ns,
                       sightings.DIR_OUT if pkttype == PACKET_OUTGOING
                       else sightings.DIR_IN, vid)
    return cap


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
    by_frame = _feed_frames(_capture(), packets)
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


# --------------------------------------------------------------------------
# The reader on a ring: blocks read in place or copied and decoded.

FAR = 70_000            # an ifindex beyond the in-place reader's table
IFACES_FAR = {**IFACES, FAR: 'tap1'}


@st.composite
def probe_blocks(draw):
    """Packets of a block the reader can read in place: probes of SESSION
    (ICMP, UDP) and echo replies on wanted interfaces, anything on the
    one not wanted; maybe one flaw (another session, a VLAN tag, an ICMP
    error, an interface far up)."""
    n = draw(st.integers(1, 40))
    packets = []
    t = 1_764_000_000_000_000_000
    for i in range(n):
        proto = draw(st.sampled_from(['icmp', 'udp']))
        f = pk.frame(proto, SESSION, draw(st.integers(0, (1 << 32) - 1)),
                     size=draw(st.sampled_from([64, 64, 100])))
        if proto == 'icmp' and draw(st.booleans()):
            f = pk.reply(f)
        ifindex = draw(st.sampled_from(sorted(IFACES)))
        if ifindex == 11 and draw(st.booleans()):
            f = pk.frame('tcp', 1, probe.tcp_ident(40000, i))
        t += draw(st.integers(0, 10**6))
        packets.append([f, ifindex, draw(st.sampled_from(
            [PACKET_HOST, PACKET_OTHERHOST, PACKET_OUTGOING])), t, None])
    flaws = [None] * 4 + ['session', 'vlan', 'error', 'far']
    flaw = draw(st.sampled_from(flaws))
    at = draw(st.integers(0, n - 1))
    if flaw == 'session':
        packets[at][0] = pk.frame('icmp', SESSION + 1, 7)
    elif flaw == 'vlan':
        packets[at][4] = 100
    elif flaw == 'error':
        packets[at][0] = pk.reply(pk.frame('udp', SESSION, 7))
    elif flaw == 'far':
        packets[at][1] = FAR
    return [tuple(p) for p in packets]


def _ring_of(*blocks, block_bytes=1 << 16):
    """A :class:`ring.PacketRing` over memory of its own (no socket), as
    the kernel hands a ring over: ``blocks`` (``pk.ring_block``'s) in its
    first blocks, one more still the kernel's.  ``pcapwalk.ring_take``
    is chosen as the ring is made (C, or Python if turned off)."""
    pring = ring.PacketRing.__new__(ring.PacketRing)
    pring.block_bytes, pring.nblocks = block_bytes, len(blocks) + 1
    pring.size = block_bytes * pring.nblocks
    pring._map = mmap.mmap(-1, pring.size)
    pring._cursor = array.array('q', [0])
    pring._take = pcapwalk.ring_take_function()
    for i, block in enumerate(blocks):
        pring._map[i * block_bytes:i * block_bytes + len(block)] = block
    return pring


def _by_frame(packets):
    """A capture fed ``packets`` one by one (the recvmsg reader's path)."""
    cap = _capture()
    for ifindex, name in IFACES_FAR.items():
        cap._index_of[ifindex] = cap._column_of(name)
    return _feed_frames(cap, packets)


def _read(blocks, copies):
    """A capture that read a ring of ``blocks`` (lists of packets);
    ``copies``: the indexes of the blocks it copied to decode."""
    pring = _ring_of(*(pk.ring_block(b) for b in blocks))
    take_block = pring.next_block

    def counted():
        at = pring._cursor[0]
        data = take_block()
        if data is not None:
            copies.append(at)
        return data
    pring.next_block = counted
    cap = _capture()
    for ifindex, name in IFACES_FAR.items():
        cap._index_of[ifindex] = cap._column_of(name)
    cap._ring = pring
    cap._read_ring()
    assert pring.next_block() is None       # every block given back
    return cap


@pytest.fixture(params=['c', 'python'])
def walk(request):
    """The C walk (skipped when not built), then Python's."""
    if request.param == 'c':
        if pcapwalk._pcapwalk is None:
            pytest.skip('netweaver_agent.core._pcapwalk not built')
        yield request.param
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pcapwalk, '_pcapwalk', None)
        yield request.param


# The walk fixture's choice holds for every example (that is its job).
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(blocks(), probe_blocks()), min_size=1,
                max_size=3))
def test_the_reader_keeps_what_the_per_frame_path_keeps(walk, blocks_):
    """Blocks read in place or decoded in runs, in any order: the rows
    (keys, interfaces, times, directions, auth, VLAN ids) and foreign
    counts of the per-frame path, every packet counted as read."""
    packets = [p for b in blocks_ for p in b]
    by_frame = _by_frame(packets)
    by_ring = _read(blocks_, [])
    assert _rows(by_ring.batch) == _rows(by_frame.batch)
    assert by_ring._foreign == by_frame._foreign
    assert by_ring._seen == len(packets)


def test_blocks_of_probes_are_read_in_place(walk):
    """Blocks holding only this window's probes and answers (and
    anything on interfaces not wanted) are never copied; a block with
    something else is, alone, and its rows come in their place."""
    clean = [(pk.frame('icmp', SESSION, i), 3 if i % 2 else 7,
              PACKET_OTHERHOST, 10**18 + i, None) for i in range(1, 50)]
    clean += [(pk.frame('tcp', 9, probe.tcp_ident(40000, 1)), 11,
               PACKET_HOST, 10**18 + 50, None)]
    mixed = [(pk.frame('icmp', SESSION, 60), 3, PACKET_HOST, 10**18 + 60,
              None),
             (pk.frame('icmp', SESSION + 1, 61), 3, PACKET_HOST,
              10**18 + 61, None)]
    copies = []
    cap = _read([clean, mixed, clean], copies)
    assert copies == [1]                    # the second block
    assert _rows(cap.batch) == _rows(_by_frame(clean + mixed + clean).batch)
    assert len(cap.batch) == 2 * 49 + 1 and cap._foreign == 1
    # Read in place only: still the time of the last probe seen is kept
    # (settle() waits on it), and an interface far up stays out of the
    # in-place reader's table.
    copies = []
    cap = _read([clean], copies)
    assert not copies and len(cap.batch) == 49 and cap._last_probe_ns
    far = [(pk.frame('icmp', SESSION, 1), FAR, PACKET_HOST, 10**18, None)]
    cap = _read([clean, far], copies)
    assert len(copies) == 1 and len(cap.batch) == 50
    assert len(cap._ring_columns) <= max(IFACES) + 1
