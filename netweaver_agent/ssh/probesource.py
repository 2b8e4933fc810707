"""A probe source by its option value, and the ``ssh://`` one.

``local`` and ``netns:`` sources are :mod:`netweaver_agent.core.sources`;
``ssh://user@host[:port]`` is :class:`SSHSource`.  The agent
(``[netweaver] probe_source``) and the command (``--source``) both read
their option through :func:`parse_source`.
"""

import dataclasses
import json
import math
import time
import urllib.parse

from oslo_log import log

from netweaver_agent.core import destinations
from netweaver_agent.core import netns
from netweaver_agent.core import pacing
from netweaver_agent.core import sources
from netweaver_agent.ssh import sender
from netweaver_agent.ssh import session

LOG = log.getLogger(__name__)

# What the sender prints: one short JSON line.
SENDER_OUTPUT_BYTES = 4096
# The files shipped to the remote host: {name there: local module}.
SHIPPED = {'sender.py': sender, 'pacing.py': pacing}
# Python's exit status when it cannot open the script (the shipped
# directory is gone, e.g. the host cleaned /tmp): shipped again next time.
_NO_SCRIPT = 2


def parse_source(spec, policy=None, **ssh_options):
    """A :class:`sources.ProbeSource` from ``local``, ``netns:NAME`` or
    ``ssh://``.

    ``policy``: where probes of any source may go (None: the
    built-in classes only; ``local`` then sends nothing, see
    :class:`destinations.DestinationPolicy`).  ``ssh_options``: keyword
    arguments of :class:`SSHSource` (``options``, ``netns_name``, the
    fields of :class:`session.SSHOptions`).
    """
    if not spec or spec == 'local':
        return sources.LocalSource(policy=policy)
    if spec.startswith('netns:'):
        name = spec[len('netns:'):]
        netns.netns_path(name)
        return sources.LocalSource(netns_name=name, policy=policy)
    if spec.startswith('ssh://'):
        url = urllib.parse.urlsplit(spec)
        if not url.hostname:
            raise ValueError(f"probe source {spec!r} names no host")
        return SSHSource(host=url.hostname, port=url.port or 22,
                         username=url.username or 'root', policy=policy,
                         **ssh_options)
    raise ValueError(f"unknown probe source {spec!r}: expected 'local', "
                     "'netns:NAME' or 'ssh://user@host[:port]'")


def _source_text(module):
    with open(module.__file__, 'rb') as f:
        return f.read()


def parse_sender_output(stdout, planned):
    """The sender's JSON as :class:`sources.SendResult` and the number
    left unsent; ValueError unless it is exactly what the sender prints
    (counts within ``planned``, at most :data:`pacing.MAX_ERRORS` short
    error strings)."""
    try:
        done = json.loads(stdout)
    except RecursionError:
        raise ValueError('nested too deep') from None
    if not isinstance(done, dict) or set(done) != {'sent', 'failed',
                                                   'errors', 'left'}:
        raise ValueError('not the sender\'s fields')
    counts = [done[k] for k in ('sent', 'failed', 'left')]
    if not all(type(c) is int and 0 <= c <= planned for c in counts) or \
            sum(counts) != planned:
        raise ValueError('counts do not add up to the plan')
    errors = done['errors']
    if not isinstance(errors, list) or len(errors) > pacing.MAX_ERRORS or \
            not all(isinstance(e, str) and len(e) <= pacing.MAX_ERROR_CHARS
                    for e in errors):
        raise ValueError('bad error list')
    return sources.SendResult(sent=done['sent'], failed=done['failed'],
                              errors=tuple(errors)), done['left']


