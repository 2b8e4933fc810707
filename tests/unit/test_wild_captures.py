"""Captures from the wild: read right, or refused in one line saying why.

Every file here is written by the test: invalid versions, timestamp
fields out of range, link types netweaver does not read, cut headers,
cooked (SLL, SLL2) captures with VLAN tags, and the same records in every
format tcpdump writes (pcap µs/ns, either byte order, pcapng, SLL, SLL2),
which must give the same rows.
"""

import json
import random
import socket
import struct

import dpkt
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from netweaver_agent.cli import offline
from netweaver_agent.core import pcapfile
from netweaver_agent.core import pcapkeys
from netweaver_agent.core import pcapngreader
from netweaver_agent.core import pcaprows
from netweaver_agent.core import probe
from tests import packets as pk

from tests.command import netweaver
from tests.command import one_line
from tests.packets import pcap
from tests.packets import pcap_of
from tests.packets import pcapng
from tests.packets import shb
from tests.packets import tagged
from tests.packets import to_sll
from tests.packets import to_sll2

T0 = pk.T0
SEC = 1_763_900_000


# --------------------------------------------------------------------------
# Version fields.


@pytest.mark.parametrize('version', [(2, 5), (1, 4), (3, 4), (0, 0),
                                     (543, 1), (1, 3)])
@pytest.mark.parametrize('order', ['<', '>'])
def test_pcap_versions_tcpdump_refuses_are_refused(version, order, tmp_path):
    path = tmp_path / 'v.pcap'
    path.write_bytes(pcap([(SEC, 1, pk.probes('icmp', 1)[0])], order,
                          version=version))
    with pytest.raises(pcaprows.PcapError) as err:
        pcapfile.read_pcap(path)
    assert str(err.value).startswith(f'{path}: pcap version '
                                     f'{version[0]}.{version[1]} ')


@pytest.mark.parametrize('version', [(2, 0), (2, 1), (2, 2), (2, 3),
                                     (2, 4), (543, 0)])
def test_pcap_versions_read(version, tmp_path):
    path = tmp_path / 'v.pcap'
    path.write_bytes(pcap([(SEC, 1, f) for f in pk.probes('icmp', 3)],
                          version=version))
    assert pcapfile.read_pcap(path).probes == 3


# Versions before 2.3 (and DG/UX's 543.0) wrote each record's wire length
# before its captured length; 2.3 files were written in either order,
# which libpcap tells apart record by record: the captured length is the
# smaller.
OLD_ORDER = {(2, 0): True, (2, 1): True, (2, 2): True, (543, 0): True,
             (2, 4): False}


def _old_records(rnd, nano):
    """``[(sec, frac, frame, wire_len)]`` whose lengths often differ: a
    run of whole probes, a run cut by one snapshot length, probes of one
    wire length cut at many lengths, a block of everyday traffic (some of
    it cut short), cut probes between everyday frames, lone records and a
    few out-of-range fractions."""
    unit = 10 ** 9 if nano else 10 ** 6
    frames = [(f, None) for f in pk.probes('icmp', rnd.randrange(16, 40))]
    snap = rnd.randrange(54, 70)
    frames += [(f, snap) for f in pk.probes('udp', rnd.randrange(16, 40),
                                            first=100)]
    frames += [(f, rnd.randrange(42, len(f)))
               for f in pk.probes('icmp', 40, first=200)]
    for _ in range(rnd.randrange(65, 300)):
        f = rnd.choice([_everyday, _wild_frame])(rnd)
        cut = len(f) > 14 and rnd.random() < 0.3
        frames.append((f, rnd.randrange(14, len(f)) if cut else None))
    for f in pk.probes('icmp', rnd.randrange(16, 40), first=400):
        frames += [(f, snap), (_everyday(rnd), None)]   # set aside by length
    frames += [(f, None) for f in pk.probes('tcp', 3, first=300)]
    records = []
    for i, (f, cut) in enumerate(frames):
        frac = rnd.randrange(unit)
        if rnd.random() < 0.01:
            frac = unit + rnd.randrange(1 << 20)
        records.append((SEC + i, frac, f[:cut], len(f)))
    return records


def _old_file(records, version, order, nano, rnd):
    """A pcap of ``version``; 2.3 records in either order at random."""
    if version != (2, 3):
        return pcap(records, order, nano, version=version,
                    swapped=OLD_ORDER[version])
    head = pcap([], order, nano, version=version)
    return head + b''.join(
        pcap([r], order, nano, version=version,
             swapped=rnd.random() < 0.5)[len(head):] for r in records)


@settings(max_examples=25, deadline=None)
@given(pk.randoms, st.sampled_from(['<', '>']), st.booleans())
def test_old_versions_give_the_rows_of_2_4(tmp_path_factory, rnd, order,
                                           nano):
    """2.0-2.2 and 543.0 (lengths in the old order), 2.3 (either order,
    record by record): the records, rows, times and fingerprints of the
    same records written as 2.4, in probe, auto and fingerprint mode."""
    records = _old_records(rnd, nano)
    tmp = tmp_path_factory.mktemp('old')

    def read_all(version):
        path = _write(tmp / f'{version[0]}.{version[1]}.pcap',
                      _old_file(records, version, order, nano, rnd))
        out = []
        for kw in (dict(), dict(fingerprint=True, dst_ip=pk.GUEST),
                   dict(probes=False, fingerprint=True, dst_ip=pk.GUEST)):
            cap = pcapfile.read_capture(path, ifname='x', lenient=True,
                                        tcp_ports=range(1, 40000), **kw)
            probes, prints = cap.probes(), cap.fingerprints()
            out.append((_batch_rows(probes), _batch_rows(prints),
                        (probes or prints).truncated))
        return out

    want = read_all((2, 4))
    assert want[0][0][0] == len(records)
    for version in ((2, 0), (2, 1), (2, 2), (2, 3), (543, 0)):
        assert read_all(version) == want, version


@pytest.mark.parametrize('nano', [False, True])
@pytest.mark.parametrize('order', ['<', '>'])
def test_2_3_lengths_in_either_order(order, nano, tmp_path):
    """A 2.3 file of probes cut at 60 bytes: with the wire length first
    or second, the same probes, times and keys as 2.4's."""
    fr = pk.probes('icmp', 20)
    records = [(SEC, 1000 * i, f[:60], len(f)) for i, f in enumerate(fr)]
    want = pcapfile.read_pcap(_write(tmp_path / 'new.pcap', pcap(
        records, order, nano)), ifname='x')
    assert want.probes == 20
    for swapped in (False, True):
        got = pcapfile.read_pcap(_write(tmp_path / 'old.pcap', pcap(
            records, order, nano, version=(2, 3), swapped=swapped)),
            ifname='x')
        assert (got.records, _keyed_rows(got)) == \
            (want.records, _keyed_rows(want)), swapped


