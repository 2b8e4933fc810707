"""Old classic pcap versions, read as the real tcpdump (libpcap) reads them.

Before version 2.3 a pcap record header held the frame's length on the
wire before its captured length; some 2.3 files have that order too, so
libpcap swaps a 2.3 record's lengths when the first is the larger, and
DG/UX tcpdump wrote 543.0 in the old order.  The test writes the same
probe records (some cut short, so the two lengths differ) as such files,
lets the real tcpdump count them (``--count``), print them and rewrite
them as 2.4 (``-w``), and checks that ``netweaver analyze`` gives the
same report on the old file as on tcpdump's rewrite.  Files only: no
namespace, no traffic.
"""

import json
import shutil
import struct
import subprocess

import pytest

from tests import packets as pk
from tests.command import netweaver

# (version, wire length written first): how each old file is laid out.
LAYOUTS = [((2, 0), True), ((2, 2), True), ((2, 3), True),
           ((2, 3), False), ((543, 0), True)]
FORMATS = [('<', True), ('>', False)]         # (byte order, nanoseconds)
CUT = 60                    # some frames cut to this many bytes


def _records(records, nano):
    """``[(t_ns, frame)]`` as pcap records, every third frame cut short
    (its wire length kept)."""
    unit = 1 if nano else 1000
    out = []
    for i, (t, f) in enumerate(records):
        cut = f[:CUT] if i % 3 == 0 else f
        out.append((t // 10 ** 9, t % 10 ** 9 // unit, cut, len(f)))
    return out


def _tcpdump(*argv):
    tcpdump = shutil.which('tcpdump')
    assert tcpdump, 'tcpdump is not installed (tools/bootstrap.sh)'
    proc = subprocess.run([tcpdump, *argv], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _analyze(pif, vif):
    """``netweaver analyze --json`` on two files, their paths left out."""
    proc = netweaver('analyze', '--json', pif, vif)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for role, path in (('pif', pif), ('vif', vif)):
        assert report[role].pop('path') == str(path)
    return report


@pytest.mark.parametrize('order,nano', FORMATS)
@pytest.mark.parametrize('version,old_order', LAYOUTS)
def test_old_versions_read_as_tcpdump_reads_them(version, old_order, order,
                                                 nano, tmp_path):
    n = 120
    pif, vif = pk.answered('icmp', [9_000 + 700 * (i % 11) for i in range(n)],
                           3_000, [2_000 + 300 * (i % 5) for i in range(n)],
                           lose={7, 50})
    precision = ['--time-stamp-precision=nano'] if nano else []
    reports = {}
    for name, written in (('old', dict(version=version, swapped=old_order)),
                          ('new', {})):
        d = tmp_path / name
        d.mkdir()
        for role, records in (('eth0', pif), ('tap0', vif)):
            (d / f'{role}.pcap').write_bytes(pk.pcap(
                _records(records, nano), order, nano, **written))
        reports[name] = _analyze(d / 'eth0.pcap', d / 'tap0.pcap')
    rewritten = tmp_path / 'rewritten'
    rewritten.mkdir()
    for role, records in (('eth0', pif), ('tap0', vif)):
        old = tmp_path / 'old' / f'{role}.pcap'
        new = tmp_path / 'new' / f'{role}.pcap'
        # tcpdump reads every record of the old file, as it reads 2.4's.
        counted = _tcpdump('-nn', '-r', old, '--count')
        assert counted.split()[0] == str(len(records)), counted
        assert _tcpdump('-nn', *precision, '-r', old) == \
            _tcpdump('-nn', *precision, '-r', new)
        out = rewritten / f'{role}.pcap'
        _tcpdump(*precision, '-r', old, '-w', out, '-Z', 'root')
        major, minor = struct.unpack_from('<HH', out.read_bytes(), 4)
        assert (major, minor) == (2, 4)         # tcpdump writes 2.4
    reports['rewritten'] = _analyze(rewritten / 'eth0.pcap',
                                    rewritten / 'tap0.pcap')
    assert reports['rewritten']['report']['ingress']['count'] == n - 2
    assert reports['old'] == reports['rewritten']
    assert reports['new'] == reports['rewritten']
