"""ssh/ against hosts that misbehave: caps, total deadlines, IPv6.

A hostile SSH server runs in a thread of this process: a real
:class:`paramiko.ServerInterface` with a real SFTP subsystem, listening on
127.0.0.1 with a host key made here and written to a temporary known_hosts.
It streams endless output, an endless SFTP file, answers byte by byte or
never.  The client (:class:`session.RemoteHost`,
:class:`probesource.SSHSource`,
the ``netweaver measure`` job) must stop at its caps and at its *total*
deadlines with an error naming the host and the command or file, and the
process's memory must stay small.

The IPv6 SSH probe source runs through the real sshd of
``sshlab.SSHLab`` in a lab built with ``ipv6=True`` (addresses in
2001:2::/64, no route out).
"""

import contextlib
import dataclasses
import os
import socket
import threading
import time

import paramiko
import pytest

from netweaver_agent.cli import seedjob
from netweaver_agent.core import destinations
from netweaver_agent.core import sources
from netweaver_agent.core import window as probe_window
from netweaver_agent.lab import build as lab_mod
from netweaver_agent.ssh import probesource
from netweaver_agent.ssh import session
from tests.functional import conftest
from tests.functional import sshlab

MIB = 1 << 20
# How long any hostile stream goes on at most (the server's own bound).
STREAM_S = 60.0