@pytest.mark.parametrize('version', [(2, 0), (1, 1), (0, 0), (1, 3)])
@pytest.mark.parametrize('second', [False, True])
def test_pcapng_section_versions_refused(version, second, tmp_path):
    f = pk.probes('icmp', 1)[0]
    good = shb() + pk.idb('<', 'eth0') + pk.epb('<', 0, 5, f)
    bad = shb(version=version) + pk.idb('<', 'eth0') + \
        pk.epb('<', 0, 6, f)
    path = tmp_path / 'v.pcapng'
    path.write_bytes(good + bad if second else bad)
    with pytest.raises(pcaprows.PcapError) as err:
        pcapfile.read_pcap(path)
    at = len(good) if second else 0
    assert str(err.value).startswith(
        f'{path}: pcapng section version {version[0]}.{version[1]} (at '
        f'byte {at}) ')


@pytest.mark.parametrize('version', [(1, 0), (1, 2)])
def test_pcapng_section_versions_read(version, tmp_path):
    path = tmp_path / 'v.pcapng'
    path.write_bytes(shb(version=version) + pk.idb('<', 'eth0') + b''.join(
        pk.epb('<', 0, 5 + i, f)
        for i, f in enumerate(pk.probes('udp', 4))))
    assert pcapfile.read_pcap(path).probes == 4


def test_cli_version_refusal_is_one_line(tmp_path):
    bad = tmp_path / 'pif.pcap'
    bad.write_bytes(pcap([(SEC, 1, pk.probes('icmp', 1)[0])],
                         version=(2, 5)))
    good = tmp_path / 'vif.pcap'
    good.write_bytes(pcap([(SEC, 2, pk.probes('icmp', 1)[0])]))
    line = one_line(netweaver('analyze', bad, good))
    assert line.startswith(f'netweaver analyze: {bad}: pcap version 2.5 ')


# --------------------------------------------------------------------------
# Timestamp fields out of range.

