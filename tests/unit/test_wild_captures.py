"""Captures from the wild: read right, or refused in one line saying why.

Every file here is written by the test: invalid versions, timestamp
fields out of range, link types netweaver does not read, cut headers,
cooked (SLL, SLL2) captures with VLAN tags, and the same records in every
format tcpdump writes (pcap µs/ns, either byte order, pcapng, SLL, SLL2),
which must give the same rows.
"""

import socket
import struct
import subprocess
import sys

import pytest

from netweaver_agent import analyze
from netweaver_agent import pcapfile
from tests.unit import test_pcapfile as tpf
from tests.unit import test_probe as tp

T0 = tpf.T0
SEC = 1_763_900_000


def pcap(records, order='<', nano=False, version=(2, 4), linktype=1):
    """A classic pcap from ``[(sec, frac, frame)]`` (fields as written)."""
    magic = pcapfile.PCAP_MAGIC_NS if nano else pcapfile.PCAP_MAGIC_US
    out = [struct.pack(order + 'IHHiIII', magic, *version, 0, 0, 65535,
                       linktype)]
    for sec, frac, frame in records:
        out.append(struct.pack(order + 'IIII', sec, frac, len(frame),
                               len(frame)) + frame)
    return b''.join(out)


def shb(order='<', version=(1, 0)):
    return struct.pack(order + 'IIIHHq', pcapfile.PCAPNG_SHB, 28,
                       pcapfile.PCAPNG_BOM, *version, -1) + \
        struct.pack(order + 'I', 28)


def netweaver(*argv, **kwargs):
    return subprocess.run([sys.executable, '-m', 'netweaver_agent.cli',
                           *map(str, argv)], capture_output=True, text=True,
                          timeout=60, **kwargs)


def one_line(proc):
    """The single stderr line of a failed command."""
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    return lines[0]


# --------------------------------------------------------------------------
# Version fields.

@pytest.mark.parametrize('version', [(2, 2), (2, 5), (1, 4), (3, 4),
                                     (0, 0), (543, 0)])
@pytest.mark.parametrize('order', ['<', '>'])
def test_pcap_versions_tcpdump_refuses_are_refused(version, order, tmp_path):
    path = tmp_path / 'v.pcap'
    path.write_bytes(pcap([(SEC, 1, tpf.probes('icmp', 1)[0])], order,
                          version=version))
    with pytest.raises(pcapfile.PcapError) as err:
        pcapfile.read_pcap(path)
    assert str(err.value).startswith(f'{path}: pcap version '
                                     f'{version[0]}.{version[1]} ')


@pytest.mark.parametrize('version', [(2, 3), (2, 4)])
def test_pcap_versions_read(version, tmp_path):
    path = tmp_path / 'v.pcap'
    path.write_bytes(pcap([(SEC, 1, f) for f in tpf.probes('icmp', 3)],
                          version=version))
    assert pcapfile.read_pcap(path).probes == 3


@pytest.mark.parametrize('version', [(2, 0), (1, 1), (0, 0), (1, 3)])
@pytest.mark.parametrize('second', [False, True])
def test_pcapng_section_versions_refused(version, second, tmp_path):
    f = tpf.probes('icmp', 1)[0]
    good = shb() + tpf._idb('<', 'eth0') + tpf._epb('<', 0, 5, f)
    bad = shb(version=version) + tpf._idb('<', 'eth0') + \
        tpf._epb('<', 0, 6, f)
    path = tmp_path / 'v.pcapng'
    path.write_bytes(good + bad if second else bad)
    with pytest.raises(pcapfile.PcapError) as err:
        pcapfile.read_pcap(path)
    at = len(good) if second else 0
    assert str(err.value).startswith(
        f'{path}: pcapng section version {version[0]}.{version[1]} (at '
        f'byte {at}) ')


@pytest.mark.parametrize('version', [(1, 0), (1, 2)])
def test_pcapng_section_versions_read(version, tmp_path):
    path = tmp_path / 'v.pcapng'
    path.write_bytes(shb(version=version) + tpf._idb('<', 'eth0') + b''.join(
        tpf._epb('<', 0, 5 + i, f)
        for i, f in enumerate(tpf.probes('udp', 4))))
    assert pcapfile.read_pcap(path).probes == 4


def test_cli_version_refusal_is_one_line(tmp_path):
    bad = tmp_path / 'pif.pcap'
    bad.write_bytes(pcap([(SEC, 1, tpf.probes('icmp', 1)[0])],
                         version=(2, 1)))
    good = tmp_path / 'vif.pcap'
    good.write_bytes(pcap([(SEC, 2, tpf.probes('icmp', 1)[0])]))
    line = one_line(netweaver('analyze', bad, good))
    assert line.startswith(f'netweaver analyze: {bad}: pcap version 2.1 ')