def rss_bytes():
    """This process's resident set size (VmRSS)."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    raise AssertionError('no VmRSS in /proc/self/status')


# -- the hostile server -------------------------------------------------------

class _Behaviour(paramiko.ServerInterface):
    """Key auth with the one client key; exec requests answered by
    :meth:`HostileServer.serve_command` in threads of their own."""

    def __init__(self, server):
        self.server = server

    def check_auth_publickey(self, username, key):
        if key.asbytes() == self.server.client_key.asbytes():
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def get_allowed_auths(self, username):
        return 'publickey'

    def check_channel_request(self, kind, chanid):
        if kind == 'session':
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel, command):
        command = command.decode()
        self.server.commands.append(command)
        if command.startswith('hang'):
            # Never answer the exec request (until the client gives up).
            self.server.stop.wait(STREAM_S)
            return False
        threading.Thread(target=self.server.serve_command,
                         args=(channel, command), daemon=True).start()
        return True


class _EndlessHandle(paramiko.SFTPHandle):
    def __init__(self, server, path):
        super().__init__()
        self.server = server
        self.path = path

    def read(self, offset, length):
        if self.path == '/slow':
            # One byte per request, slowly: every read is quick enough,
            # the whole never ends.
            if self.server.stop.wait(0.2):
                return b''
            return b'x'
        if self.path == '/small':
            return self.server.small[offset:offset + length]
        self.server.sent += length
        return b'\xd4' * length              # '/endless', '/huge'

    def stat(self):
        return self.server.attrs(self.path)

    def write(self, offset, data):
        # What the client ships (the sender): taken, and dropped.
        self.server.put.append(self.path)
        return paramiko.SFTP_OK


class _EndlessSFTP(paramiko.SFTPServerInterface):
    """SFTP files: '/endless' (announces 1000 bytes, never ends), '/huge'
    (announces 1 TiB), '/slow' (a byte per 0.2 s), '/small' (honest)."""

    def __init__(self, server_interface, *args, hostile=None, **kwargs):
        super().__init__(server_interface, *args, **kwargs)
        self.server = hostile

    def open(self, path, flags, attr):
        return _EndlessHandle(self.server, path)

    def stat(self, path):
        return self.server.attrs(path)

    lstat = stat


class HostileServer:
    """A paramiko SSH server on 127.0.0.1 that misbehaves on purpose."""

    def __init__(self, workdir):
        self.host_key = paramiko.ECDSAKey.generate()
        self.client_key = paramiko.ECDSAKey.generate()
        self.key_file = os.path.join(workdir, 'client_key')
        self.client_key.write_private_key_file(self.key_file)
        self.small = bytes(range(256)) * 4
        self.commands = []
        self.put = []
        self.connections = 0
        self.sent = 0
        self.stop = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(('127.0.0.1', 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.known_hosts = os.path.join(workdir, 'known_hosts')
        with open(self.known_hosts, 'w') as f:
            f.write(f'[127.0.0.1]:{self.port} {self.host_key.get_name()} '
                    f'{self.host_key.get_base64()}\n')
        self.transports = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def attrs(self, path):
        a = paramiko.SFTPAttributes()
        a.st_size = {'/endless': 1000, '/huge': 1 << 40, '/slow': 1000,
                     '/small': len(self.small)}.get(path, 0)
        a.st_mode = 0o100644
        return a

    def _accept(self):
        while not self.stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            t = paramiko.Transport(sock)
            t.add_server_key(self.host_key)
            t.set_subsystem_handler('sftp', paramiko.SFTPServer,
                                    _EndlessSFTP, hostile=self)
            self.transports.append(t)
            try:
                t.start_server(server=_Behaviour(self))
            except (paramiko.SSHException, EOFError, OSError):
                continue
            threading.Thread(target=self._channels, args=(t,),
                             daemon=True).start()

    def _channels(self, t):
        channels = []           # a channel dropped is closed (__del__)
        while t.is_active() and not self.stop.is_set():
            ch = t.accept(0.5)  # exec requests start their own threads
            if ch is not None:
                channels.append(ch)

    def serve_command(self, channel, command):
        """What each command does (argv[0] picks the behaviour)."""
        # paramiko answers the exec request after check_channel_exec_request
        # returns: a channel closed before that answer fails the request.
        time.sleep(0.05)
        end = time.monotonic() + STREAM_S
        name = command.split()[0]
        try:
            if name in ('xe', 'ip', 'python3', 'endless'):
                # Digits without end: xe's dom-id, ip's route, the
                # sender's JSON... (512 MB took the old client to 1 GB).
                chunk = b'9' * 65536
                while time.monotonic() < end and not channel.closed:
                    channel.sendall(chunk)
                    self.sent += len(chunk)
            elif name == 'endless-stderr':
                chunk = b'e' * 65536
                while time.monotonic() < end and not channel.closed:
                    channel.sendall_stderr(chunk)
            elif name == 'slow':
                while time.monotonic() < end and not channel.closed:
                    channel.sendall(b'.')
                    if self.stop.wait(0.2):
                        break
            elif name == 'mktemp':      # an honest directory
                channel.sendall(b'/tmp/netweaver.0123456789\n')
                channel.send_exit_status(0)
            elif name == 'sh':          # RemoteHost.start's wrapper
                chunk = b'1' * 65536    # a "pid" without end
                while time.monotonic() < end and not channel.closed:
                    channel.sendall(chunk)
            else:                       # 'echo': an honest command
                channel.sendall(command.split(None, 1)[-1].encode() + b'\n')
                channel.send_exit_status(0)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            with contextlib.suppress(Exception):
                channel.close()

    def close(self):
        self.stop.set()
        self.listener.close()
        for t in self.transports:
            t.close()
        self.thread.join(5)


@pytest.fixture(scope='module')
def hostile(tmp_path_factory):
    server = HostileServer(str(tmp_path_factory.mktemp('hostile')))
    try:
        yield server
    finally:
        server.close()


def _host(server, **kw):
    # The caps end the endless streams long before this deadline, which
    # only keeps a broken cap from hanging the test.
    args = dict(key_file=server.key_file,
                known_hosts_file=server.known_hosts,
                connect_timeout_s=5.0, command_timeout_s=15.0)
    args.update(kw)
    return session.RemoteHost('127.0.0.1', server.port, 'root',
                              session.SSHOptions(**args))


# -- caps ---------------------------------------------------------------------

def test_honest_commands_and_files_still_work(hostile, tmp_path):
    with _host(hostile) as host:
        assert host.run(['echo', 'hello']).text == 'hello\n'
        local = tmp_path / 'small'
        host.fetch('/small', str(local))
        assert local.read_bytes() == hostile.small


def test_endless_output_stops_at_the_cap(hostile):
    before = rss_bytes()
    with _host(hostile) as host:
        for argv in (['xe', 'vm-list', 'name-label=vm1', 'params=dom-id',
                      '--minimal'], ['endless-stderr']):
            sent_before = hostile.sent
            with pytest.raises(session.OutputTooLarge) as err:
                host.run(argv, check=False)
            msg = str(err.value)
            assert hostile.port and f'127.0.0.1:{hostile.port}' in msg
            assert repr(' '.join(argv)) in msg
            assert f'more than {session.MAX_OUTPUT_BYTES} bytes' in msg
            # It stopped: the server was still streaming (it would go on
            # for a minute), the client did not read to its end.
            assert hostile.sent - sent_before < 1024 * MIB
        # The session is still good for the next command.
        assert host.run(['echo', 'after']).text == 'after\n'
    grown = rss_bytes() - before
    assert grown < 64 * MIB, f'RSS grew by {grown / MIB:.0f} MiB'


def test_a_larger_cap_is_the_callers_choice(hostile):
    with _host(hostile) as host:
        with pytest.raises(session.OutputTooLarge, match='more than 4194304'):
            host.run(['endless'], max_output=4 * MIB)


def test_resolve_vif_of_an_endless_dom_id_is_a_clear_error(hostile):
    """The finding: 512 MB of digits from `xe vm-list`, then int() of
    them raised an uncaught ValueError."""
    before = rss_bytes()
    with _host(hostile) as host:
        with pytest.raises(session.RemoteCommandError) as err:
            seedjob.resolve_vif(host, 'vm1')
    assert 'xe vm-list' in str(err.value)
    assert rss_bytes() - before < 64 * MIB


def test_a_pid_without_end_is_refused(hostile):
    with _host(hostile) as host:
        with pytest.raises(session.RemoteCommandError,
                           match='no process id') as err:
            host.start(['tcpdump', '-i', 'eth0'])
    assert 'tcpdump -i eth0' in str(err.value)


def test_ssh_source_of_a_hostile_host_is_a_clear_error(hostile):
    """``ip route get`` answered without end: the source fails with the
    host named, the agent's memory stays small."""
    src = probesource.SSHSource('127.0.0.1', hostile.port, 'root',
                                key_file=hostile.key_file,
                                known_hosts_file=hostile.known_hosts,
                                connect_timeout_s=5.0, command_timeout_s=15.0)
    plan = sources.schedule(1, 'icmp', ['198.18.0.10'], 3,
                            1_000_000).plan
    before = rss_bytes()
    try:
        with pytest.raises(sources.SourceError) as err:
            src.prepare(plan)
        assert f'127.0.0.1:{hostile.port}' in str(err.value)
        assert 'more than' in str(err.value)
        # The sender answering without end: the same.
        src._src['198.18.0.10'] = '198.18.0.1'
        with pytest.raises(sources.SourceError) as err:
            src.send(plan, time.monotonic() + 5)
        assert 'python3' in str(err.value) and 'more than' in str(err.value)
        # It ran the files it shipped there, into a mktemp -d directory.
        assert {f'/tmp/netweaver.0123456789/{name}'
                for name in probesource.SHIPPED} <= set(hostile.put)
    finally:
        src.close()
    assert rss_bytes() - before < 64 * MIB