def _records(n, bad, nano, length_of=lambda i: 0):
    """``n`` probe records one ms apart; ``bad``: {index: fraction}."""
    unit = 10 ** 9 if nano else 10 ** 6
    out = []
    for i, f in enumerate(pk.probes('icmp', n)):
        frac = bad.get(i, (i * unit // 1000) % unit)
        out.append((SEC, frac,
                    f + bytes(length_of(i))))
    return out


# Out-of-range fractions as in the wild: one over, and the sign bit.
BAD_US = [1_000_000, 2_147_483_648, 0xffffffff]
BAD_NS = [1_000_000_000, 2_147_483_648, 0xffffffff]
LAYOUTS = {
    'alone': (3, lambda i: 0),                  # record by record
    'run': (40, lambda i: 0),                   # one columnar run
    'set aside': (40, lambda i: (i % 2) * 4),   # lengths alternate
}


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
@pytest.mark.parametrize('nano, frac', [(False, b) for b in BAD_US] +
                         [(True, b) for b in BAD_NS])
@pytest.mark.parametrize('order', ['<', '>'])
def test_timestamp_fraction_out_of_range_names_the_record(
        layout, nano, frac, order, tmp_path):
    n, length_of = LAYOUTS[layout]
    index = n - 2
    records = _records(n, {index: frac}, nano, length_of)
    data = pcap(records, order, nano)
    byte = 24 + sum(16 + len(f) for _, _, f in records[:index])
    path = tmp_path / 't.pcap'
    path.write_bytes(data)
    with pytest.raises(pcaprows.PcapError) as err:
        pcapfile.read_pcap(path)
    unit = 'ns' if nano else 'µs'
    assert str(err.value).startswith(
        f'{path}: record {index + 1} (byte {byte}) has an invalid '
        f'timestamp: fraction {frac} {unit} ')
    # Lenient: that record skipped and counted, every other one kept.
    read = pcapfile.read_pcap(path, ifname='eth0', lenient=True)
    good = pcapfile.read_pcap(_write(tmp_path / 'g.pcap', pcap(
        records[:index] + records[index + 1:], order, nano)), ifname='eth0')
    assert (read.records, read.invalid_times, read.probes) == \
        (n, 1, n - 1)
    assert pk.rows(read) == pk.rows(good)
    assert read.foreign == 0


def _write(path, data):
    path.write_bytes(data)
    return path


def test_cli_invalid_timestamp_refused_or_lenient(tmp_path):
    n = 20
    records = _records(n, {5: 1_000_000, 9: 2_147_483_648}, False)
    pif = _write(tmp_path / 'pif.pcap', pcap(records))
    vif = _write(tmp_path / 'vif.pcap', pcap(_records(n, {}, False)))
    line = one_line(netweaver('analyze', pif, vif))
    assert line.startswith(f'netweaver analyze: {pif}: record 6 (byte ')
    assert 'fraction 1000000 µs' in line and '--lenient' in line
    proc = netweaver('analyze', '--lenient', pif, vif)
    assert proc.returncode == 0, proc.stderr
    assert f'pif {pif}: pcap, {n} records, {n - 2} matched, 0 other, ' \
        '2 records with an invalid timestamp skipped' in proc.stdout


# --------------------------------------------------------------------------
# Link types and cut headers.

@pytest.mark.parametrize('linktype, name', [(101, 'raw IP'),
                                            (127, '802.11 radiotap'),
                                            (147, None)])
def test_link_type_not_read_is_refused(linktype, name, tmp_path):
    path = _write(tmp_path / 'l.pcap', pcap(
        [(SEC, 1, pk.probes('icmp', 1)[0][14:])], linktype=linktype))
    with pytest.raises(pcaprows.PcapError) as err:
        pcapfile.read_pcap(path)
    named = f' ({name})' if name else ''
    assert str(err.value).startswith(
        f'{path}: link type {linktype}{named} is not read by netweaver')
    assert 'Ethernet (1)' in str(err.value)


def test_pcapng_link_types(tmp_path):
    f = pk.probes('icmp', 1)[0]
    only_radio = shb() + pk.idb('<', 'wlan0', linktype=127) + \
        pk.epb('<', 0, 5, f)
    path = _write(tmp_path / 'r.pcapng', only_radio)
    with pytest.raises(pcaprows.PcapError) as err:
        pcapfile.read_pcap(path)
    assert str(err.value).startswith(
        f"{path}: every packet's link type 127 (802.11 radiotap) is not "
        'read by netweaver')
    # Next to an Ethernet interface, the other link type is only counted.
    mixed = shb() + pk.idb('<', 'wlan0', linktype=127) + \
        pk.idb('<', 'eth0') + pk.epb('<', 0, 5, f) + \
        pk.epb('<', 1, 6, f)
    read = pcapfile.read_pcap(_write(tmp_path / 'm.pcapng', mixed))
    assert (read.records, read.probes, read.foreign) == (2, 1, 1)


@pytest.mark.parametrize('data, message', [
    (b'\xd4\xc3\xb2\xa1\x02\x00', 'truncated pcap file header'),
    (b'\x0a\x0d\x0d\x0a\x1c\x00\x00\x00', 'truncated pcapng section header'),
    (shb()[:27], 'truncated pcapng section header'),
    (struct.pack('<IIIHHq', pcapngreader.PCAPNG_SHB, 64,
                 pcapngreader.PCAPNG_BOM, 1, 0, -1) + bytes(8),
     'truncated pcapng section header'),
])
def test_truncated_headers(data, message, tmp_path):
    path = _write(tmp_path / 'c.pcap', data)
    with pytest.raises(pcaprows.PcapError) as err:
        pcapfile.read_pcap(path)
    assert str(err.value).startswith(f'{path}: {message}')


# --------------------------------------------------------------------------
# One read per file.

def test_auto_mode_reads_each_file_once(tmp_path, monkeypatch):
    """Foreign traffic in auto mode: probes looked for, then fingerprints,
    from one read of each file (a pipe can be read only once)."""
    syns = [pk.hping_syn(2911 + i, 36550021 * (i + 1) & 0xffffffff, i)
            for i in range(10)]
    pif = pk.write_pcap(tmp_path / 'p.pcap', syns,
                        [T0 + i * 1000 for i in range(10)])
    vif = pk.write_pcap(tmp_path / 'v.pcap', syns,
                        [T0 + i * 1000 + 7000 for i in range(10)])
    opened = []
    real = pcapfile._open

    def counting(path):
        opened.append(path)
        return real(path)
    monkeypatch.setattr(pcapfile, '_open', counting)
    result = offline.analyze_pcaps(pif, vif,
                                   destination=socket.inet_ntoa(pk.DST))
    assert result.mode == 'fingerprint'
    assert result.report.ingress.count == 10
    assert result.report.ingress.min_us == 7.0
    assert sorted(opened) == sorted([pif, vif])


def test_probe_mode_session_from_the_vif_file_reads_once(tmp_path,
                                                         monkeypatch):
    fwd = pk.probes('icmp', 5, session=77)
    pif = pk.write_pcap(tmp_path / 'p.pcap', [], [])
    vif = pk.write_pcap(tmp_path / 'v.pcap', fwd,
                        [T0 + i for i in range(5)])
    opened = []
    real = pcapfile._open
    monkeypatch.setattr(pcapfile, '_open',
                        lambda path: opened.append(path) or real(path))
    # The vif's session is found without reading the pif again.
    result = offline.analyze_pcaps(pif, vif)
    assert (result.session, result.report.unseen_at_pif) == (77, 5)
    assert len(opened) == 2


# --------------------------------------------------------------------------
# The same records in every format tcpdump writes.

FORMATS = {
    'pcap us': lambda fr, ts, out: pcap_of(fr, ts, nano=False),
    'pcap ns': lambda fr, ts, out: pcap_of(fr, ts),
    'pcap ns big-endian': lambda fr, ts, out: pcap_of(fr, ts, '>'),
    'pcap us big-endian': lambda fr, ts, out: pcap_of(fr, ts, '>', False),
    'pcapng': lambda fr, ts, out: pcapng(fr, ts, tsresol=6),
    'pcapng ns big-endian': lambda fr, ts, out: pcapng(fr, ts, '>'),
    'pcapng flags': lambda fr, ts, out: pcapng(
        fr, ts, flags=[2 if o else 1 for o in out]),
    'sll': lambda fr, ts, out: pcap_of(
        [to_sll(f, o) for f, o in zip(fr, out)], ts, linktype=113),
    'sll2': lambda fr, ts, out: pcap_of(
        [to_sll2(f, o) for f, o in zip(fr, out)], ts, linktype=276),
    'sll2 pcapng big-endian': lambda fr, ts, out: pcapng(
        [to_sll2(f, o) for f, o in zip(fr, out)], ts, '>', linktype=276),
}


def _keyed_rows(read):
    """Rows as ``(key, t_ns, encap)``, sorted: what must not depend on
    the format (direction aside: only some formats carry it)."""
    b = read.batch
    return sorted((k, t, b.encap.get((k, i))) for k, i, t in
                  zip(b.keys, b.ifindex, b.t_ns))


# NetBIOS-style chatter to the subnet's broadcast address: only the
# link layer says it went to a group (Ethernet's I/G bit, the cooked
# packet type), the IP header does not.
SUBNET_BROADCAST = pk.eth(
    pk.ip4(pk.GUEST, '198.18.0.255', 17,
           struct.pack('!HHHH', 137, 137, 8 + 4, 0) + bytes(4), ip_id=77),
    0x0800, dst=pk.BCAST_MAC)


@st.composite
def wild_records(draw):
    """Probes, replies, hping3 traffic and noise, some VLAN or QinQ
    tagged, with µs timestamps (every format holds them exactly)."""
    kinds = draw(st.lists(st.integers(0, 5), min_size=1, max_size=50))
    noise = pk.noise() + [SUBNET_BROADCAST]
    frames, outgoing = [], []
    for n, kind in enumerate(kinds):
        if kind <= 2:
            proto = ('icmp', 'udp', 'tcp')[kind]
            f = pk.frame(proto, 4242, pk.ident(proto, n))
            if draw(st.booleans()):
                f = pk.reply(f)
        elif kind == 3:
            f = pk.hping_syn(2000 + n, draw(st.integers(0, 2 ** 32 - 1)),
                             n)
            if draw(st.booleans()):
                f = pk.reply(f)
        else:
            f = draw(st.sampled_from(noise))
        vids = draw(st.sampled_from([(), (), (100,), (7, 100)]))
        frames.append(tagged(f, *vids) if vids else f)
        outgoing.append(draw(st.booleans()))
    start = T0 - T0 % 1000
    gaps = draw(st.lists(st.integers(0, 5_000), min_size=len(frames),
                         max_size=len(frames)))
    times, t = [], start
    for g in gaps:
        t += g * 1000
        times.append(t)
    return frames, times, outgoing


@settings(max_examples=60, deadline=None)
@given(wild_records(), st.booleans())
def test_every_format_gives_the_same_rows(tmp_path_factory, records,
                                          fingerprint):
    frames, times, outgoing = records
    tmp = tmp_path_factory.mktemp('formats')
    kwargs = dict(fingerprint=True, dst_ip='198.18.0.10') if fingerprint \
        else {}
    seen = {}
    for name, write in FORMATS.items():
        path = _write(tmp / 'f', write(frames, times, outgoing))
        read = pcapfile.read_pcap(path, ifname='eth0', **kwargs)
        assert read.records == len(frames), name
        seen[name] = _keyed_rows(read)
    want = seen.pop('pcap ns')
    for name, got in seen.items():
        assert got == want, name


@pytest.mark.parametrize('fmt', ['sll', 'sll2', 'sll2 pcapng big-endian',
                                 'pcap ns'])
@pytest.mark.parametrize('vids', [(100,), (7, 100)])
def test_fingerprint_reads_vlan_frames_in_cooked_captures(fmt, vids,
                                                          tmp_path):
    """hping3 SYNs tagged on a VLAN, as tcpdump -i any writes them: the
    fingerprint analysis matches them all, VLAN reported."""
    n = 20
    syns = [tagged(pk.hping_syn(2911 + i, 1000 * i, i), *vids)
            for i in range(n)]
    rsts = [tagged(pk.reply(pk.hping_syn(2911 + i, 1000 * i, i)), *vids)
            for i in range(n)]
    base = T0 - T0 % 1000
    pif_frames, pif_times, pif_out = [], [], []
    vif_frames, vif_times, vif_out = [], [], []
    for i in range(n):
        t = base + i * 1_000_000
        pif_frames += [syns[i], rsts[i]]
        pif_times += [t, t + 30_000]
        pif_out += [False, True]
        vif_frames += [syns[i], rsts[i]]
        vif_times += [t + 8_000, t + 25_000]
        vif_out += [True, False]
    write = FORMATS[fmt]
    pif = _write(tmp_path / 'pif.pcap', write(pif_frames, pif_times,
                                              pif_out))
    vif = _write(tmp_path / 'vif.pcap', write(vif_frames, vif_times,
                                              vif_out))
    read = pcapfile.read_pcap(pif, fingerprint=True, dst_ip='198.18.0.10')
    assert read.probes == 2 * n
    result = offline.analyze_pcaps(pif, vif, destination='198.18.0.10')
    rep = result.report
    assert result.mode == 'fingerprint'
    assert rep.vlan == vids
    assert (rep.ingress.count, rep.ingress.min_us, rep.ingress.max_us) == \
        (n, 8.0, 8.0)
    assert (rep.egress.count, rep.egress.min_us) == (n, 5.0)


# --------------------------------------------------------------------------
# What one capture, or a capture without direction, cannot tell.

def _probe_pair(n=12):
    """Probe and reply frames with pif/vif times and directions."""
    pif, vif = pk.answered('icmp', [9_000] * n, 4_000, [3_000] * n)
    # On the pif probes come in and replies go out; on the tap the reverse.
    pif_out = [bool(pk.key_of(f)[1] & 1) for _, f in pif]
    vif_out = [not bool(pk.key_of(f)[1] & 1) for _, f in vif]
    return pif, pif_out, vif, vif_out


def _files(tmp_path, fmt):
    pif, pif_out, vif, vif_out = _probe_pair()
    write = FORMATS[fmt]
    return (_write(tmp_path / 'eth0.cap', write([f for _, f in pif],
                                                [t for t, _ in pif],
                                                pif_out)),
            _write(tmp_path / 'tap0.cap', write([f for _, f in vif],
                                                [t for t, _ in vif],
                                                vif_out)))


@pytest.mark.parametrize('fmt', ['pcap ns', 'sll', 'pcapng flags'])
@pytest.mark.parametrize('fingerprint', [False, True])
def test_one_capture_as_both_is_refused(fmt, fingerprint, tmp_path):
    _, vif = _files(tmp_path, fmt)
    copy = _write(tmp_path / 'copy.cap', vif.read_bytes())
    extra = ['--fingerprint', '-d', pk.GUEST] if fingerprint else []
    for other in (vif, copy):
        line = one_line(netweaver('analyze', *extra, vif, other))
        assert line == (
            f'netweaver analyze: {vif} and {other} are the same capture '
            '(the same packets at the same times): nothing in-host can be '
            'measured from one capture; give the one taken on the pif and '
            'the one taken on the vif')


@pytest.mark.parametrize('fmt, known', [('pcap ns', False), ('pcap us', False),
                                        ('sll', True), ('sll2', True),
                                        ('pcapng flags', True)])
def test_a_pif_capture_without_direction_says_so(fmt, known, tmp_path):
    pif, vif = _files(tmp_path, fmt)
    proc = netweaver('analyze', pif, vif)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert ('0 not received on the pif' in out) is known
    assert ('0 not seen on the pif' in out) is not known
    assert ("the pif's capture does not say which way" in out) is not known
    assert 'ingress                          12        0      9.0' in out
    data = json.loads(netweaver('analyze', '--json', pif, vif).stdout)
    assert data['pif']['directions_known'] is known
    assert data['report']['ingress']['count'] == 12


# --------------------------------------------------------------------------
# Turnaround in fingerprint mode.

def _icmp(kind, ident, seq, v6=False):
    """A ping (not ours: no tag) request or reply, to or from the guest."""
    if v6:
        body = struct.pack('!BBHHH', 128 if kind == 'request' else 129, 0,
                           0, ident, seq) + b'ping6 payload'
        src, dst = pk.SRC6, pk.GUEST6
        if kind == 'reply':
            src, dst = dst, src
        return pk.eth(pk.ip6(src, dst, 58, body), dpkt.ethernet.ETH_TYPE_IP6)
    body = struct.pack('!BBHHH', 8 if kind == 'request' else 0, 0, 0,
                       ident, seq) + b'ping payload'
    src, dst = '198.18.0.1', pk.GUEST
    if kind == 'reply':
        src, dst = dst, src
    ip_id = seq + 17 * (kind == 'reply')
    return pk.eth(pk.ip4(src, dst, 1, body, ip_id=ip_id),
                  dpkt.ethernet.ETH_TYPE_IP)


def _tcp(sport, dport, seq, ack, flags, from_guest, ip_id):
    src, dst = ('198.18.0.1', pk.GUEST)
    if from_guest:
        src, dst = dst, src
    head = struct.pack('!HHIIBBHHH', sport, dport, seq, ack, 0x50, flags,
                       512, 0, 0)
    return pk.eth(pk.ip4(src, dst, 6, head, ip_id=ip_id),
                  dpkt.ethernet.ETH_TYPE_IP)


SYN, RST, ACK = 0x02, 0x04, 0x10


def _exchanges(kind, n):
    """``[(request, answer)]``: requests to the guest and its answers."""
    out = []
    for i in range(n):
        if kind in ('ping', 'ping6'):
            out.append((_icmp('request', 77, i, kind == 'ping6'),
                        _icmp('reply', 77, i, kind == 'ping6')))
        else:
            seq = (0xfffffff0 + 1000 * i) & 0xffffffff    # wraps at 2**32
            answer = SYN | ACK if kind == 'synack' else RST | ACK
            out.append((_tcp(40000 + i, 80, seq, 0, SYN, False, i),
                        _tcp(80, 40000 + i, 555 + i, (seq + 1) & 0xffffffff,
                             answer, True, 900 + i)))
    return out


def _timeline(exchanges, ingress, turnaround, egress, outward=()):
    """pif and vif records; ``outward``: exchanges the guest started (its
    request leaves through the vif, then the pif; the answer comes back)."""
    pif, vif = [], []
    for i, (req, ans) in enumerate(exchanges):
        t = T0 + i * 1_000_000
        if i in outward:
            vif.append((t, req))
            pif.append((t + egress, req))
            pif.append((t + egress + turnaround, ans))
            vif.append((t + egress + turnaround + ingress, ans))
            continue
        pif.append((t, req))
        vif.append((t + ingress, req))
        vif.append((t + ingress + turnaround + i, ans))
        pif.append((t + ingress + turnaround + i + egress, ans))
    return sorted(pif), sorted(vif)


@pytest.mark.parametrize('kind', ['ping', 'ping6', 'synack', 'rst'])
def test_fingerprint_turnaround(kind, tmp_path):
    n = 12
    pif, vif = _timeline(_exchanges(kind, n), 7_000, 40_000, 2_000)
    dest = '2001:2::a' if kind == 'ping6' else pk.GUEST
    result = offline.analyze_pcaps(pk.write(tmp_path / 'p.pcap', pif),
                                   pk.write(tmp_path / 'v.pcap', vif),
                                   destination=dest, mode='fingerprint')
    rep = result.report
    assert result.mode == 'fingerprint'
    assert (rep.sent, rep.ingress.count, rep.ingress.min_us) == (n, n, 7.0)
    assert (rep.egress.count, rep.egress.max_us) == (n, 2.0)
    assert (rep.turnaround.count, rep.turnaround.min_us,
            rep.turnaround.max_us) == (n, 40.0, 40.0 + (n - 1) / 1000)
    assert rep.anomalies == 0
    # The pictures follow: egress from the replies' matcher too.
    for direction, stats in (('ingress', rep.ingress),
                             ('egress', rep.egress),
                             ('turnaround', rep.turnaround)):
        assert sum(rep.histogram(direction)) == stats.count == n


def test_fingerprint_turnaround_only_for_answers_to_the_request(tmp_path):
    """A RST acknowledging another number, UDP answers and a connection
    the guest opened give no turnaround (and no anomaly)."""
    exchanges = []
    for i in range(6):
        syn = _tcp(41000 + i, 22, 5000 * i, 0, SYN, False, i)
        wrong = _tcp(22, 41000 + i, 0, 5000 * i + 2, RST | ACK, True, 50 + i)
        exchanges.append((syn, wrong))
        out = _tcp(33000 + i, 443, 777 * i, 0, SYN, True, 70 + i)
        back = _tcp(443, 33000 + i, 99, 777 * i + 1, SYN | ACK, False, 90 + i)
        exchanges.append((out, back))
        udp = pk.eth(pk.ip4('198.18.0.1', pk.GUEST, 17, struct.pack(
            '!HHHH', 5353 + i, 9999, 8 + 3, 0) + b'abc', ip_id=30 + i),
            dpkt.ethernet.ETH_TYPE_IP)
        udp_ans = pk.eth(pk.ip4(pk.GUEST, '198.18.0.1', 17, struct.pack(
            '!HHHH', 9999, 5353 + i, 8 + 3, 0) + b'xyz', ip_id=40 + i),
            dpkt.ethernet.ETH_TYPE_IP)
        exchanges.append((udp, udp_ans))
    pif, vif = _timeline(exchanges, 5_000, 30_000, 1_000,
                         outward=range(1, len(exchanges), 3))
    rep = offline.analyze_pcaps(pk.write(tmp_path / 'p.pcap', pif),
                                pk.write(tmp_path / 'v.pcap', vif),
                                destination=pk.GUEST,
                                mode='fingerprint').report
    assert rep.turnaround.count == 0
    assert rep.anomalies == 0
    # Every packet is still measured on its own way.
    assert rep.ingress.count + rep.egress.count == len(exchanges) * 2
    assert sum(rep.histogram('egress')) == rep.egress.count > 0


# --------------------------------------------------------------------------
# The columnar prefilters of real traffic never rule out a key.

def _wild_frame(rnd):
    """Probes (maybe damaged, tunnelled, tagged) or everyday traffic."""
    pick = rnd.random()
    if pick < 0.4:
        return pk.damage(rnd, pk.make_frame(rnd))
    if pick < 0.55:
        return rnd.choice(pk.noise() + [SUBNET_BROADCAST])
    exchange = rnd.choice(_exchanges(rnd.choice(
        ['ping', 'ping6', 'synack', 'rst']), 3))
    frame = exchange[rnd.randrange(2)]
    if rnd.random() < 0.3:
        frame = tagged(frame, *rnd.choice([(5,), (7, 100)]))
    if rnd.random() < 0.3:
        frame = pk.damage(rnd, frame)
    return frame


@settings(max_examples=400, deadline=None)
@given(pk.randoms, st.sampled_from([1, 113, 276]),
       st.sampled_from([None, pk.GUEST, '2001:2::a', '198.18.0.1']))
def test_prefilters_never_rule_out_a_key(rnd, linktype, dst):
    link = pcapkeys.LINKS[linktype]
    dst_ip = None if dst is None else socket.inet_pton(
        socket.AF_INET6 if ':' in dst else socket.AF_INET, dst)
    same = rnd.random() < 0.3          # runs of one kind, as in real files
    first = _wild_frame(rnd)
    frames = [first if same and rnd.random() < 0.8 else _wild_frame(rnd)
              for _ in range(rnd.randrange(1, 40))]
    frames = [f for f in frames if len(f) >= 14]
    if linktype == 113:
        frames = [to_sll(f, rnd.random() < 0.5) for f in frames]
    elif linktype == 276:
        frames = [to_sll2(f, rnd.random() < 0.5) for f in frames]
    if not frames:
        return
    caplen = rnd.choice([len(f) for f in frames] + [rnd.randrange(1, 200)])
    frames = [(f + bytes(caplen))[:caplen] for f in frames]
    stride = caplen + rnd.randrange(0, 24)
    buf = b''.join(f + rnd.randbytes(stride - caplen) for f in frames)
    n = len(frames)
    maybe_probe = pcapkeys.probe_candidates(buf, 0, stride, n, caplen, link)
    maybe_print = pcapkeys.fingerprint_candidates(buf, 0, stride, n, caplen,
                                                  link, dst_ip)
    assert len(maybe_probe) == len(maybe_print) == n
    for i in range(n):
        off = i * stride
        if not maybe_probe[i]:
            assert pcapkeys.frame_key(buf, off, caplen, link) is None
        if not maybe_print[i]:
            assert pcapkeys.fingerprint_key(buf, off, caplen, link,
                                            dst_ip) is None


def test_prefilters_rule_out_everyday_traffic():
    """What they are for: TCP data and ACKs, ARP, DNS, IPv6 of other
    hosts, tagged or not, are ruled out without a per-record look."""
    data = pk.eth(pk.ip4('198.18.0.1', '198.18.0.20', 6, struct.pack(
        '!HHIIBBHHH', 40000, 443, 1, 1, 0x50, ACK | 0x08, 512, 0, 0) +
        bytes(100)), dpkt.ethernet.ETH_TYPE_IP)
    arp = pk.noise()[5]
    dns = pk.eth(pk.ip4('198.18.0.1', '198.18.0.53', 17, struct.pack(
        '!HHHH', 5353, 53, 8 + 20, 0) + bytes(20)), dpkt.ethernet.ETH_TYPE_IP)
    frames = [data, tagged(data, 5), arp, dns, tagged(dns, 9)]
    caplen = max(map(len, frames))
    buf = b''.join((f + bytes(caplen))[:caplen] for f in frames)
    n = len(frames)
    assert pcapkeys.probe_candidates(buf, 0, caplen, n, caplen) == bytes(n)
    guest = socket.inet_aton(pk.GUEST)
    assert pcapkeys.fingerprint_candidates(buf, 0, caplen, n, caplen,
                                           dst_ip=guest) == bytes(n)


# --------------------------------------------------------------------------
# The distribution: log2 µs buckets in JSON and as a picture.

def test_histogram_buckets_are_log2_microseconds():
    from netweaver_agent.core import latency
    edges = latency.HISTOGRAM_EDGES_US
    assert edges[0] == 0 and edges[1] == 1
    assert all(b == 2 * a for a, b in zip(edges[1:], edges[2:]))
    for k, edge in enumerate(edges):
        at = latency.log2_histogram([edge * 1000])
        assert at[k] == 1 and sum(at) == 1
        if k:
            below = latency.log2_histogram([edge * 1000 - 1])
            assert below[k - 1] == 1
    huge = latency.log2_histogram([10 ** 15])
    assert huge[-1] == 1
    assert sum(latency.log2_histogram([])) == 0


def test_bimodal_path_in_json_and_table(tmp_path):
    """30 probes through a fast path (5 µs), 10 through a slow one (2 ms):
    the table's picture and the JSON counts show both modes."""
    fast, slow = [5_000] * 30, [2_000_000] * 10
    pif, vif = pk.answered('icmp', fast + slow, 3_000, [1_500] * 40)
    p = pk.write(tmp_path / 'eth0.pcap', pif)
    v = pk.write(tmp_path / 'tap0.pcap', vif)
    data = json.loads(netweaver('analyze', '--json', p, v).stdout)
    rep = data['report']
    edges = rep['histogram_edges_us']
    counts = rep['ingress']['histogram']
    assert len(counts) == len(edges) and sum(counts) == 40
    lows = [edges[i] for i, c in enumerate(counts) if c]
    assert lows == [4, 1024]                   # [4, 8) and [1024, 2048)
    assert [c for c in counts if c] == [30, 10]
    assert sum(rep['turnaround']['histogram']) == 40
    assert [edges[i] for i, c in enumerate(rep['egress']['histogram'])
            if c] == [1]                        # 1.5 µs: [1, 2)
    out = netweaver('analyze', p, v).stdout
    line = next(x for x in out.splitlines()
                if x.startswith('    ingress'))
    # From the 4 µs bucket to the one ending at 2.048 ms: the two modes
    # and the empty buckets between them.
    assert line.split()[1:] == ['4', 'µs', '█' + '·' * 7 + '▃', '2.048',
                                'ms']


# --------------------------------------------------------------------------
# Blocks of mixed records: the same rows as record by record.

def _batch_rows(read):
    if read is None:
        return None
    b = read.batch
    # One encapsulation per key and interface, the first met: the same
    # packet tagged two ways (as these files have it) keeps either.
    return (read.records, read.foreign, read.invalid_times,
            sorted(zip(b.keys, b.t_ns, b.direction, b.ifindex)),
            sorted((k, i, e.vni, e.tunnel) for (k, i), e in b.encap.items()))


def _assert_blocks_read_as_record_by_record(path, dst, **read_kw):
    """Probe, auto and fingerprint mode read ``path`` in blocks (runs,
    prefilters) give the rows of reading every record on its own."""
    modes = [dict(), dict(fingerprint=True, dst_ip=dst),
             dict(probes=False, fingerprint=True, dst_ip=dst)]

    def read_all():
        out = []
        for kw in modes:
            cap = pcapfile.read_capture(path, ifname='x',
                                        tcp_ports=range(1, 40000),
                                        **read_kw, **kw)
            out.append((_batch_rows(cap.probes()),
                        _batch_rows(cap.fingerprints())))
        return out

    blocks = read_all()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pcaprows, 'MAX_BLOCK', pcaprows.BACKOFF)
        patch.setattr(pcaprows, 'PREFIX', None)         # never used
        assert blocks == read_all()


@settings(max_examples=40, deadline=None)
@given(pk.randoms, st.sampled_from([1, 113, 276]), st.booleans(),
       st.sampled_from(['<', '>']))
def test_mixed_blocks_read_as_record_by_record(tmp_path_factory, rnd,
                                               linktype, nano, order):
    """Hundreds of records of every kind and length (probes, damaged
    frames, tunnels, QinQ, pings, handshakes, noise, some cut short by the
    snapshot length) and a few out-of-range timestamps: the blocks the
    prefilters read give exactly the rows, counts and encapsulations of
    reading every record on its own, in probe, auto and fingerprint
    mode."""
    frames = [_wild_frame(rnd) for _ in range(rnd.randrange(65, 400))]
    frames = [f for f in frames if len(f) >= 14]
    if linktype == 113:
        frames = [to_sll(f, rnd.random() < 0.5) for f in frames]
    elif linktype == 276:
        frames = [to_sll2(f, rnd.random() < 0.5) for f in frames]
    unit = 10 ** 9 if nano else 10 ** 6
    records = []
    for i, f in enumerate(frames):
        frac = rnd.randrange(unit)
        if rnd.random() < 0.01:
            frac = unit + rnd.randrange(1 << 20)
        if rnd.random() < 0.05:
            f = f[:rnd.randrange(len(f) + 1)]
        records.append((SEC + i, frac, f))
    path = _write(tmp_path_factory.mktemp('mixed') / 'm.pcap',
                  pcap(records, order, nano, linktype=linktype))
    _assert_blocks_read_as_record_by_record(
        path, rnd.choice([pk.GUEST, '2001:2::a']), lenient=True)


# --------------------------------------------------------------------------
# Fingerprints in columns and pcapng blocks of mixed lengths: the same as
# record by record.

_PEERS = ['198.18.0.20', '198.18.0.21', '198.18.1.7']
_PEERS6 = [socket.inet_pton(socket.AF_INET6, '2001:2::%x' % i)
           for i in (0x20, 0x21)]


def _everyday(rnd):
    """One frame of a pif's everyday traffic, to, from or past the guest:
    TCP of any flags (options or not), UDP (DHCP and tunnel ports too),
    ICMP of any type and code, IPv6 of each kind, to groups and broadcast,
    fragments, untagged, tagged or QinQ, some cut short."""
    ours = rnd.random() < 0.6
    v6 = rnd.random() < 0.35
    if v6:
        a, b = rnd.choice(_PEERS6), (pk.GUEST6 if ours else
                                     rnd.choice(_PEERS6))
        if rnd.random() < 0.05:
            b = socket.inet_pton(socket.AF_INET6, 'ff02::1')
    else:
        a, b = rnd.choice(_PEERS), (pk.GUEST if ours else
                                    rnd.choice(_PEERS))
        if rnd.random() < 0.05:
            b = rnd.choice(['255.255.255.255', '224.0.0.5'])
    if rnd.random() < 0.5:
        a, b = b, a
    proto = rnd.choice([6, 6, 17, 1, 58 if v6 else 1, 2])
    ports = rnd.choice([(40000, 443), (68, 67), (5000, 4789),
                        (rnd.randrange(65536), rnd.randrange(65536))])
    if proto == 6:
        l4 = struct.pack('!HHIIBBHHH', *ports, rnd.randrange(1 << 32),
                         rnd.randrange(1 << 32), rnd.choice([0x50, 0x80]),
                         rnd.choice([SYN, SYN | ACK, RST | ACK, ACK, 0x18,
                                     RST, rnd.randrange(256)]), 502, 0, 0)
    elif proto == 17:
        l4 = struct.pack('!HHHH', *ports, 8 + 30, rnd.randrange(65536))
    else:
        l4 = struct.pack('!BBHHH', rnd.choice([0, 8, 128, 129, 3, 11, 5]),
                         rnd.choice([0, 0, 1]), 0, 77, rnd.randrange(9))
    l4 += rnd.randbytes(rnd.randrange(0, 120))
    if v6:
        frame = pk.eth(pk.ip6(a, b, proto, l4), 0x86dd)
    else:
        frame = pk.eth(pk.ip4(a, b, proto, l4, ip_id=rnd.randrange(65536)),
                       dpkt.ethernet.ETH_TYPE_IP)
        if rnd.random() < 0.05:                   # a later fragment
            frame = frame[:20] + b'\x00\x10' + frame[22:]
        elif rnd.random() < 0.05:                 # total length too short
            frame = frame[:16] + b'\x00\x14' + frame[18:]
    if rnd.random() < 0.1:
        frame = pk.damage(rnd, frame)
    if rnd.random() < 0.1:
        frame = pk.BCAST_MAC + frame[6:]
    vids = rnd.choice([(), (), (), (100,), (4095,), (7, 100)])
    return tagged(frame, *vids) if vids else frame


@settings(max_examples=150, deadline=None)
@given(pk.randoms, st.sampled_from([1, 113, 276]),
       st.sampled_from([None, pk.GUEST, '2001:2::a', '198.18.0.1']))
def test_fingerprints_in_columns_equal_fingerprint_key(rnd, linktype, dst):
    """fingerprint_plain decides a record only as fingerprint_key would:
    the same key (reply bit included), the same VLAN, or no key."""
    link = pcapkeys.LINKS[linktype]
    dst_ip = None if dst is None else socket.inet_pton(
        socket.AF_INET6 if ':' in dst else socket.AF_INET, dst)
    frames = [_everyday(rnd) for _ in range(rnd.randrange(1, 120))]
    frames = [f for f in frames if len(f) >= 14]
    if linktype == 113:
        frames = [to_sll(f, rnd.random() < 0.5) for f in frames]
    elif linktype == 276:
        frames = [to_sll2(f, rnd.random() < 0.5) for f in frames]
    if not frames:
        return
    head, prefix = rnd.choice([(16, 80), (28, 80), (0, 120)])
    caps = [min(len(f), rnd.choice([len(f), rnd.randrange(1, 90)]))
            for f in frames]
    size = head + prefix
    packed = b''.join((rnd.randbytes(head) + f[:c] + rnd.randbytes(size))
                      [:size] for f, c in zip(frames, caps))
    n = len(frames)

    def short(need):
        return int.from_bytes(bytes(c < need for c in caps), 'little')

    want = bytes(rnd.random() < 0.9 for _ in range(n))
    decided, parts = pcapkeys.fingerprint_plain(packed, head, size, n, link,
                                                dst_ip, short, want)
    got = {}
    for keyed, keys, encaps in parts:
        rows = [i for i in range(n) if keyed[i]]
        assert len(rows) == len(keys)
        for j, (i, key) in enumerate(zip(rows, keys)):
            assert i not in got
            got[i] = (key, encaps[j].vlan if encaps else ())
    for i in range(n):
        if not decided[i]:
            assert i not in got
            continue
        assert want[i]
        frame = frames[i][:caps[i]]
        found = pcapkeys.fingerprint_key(frame, 0, len(frame), link, dst_ip)
        if found is None:
            assert i not in got, i
        else:
            encap = found[2] if len(found) > 2 else probe.NO_ENCAP
            assert got[i] == (found[1], encap.vlan), i
            assert encap.vni is None


def test_fingerprints_in_columns_decide_everyday_traffic():
    """What they are for: plain TCP/UDP/ICMP, IPv4 and IPv6, tagged or
    not, to or from the guest, are keyed in columns, not one by one."""
    guest = socket.inet_aton(pk.GUEST)
    tcp = struct.pack('!HHIIBBHHH', 40000, 443, 1, 1, 0x50, ACK | 0x08,
                      512, 0, 0) + bytes(60)
    frames = [pk.eth(pk.ip4(pk.GUEST, '198.18.0.20', 6, tcp), 0x0800),
              pk.eth(pk.ip6(_PEERS6[0], pk.GUEST6, 6, tcp), 0x86dd)]
    frames += [tagged(f, 5) for f in frames]
    size = max(map(len, frames))
    packed = b''.join(f.ljust(size, b'\0') for f in frames)
    n = len(frames)
    lengths = [len(f) for f in frames]
    decided, parts = pcapkeys.fingerprint_plain(
        packed, 0, size, n, pcapkeys.ETHERNET, guest,
        lambda need: int.from_bytes(bytes(c < need for c in lengths),
                                    'little'), b'\x01' * n)
    assert decided == b'\x01' * 4
    keyed = [i for keyed, _, _ in parts for i in range(n) if keyed[i]]
    assert sorted(keyed) == [0, 2]          # the IPv6 ones: not the guest


@settings(max_examples=30, deadline=None)
@given(pk.randoms, st.sampled_from([1, 113, 276]), st.sampled_from('<>'),
       st.sampled_from([6, 9]), st.booleans())
def test_pcapng_blocks_read_as_record_by_record(tmp_path_factory, rnd,
                                                linktype, order, tsresol,
                                                with_flags):
    """pcapng files of everyday traffic, probes and damaged frames (enough
    for blocks of mixed lengths): the same rows, counts, directions and
    encapsulations as reading every block on its own, in probe, auto and
    fingerprint mode."""
    frames = [_everyday(rnd) if rnd.random() < 0.6 else _wild_frame(rnd)
              for _ in range(rnd.randrange(130, 500))]
    frames = [f for f in frames if len(f) >= 14]
    if linktype == 113:
        frames = [to_sll(f, rnd.random() < 0.5) for f in frames]
    elif linktype == 276:
        frames = [to_sll2(f, rnd.random() < 0.5) for f in frames]
    times = [T0 - T0 % 1000 + 1000 * rnd.randrange(10 ** 6) for _ in frames]
    flags = [rnd.choice([0, 1, 2]) for _ in frames] if with_flags else None
    path = _write(tmp_path_factory.mktemp('ng') / 'm.pcapng',
                  pcapng(frames, times, order, tsresol, linktype, flags))
    _assert_blocks_read_as_record_by_record(
        path, rnd.choice([pk.GUEST, '2001:2::a']))


@pytest.mark.parametrize('tunnel_first', [True, False])
@pytest.mark.parametrize('fmt', ['pcap ns', 'pcapng'])
def test_packet_tunnelled_and_tagged_reports_its_vni(tunnel_first, fmt,
                                                     tmp_path):
    """The same packet to the guest seen in a Geneve tunnel and under a
    VLAN tag, among enough everyday traffic for blocks read in columns:
    its row reports the VNI whichever comes first, in blocks or one by
    one."""
    rnd = random.Random(7)
    tcp = struct.pack('!HHIIBBHHH', 40000, 443, 1, 1, 0x50, ACK | 0x08,
                      512, 0, 0) + bytes(60)
    inner = pk.eth(pk.ip4('198.18.0.20', pk.GUEST, 6, tcp, ip_id=4321),
                   dpkt.ethernet.ETH_TYPE_IP)
    pair = [pk.geneve(inner, 0x123456), tagged(inner, 100)]
    if not tunnel_first:
        pair.reverse()
    frames = [_everyday(rnd) for _ in range(300)]
    frames[150:150] = pair
    times = [T0 - T0 % 1000 + 1000 * i for i in range(len(frames))]
    path = _write(tmp_path / 'm', FORMATS[fmt](frames, times,
                                               [False] * len(frames)))

    def vnis():
        read = pcapfile.read_pcap(path, ifname='x', fingerprint=True,
                                  dst_ip=pk.GUEST)
        return {e.vni for e in read.batch.encap.values()} - {None}

    assert vnis() == {0x123456}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pcaprows, 'MAX_BLOCK', pcaprows.BACKOFF)
        assert vnis() == {0x123456}


@pytest.mark.parametrize('order', [((7, 100), (100,)), ((100,), (7, 100))])
def test_one_key_tagged_two_ways_reads_the_same_in_every_format(
        tmp_path, order):
    # The same probe twice at the same time, under two tag stacks: which
    # encapsulation a row reports must not depend on how the format is
    # read (pcapng blocks are keyed in columns, not in file order).
    f = pk.frame('icmp', 4242, pk.ident('icmp', 1))
    frames = [tagged(f, *vids) for vids in order]
    times = [T0 - T0 % 1000] * 2
    seen = {}
    for name, write in FORMATS.items():
        read = pcapfile.read_pcap(_write(tmp_path / 'f',
                                         write(frames, times, [False] * 2)),
                                  ifname='eth0')
        seen[name] = _keyed_rows(read)
    want = seen.pop('pcap ns')
    assert want and all(row[2].vlan == (100,) for row in want), want
    for name, got in seen.items():
        assert got == want, name