# --------------------------------------------------------------------------
# Timestamp fields out of range.

def _records(n, bad, nano, length_of=lambda i: 0):
    """``n`` probe records one ms apart; ``bad``: {index: fraction}."""
    unit = 10 ** 9 if nano else 10 ** 6
    out = []
    for i, f in enumerate(tpf.probes('icmp', n)):
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
    with pytest.raises(pcapfile.PcapError) as err:
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
    assert tpf.rows(read) == tpf.rows(good)
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
        [(SEC, 1, tpf.probes('icmp', 1)[0][14:])], linktype=linktype))
    with pytest.raises(pcapfile.PcapError) as err:
        pcapfile.read_pcap(path)
    named = f' ({name})' if name else ''
    assert str(err.value).startswith(
        f'{path}: link type {linktype}{named} is not read by netweaver')
    assert 'Ethernet (1)' in str(err.value)


def test_pcapng_link_types(tmp_path):
    f = tpf.probes('icmp', 1)[0]
    only_radio = shb() + tpf._idb('<', 'wlan0', linktype=127) + \
        tpf._epb('<', 0, 5, f)
    path = _write(tmp_path / 'r.pcapng', only_radio)
    with pytest.raises(pcapfile.PcapError) as err:
        pcapfile.read_pcap(path)
    assert str(err.value).startswith(
        f"{path}: every packet's link type 127 (802.11 radiotap) is not "
        'read by netweaver')
    # Next to an Ethernet interface, the other link type is only counted.
    mixed = shb() + tpf._idb('<', 'wlan0', linktype=127) + \
        tpf._idb('<', 'eth0') + tpf._epb('<', 0, 5, f) + \
        tpf._epb('<', 1, 6, f)
    read = pcapfile.read_pcap(_write(tmp_path / 'm.pcapng', mixed))
    assert (read.records, read.probes, read.foreign) == (2, 1, 1)


@pytest.mark.parametrize('data, message', [
    (b'\xd4\xc3\xb2\xa1\x02\x00', 'truncated pcap file header'),
    (b'\x0a\x0d\x0d\x0a\x1c\x00\x00\x00', 'truncated pcapng section header'),
    (shb()[:27], 'truncated pcapng section header'),
    (struct.pack('<IIIHHq', pcapfile.PCAPNG_SHB, 64, pcapfile.PCAPNG_BOM,
                 1, 0, -1) + bytes(8), 'truncated pcapng section header'),
])
def test_truncated_headers(data, message, tmp_path):
    path = _write(tmp_path / 'c.pcap', data)
    with pytest.raises(pcapfile.PcapError) as err:
        pcapfile.read_pcap(path)
    assert str(err.value).startswith(f'{path}: {message}')


# --------------------------------------------------------------------------
# One read per file.

def test_auto_mode_reads_each_file_once(tmp_path, monkeypatch):
    """Foreign traffic in auto mode: probes looked for, then fingerprints,
    from one read of each file (a pipe can be read only once)."""
    syns = [tpf._hping_syn(2911 + i, 36550021 * (i + 1) & 0xffffffff, i)
            for i in range(10)]
    pif = tpf.write_pcap(tmp_path / 'p.pcap', syns,
                         [T0 + i * 1000 for i in range(10)])
    vif = tpf.write_pcap(tmp_path / 'v.pcap', syns,
                         [T0 + i * 1000 + 7000 for i in range(10)])
    opened = []
    real = pcapfile._open

    def counting(path):
        opened.append(path)
        return real(path)
    monkeypatch.setattr(pcapfile, '_open', counting)
    result = analyze.analyze_pcaps(pif, vif,
                                   destination=socket.inet_ntoa(tp.DST))
    assert result.mode == 'fingerprint'
    assert result.report.ingress.count == 10
    assert result.report.ingress.min_us == 7.0
    assert sorted(opened) == sorted([pif, vif])


def test_probe_mode_session_from_the_vif_file_reads_once(tmp_path,
                                                         monkeypatch):
    fwd = tpf.probes('icmp', 5, session=77)
    pif = tpf.write_pcap(tmp_path / 'p.pcap', [], [])
    vif = tpf.write_pcap(tmp_path / 'v.pcap', fwd,
                         [T0 + i for i in range(5)])
    opened = []
    real = pcapfile._open
    monkeypatch.setattr(pcapfile, '_open',
                        lambda path: opened.append(path) or real(path))
    # The vif's session is found without reading the pif again.
    result = analyze.analyze_pcaps(pif, vif)
    assert (result.session, result.report.unseen_at_pif) == (77, 5)
    assert len(opened) == 2