def test_endless_sftp_file_stops_at_the_cap(hostile, tmp_path):
    local = tmp_path / 'pif.pcap'
    before = rss_bytes()
    with _host(hostile) as host:
        with pytest.raises(session.RemoteError) as err:
            host.fetch('/endless', str(local), max_bytes=8 * MIB)
        msg = str(err.value)
        assert '/endless' in msg and f'127.0.0.1:{hostile.port}' in msg
        assert f'more than the {8 * MIB} bytes' in msg
        assert not local.exists(), 'a partial capture was left behind'
        # The options' cap (max_capture_mb) is the default.
        small = _host(hostile, max_capture_mb=2)
        with small, pytest.raises(session.RemoteError,
                                  match=f'more than the {2 * MIB} bytes'):
            small.fetch('/endless', str(local))
    assert rss_bytes() - before < 64 * MIB


def test_an_announced_huge_file_is_refused_before_reading(hostile,
                                                          tmp_path):
    with _host(hostile) as host:
        sent = hostile.sent
        with pytest.raises(session.RemoteError,
                           match=rf'holds {1 << 40} bytes, more than'):
            host.fetch('/huge', str(tmp_path / 'x'))
        assert hostile.sent == sent       # not a byte read


# -- total deadlines ---------------------------------------------------------

def _elapsed(fn):
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def test_output_byte_by_byte_ends_at_the_total_deadline(hostile):
    with _host(hostile, command_timeout_s=1.5) as host:
        err = None

        def run():
            nonlocal err
            with pytest.raises(session.RemoteCommandError) as err:
                host.run(['slow'])
        took = _elapsed(run)
        assert 'did not end within 1.5 s' in str(err.value)
        assert "'slow'" in str(err.value)
        # Not a speed check: each byte came in time (0.2 s), so only a
        # total deadline ends it; a per-read one would wait a minute.
        assert took < 1.5 + 10, took
        assert host.run(['echo', 'again']).text == 'again\n'


