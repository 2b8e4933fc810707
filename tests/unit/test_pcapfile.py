"""Capture files: exact keys and timestamps, every format, clear errors.

Files are written with dpkt's writers (or by hand where dpkt has none:
big-endian files, cooked link types), with chosen nanosecond timestamps.
The fast paths are checked against :func:`probe.parse_key` with
hypothesis-generated probes, replies and damaged frames.
"""

import io
import struct

import dpkt
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.core import pcapfile
from netweaver_agent.core import pcapkeys
from netweaver_agent.core import pcapngreader
from netweaver_agent.core import pcapreader
from netweaver_agent.core import pcaprows
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from tests import packets as pk
from tests.packets import key_of
from tests.packets import probe_frames as frames
from tests.packets import probes
from tests.packets import rows
from tests.packets import T0
from tests.packets import write_pcap
from tests.packets import write_pcap_raw


# --------------------------------------------------------------------------
# Keys: the fast paths agree with probe.parse_key.

@settings(max_examples=600, deadline=None)
@given(frames())
def test_frame_key_agrees_with_parse_key(frame):
    assert pcapkeys.frame_key(frame, 0, len(frame)) == key_of(frame)


def plain_icmp_or_udp(frame):
    """An untagged IPv4 probe or answer without IP options, its tag and
    keyed tag whole: an ICMP echo (request or reply) or a UDP probe off the
    tunnel ports."""
    if key_of(frame) is None:
        return False
    eth = dpkt.ethernet.Ethernet(frame)
    ip = eth.data
    if (eth.type != dpkt.ethernet.ETH_TYPE_IP or
            not isinstance(ip, dpkt.ip.IP) or ip.v != 4 or ip.hl != 5 or
            min(ip.len, len(frame) - 14) <
            20 + 8 + probe.TAG_LEN + probe.AUTH_LEN):
        return False
    if isinstance(ip.data, dpkt.icmp.ICMP):
        return ip.data.type in (dpkt.icmp.ICMP_ECHO, dpkt.icmp.ICMP_ECHOREPLY)
    if isinstance(ip.data, dpkt.udp.UDP):
        return ip.data.dport not in probe.TUNNEL_PORTS
    return False


@settings(max_examples=300, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=40))
def test_run_keys_agree_with_parse_key(batch):
    # A run is made of frames of one length: pad (or cut) them to it.
    size = max(len(f) for f in batch)
    batch = [f + bytes(size - len(f)) for f in batch]
    buf = b''.join(batch)
    found = pcapkeys.run_keys(buf, 0, size, len(batch), size)
    if plain_icmp_or_udp(batch[0]):
        # The run's first record is what the fast path exists for.
        assert found is not None and found.ok[0], batch[0].hex()
    if found is None:
        return
    for i, f in enumerate(batch):
        if found.ok[i]:
            assert (found.sessions[i], found.keys[i]) == key_of(f), i
    if found.session is not None:
        assert {found.sessions[i] for i in range(len(batch))} == \
            {found.session}


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(frames(), min_size=1, max_size=10),
       repeat=st.integers(1, 40), round_robin=st.booleans())
def test_read_pcap_agrees_with_parse_key(batch, repeat, round_robin,
                                         tmp_path_factory):
    # Repeats make runs (read as columns in place); round robin makes
    # lengths alternate (records set aside by length, then columns); few
    # records are read one by one.
    if round_robin:
        records = [f for _ in range(repeat) for f in batch]
    else:
        records = [f for f in batch for _ in range(repeat)]
    times = [T0 + i * 1001 for i in range(len(records))]
    path = write_pcap(tmp_path_factory.mktemp('p') / 'x.pcap', records,
                      times)
    expected = [(key_of(f), t) for f, t in zip(records, times)]
    sessions = {k[0] for k, _ in expected if k is not None}
    for session in sessions:
        read = pcapfile.read_pcap(path, session=session)
        want = sorted(('x', k[1], t, sightings.DIR_UNKNOWN)
                      for k, t in expected if k and k[0] == session)
        assert rows(read) == want
    read = pcapfile.read_pcap(path)
    assert read.records == len(records)
    assert read.foreign == sum(1 for k, _ in expected if k is None)


