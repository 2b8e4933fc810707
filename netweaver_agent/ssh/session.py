"""Remote hosts over SSH (paramiko): verified connect, run argv, fetch and
put files, every read bounded.

* Host keys are checked against a known_hosts file.  A host absent from it
  is refused unless :attr:`SSHOptions.accept_new_host_key` is set, which
  records the new key there; a key that differs from the recorded one is
  always refused.
* Authentication is by key only (never a password).
* Every remote command is an argument list joined with :func:`shlex.join`,
  never a string formatted from input.  A failed command raises
  :class:`RemoteCommandError` with the host, the command, its exit status
  and its stderr.
* Nothing a remote host sends is trusted to be small or quick: every
  command's output is read up to a cap (:data:`MAX_OUTPUT_BYTES` unless
  the caller gives another) and never buffered past it, a fetched file up
  to :attr:`SSHOptions.max_capture_mb`; numbers read from a remote host
  are refused past a few digits (:func:`parse_uint`).  Every command and
  every transfer has a *total* deadline: when it passes, the session is
  closed, which wakes any paramiko call blocked on the host (a host
  answering byte by byte cannot stretch it).  Exceeding either raises an
  error naming the host and the command or file.
* Remote temporary directories are removed also when the work in them
  fails.

The options come in as a :class:`SSHOptions` value: the agent makes one
from its ``[netweaver] ssh_*`` options (:mod:`netweaver_agent.agent.opts`),
``netweaver measure`` from its flags.
"""

import base64
import contextlib
import dataclasses
import hashlib
import ipaddress
import math
import os
import re
import select
import shlex
import socket
import threading
import time

from oslo_log import log
import paramiko

from netweaver_agent.core import netns

LOG = log.getLogger(__name__)

_CHUNK = 65536
# What one remote command of ours may print, stdout and stderr together:
# they print a line or a table (xe, virsh, ip route, mktemp, the sender's
# JSON).  A command that prints more is stopped there (error).
MAX_OUTPUT_BYTES = 1 << 20
# The longest decimal number read from a remote host (a pid, a dom-id):
# int() of millions of digits is slow, then raises.
MAX_INT_DIGITS = 10
# Fetched files (captures): default bound, MiB.
DEFAULT_MAX_CAPTURE_MB = 512
_UINT_RE = re.compile(rb'[0-9]{1,%d}' % MAX_INT_DIGITS)
# Outstanding SFTP read requests of one fetch (32 KiB each: 2 MiB in
# flight).  Answers are taken in only as the copy reads them.
_SFTP_REQUESTS = 64
# The longest stderr an error message quotes (the tail).
_STDERR_QUOTE = 2000
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
        quoted = stderr.strip()[-_STDERR_QUOTE:]
        super().__init__(
            f"command {shlex.join(self.argv)!r} on {host} {what}: "
            f"{quoted or '(no stderr)'}")


class OutputTooLarge(RemoteCommandError):
    """A remote command printed more than it may; reading stopped there."""


def parse_uint(text, max_digits=MAX_INT_DIGITS):
    """The non-negative decimal integer ``text`` is (str or bytes, spaces
    around allowed), or None: not ASCII digits only, or more than
    ``max_digits`` of them (a remote host chooses what it prints)."""
    if isinstance(text, str):
        text = text.encode('ascii', 'replace')
    text = text.strip()
    if not 0 < len(text) <= max_digits or not _UINT_RE.fullmatch(text):
        return None
    return int(text)


def _finite_positive(name, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and
            value > 0):
        raise ValueError(f"SSH option {name}={value!r} must be a finite "
                         "number > 0")


@dataclasses.dataclass(frozen=True, slots=True)
class SSHOptions:
    """How to reach remote hosts.  Times in seconds.

    ``command_timeout_s`` bounds each remote command and each file fetch
    as a whole; ``max_capture_mb`` bounds each fetched file (MiB).
    """

    key_file: str | None = None
    known_hosts_file: str | None = '~/.ssh/known_hosts'
    accept_new_host_key: bool = False
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 60.0
    max_capture_mb: int = DEFAULT_MAX_CAPTURE_MB

    def __post_init__(self):
        for name in ('connect_timeout_s', 'command_timeout_s',
                     'max_capture_mb'):
            _finite_positive(name, getattr(self, name))
        if self.accept_new_host_key and not self.known_hosts_file:
            raise ValueError(
                "SSH option accept_new_host_key needs a known_hosts file to "
                "record keys in (known_hosts_file is empty): without one, "
                "any host key would be accepted on every connection")

    @property
    def max_capture_bytes(self):
        return int(self.max_capture_mb * (1 << 20))

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