def test_an_exec_request_never_answered_ends_at_the_deadline(hostile):
    with _host(hostile, command_timeout_s=1.5) as host:
        started = time.monotonic()
        with pytest.raises(session.RemoteCommandError,
                           match='did not end within 1.5 s'):
            host.run(['hang'])
        assert time.monotonic() - started < 1.5 + 10
        assert host.run(['echo', 'again']).text == 'again\n'


def test_sftp_byte_by_byte_ends_at_the_total_deadline(hostile, tmp_path):
    """The finding: 1 GB copied in 19.5 s with command_timeout_s=5, the
    timeout being per read."""
    local = tmp_path / 'vif.pcap'
    with _host(hostile, command_timeout_s=1.5) as host:
        started = time.monotonic()
        with pytest.raises(session.RemoteError) as err:
            host.fetch('/slow', str(local))
        assert time.monotonic() - started < 1.5 + 10
        assert 'did not finish within 1.5 s' in str(err.value)
        assert '/slow' in str(err.value)
        assert not local.exists()
        # An explicit timeout for the one transfer wins.
        with pytest.raises(session.RemoteError, match='within 0.5 s'):
            host.fetch('/slow', str(local), timeout_s=0.5)
        # Fast but endless, no cap in reach: the deadline ends it, with the
        # same error (the SFTP stream cut mid-answer is not another one).
        with pytest.raises(session.RemoteError,
                           match='/endless .*did not finish within 1.0 s'):
            host.fetch('/endless', str(local), max_bytes=1 << 40,
                       timeout_s=1.0)
        assert not local.exists()
        host.fetch('/small', str(local))
        assert local.read_bytes() == hostile.small


# -- host keys ---------------------------------------------------------------

def test_accept_new_without_known_hosts_fails_closed(hostile, tmp_path):
    with pytest.raises(ValueError, match='known_hosts'):
        session.SSHOptions(key_file=hostile.key_file, known_hosts_file='',
                           accept_new_host_key=True)
    # Options made past that check: connect() refuses by itself, before
    # any connection is opened.
    opts = session.SSHOptions(key_file=hostile.key_file,
                              known_hosts_file=hostile.known_hosts)
    object.__setattr__(opts, 'known_hosts_file', '')
    object.__setattr__(opts, 'accept_new_host_key', True)
    connections = hostile.connections
    host = session.RemoteHost('127.0.0.1', hostile.port, 'root', opts)
    for _ in range(2):          # every time, not only the first
        with pytest.raises(session.HostKeyError) as err:
            host.connect()
        assert 'known_hosts' in str(err.value)
    assert hostile.connections == connections
    # With a file, accept-new records the key; the next connect checks it.
    fresh = tmp_path / 'known_hosts'
    with _host(hostile, known_hosts_file=str(fresh),
               accept_new_host_key=True) as h:
        h.run(['echo', 'x'])
    assert hostile.host_key.get_base64() in fresh.read_text()


def test_measure_refuses_accept_new_without_known_hosts(capsys):
    status, out, err = sshlab.cli(
        ['measure', '--hv', '127.0.0.1', '-s', '127.0.0.1', '-d',
         '198.18.0.10', '--vif', 'tap0', '--known-hosts', '',
         '--accept-new-host-key'], capsys)
    assert status == 2
    assert 'known_hosts' in err


# -- destinations ------------------------------------------------------------

def test_ssh_source_refuses_a_destination_before_reaching_the_host(hostile):
    """The same destination policy as every source: a refused address
    never reaches the remote host (not even a route lookup)."""
    src = probesource.SSHSource('127.0.0.1', hostile.port, 'root',
                                key_file=hostile.key_file,
                                known_hosts_file=hostile.known_hosts,
                                policy=destinations.policy(['198.18.0.0/24']))
    connections, commands = hostile.connections, len(hostile.commands)
    try:
        for dst in ('169.254.169.254', '198.19.0.10', '224.0.0.1'):
            plan = sources.schedule(1, 'icmp', [dst], 3,
                                    1_000_000).plan
            with pytest.raises(destinations.RefusedDestination,
                               match=dst.replace('.', r'\.')):
                src.prepare(plan)
            with pytest.raises(destinations.RefusedDestination):
                src.send(plan, time.monotonic() + 5)
    finally:
        src.close()
    assert (hostile.connections, len(hostile.commands)) == (connections,
                                                            commands)