def test_mixed_run_with_foreign_frames_of_equal_length(tmp_path):
    good = probes('icmp', 40)
    foreign = bytearray(good[0])
    foreign[42:46] = b'XXXX'                  # no magic: foreign
    records = []
    for i, f in enumerate(good):
        records += [f, bytes(foreign)] if i % 7 == 3 else [f]
    times = [T0 + i for i in range(len(records))]
    read = pcapfile.read_pcap(write_pcap(tmp_path / 'm.pcap', records,
                                         times))
    assert sorted(k >> 1 for k in read.batch.keys) == list(range(40))
    assert read.foreign == len(records) - 40


@pytest.mark.parametrize('proto', probe.PROTOCOLS)
def test_probes_and_replies_interleaved(proto, tmp_path):
    records = probes(proto, 50, replies=True)
    times = [T0 + i * 10 for i in range(len(records))]
    read = pcapfile.read_pcap(write_pcap(tmp_path / 'r.pcap', records,
                                         times))
    # Rows need not keep the file's order (udp: probes and ICMP errors
    # differ in length and are read as two runs).
    assert rows(read) == sorted(('r', key_of(f)[1], t, sightings.DIR_UNKNOWN)
                                for f, t in zip(records, times))
    assert read.probes == 100 and read.foreign == 0


# --------------------------------------------------------------------------
# Timestamps and formats.

@pytest.mark.parametrize('nano', [True, False])
@pytest.mark.parametrize('order', ['<', '>'])
def test_exact_timestamps_both_precisions_both_byte_orders(nano, order,
                                                           tmp_path):
    records = probes('udp', 300)
    # Across second boundaries, with nanoseconds that a float would lose.
    times = [T0 + i * 7_777_777 for i in range(len(records))]
    if not nano:
        times = [t - t % 1000 for t in times]
    path = write_pcap_raw(tmp_path / 'x.pcap', records, times, order, nano)
    read = pcapfile.read_pcap(path, ifname='eth0')
    assert list(read.batch.t_ns) == times
    assert list(read.batch.keys) == [s << 1 for s in range(300)]  # a run
    assert read.batch.ifnames == {0: 'eth0'}
    assert read.format == 'pcap' and read.linktypes == (1,)
    assert set(read.batch.direction) == {sightings.DIR_UNKNOWN}


def test_every_record_in_another_second(tmp_path):
    records = probes('icmp', 200)
    times = [T0 + i * 1_000_000_001 for i in range(200)]
    read = pcapfile.read_pcap(write_pcap(tmp_path / 's.pcap', records,
                                         times))
    assert list(read.batch.t_ns) == times


def test_dpkt_writer_microseconds(tmp_path):
    records = probes('icmp', 20)
    times = [T0 - T0 % 1000 + i * 1000 for i in range(20)]
    path = write_pcap(tmp_path / 'us.pcap', records, times, nano=False)
    assert list(pcapfile.read_pcap(path).batch.t_ns) == times


@pytest.mark.parametrize('order', ['<', '>'])
def test_pcapng_two_interfaces_resolutions_and_directions(order, tmp_path):
    """One pcapng holding the pif (ns) and the tap (µs, default)."""
    fwd = probes('tcp', 64, replies=True)
    blocks = [pk.shb(order), pk.idb(order, 'eth0', tsresol=9),
              pk.idb(order, 'tap0')]
    want = []
    for i, f in enumerate(fwd):
        t = T0 + i * 1_000_003
        reply = i % 2
        key = key_of(f)[1]
        # pif: probes inbound, replies outbound; tap: the reverse.
        blocks.append(pk.epb(order, 0, t, f, flags=2 if reply else 1))
        want.append(('eth0', key, t, sightings.DIR_OUT if reply else
                     sightings.DIR_IN))
        t_tap = (t + 12_345) // 1000
        blocks.append(pk.epb(order, 1, t_tap, f, flags=1 if reply else 2))
        tap_dir = sightings.DIR_IN if reply else sightings.DIR_OUT
        want.append(('tap0', key, t_tap * 1000, tap_dir))
    path = tmp_path / 'both.pcapng'
    path.write_bytes(b''.join(blocks))
    read = pcapfile.read_pcap(path)
    assert read.format == 'pcapng'
    assert rows(read) == sorted(want)
    assert sorted(read.batch.ifnames.values()) == ['eth0', 'tap0']


