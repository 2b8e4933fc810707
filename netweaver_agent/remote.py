"""Remote hosts over SSH (paramiko): verified connect, run argv, fetch files.

* Host keys are checked against a known_hosts file.  A host absent from it
  is refused unless ``ssh_accept_new_host_key`` is set, which records the
  new key there; a key that differs from the recorded one is always refused.
* Authentication is by key only (never a password).
* Every remote command is an argument list joined with :func:`shlex.join`,
  never a string formatted from input.  A failed command raises
  :class:`RemoteCommandError` with the host, the command, its exit status
  and its stderr.
* Connects and commands are bounded by timeouts; remote temporary
  directories are removed also when the work in them fails.

:class:`SSHSource` is the ``ssh://user@host`` probe source: it sends a
:class:`sources.ProbePlan` from the remote host, so probes enter the
compute host through its physical network like production traffic.
"""

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import select
import shlex
import socket
import struct
import time

from oslo_config import cfg
from oslo_log import log
import paramiko

from netweaver_agent import netns
from netweaver_agent import sources

LOG = log.getLogger(__name__)

GROUP = 'netweaver'

OPTS = [
    cfg.StrOpt('ssh_key_file',
               help='Private key file for SSH to a remote probe source or '
                    'hypervisor (key authentication only). Unset: the SSH '
                    'agent and the default keys of the user.'),
    cfg.StrOpt('ssh_known_hosts_file',
               default='~/.ssh/known_hosts',
               help='known_hosts file against which remote host keys are '
                    'checked.'),
    cfg.BoolOpt('ssh_accept_new_host_key', default=False,
                help='Accept the key of a host absent from the known_hosts '
                     'file and record it there. Off: unknown hosts are '
                     'refused. A key that differs from the recorded one is '
                     'always refused.'),
    cfg.FloatOpt('ssh_connect_timeout_s', default=10.0, min=0.1, max=300.0,
                 help='Timeout for the TCP connect, the SSH banner and '
                      'authentication, in seconds.'),
    cfg.FloatOpt('ssh_command_timeout_s', default=60.0, min=0.1,
                 max=3600.0,
                 help='Timeout for one remote command, in seconds.'),
]

_CHUNK = 65536
# bandit B108: the remote host's mktemp -d template (random, 0700), checked by
# _TMP_RE
_TMP_TEMPLATE = '/tmp/netweaver.XXXXXXXXXX'  # nosec B108
_TMP_RE = re.compile(r'^/tmp/netweaver\.[A-Za-z0-9]{10}$')


class RemoteError(RuntimeError):
    """Something failed on, or on the way to, a remote host."""


class RemoteConnectError(RemoteError):
    """A remote host could not be reached or refused us."""


class HostKeyError(RemoteConnectError):
    """A remote host's key is unknown or differs from known_hosts."""


class RemoteCommandError(RemoteError):
    """A remote command failed or timed out.

    The message names the host, the command, the exit status (None when it
    timed out) and the command's stderr.
    """

    def __init__(self, host, argv, exit_status, stderr, reason=None):
        self.host = host
        self.argv = tuple(argv)
        self.exit_status = exit_status
        self.stderr = stderr
        what = reason or f'failed with exit status {exit_status}'
        super().__init__(
            f"command {shlex.join(self.argv)!r} on {host} {what}: "
            f"{stderr.strip() or '(no stderr)'}")


@dataclasses.dataclass(frozen=True, slots=True)
class SSHOptions:
    """How to reach remote hosts.  Times in seconds."""

    key_file: str | None = None
    known_hosts_file: str | None = '~/.ssh/known_hosts'
    accept_new_host_key: bool = False
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 60.0

    def __post_init__(self):
        for name in ('connect_timeout_s', 'command_timeout_s'):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"SSH option {name}={getattr(self, name)!r} must be > 0")

    @classmethod
    def from_conf(cls, conf, group=GROUP):
        """The options from an oslo.config object with :data:`OPTS`."""
        g = conf[group]
        return cls(key_file=g.ssh_key_file,
                   known_hosts_file=g.ssh_known_hosts_file,
                   accept_new_host_key=g.ssh_accept_new_host_key,
                   connect_timeout_s=g.ssh_connect_timeout_s,
                   command_timeout_s=g.ssh_command_timeout_s)

    def known_hosts_path(self):
        if not self.known_hosts_file:
            return None
        return os.path.expanduser(self.known_hosts_file)