class SSHSource(sources.ProbeSource):
    """Sends a probe plan from a remote host over SSH.

    The remote host tells which source address it routes each target
    from (``ip route get``); the probes are built here with
    :func:`sources.build_packets`, encoded with :func:`pacing.encode` and
    streamed to :mod:`netweaver_agent.ssh.sender` on the remote host,
    which paces them out of a raw socket with :func:`pacing.pace`,
    bounded by count and deadline.  :meth:`prepare` connects, looks the
    routes up, builds, and ships the sender (once per source, into a
    ``mktemp -d`` directory removed by :meth:`close`) before the capture
    opens.  The remote user needs CAP_NET_RAW (root) and ``python3``.

    :param options: :class:`session.SSHOptions`; keyword arguments named
        after its fields override it
    :param netns_name: open the SSH connection from this namespace
    :param policy: where probes may go (a
        :class:`destinations.DestinationPolicy`; None: the built-in classes
        only): :func:`window.run_window` leaves out the vNICs it refuses,
        and :meth:`prepare` refuses a plan to any of them before asking
        the remote host anything
    """

    def __init__(self, host, port=22, username='root', options=None,
                 netns_name=None, policy=None, **overrides):
        options = options or session.SSHOptions()
        if overrides:
            options = dataclasses.replace(options, **overrides)
        self.policy = policy or destinations.DEFAULT
        self.remote = session.RemoteHost(host, port, username, options,
                                         netns_name=netns_name)
        self.name = f'ssh://{self.remote.name}'
        self._src = {}
        self._shipped = None        # the remote directory of the sender

    def _error(self, exc):
        return sources.SourceError(f"probe source {self.name}: {exc}")

    def source_address(self, dst_ip):
        if dst_ip not in self._src:
            try:
                self._src[dst_ip] = self.remote.route_source(dst_ip)
            except session.RemoteError as exc:
                raise self._error(exc) from exc
        return self._src[dst_ip]

    def _ship(self):
        """The remote directory holding the sender and pacing.py."""
        if self._shipped is None:
            path = self.remote.make_tempdir()
            try:
                for name, module in SHIPPED.items():
                    self.remote.put(_source_text(module), f'{path}/{name}')
            except session.RemoteError:
                self.remote.remove_tempdir(path)
                raise
            self._shipped = path
        return self._shipped

    def _make_ready(self, plan):
        """Connect, learn the source addresses, build, ship the sender:
        the plan's :func:`pacing.encode` records."""
        try:
            self.remote.connect()
            packets = sources.build_packets(plan, self.source_address)
            records = pacing.encode(
                [pacing.Packet(p.offset_ns, dst, data)
                 for p, (dst, data) in zip(plan.probes, packets)])
            self._ship()
        except session.RemoteError as exc:
            raise self._error(exc) from exc
        return records

    def send(self, plan, deadline_s):
        if not plan.probes:
            self.discard()
            return sources.SendResult(sent=0)
        records = self._ready_for(plan)
        if not math.isfinite(deadline_s):
            raise ValueError(f"probe source {self.name}: deadline_s "
                             f"{deadline_s!r} is not a finite time")
        budget = deadline_s - time.monotonic()
        if budget < 0.001:      # the sender takes milliseconds (%.3f)
            return sources.SendResult(sent=0, failed=0,
                                      errors=('deadline already passed',))
        planned = len(plan.probes)
        argv = ['python3', '-E', '-s', f'{self._shipped}/sender.py',
                str(planned), f'{budget:.3f}']
        try:
            result = self.remote.run(
                argv, stdin=records,
                timeout_s=budget + self.remote.options.connect_timeout_s,
                max_output=SENDER_OUTPUT_BYTES)
        except session.RemoteCommandError as exc:
            if exc.exit_status is None:     # timed out, or printed too much
                raise self._error(f'sender {exc}') from exc
            if exc.exit_status == _NO_SCRIPT:
                self._shipped = None
            raise self._error(
                f"sender failed on {self.remote.name} (exit status "
                f"{exc.exit_status}): "
                f"{exc.stderr.strip()[-500:] or '(no stderr)'}") from exc
        except session.RemoteError as exc:
            raise self._error(exc) from exc
        try:
            sent, left = parse_sender_output(result.stdout, planned)
        except ValueError as exc:
            raise self._error(f"sender answered {result.stdout[:200]!r} "
                              f"({exc})") from exc
        if left:
            LOG.warning('Probe source %(src)s stopped at its deadline: '
                        '%(left)d probes not sent',
                        {'src': self.name, 'left': left})
        return sent

    def close(self):
        super().close()
        shipped, self._shipped = self._shipped, None
        if shipped is not None and self.remote.connected:
            self.remote.remove_tempdir(shipped)
        self.remote.close()