def test_pcapng_dpkt_writer_and_tsoffset_and_binary_resolution(tmp_path):
    records = probes('icmp', 40)
    buf = io.BytesIO()
    idb = dpkt.pcapng.InterfaceDescriptionBlockLE(
        snaplen=1500, linktype=1, opts=[
            dpkt.pcapng.PcapngOptionLE(code=2, data=b'vif7'),
            dpkt.pcapng.PcapngOptionLE(code=9, data=b'\x9e'),  # 2^-30 s
            dpkt.pcapng.PcapngOptionLE(
                code=14, data=struct.pack('<q', 1_700_000_000)),
            dpkt.pcapng.PcapngOptionLE(code=0, data=b'')])
    w = dpkt.pcapng.Writer(buf, idb=idb)
    want = []
    for i, f in enumerate(records):
        ticks = (5 << 30) + i * 3                 # 5 s + i * 3 * 2^-30 s
        epb = dpkt.pcapng.EnhancedPacketBlockLE(
            ts_high=ticks >> 32, ts_low=ticks & 0xffffffff,
            caplen=len(f), pkt_len=len(f), pkt_data=f)
        w.writepkt(epb)
        want.append(1_700_000_005 * 10 ** 9 + (i * 3 * 10 ** 9 >> 30))
    (tmp_path / 'w.pcapng').write_bytes(buf.getvalue())
    read = pcapfile.read_pcap(tmp_path / 'w.pcapng')
    assert list(read.batch.t_ns) == want
    assert read.batch.ifnames == {0: 'vif7'}


def test_pcapng_simple_packet_blocks_are_untimed(tmp_path):
    f = probes('icmp', 1)[0]
    spb = pk.block('<', pcapngreader.PCAPNG_SPB,
                   struct.pack('<I', len(f)) + f + bytes((-len(f)) % 4))
    path = tmp_path / 's.pcapng'
    path.write_bytes(pk.shb('<') + pk.idb('<', 'eth0') + spb +
                     pk.epb('<', 0, 5, f))
    read = pcapfile.read_pcap(path)
    assert (read.records, read.untimed, read.probes) == (2, 1, 1)


@pytest.mark.parametrize('linktype', [113, 276])
def test_linux_cooked_captures_give_direction(linktype, tmp_path):
    records, want = [], []
    for i, f in enumerate(probes('icmp', 40, replies=True)):
        outgoing = i % 2
        ptype = 4 if outgoing else 0
        if linktype == 113:
            head = struct.pack('!HHH8sH', ptype, 1, 6, f[6:12] + b'\0\0',
                               0x0800)
        else:
            head = struct.pack('!HHIHBB8s', 0x0800, 0, 3, 1, ptype, 6,
                               f[6:12] + b'\0\0')
        records.append(head + f[14:])
        want.append(('any', key_of(f)[1], T0 + i,
                     sightings.DIR_OUT if outgoing else sightings.DIR_IN))
    path = write_pcap_raw(tmp_path / 'c.pcap', records,
                          [T0 + i for i in range(len(records))],
                          linktype=linktype)
    read = pcapfile.read_pcap(path, ifname='any')
    assert rows(read) == sorted(want)


def test_vlan_and_ip_options_take_the_slow_path(tmp_path):
    f = probes('udp', 1)[0]
    tagged = f[:12] + b'\x81\x00\x00\x64' + f[12:]
    ip = dpkt.ethernet.Ethernet(probes('icmp', 2)[1]).data
    ip.opts = b'\x01\x01\x01\x00'                  # NOP NOP NOP EOL
    ip.hl = 6
    ip.sum = 0
    ip.len = len(ip)
    with_opts = pk.ethernet(bytes(ip), src=pk.MAC_A, dst=pk.MAC_B)
    path = write_pcap(tmp_path / 'v.pcap', [tagged] * 20 + [with_opts] * 20,
                      [T0 + i for i in range(40)])
    read = pcapfile.read_pcap(path)
    assert sorted(read.batch.keys) == [0] * 20 + [2] * 20


# --------------------------------------------------------------------------
# Sessions and fingerprints.