def _close(channel):
    """Close ``channel``; a session already gone (a deadline closed it) is
    not a new error."""
    try:
        channel.close()
    except (paramiko.SSHException, OSError, EOFError):
        pass


class _Output:
    """stdout and stderr of one command, bounded together by ``cap``."""

    def __init__(self, host, argv, cap):
        self.host = host
        self.argv = argv
        self.cap = cap
        self.out = bytearray()
        self.err = bytearray()

    def read_ready(self, channel):
        """One bounded read of each stream that has data; bytes read.

        Never asks for more than the cap leaves (plus one byte, to tell
        a command that printed exactly the cap from one that printed
        more).  :raises OutputTooLarge: past the cap
        """
        got = 0
        for ready, recv, buf in (
                (channel.recv_ready, channel.recv, self.out),
                (channel.recv_stderr_ready, channel.recv_stderr, self.err)):
            if not ready():
                continue
            room = self.cap - len(self.out) - len(self.err)
            data = recv(max(1, min(_CHUNK, room + 1)))
            buf += data
            got += len(data)
            if len(self.out) + len(self.err) > self.cap:
                del buf[len(buf) - (len(self.out) + len(self.err) -
                                    self.cap):]
                raise OutputTooLarge(
                    self.host, self.argv, None, self.stderr,
                    reason=f'printed more than {self.cap} bytes (stdout '
                           'and stderr); stopped reading there')
        return got

    @property
    def stderr(self):
        return self.err.decode('utf-8', 'replace')


class _Watchdog:
    """A total deadline for one remote operation.

    When ``timeout_s`` passes, the session's transport is closed: every
    paramiko call blocked on the host (exec, recv, an SFTP read, close)
    wakes with an error, and :attr:`fired` tells why.  The host then
    needs a new session (:meth:`RemoteHost.connect` makes one).
    """

    def __init__(self, remote, timeout_s):
        self.remote = remote
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.fired = threading.Event()
        self._transport = remote._client.get_transport()
        self._timer = threading.Timer(timeout_s, self._expire)
        self._timer.daemon = True

    def _expire(self):
        self.fired.set()
        if self._transport is not None:
            self._transport.close()

    def left(self):
        return self.deadline - time.monotonic()

    def __enter__(self):
        self._timer.start()
        return self

    def __exit__(self, *exc):
        self._timer.cancel()
        if self.fired.is_set():
            self.remote._lost()


