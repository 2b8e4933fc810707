"""The remote sender as code: its records, its arguments, its answer, and
the shipped files run on their own.

``ssh/sender.py`` and ``core/pacing.py`` are what :class:`SSHSource`
ships to a remote host; here they run in this process (a recording
socket in place of the raw one) and as files copied alone into a
directory, run by this Python without site-packages (so nothing of ours
but the two files can be imported).  The pacing on the wire is
``tests/functional/test_ssh.py::test_ssh_source_paces_on_the_wire``.
"""

import io
import ipaddress
import json
import shutil
import socket
import struct
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st
import pytest

from netweaver_agent.core import pacing
from netweaver_agent.ssh import probesource
from netweaver_agent.ssh import sender


def _packets():
    return [pacing.Packet(0, '198.18.0.10', b'\x45abc'),
            pacing.Packet(1500, '2001:2::b', b'\x60')]


def test_records_on_the_wire():
    data = pacing.encode(_packets())
    head = struct.Struct('!QHB16s')
    off, n, version, dst = head.unpack_from(data, 0)
    assert (off, n, version, dst) == (0, 4, 4,
                                      bytes([198, 18, 0, 10]) + bytes(12))
    assert data[head.size:head.size + 4] == b'\x45abc'
    off, n, version, dst = head.unpack_from(data, head.size + 4)
    v6 = socket.inet_pton(socket.AF_INET6, '2001:2::b')
    assert (off, n, version, dst) == (1500, 1, 6, v6)
    assert len(data) == 2 * head.size + 5


addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))


@given(st.lists(st.builds(pacing.Packet, st.integers(0, 2**64 - 1),
                          addresses, st.binary(max_size=200)),
                max_size=20))
def test_decode_gives_back_what_was_encoded(packets):
    def plain(ps):      # '::ffff:0:0' and '::ffff:0.0.0.0' are one address
        return [(p.offset_ns, ipaddress.ip_address(p.dst_ip), p.data)
                for p in ps]
    got = pacing.decode(io.BytesIO(pacing.encode(packets)), len(packets))
    assert plain(got) == plain(packets)


def test_encode_refuses_a_non_address():
    with pytest.raises(ValueError, match='198.18.0.300'):
        pacing.encode([pacing.Packet(0, '198.18.0.300', b'\x45')])


@pytest.mark.parametrize('cut, limit, words', [
    (lambda d: d[:-1], 2, 'record 1: cut packet'),
    (lambda d: d[:pacing.RECORD.size - 1], 2, 'record 0: cut header'),
    (lambda d: d[:10] + b'\x05' + d[11:], 2, 'record 0: IP version 5'),
    (lambda d: d, 1, 'more than 1 records')])
def test_decode_refuses_bad_records(cut, limit, words):
    with pytest.raises(ValueError, match=words):
        pacing.decode(io.BytesIO(cut(pacing.encode(_packets()))), limit)


class RecordingSocket:
    def __init__(self, family, log):
        self.family, self.log = family, log

    def sendto(self, data, address):
        self.log.append((self.family, address, data))

    def close(self):
        pass


def test_run_sends_each_family_through_its_socket():
    log = []
    done = sender.run(['2', '5'], io.BytesIO(pacing.encode(_packets())),
                      lambda family: RecordingSocket(family, log))
    assert done == {'sent': 2, 'failed': 0, 'errors': [], 'left': 0}
    assert log == [(socket.AF_INET, ('198.18.0.10', 0), b'\x45abc'),
                   (socket.AF_INET6, ('2001:2::b', 0), b'\x60')]
    # What probesource reads back.
    result, left = probesource.parse_sender_output(json.dumps(done), 2)
    assert (result.sent, result.failed, left) == (2, 0, 0)


@pytest.mark.parametrize('argv', [['10', 'nan'], ['10', 'inf'],
                                  ['10', '-1'], ['10', '1e9'], ['x', '1'],
                                  ['-1', '1'], ['1']])
def test_run_refuses_bad_arguments(argv):
    with pytest.raises(sender.SenderError):
        sender.run(argv, io.BytesIO(b''), lambda f: pytest.fail('opened'))


@pytest.fixture
def shipped(tmp_path):
    """The two files alone in a directory, as SSHSource ships them."""
    for name, module in probesource.SHIPPED.items():
        shutil.copy(module.__file__, tmp_path / name)
    return tmp_path


def _run_shipped(shipped, stdin, *argv):
    # -S: no site-packages, so netweaver_agent cannot be imported there.
    return subprocess.run(
        [sys.executable, '-E', '-s', '-S', str(shipped / 'sender.py'),
         *argv], input=stdin, capture_output=True, timeout=30)


def test_the_shipped_sender_runs_alone(shipped):
    proc = _run_shipped(shipped, b'', '0', '1.0')
    assert proc.returncode == 0, proc.stderr
    result, left = probesource.parse_sender_output(proc.stdout, 0)
    assert (result.sent, result.failed, left) == (0, 0, 0)


def test_the_shipped_sender_says_what_is_wrong(shipped):
    good = pacing.encode(_packets())
    for stdin, argv, words in (
            (b'', ('10', 'nan'), b'bad time budget'),
            (good[:-1], ('2', '1.0'), b'cut packet'),
            (good, ('1', '1.0'), b'more than 1 records')):
        proc = _run_shipped(shipped, stdin, *argv)
        assert proc.returncode == 1 and words in proc.stderr, proc.stderr
        assert proc.stdout == b''


def test_what_the_sender_prints():
    out = b'{"sent": 7, "failed": 1, "errors": ["x: boom"], "left": 2}'
    result, left = probesource.parse_sender_output(out, 10)
    assert (result.sent, result.failed, result.errors, left) == (
        7, 1, ('x: boom',), 2)


@pytest.mark.parametrize('out', [
    b'[]', b'{"sent": 1}', b'"x"', b'[' * 5000,
    b'{"sent": 99999999999, "failed": 0, "errors": [], "left": 0}',
    b'{"sent": -1, "failed": 1, "errors": [], "left": 0}',
    b'{"sent": 1.5, "failed": 0, "errors": [], "left": 0}',
    b'{"sent": 1, "failed": 0, "errors": {}, "left": 0}',
    b'{"sent": 1, "failed": 0, "errors": [1], "left": 0}',
    b'{"sent": 0, "failed": 0, "errors": [], "left": 0}',
    b'{"sent": 1, "failed": 0, "errors": ["' + b'e' * 1000 +
    b'"], "left": 0}'])
def test_anything_else_is_refused(out):
    with pytest.raises(ValueError):
        probesource.parse_sender_output(out, 1)