@dataclasses.dataclass(frozen=True, slots=True)
class CommandResult:
    """A finished remote command."""

    argv: tuple
    exit_status: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self):
        return self.stdout.decode('utf-8', 'replace')


def command_line(argv):
    """The one string paramiko sends for ``argv``: ``shlex.join`` only."""
    argv = [str(a) for a in argv]
    if not argv or not argv[0]:
        raise ValueError(f"empty remote command {argv!r}")
    return shlex.join(argv)


def _fingerprint(key):
    digest = hashlib.sha256(key.asbytes()).digest()
    return 'SHA256:' + base64.b64encode(digest).decode().rstrip('=')


class _RejectPolicy(paramiko.MissingHostKeyPolicy):
    def __init__(self, known_hosts):
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        raise HostKeyError(
            f"host key of {hostname} ({key.get_name()} {_fingerprint(key)}) "
            f"is not in known_hosts {self.known_hosts or '(none configured)'}"
            "; add it there (e.g. ssh-keyscan, checked out of band) or set "
            "ssh_accept_new_host_key")


class _RecordNewKeyPolicy(paramiko.MissingHostKeyPolicy):
    def __init__(self, known_hosts):
        self.known_hosts = known_hosts

    def missing_host_key(self, client, hostname, key):
        client.get_host_keys().add(hostname, key.get_name(), key)
        if self.known_hosts:
            # Append one line: rewriting the file would lose its comments.
            fd = os.open(self.known_hosts,
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, 'a') as f:
                f.write(f'{hostname} {key.get_name()} {key.get_base64()}\n')
        LOG.warning('Accepted new host key of %(host)s (%(type)s %(fp)s) '
                    'and recorded it in %(file)s',
                    {'host': hostname, 'type': key.get_name(),
                     'fp': _fingerprint(key), 'file': self.known_hosts})


class RemoteProcess:
    """A remote command left running (e.g. a capture), stopped by signal.

    Started through ``sh -c 'echo $$; exec "$@"' sh ARGV...``: the fixed
    script prints the process id and execs the argument list, which the
    shell passes on as positional parameters without parsing them.
    """

    def __init__(self, host, argv, channel, pid):
        self.host = host
        self.argv = tuple(argv)
        self.channel = channel
        self.pid = pid
        self._out = bytearray()
        self._err = bytearray()

    def _pump(self, wait_s):
        ch = self.channel
        if not (ch.recv_ready() or ch.recv_stderr_ready()):
            select.select([ch], [], [], wait_s)
        got = False
        while ch.recv_ready():
            data = ch.recv(_CHUNK)
            if not data:
                break
            self._out += data
            got = True
        while ch.recv_stderr_ready():
            data = ch.recv_stderr(_CHUNK)
            if not data:
                break
            self._err += data
            got = True
        return got

    def wait_for_stderr(self, marker, timeout_s):
        """Read stderr until ``marker`` (bytes) appears; raise if it ends."""
        deadline = time.monotonic() + timeout_s
        while marker not in self._err:
            if self.channel.exit_status_ready() and not (
                    self.channel.recv_ready() or
                    self.channel.recv_stderr_ready()):
                raise RemoteCommandError(
                    self.host.name, self.argv,
                    self.channel.recv_exit_status(),
                    self._err.decode('utf-8', 'replace'),
                    reason=f'ended before printing {marker!r}')
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteCommandError(
                    self.host.name, self.argv, None,
                    self._err.decode('utf-8', 'replace'),
                    reason=f'did not print {marker!r} within {timeout_s} s')
            self._pump(min(left, 0.2))

    def signal(self, name='INT'):
        """Send signal ``name`` to the process (``kill -s NAME PID``)."""
        self.host.run(['kill', '-s', name, str(self.pid)], check=False)

    def wait(self, timeout_s, ok=(0,)):
        """Wait for the end; return a :class:`CommandResult`."""
        deadline = time.monotonic() + timeout_s
        while not self.channel.exit_status_ready():
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteCommandError(
                    self.host.name, self.argv, None,
                    self._err.decode('utf-8', 'replace'),
                    reason=f'did not end within {timeout_s} s')
            self._pump(min(left, 0.2))
        while self._pump(0):
            pass
        status = self.channel.recv_exit_status()
        self.channel.close()
        result = CommandResult(self.argv, status, bytes(self._out),
                               bytes(self._err))
        if status not in ok:
            raise RemoteCommandError(self.host.name, self.argv, status,
                                     result.stderr.decode('utf-8', 'replace'))
        return result

    def close(self):
        self.channel.close()