class RemoteProcess:
    """A remote command left running (e.g. a capture), stopped by signal.

    Started through ``sh -c 'echo $$; exec "$@"' sh ARGV...``: the fixed
    script prints the process id and execs the argument list, which the
    shell passes on as positional parameters without parsing them.  What
    it prints is read up to :data:`MAX_OUTPUT_BYTES`.
    """

    def __init__(self, host, argv, channel, pid, max_output=None):
        self.host = host
        self.argv = tuple(argv)
        self.channel = channel
        self.pid = pid
        self._io = _Output(host.name, self.argv,
                           MAX_OUTPUT_BYTES if max_output is None
                           else max_output)

    def _pump(self, wait_s):
        """Wait up to ``wait_s`` for output; one bounded read per stream."""
        ch = self.channel
        if not (ch.recv_ready() or ch.recv_stderr_ready()):
            select.select([ch], [], [], wait_s)
        try:
            return self._io.read_ready(ch) > 0
        except OutputTooLarge:
            _close(ch)
            raise

    def wait_for_stderr(self, marker, timeout_s):
        """Read stderr until ``marker`` (bytes) appears; raise if it ends."""
        deadline = time.monotonic() + timeout_s
        while marker not in self._io.err:
            if self.channel.exit_status_ready() and not (
                    self.channel.recv_ready() or
                    self.channel.recv_stderr_ready()):
                raise RemoteCommandError(
                    self.host.name, self.argv,
                    self.channel.recv_exit_status(), self._io.stderr,
                    reason=f'ended before printing {marker!r}')
            left = deadline - time.monotonic()
            if left <= 0:
                raise RemoteCommandError(
                    self.host.name, self.argv, None, self._io.stderr,
                    reason=f'did not print {marker!r} within {timeout_s} s')
            self._pump(min(left, 0.2))

    def signal(self, name='INT'):
        """Send signal ``name`` to the process (``kill -s NAME PID``)."""
        self.host.run(['kill', '-s', name, str(self.pid)], check=False)

    def wait(self, timeout_s, ok=(0,)):
        """Wait for the end, at most ``timeout_s`` in all; return a
        :class:`CommandResult`."""
        deadline = time.monotonic() + timeout_s

        def timed_out():
            return RemoteCommandError(
                self.host.name, self.argv, None, self._io.stderr,
                reason=f'did not end within {timeout_s} s')

        ch = self.channel
        while not ch.exit_status_ready() or ch.recv_ready() or \
                ch.recv_stderr_ready():
            left = deadline - time.monotonic()
            if left <= 0:
                raise timed_out()
            self._pump(min(left, 0.2))
        status = ch.recv_exit_status()
        _close(ch)
        result = CommandResult(self.argv, status, bytes(self._io.out),
                               bytes(self._io.err))
        if status not in ok:
            raise RemoteCommandError(self.host.name, self.argv, status,
                                     self._io.stderr)
        return result

    def close(self):
        _close(self.channel)


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
        if self.port == 22:
            return f'{self.username}@{self.host}'
        host = f'[{self.host}]' if ':' in self.host else self.host
        return f'{self.username}@{host}:{self.port}'

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
        if opts.accept_new_host_key and not known_hosts:
            # Fail closed: with nowhere to record keys, accept-new would
            # take any key on every connection.
            raise HostKeyError(
                f"refusing to connect to {self.name}: accepting new host "
                "keys needs a known_hosts file to record them in, and none "
                "is configured (ssh_known_hosts_file is empty)")
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

    @property
    def connected(self):
        """A session is open (it may still be found lost on next use)."""
        return self._client is not None

    def close(self):
        if self._client is not None:
            self._client.close()
            self._client = None

    def _lost(self):
        """The session was closed under us (a deadline): forget it, so the
        next command connects again."""
        LOG.warning('SSH session to %s closed: an operation outlived its '
                    'deadline', self.name)
        self.close()

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

    def _timeout(self, timeout_s):
        timeout_s = timeout_s or self.options.command_timeout_s
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout {timeout_s!r} s for {self.name} is "
                             "not a finite number > 0")
        return timeout_s

    def run(self, argv, stdin=None, timeout_s=None, check=True,
            max_output=None):
        """Run ``argv`` to its end; return a :class:`CommandResult`.

        :param stdin: bytes written to the command's stdin (then EOF)
        :param timeout_s: for the whole command, its start included
            (default ``ssh_command_timeout_s``); past it the session is
            closed and :class:`RemoteCommandError` raised
        :param check: raise :class:`RemoteCommandError` on exit status != 0
        :param max_output: bytes of stdout and stderr together (default
            :data:`MAX_OUTPUT_BYTES`); past it, :class:`OutputTooLarge`
        """
        argv = tuple(str(a) for a in argv)
        timeout_s = self._timeout(timeout_s)
        io = _Output(self.name, argv, MAX_OUTPUT_BYTES if max_output is None
                     else max_output)
        self.connect()

        def timed_out():
            return RemoteCommandError(
                self.name, argv, None, io.stderr,
                reason=f'did not end within {timeout_s} s')

        with _Watchdog(self, timeout_s) as watch:
            try:
                channel = self._channel(argv)
            except RemoteCommandError:
                if watch.fired.is_set():
                    raise timed_out() from None
                raise
            pending = memoryview(stdin or b'')
            try:
                if not pending:
                    channel.shutdown_write()
                while True:
                    got = io.read_ready(channel)
                    if pending and channel.send_ready():
                        n = channel.send(pending[:_CHUNK])
                        pending = pending[n:]
                        if not pending:
                            channel.shutdown_write()
                        got += n
                    if channel.exit_status_ready() and not (
                            channel.recv_ready() or
                            channel.recv_stderr_ready()):
                        break
                    left = watch.left()
                    if left <= 0 or watch.fired.is_set():
                        raise timed_out()
                    if not got:
                        select.select([channel], [], [], min(left, 0.1))
                status = channel.recv_exit_status()
            except (paramiko.SSHException, OSError, EOFError) as exc:
                if watch.fired.is_set():
                    raise timed_out() from None
                raise RemoteCommandError(self.name, argv, None, io.stderr,
                                         reason=f'failed: {exc}') from exc
            finally:
                _close(channel)
        if watch.fired.is_set():     # the session closed before it ended
            raise timed_out()
        result = CommandResult(argv, status, bytes(io.out), bytes(io.err))
        LOG.debug('%(host)s: %(cmd)s -> %(status)d',
                  {'host': self.name, 'cmd': shlex.join(argv),
                   'status': status})
        if check and status != 0:
            raise RemoteCommandError(self.name, argv, status, io.stderr)
        return result

    def start(self, argv):
        """Start ``argv`` in the background; return a :class:`RemoteProcess`.

        The caller stops it with :meth:`RemoteProcess.signal` and reaps it
        with :meth:`RemoteProcess.wait`; bound it with its own options
        (count, ``timeout``) too, so it ends if this session is lost.
        Starting it (up to its process id) takes at most
        ``ssh_command_timeout_s``.
        """
        argv = tuple(str(a) for a in argv)
        wrapped = ('sh', '-c', 'echo $$; exec "$@"', 'sh', *argv)
        timeout_s = self.options.command_timeout_s
        self.connect()
        with _Watchdog(self, timeout_s) as watch:
            try:
                channel = self._channel(wrapped)
                channel.shutdown_write()
                proc = RemoteProcess(self, argv, channel, pid=None)
                # The pid's line: a few digits, never more than that.
                while b'\n' not in proc._io.out[:MAX_INT_DIGITS + 2]:
                    if len(proc._io.out) > MAX_INT_DIGITS + 2:
                        break
                    if channel.exit_status_ready() and not \
                            channel.recv_ready():
                        break
                    if watch.left() <= 0 or watch.fired.is_set():
                        _close(channel)
                        raise RemoteCommandError(
                            self.name, argv, None, proc._io.stderr,
                            reason='printed no process id within '
                                   f'{timeout_s} s')
                    proc._pump(min(max(watch.left(), 0), 0.2))
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise RemoteCommandError(
                    self.name, argv, None, '',
                    reason=f'could not start: {exc}') from exc
            except RemoteCommandError:
                if watch.fired.is_set():
                    raise RemoteCommandError(
                        self.name, argv, None, '',
                        reason=f'did not start within {timeout_s} s') \
                        from None
                raise
        if watch.fired.is_set():
            raise RemoteCommandError(
                self.name, argv, None, proc._io.stderr,
                reason=f'did not start within {timeout_s} s')
        line, _, _rest = bytes(proc._io.out).partition(b'\n')
        pid = parse_uint(line)
        if pid is None:
            status = (channel.recv_exit_status()
                      if channel.exit_status_ready() else None)
            _close(channel)
            raise RemoteCommandError(self.name, argv, status,
                                     proc._io.stderr,
                                     reason='could not start (no process '
                                            f'id but {line[:40]!r})')
        proc.pid = pid
        del proc._io.out[:len(line) + 1]
        return proc

    def fetch(self, remote_path, local_path, max_bytes=None,
              timeout_s=None):
        """Copy ``remote_path`` to ``local_path`` over SFTP.

        :param max_bytes: refuse a larger file (default: the options'
            ``max_capture_mb``); the copy stops there, whatever size the
            host claimed
        :param timeout_s: for the whole transfer (default
            ``ssh_command_timeout_s``)
        :raises RemoteError: naming the host and the file; ``local_path``
            is then removed
        """
        cap = self.options.max_capture_bytes if max_bytes is None \
            else max_bytes
        timeout_s = self._timeout(timeout_s)
        self.connect()
        what = f"{remote_path} from {self.name} to {local_path}"
        try:
            with _Watchdog(self, timeout_s) as watch:
                try:
                    self._copy(remote_path, local_path, cap, watch)
                except (OSError, EOFError, paramiko.SSHException,
                        paramiko.SFTPError) as exc:
                    if watch.fired.is_set() or watch.left() <= 0:
                        raise RemoteError(
                            f"cannot fetch {what}: did not finish within "
                            f"{timeout_s} s") from None
                    raise RemoteError(f"cannot fetch {what}: {exc}") \
                        from exc
            if watch.fired.is_set():
                raise RemoteError(f"cannot fetch {what}: did not finish "
                                  f"within {timeout_s} s")
        except RemoteError:
            try:
                os.unlink(local_path)
            except FileNotFoundError:
                pass
            raise
        return local_path

    def put(self, data, remote_path, timeout_s=None):
        """Write the bytes ``data`` to ``remote_path`` over SFTP (a small
        file of ours, e.g. the sender), within ``timeout_s`` in all
        (default ``ssh_command_timeout_s``).

        :raises RemoteError: naming the host and the file
        """
        timeout_s = self._timeout(timeout_s)
        self.connect()
        what = f"{remote_path} to {self.name}"
        with _Watchdog(self, timeout_s) as watch:
            try:
                sftp = self._client.open_sftp()
                try:
                    sftp.get_channel().settimeout(timeout_s)
                    with sftp.open(remote_path, 'wb') as dst:
                        dst.write(data)
                finally:
                    sftp.close()
            except (OSError, EOFError, paramiko.SSHException) as exc:
                if watch.fired.is_set():
                    raise RemoteError(f"cannot put {what}: did not finish "
                                      f"within {timeout_s} s") from None
                raise RemoteError(f"cannot put {what}: {exc}") from exc
        if watch.fired.is_set():
            raise RemoteError(f"cannot put {what}: did not finish within "
                              f"{timeout_s} s")

    def _copy(self, remote_path, local_path, cap, watch):
        sftp = self._client.open_sftp()
        try:
            channel = sftp.get_channel()
            src = sftp.open(remote_path, 'rb')
            size = src.stat().st_size
            if size is not None and size > cap:
                raise RemoteError(
                    f"cannot fetch {remote_path} from {self.name}: it "
                    f"holds {size} bytes, more than the {cap} allowed "
                    "(max_capture_mb)")
            if size:
                src.prefetch(size, _SFTP_REQUESTS)
            total = 0
            with open(local_path, 'wb') as dst:
                while True:
                    left = watch.left()
                    if left <= 0:
                        raise RemoteError(
                            f"cannot fetch {remote_path} from {self.name}: "
                            f"did not finish within {watch.timeout_s} s")
                    channel.settimeout(left)
                    data = src.read(min(_CHUNK, cap + 1 - total))
                    if not data:
                        break
                    total += len(data)
                    if total > cap:
                        raise RemoteError(
                            f"cannot fetch {remote_path} from {self.name}: "
                            f"more than the {cap} bytes allowed "
                            f"(max_capture_mb; the host announced {size}); "
                            "stopped there")
                    dst.write(data)
            # Closed politely only when all went well: after a timeout or a
            # cap the SFTP stream may hold half an answer.
            src.close()
        finally:
            try:
                sftp.close()
            except (OSError, EOFError, paramiko.SSHException):
                pass

    @contextlib.contextmanager
    def tempdir(self):
        """A fresh remote directory (``mktemp -d``), removed on exit."""
        path = self.make_tempdir()
        try:
            yield path
        finally:
            self.remove_tempdir(path)

    def make_tempdir(self):
        """A fresh remote directory (``mktemp -d``, mode 0700); the
        caller removes it with :meth:`remove_tempdir`."""
        path = self.run(['mktemp', '-d', _TMP_TEMPLATE]).text.strip()
        if not _TMP_RE.match(path):
            raise RemoteError(
                f"mktemp on {self.name} gave an unexpected path {path!r}")
        return path

    def remove_tempdir(self, path):
        """Remove a directory of :meth:`make_tempdir`; a failure is only
        logged."""
        if not _TMP_RE.match(path):
            raise ValueError(f"{path!r} is not a directory of ours")
        try:
            self.run(['rm', '-rf', '--', path], check=False)
        except RemoteError as exc:
            LOG.warning('Could not remove %(path)s on %(host)s: %(err)s',
                        {'path': path, 'host': self.name, 'err': exc})

    def route_source(self, dst_ip):
        """The source address the remote host routes ``dst_ip`` from
        (IPv4 or IPv6, as ``dst_ip``)."""
        try:
            dst = ipaddress.ip_address(dst_ip)
        except ValueError as exc:
            raise RemoteError(f"{dst_ip!r} is not an IP address") from exc
        out = self.run(['ip', f'-{dst.version}', 'route', 'get',
                        str(dst)]).text
        m = re.search(r'\bsrc ([0-9A-Fa-f:.]{2,45})(?:\s|$)', out)
        src = None
        if m:
            try:
                src = ipaddress.ip_address(m.group(1))
            except ValueError:
                pass
        if src is None or src.version != dst.version:
            raise RemoteError(
                f"{self.name} has no route with a source address to "
                f"{dst_ip}: {out.strip()[:200]!r}")
        return str(src)
