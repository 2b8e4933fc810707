"""The ``netweaver`` command on real standard streams, and on what the
real tcpdump writes.

Real pipes (the read end closed before the command starts, as ``| head
-c0`` ends up), ``/dev/full``, a fifo, bash process substitution, standard
input and a pseudo-terminal for the progress line: a closed output ends
silently with 141, a full one says so in one line with 1, and every kind
of input is read as a file is (captures written by the test).  Then real
traffic in the namespace lab (pings and SYNs to a closed port, not probes
of ours) captured by tcpdump as Ethernet pcaps and as Linux cooked v2
(``-i any``, one file per interface by ifindex): fingerprint mode
measures all three directions from either, and says what a format
without direction cannot tell.  Needs root for the lab; fails (never
skips) without it.
"""

import json
import os
import subprocess
import sys
import threading

import pytest

from netweaver_agent.cli import offline
from tests import packets as pk

SIGPIPE_STATUS = 141


def _captures(tmp_path, n=40):
    pif, vif = pk.answered('icmp', [10_000 + 1_000 * (i % 7)
                                    for i in range(n)], 3_000, [2_000] * n)
    return (pk.write(tmp_path / 'eth0.pcap', pif),
            pk.write(tmp_path / 'tap0.pcap', vif))


def _env(buffered):
    """The environment with Python's stdout buffered (the default) or not
    (PYTHONUNBUFFERED: every print is a write of its own)."""
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONUNBUFFERED'}
    if not buffered:
        env['PYTHONUNBUFFERED'] = '1'
    return env


def _command(*argv):
    return [sys.executable, '-m', 'netweaver_agent.cli.main', *map(str, argv)]