class RemoteHost:
    """One SSH connection to ``username@host:port``.

    :param options: :class:`SSHOptions`
    :param netns_name: open the TCP connection from this network namespace
        (the lab's management network); None: from here
    """

    def __init__(self, host, port=22, username='root', options=None,
                 netns_name=None):
        self.host = host
        self.port = int(port)
        self.username = username
        self.options = options or SSHOptions()
        self.netns_name = netns_name
        self._client = None

    @property
    def name(self):
        port = '' if self.port == 22 else f':{self.port}'
        return f'{self.username}@{self.host}{port}'

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def _socket(self):
        timeout = self.options.connect_timeout_s
        try:
            return netns.run_in_netns(
                self.netns_name, socket.create_connection,
                (self.host, self.port), timeout)
        except socket.timeout as exc:
            raise RemoteConnectError(
                f"cannot connect to {self.name}: timed out after "
                f"{timeout} s") from exc
        except OSError as exc:
            raise RemoteConnectError(
                f"cannot connect to {self.name}: {exc}") from exc

    def connect(self):
        """Open the session: TCP, host key check, key authentication."""
        if self._client is not None:
            return self
        opts = self.options
        known_hosts = opts.known_hosts_path()
        client = paramiko.SSHClient()
        try:
            if known_hosts and os.path.exists(known_hosts):
                client.load_host_keys(known_hosts)
            elif known_hosts and opts.accept_new_host_key:
                os.makedirs(os.path.dirname(known_hosts) or '.',
                            exist_ok=True)
            if opts.accept_new_host_key:
                client.set_missing_host_key_policy(
                    _RecordNewKeyPolicy(known_hosts))
            else:
                client.set_missing_host_key_policy(_RejectPolicy(known_hosts))
            key_file = (os.path.expanduser(opts.key_file)
                        if opts.key_file else None)
            if key_file and not os.path.isfile(key_file):
                raise RemoteConnectError(
                    f"SSH key file {key_file!r} for {self.name} does not "
                    "exist")
            sock = self._socket()
            t = opts.connect_timeout_s
            client.connect(
                self.host, port=self.port, username=self.username,
                key_filename=key_file, look_for_keys=key_file is None,
                allow_agent=key_file is None, timeout=t, banner_timeout=t,
                auth_timeout=t, channel_timeout=t, sock=sock)
        except RemoteConnectError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(
                f"host key of {self.name} ({exc.key.get_name()} "
                f"{_fingerprint(exc.key)}) differs from the one in "
                f"known_hosts {known_hosts} ({_fingerprint(exc.expected_key)})"
                ": refused (host reinstalled, or someone in the middle)"
            ) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise RemoteConnectError(
                f"SSH key authentication to {self.name} failed (key file "
                f"{opts.key_file!r}): {exc}") from exc
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            raise RemoteConnectError(
                f"SSH session to {self.name} failed: "
                f"{exc or type(exc).__name__}") from exc
        self._client = client
        LOG.debug('SSH session to %s open', self.name)
        return self

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None

    def _channel(self, argv):
        self.connect()
        line = command_line(argv)
        try:
            channel = self._client.get_transport().open_session(
                timeout=self.options.connect_timeout_s)
            # bandit B601: line is shlex.join(argv): one word per argument, no
            # shell syntax
            channel.exec_command(line)  # nosec B601
        except (paramiko.SSHException, OSError, AttributeError) as exc:
            raise RemoteCommandError(self.name, argv, None, '',
                                     reason=f'could not start: {exc}') \
                from exc
        return channel

    def run(self, argv, stdin=None, timeout_s=None, check=True):
        """Run ``argv`` to its end; return a :class:`CommandResult`.

        :param stdin: bytes written to the command's stdin (then EOF)
        :param timeout_s: default ``ssh_command_timeout_s``
        :param check: raise :class:`RemoteCommandError` on exit status != 0
        """
        argv = tuple(str(a) for a in argv)
        timeout_s = timeout_s or self.options.command_timeout_s
        deadline = time.monotonic() + timeout_s
        channel = self._channel(argv)
        out, err = bytearray(), bytearray()
        pending = memoryview(stdin or b'')
        if not pending:
            channel.shutdown_write()
        try:
            while True:
                while channel.recv_ready():
                    out += channel.recv(_CHUNK)
                while channel.recv_stderr_ready():
                    err += channel.recv_stderr(_CHUNK)
                if pending and channel.send_ready():
                    n = channel.send(pending[:_CHUNK])
                    pending = pending[n:]
                    if not pending:
                        channel.shutdown_write()
                    continue
                if channel.exit_status_ready() and not (
                        channel.recv_ready() or channel.recv_stderr_ready()):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RemoteCommandError(
                        self.name, argv, None, err.decode('utf-8', 'replace'),
                        reason=f'did not end within {timeout_s} s')
                select.select([channel], [], [], min(left, 0.1))
            status = channel.recv_exit_status()
        finally:
            channel.close()
        result = CommandResult(argv, status, bytes(out), bytes(err))
        LOG.debug('%(host)s: %(cmd)s -> %(status)d',
                  {'host': self.name, 'cmd': shlex.join(argv),
                   'status': status})
        if check and status != 0:
            raise RemoteCommandError(self.name, argv, status,
                                     err.decode('utf-8', 'replace'))
        return result

    def start(self, argv):
        """Start ``argv`` in the background; return a :class:`RemoteProcess`.

        The caller stops it with :meth:`RemoteProcess.signal` and reaps it
        with :meth:`RemoteProcess.wait`; bound it with its own options
        (count, ``timeout``) too, so it ends if this session is lost.
        """
        argv = tuple(str(a) for a in argv)
        wrapped = ('sh', '-c', 'echo $$; exec "$@"', 'sh', *argv)
        channel = self._channel(wrapped)
        channel.shutdown_write()
        proc = RemoteProcess(self, argv, channel, pid=None)
        deadline = time.monotonic() + self.options.command_timeout_s
        while b'\n' not in proc._out:
            if channel.exit_status_ready() and not channel.recv_ready():
                break
            if time.monotonic() > deadline:
                channel.close()
                raise RemoteCommandError(self.name, argv, None, '',
                                         reason='printed no process id')
            proc._pump(0.2)
        line, _, rest = bytes(proc._out).partition(b'\n')
        if not line.strip().isdigit():
            status = (channel.recv_exit_status()
                      if channel.exit_status_ready() else None)
            channel.close()
            raise RemoteCommandError(self.name, argv, status,
                                     proc._err.decode('utf-8', 'replace'),
                                     reason='could not start')
        proc.pid = int(line)
        proc._out = bytearray(rest)
        return proc

    def fetch(self, remote_path, local_path):
        """Copy ``remote_path`` to ``local_path`` over SFTP."""
        self.connect()
        try:
            with self._client.open_sftp() as sftp:
                sftp.get_channel().settimeout(
                    self.options.command_timeout_s)
                sftp.get(remote_path, local_path)
        except (OSError, paramiko.SSHException) as exc:
            raise RemoteError(
                f"cannot fetch {remote_path} from {self.name} to "
                f"{local_path}: {exc}") from exc
        return local_path

    @contextlib.contextmanager
    def tempdir(self):
        """A fresh remote directory (``mktemp -d``), removed on exit."""
        path = self.run(['mktemp', '-d', _TMP_TEMPLATE]).text.strip()
        if not _TMP_RE.match(path):
            raise RemoteError(
                f"mktemp on {self.name} gave an unexpected path {path!r}")
        try:
            yield path
        finally:
            try:
                self.run(['rm', '-rf', '--', path], check=False)
            except RemoteError as exc:
                LOG.warning('Could not remove %(path)s on %(host)s: %(err)s',
                            {'path': path, 'host': self.name, 'err': exc})

    def route_source(self, dst_ip):
        """The source address the remote host routes ``dst_ip`` from."""
        out = self.run(['ip', '-4', 'route', 'get', dst_ip]).text
        m = re.search(r'\bsrc (\d+\.\d+\.\d+\.\d+)', out)
        if not m:
            raise RemoteError(
                f"{self.name} has no route with a source address to "
                f"{dst_ip}: {out.strip()!r}")
        return m.group(1)