def test_most_common_session_or_the_one_asked_for(tmp_path):
    records = probes('icmp', 30, session=7) + probes('icmp', 20, session=8)
    path = write_pcap(tmp_path / 's.pcap', records,
                      [T0 + i for i in range(50)])
    read = pcapfile.read_pcap(path)
    assert read.session == 7 and read.probes == 30
    assert read.sessions == ((7, 30), (8, 20)) and read.other_sessions == 20
    read = pcapfile.read_pcap(path, session=8)
    assert read.session == 8 and [k >> 1 for k in read.batch.keys] == \
        list(range(20))
    assert list(read.batch.t_ns) == [T0 + 30 + i for i in range(20)]
    assert pcapfile.read_pcap(path, session=9).probes == 0


def test_fingerprint_keys_foreign_traffic(tmp_path):
    syns = [pk.hping_syn(2911 + i, 36550021 * (i + 1) & 0xffffffff, i)
            for i in range(30)]
    rsts = [pk.reply(s) for s in syns]
    records = [x for pair in zip(syns, rsts) for x in pair]
    path = write_pcap(tmp_path / 'h.pcap', records,
                      [T0 + i for i in range(60)])
    # Not ours: no tag, and TCP from ports (hping3's 1024..) outside the
    # range our TCP probes come from.
    assert pcapfile.read_pcap(
        path, tcp_ports=probe.DEFAULT_TCP_SOURCE_PORTS).probes == 0
    read = pcapfile.read_pcap(path, fingerprint=True, dst_ip='198.18.0.10')
    keys = list(read.batch.keys)
    assert read.probes == 60 and read.session == 0
    assert [k & 1 for k in keys] == [0, 1] * 30             # reply bit
    assert len(set(keys)) == 60
    # The same packet seen elsewhere (TTL, MACs, checksum aside) has the
    # same key; another IP id does not.
    moved = bytearray(syns[0])
    moved[0:12] = bytes(12)
    moved[22] = 63
    assert pcapkeys.fingerprint_key(bytes(moved), 0, len(moved)) == \
        pcapkeys.fingerprint_key(syns[0], 0, len(syns[0]))
    other = pk.hping_syn(2911, 36550021, 99)
    assert pcapkeys.fingerprint_key(other, 0, len(other)) != \
        pcapkeys.fingerprint_key(syns[0], 0, len(syns[0]))
    no_dst = pcapfile.read_pcap(path, fingerprint=True)
    assert {k & 1 for k in no_dst.batch.keys} == {0}


# --------------------------------------------------------------------------
# Errors.

def test_empty_file(tmp_path):
    path = tmp_path / 'PIF.pcap'
    path.write_bytes(b'')
    with pytest.raises(pcaprows.PcapError, match=r'PIF\.pcap: empty file'):
        pcapfile.read_pcap(path)


def test_missing_file(tmp_path):
    with pytest.raises(pcaprows.PcapError,
                       match=r'nope\.pcap: cannot read: No such file'):
        pcapfile.read_pcap(tmp_path / 'nope.pcap')


def test_not_a_capture(tmp_path):
    path = tmp_path / 'notes.pcap'
    path.write_text('hello, this is text\n' * 3)
    with pytest.raises(pcaprows.PcapError,
                       match=r'notes\.pcap: not a pcap or pcapng file'):
        pcapfile.read_pcap(path)


def test_truncated_header(tmp_path):
    path = tmp_path / 'h.pcap'
    path.write_bytes(struct.pack('<I', pcapreader.PCAP_MAGIC_NS) + bytes(6))
    with pytest.raises(pcaprows.PcapError,
                       match=r'h\.pcap: truncated pcap file header'):
        pcapfile.read_pcap(path)


def test_header_only_is_an_empty_capture(tmp_path):
    path = write_pcap(tmp_path / 'e.pcap', [], [])
    read = pcapfile.read_pcap(path)
    assert (read.records, read.probes, read.truncated) == (0, 0, False)


@pytest.mark.parametrize('cut', [1, 10, 16, 40])
def test_truncated_last_record_is_a_warning(cut, tmp_path):
    records = probes('icmp', 50)
    path = write_pcap(tmp_path / 't.pcap', records,
                      [T0 + i for i in range(50)])
    with open(path, 'r+b') as f:
        f.truncate(24 + 49 * (16 + len(records[0])) + cut)
    read = pcapfile.read_pcap(path)
    assert read.truncated and read.records == 49 and read.probes == 49