def test_measure_refuses_a_metadata_destination(hostile, capsys):
    connections = hostile.connections
    status, out, err = sshlab.cli(
        ['measure', '--hv', '127.0.0.1', '--hypervisor-port',
         str(hostile.port), '-s', '127.0.0.1', '--source-port',
         str(hostile.port), '-k', hostile.key_file, '--known-hosts',
         hostile.known_hosts, '-d', '169.254.169.254', '--vif', 'tap0'],
        capsys)
    assert status == 2
    assert "'169.254.169.254' refused" in err
    assert hostile.connections == connections


# -- IPv6: the SSH probe source through real sshd -----------------------------

class SSHLab6(sshlab.SSHLab):
    """test_ssh's lab (sshd in the source and hypervisor namespaces, the
    client on the management network) with IPv6 on the probe network."""

    def __init__(self, workdir):
        super().__init__(workdir)
        self.lab = lab_mod.Lab(dataclasses.replace(self.lab.spec, ipv6=True))


@pytest.fixture(scope='module')
def lab6(tmp_path_factory):
    yield from sshlab.built(tmp_path_factory, SSHLab6, 'ssh6')


def test_ssh_source_sends_ipv6_probes(lab6):
    paths = lab6.lab.paths(ipv6=True)
    settings = probe_window.WindowSettings(count=20, interval_ms=2.0)
    src = probesource.parse_source(
        f'ssh://root@{lab6.src_mgmt}:{sshlab.PORT}',
        options=lab6.options(), netns_name=lab6.mgmt)
    try:
        assert src.remote.route_source(paths[0].address) == \
            lab6.lab.spec.src_address6
        window = probe_window.run_window(paths, src, settings,
                                         capture_netns=lab6.hv)
    finally:
        src.close()
    assert window.send == sources.SendResult(sent=40)
    delayed = lab6.lab.delay_records(0)
    for i, path in enumerate(paths):
        assert ':' in path.address
        rep = window.reports[path.vif]
        assert rep.ingress.count == 20 and rep.ingress.lost == 0, rep
        assert rep.egress.count == 20
    # Guest 0's probes are held DELAY_MS on the bridge (ip6tables and the
    # NFQUEUE delayer): its ingress is at least each recorded hold.
    held = [r.hold_ns for r in delayed
            if r.session == window.session and not r.reply]
    assert len(held) == 20
    assert window.reports[paths[0].vif].ingress.min_us * 1000 >= min(held)


def test_measure_of_an_ipv6_destination(lab6, tmp_path):
    g = lab6.guests[1]
    proc = sshlab.netweaver(lab6.measure_argv(
        '--vif', g.vif, '-d', g.address6, '--count', '20',
        '--interval-ms', '5', '--json', '--max-capture-mb', '1'))
    import json
    got = json.loads(proc.stdout)
    assert got['source_ip'] == lab6.lab.spec.src_address6
    assert got['sent'] == 20
    rep = got['reports'][g.vif]
    assert rep['ingress']['count'] == 20 and rep['ingress']['lost'] == 0
    assert rep['egress']['count'] == 20


# -- start-up validation in the real agent ------------------------------------

AGENT_INTERVAL_S = 3
AGENT_WAIT_S = 90.0


def test_the_real_agent_refuses_options_that_can_never_work(lab_factory,
                                                            tmp_path):
    """ceilometer-polling with a NaN float, a window with no room for a
    probe and accept-new without a known_hosts file: the meters are not
    loaded, one ERROR names every option, nothing is probed."""
    from netweaver_agent.lab import agent as labagent
    the_lab = lab_factory(guests=1)
    files = labagent.write_files(
        the_lab, str(tmp_path / 'agent'), interval_s=AGENT_INTERVAL_S,
        probe={'probe_interval_ms': 'nan', 'probe_timeout_ms': 990,
               'max_window_ms': 1000,
               'probe_source': 'ssh://root@198.18.0.1:2222',
               'ssh_accept_new_host_key': 'true',
               'ssh_known_hosts_file': ''})
    with labagent.PollingAgent(files, the_lab.spec.hv_netns) as agent:
        errors, log = conftest.meters_refused(agent, AGENT_INTERVAL_S,
                                              AGENT_WAIT_S)
    for words in ('[netweaver] probe_interval_ms = nan is not a finite',
                  '[netweaver] max_window_ms = 1000 must exceed '
                  '[netweaver] probe_timeout_ms = 990',
                  '[netweaver] ssh_accept_new_host_key = True needs '
                  '[netweaver] ssh_known_hosts_file'):
        assert words in errors[0], (words, errors[0])
    assert 'Probe window' not in log