# The sender run on the remote host with ``python3 -c``.  argv: maximum
# number of packets, time budget in seconds.  stdin: records of
# (offset_ns, length, destination) + the IPv4 packet.  stdout: JSON.
SENDER = r'''
import json, socket, struct, sys, time
limit, budget = int(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + budget
head = struct.Struct('!QH4s')
inp = sys.stdin.buffer
packets = []
while True:
    h = inp.read(head.size)
    if not h:
        break
    if len(h) != head.size or len(packets) >= limit:
        sys.exit('netweaver sender: bad input or more than %d packets' % limit)
    off, n, dst = head.unpack(h)
    data = inp.read(n)
    if len(data) != n:
        sys.exit('netweaver sender: truncated packet')
    packets.append((off, socket.inet_ntoa(dst), data))
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
t0 = time.monotonic()
sent = failed = 0
errors = []
for off, dst, data in packets:
    due = t0 + off / 1e9
    if due > end or time.monotonic() > end:
        break
    wait = due - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    try:
        s.sendto(data, (dst, 0))
        sent += 1
    except OSError as e:
        failed += 1
        if len(errors) < 5:
            errors.append('%s: %s' % (dst, e))
print(json.dumps({'sent': sent, 'failed': failed, 'errors': errors,
                  'left': len(packets) - sent - failed}))
'''
_RECORD = struct.Struct('!QH4s')