def test_corrupt_record_length_names_the_byte(tmp_path):
    records = probes('icmp', 5)
    path = write_pcap(tmp_path / 'PIF.pcap', records,
                      [T0 + i for i in range(5)])
    at = 24 + 2 * (16 + len(records[0]))
    with open(path, 'r+b') as f:
        f.seek(at + 8)
        f.write(struct.pack('<I', 0x7fffffff))
    with pytest.raises(pcaprows.PcapError,
                       match=rf'PIF\.pcap: corrupt record header at byte '
                             rf'{at}: capture length 2147483647'):
        pcapfile.read_pcap(path)


def test_corrupt_pcapng_blocks(tmp_path):
    f = probes('icmp', 1)[0]
    good = pk.shb('<') + pk.idb('<', 'eth0') + pk.epb('<', 0, 1, f)
    path = tmp_path / 'b.pcapng'
    bad = bytearray(good + pk.epb('<', 0, 2, f))
    bad[-4:] = struct.pack('<I', 8)                    # trailer mismatch
    path.write_bytes(bytes(bad))
    with pytest.raises(pcaprows.PcapError,
                       match=rf'b\.pcapng: corrupt pcapng block at byte '
                             rf'{len(good)}'):
        pcapfile.read_pcap(path)
    path.write_bytes(good + pk.epb('<', 3, 2, f))
    with pytest.raises(pcaprows.PcapError, match='names interface 3'):
        pcapfile.read_pcap(path)
    # A cut last block is the truncated-tail warning again.
    path.write_bytes(good + pk.epb('<', 0, 2, f)[:30])
    read = pcapfile.read_pcap(path)
    assert read.truncated and read.probes == 1


# --- work per block stays constant (no quadratic step) ----------------------

class _TooMuchWork(Exception):
    pass


def _lines_run(path, budget):
    """Lines of pcapfile/pcapkeys executed reading ``path`` (loop
    iterations included); :class:`_TooMuchWork` past ``budget``."""
    import sys
    ours = {pcapfile.__file__, pcapkeys.__file__}
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == 'line':
            count += 1
            if count > budget:
                raise _TooMuchWork(count)
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename in ours else None

    sys.settrace(tracer)
    try:
        read = pcapfile.read_pcap(path)
    finally:
        sys.settrace(None)
    return count, read


def _many_interfaces(path, n):
    """A pcapng of ``n`` unnamed interface blocks, then ``n`` packets in
    runs of 16 that name several of those interfaces (every run its own
    frame length, so no two runs merge)."""
    unnamed = pk.block('<', pcapngreader.PCAPNG_IDB,
                       struct.pack('<HHI', 1, 0, 65535))
    frame = probes('icmp', 1)[0]
    out = [pk.shb('<'), unnamed * n]
    for run in range(n // 16):
        f = frame + bytes(4 * (run % 2))
        out += [pk.epb('<', (run + j) % 3, T0 // 1000 + j, f)
                for j in range(16)]
    path.write_bytes(b''.join(out))
    return path


def test_pcapng_many_unnamed_interfaces_cost_the_same_per_block(tmp_path):
    small, large = 2000, 8000
    work_small, read = _lines_run(_many_interfaces(tmp_path / 's.pcapng',
                                                   small), budget=10 ** 8)
    assert len(read.batch.ifnames) == small
    assert read.records == small // 16 * 16
    # Four times the blocks may cost a little over four times the work
    # (fixed costs aside), never the square.
    limit = 5 * work_small
    try:
        work_large, read = _lines_run(
            _many_interfaces(tmp_path / 'l.pcapng', large), budget=limit)
    except _TooMuchWork:
        pytest.fail(f'{large} interface blocks took more than {limit} '
                    f'lines against {work_small} for {small}: not linear')
    assert len(read.batch.ifnames) == large
    assert {read.batch.ifnames[i] for i in set(read.batch.ifindex)} == {
        'l#0', 'l#1', 'l#2'}
    assert work_large <= limit