def _expected(pif, vif):
    """What the command prints on the files themselves."""
    proc = subprocess.run(_command('analyze', '--json', pif, vif),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _same_report(got, want):
    """The same report but for the interface names (from file names)."""
    def unnamed(rep):
        return {k: v for k, v in rep.items() if k not in ('vnic', 'pif')}
    assert unnamed(got['report']) == unnamed(want['report'])
    assert got['summary'] == want['summary']
    assert got['report']['ingress']['count'] == want['pif']['matched'] // 2
    for role in ('pif', 'vif'):
        assert {k: v for k, v in got[role].items() if k != 'path'} == \
            {k: v for k, v in want[role].items() if k != 'path'}


@pytest.mark.parametrize('argv', [
    ('analyze', '--json', '{pif}', '{vif}'),
    ('analyze', '{pif}', '{vif}'),
    ('--help',),
    ('analyze', '--help'),
])
@pytest.mark.parametrize('buffered', [True, False])
def test_closed_stdout_ends_silently_with_141(argv, buffered, tmp_path):
    pif, vif = _captures(tmp_path)
    argv = [a.format(pif=pif, vif=vif) for a in argv]
    read_end, write_end = os.pipe()
    os.close(read_end)          # nobody will ever read: EPIPE on write
    try:
        proc = subprocess.run(_command(*argv), stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env=_env(buffered))
    finally:
        os.close(write_end)
    assert proc.returncode == SIGPIPE_STATUS
    assert proc.stderr == ''


def test_head_c0_in_a_real_shell_pipeline(tmp_path):
    pif, vif = _captures(tmp_path)
    script = ('"$@" | head -c0; echo "${PIPESTATUS[0]}"')
    proc = subprocess.run(['bash', '-c', script, 'bash',
                           *_command('analyze', '--json', pif, vif)],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == str(SIGPIPE_STATUS)
    assert 'Traceback' not in proc.stderr and 'Error' not in proc.stderr


@pytest.mark.parametrize('argv', [
    ('analyze', '--json', '{pif}', '{vif}'),
    ('analyze', '{pif}', '{vif}'),
    ('--help',),
])
@pytest.mark.parametrize('buffered', [True, False])
def test_full_stdout_is_one_line_and_status_1(argv, buffered, tmp_path):
    pif, vif = _captures(tmp_path)
    argv = [a.format(pif=pif, vif=vif) for a in argv]
    with open('/dev/full', 'w') as full:
        proc = subprocess.run(_command(*argv), stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env=_env(buffered))
    assert proc.returncode == 1
    assert proc.stderr == ('netweaver: writing output: No space left on '
                           'device\n')


def test_standard_input_as_either_capture(tmp_path):
    pif, vif = _captures(tmp_path)
    want = _expected(pif, vif)
    for argv, feed in ((('-', vif), pif), ((pif, '-'), vif)):
        with open(feed, 'rb') as f:
            proc = subprocess.run(_command('analyze', '--json', *argv),
                                  stdin=f, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        _same_report(json.loads(proc.stdout), want)


def test_both_captures_from_standard_input_is_refused(tmp_path):
    pif, _ = _captures(tmp_path)
    with open(pif, 'rb') as f:
        proc = subprocess.run(_command('analyze', '-', '-'), stdin=f,
                              capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and 'standard input' in lines[0], proc.stderr


def test_process_substitution(tmp_path):
    pif, vif = _captures(tmp_path)
    want = _expected(pif, vif)
    script = '"$@" --json <(cat "$P") <(cat "$V")'
    proc = subprocess.run(['bash', '-c', script, 'bash',
                           *_command('analyze')],
                          env={**os.environ, 'P': pif, 'V': vif},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    _same_report(got, want)
    assert got['pif']['path'].startswith('/dev/fd/')


def test_fifos(tmp_path):
    pif, vif = _captures(tmp_path)
    want = _expected(pif, vif)
    fifos = [tmp_path / 'pif.fifo', tmp_path / 'vif.fifo']
    for fifo in fifos:
        os.mkfifo(fifo)

    def feed(src, fifo):
        with open(src, 'rb') as s, open(fifo, 'wb') as d:
            d.write(s.read())

    writers = [threading.Thread(target=feed, args=pair, daemon=True)
               for pair in zip((pif, vif), fifos)]
    for w in writers:
        w.start()
    proc = subprocess.run(_command('analyze', '--json', *fifos),
                          capture_output=True, text=True, timeout=60)
    for w in writers:
        w.join(timeout=10)
    assert proc.returncode == 0, proc.stderr
    _same_report(json.loads(proc.stdout), want)


def test_empty_pipe_is_one_clear_line(tmp_path):
    _, vif = _captures(tmp_path)
    proc = subprocess.run(_command('analyze', '-', vif),
                          stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == 'netweaver analyze: -: empty file (no pcap ' \
        'header)\n'


_WITH_SECONDS = ('import sys\n'
                 'from netweaver_agent.cli import main\n'
                 'from netweaver_agent.core import pcaprows\n'
                 'pcaprows.PROGRESS_EVERY_S = float(sys.argv[1])\n'
                 'sys.exit(main.main(sys.argv[2:]))\n')


def _progress_run(tmp_path, stderr_tty, seconds=0.0):
    """The command with a progress interval of ``seconds``, stderr on a
    real pseudo-terminal or a pipe; ``(status, stdout, stderr)``."""
    # Probes of many lengths: the reader goes through the file in many
    # steps (a file of equal records is one step: no time to report).
    pif, vif = [], []
    for seq in range(3000):
        f = pk.frame('icmp', 4242, seq, size=20 + seq % 50)
        pif.append((pk.T0 + seq * 1000, f))
        vif.append((pk.T0 + seq * 1000 + 9000, f))
    pif = pk.write(tmp_path / 'eth0.pcap', pif)
    vif = pk.write(tmp_path / 'tap0.pcap', vif)
    argv = [sys.executable, '-c', _WITH_SECONDS, str(seconds), 'analyze',
            pif, vif]
    if not stderr_tty:
        proc = subprocess.run(argv, capture_output=True, text=True,
                              timeout=60)
        return proc.returncode, proc.stdout, proc.stderr
    master, slave = os.openpty()
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=slave,
                              text=True, timeout=60)
        os.close(slave)
        slave = None
        err = b''
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:         # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            err += chunk
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    return proc.returncode, proc.stdout, err.decode()


def test_progress_line_on_a_terminal(tmp_path):
    status, out, err = _progress_run(tmp_path, stderr_tty=True)
    assert status == 0
    assert '\rnetweaver analyze: reading eth0.pcap: ' in err
    assert '% (0 of 0 MiB)' in err
    assert err.endswith('\r\x1b[K')         # the line is wiped at the end
    assert 'eth0 → tap0 (probe mode' in out and '\r' not in out


def test_no_progress_line_when_stderr_is_no_terminal(tmp_path):
    status, out, err = _progress_run(tmp_path, stderr_tty=False)
    assert status == 0 and err == ''
    assert 'eth0 → tap0 (probe mode' in out


def test_no_progress_line_for_files_read_within_a_second(tmp_path):
    status, out, err = _progress_run(tmp_path, stderr_tty=True,
                                     seconds=3600)
    assert status == 0 and 'reading' not in err


# --------------------------------------------------------------------------
# Captures the real tcpdump writes of real traffic (the namespace lab):
# Ethernet pcaps of the pif and the tap, and Linux cooked v2 captures of
# "-i any" cut to each interface by ifindex.

TRAFFIC = r'''
import socket, struct, sys, time
addr, n = sys.argv[1], int(sys.argv[2])

def csum(data):
    total = sum(struct.unpack('!%dH' % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return ~total & 0xffff

ping = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
for seq in range(n):
    body = struct.pack('!BBHHH', 8, 0, 0, 0x4b4b, seq) + b'wild' * 8
    body = body[:2] + struct.pack('!H', csum(body)) + body[4:]
    ping.sendto(body, (addr, 0))
    time.sleep(0.01)
for _ in range(n):
    syn = socket.socket()
    syn.settimeout(1)
    syn.connect_ex((addr, 9))       # closed: the guest answers RST-ACK
    syn.close()
    time.sleep(0.01)
time.sleep(0.2)
'''
EXCHANGES = 15


def _ifindex(netns_name, dev):
    out = subprocess.run(['ip', '-n', netns_name, '-j', 'link', 'show',
                          'dev', dev], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)[0]['ifindex']


def test_real_tcpdump_captures_ethernet_and_cooked(lab_factory, tmp_path):
    from tests.functional import tcpdump
    the_lab = lab_factory(guests=1)
    guest = the_lab.guests[0]
    hv, pif, tap = the_lab.spec.hv_netns, the_lab.spec.pif, guest.vif
    host = ['host', guest.address]
    files = {
        ('eth', 'pif'): (pif, host),
        ('eth', 'vif'): (tap, host),
        ('sll2', 'pif'): ('any', ['-y', 'LINUX_SLL2', 'ifindex',
                                  str(_ifindex(hv, pif)), 'and', *host]),
        ('sll2', 'vif'): ('any', ['-y', 'LINUX_SLL2', 'ifindex',
                                  str(_ifindex(hv, tap)), 'and', *host]),
    }
    with tcpdump.recording(
            tcpdump.Tcpdump(hv, iface, str(tmp_path / f'{kind}-{role}.pcap'),
                            bpf, limit=8 * EXCHANGES + 50)
            for (kind, role), (iface, bpf) in files.items()) as started:
        subprocess.run(['ip', 'netns', 'exec', the_lab.spec.src_netns,
                        sys.executable, '-c', TRAFFIC, guest.address,
                        str(EXCHANGES)], check=True, timeout=60)
    dumps = dict(zip(files, started))
    for kind in ('eth', 'sll2'):
        p, v = dumps[kind, 'pif'].path, dumps[kind, 'vif'].path
        result = offline.analyze_pcaps(p, v, destination=guest.address,
                                       mode='fingerprint')
        rep = result.report
        # Every ping and every SYN in, every answer out, and the guest's
        # turnaround of each (echo id/seq; RST ack = SYN seq + 1).
        assert rep.sent == 2 * EXCHANGES, (kind, rep)
        assert rep.ingress.count == 2 * EXCHANGES, (kind, rep)
        assert rep.egress.count == 2 * EXCHANGES, (kind, rep)
        assert rep.turnaround.count == 2 * EXCHANGES, (kind, rep)
        assert rep.anomalies == 0
        assert result.pif.directions_known is (kind == 'sll2')
        out = subprocess.run(_command('analyze', '--fingerprint', '-d',
                                      guest.address, p, v),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        word = 'received' if kind == 'sll2' else 'seen'
        assert f'0 not {word} on the pif' in out.stdout
        # One capture as both: refused, whatever its format.
        same = subprocess.run(_command('analyze', '--fingerprint', '-d',
                                       guest.address, v, v),
                              capture_output=True, text=True, timeout=60)
        assert same.returncode == 1 and 'are the same capture' in \
            same.stderr