def encode_plan(packets):
    """``[(offset_ns, dst_ip, bytes)]`` as the sender's stdin."""
    out = bytearray()
    for offset_ns, dst, data in packets:
        out += _RECORD.pack(offset_ns, len(data), socket.inet_aton(dst))
        out += data
    return bytes(out)


class SSHSource(sources.ProbeSource):
    """Sends a probe plan from a remote host over SSH.

    The remote host tells which source address it routes each target
    from (``ip route get``); the probes are built here with
    :func:`sources.build_packets` and streamed to a small ``python3``
    sender on the remote host, which writes them to a raw socket at their
    offsets, bounded by count and deadline.  :meth:`prepare` does the
    connect, the route lookups and the building before the capture opens.
    The remote user needs CAP_NET_RAW (root) and ``python3``.

    :param options: :class:`SSHOptions`; keyword arguments named after its
        fields override it
    :param netns_name: open the SSH connection from this namespace
    """

    def __init__(self, host, port=22, username='root', options=None,
                 netns_name=None, **overrides):
        options = options or SSHOptions()
        if overrides:
            options = dataclasses.replace(options, **overrides)
        self.remote = RemoteHost(host, port, username, options,
                                 netns_name=netns_name)
        self.name = f'ssh://{self.remote.name}'
        self._src = {}
        self._prepared = None

    def source_address(self, dst_ip):
        if dst_ip not in self._src:
            try:
                self._src[dst_ip] = self.remote.route_source(dst_ip)
            except RemoteError as exc:
                raise sources.SourceError(
                    f"probe source {self.name}: {exc}") from exc
        return self._src[dst_ip]

    def build(self, plan):
        """``[(offset_ns, dst_ip, bytes)]`` for every probe of ``plan``."""
        try:
            self.remote.connect()
            packets = sources.build_packets(plan, self.source_address)
        except RemoteError as exc:
            raise sources.SourceError(
                f"probe source {self.name}: {exc}") from exc
        return [(p.offset_ns, dst, data)
                for p, (dst, data) in zip(plan.probes, packets)]

    def prepare(self, plan):
        """Connect, learn source addresses and build, before the capture."""
        self._prepared = (plan, self.build(plan))

    def send(self, plan, deadline_s):
        if not plan.probes:
            return sources.SendResult(sent=0)
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] is plan:
            packets = prepared[1]
        else:
            packets = self.build(plan)
        budget = deadline_s - time.monotonic()
        if budget <= 0:
            return sources.SendResult(sent=0, failed=0,
                                      errors=('deadline already passed',))
        argv = ['python3', '-c', SENDER, str(len(packets)),
                f'{budget:.3f}']
        try:
            result = self.remote.run(
                argv, stdin=encode_plan(packets),
                timeout_s=budget + self.remote.options.connect_timeout_s)
        except RemoteCommandError as exc:
            raise sources.SourceError(
                f"probe source {self.name}: sender failed on "
                f"{self.remote.name} (exit status {exc.exit_status}): "
                f"{exc.stderr.strip()[-500:] or '(no stderr)'}") from exc
        except RemoteError as exc:
            raise sources.SourceError(
                f"probe source {self.name}: {exc}") from exc
        try:
            done = json.loads(result.stdout)
        except ValueError as exc:
            raise sources.SourceError(
                f"probe source {self.name}: sender answered "
                f"{result.stdout[:200]!r}") from exc
        if done.get('left'):
            LOG.warning('Probe source %(src)s stopped at its deadline: '
                        '%(left)d probes not sent',
                        {'src': self.name, 'left': done['left']})
        return sources.SendResult(sent=int(done['sent']),
                                  failed=int(done['failed']),
                                  errors=tuple(done['errors']))

    def close(self):
        self.remote.close()
