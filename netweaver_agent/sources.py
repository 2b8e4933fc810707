"""Probe sources: where probes are sent from.

* ``local``: this host's own stack (valid only where routing takes the
  probes out and back in through the pif);
* ``netns:NAME``: a network namespace attached to the physical network
  (the lab's source; needs CAP_SYS_ADMIN to enter it);
* ``ssh://user@host[:port]``: a remote host, over SSH (see
  :mod:`netweaver_agent.remote`).

A source takes a :class:`ProbePlan` (which packet, to which address, at
which offset in the window) and sends it, bounded in count and time.
"""

import dataclasses
import socket
import time
import urllib.parse

from oslo_log import log

from netweaver_agent import netns
from netweaver_agent import probe

LOG = log.getLogger(__name__)


class SourceError(RuntimeError):
    """A probe source could not send."""


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedProbe:
    """One probe to send: sequence, destination, offset in the window."""

    seq: int
    dst_ip: str
    offset_ns: int


@dataclasses.dataclass(frozen=True, slots=True)
class ProbePlan:
    """Every probe of one window, in sending order."""

    session: int
    protocol: str
    probes: tuple
    size: int = 64
    port: int | None = None

    @property
    def duration_ns(self):
        return self.probes[-1].offset_ns if self.probes else 0

    def targets(self):
        """The distinct destination addresses, in first-use order."""
        return list(dict.fromkeys(p.dst_ip for p in self.probes))


@dataclasses.dataclass(frozen=True, slots=True)
class SendResult:
    """What a source actually sent."""

    sent: int
    failed: int = 0
    errors: tuple = ()


def interleaved_plan(session, protocol, targets, count, interval_ns,
                     per_target_interval_ns=0, size=64, port=None,
                     first_seq=0):
    """Plan ``count`` probes per target, round-robin, evenly spaced.

    :param targets: destination addresses (strings), one per vNIC
    :param interval_ns: spacing between consecutive probes of the window
    :param per_target_interval_ns: minimum spacing between two probes to
        the same target (the window stretches to honour it)
    Returns ``(plan, {seq: index of target})``.
    """
    if count < 0:
        raise ValueError(f"probe count {count!r} is negative")
    step = max(interval_ns,
               per_target_interval_ns // max(1, len(targets)))
    probes = []
    owner = {}
    seq = first_seq
    for round_ in range(count):
        for index, dst in enumerate(targets):
            offset = (round_ * len(targets) + index) * step
            probes.append(PlannedProbe(seq=seq, dst_ip=dst,
                                       offset_ns=offset))
            owner[seq] = index
            seq += 1
    return (ProbePlan(session=session, protocol=protocol,
                      probes=tuple(probes), size=size, port=port), owner)


class ProbeSource:
    """Base class: sends a :class:`ProbePlan`."""

    name = 'abstract'

    def send(self, plan, deadline_s):
        """Send the plan; stop at ``deadline_s`` (time.monotonic())."""
        raise NotImplementedError

    def close(self):
        pass


def _source_address(dst_ip):
    """The address routing would use to reach ``dst_ip`` from here."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((dst_ip, 9))
        return s.getsockname()[0]


class LocalSource(ProbeSource):
    """Sends from this host's stack, or from a network namespace's.

    Probes are complete IPv4 packets written to an ``IPPROTO_RAW`` socket,
    so the kernel routes them and resolves neighbours as for any packet.
    """

    def __init__(self, netns_name=None):
        self.netns_name = netns_name
        self.name = f'netns:{netns_name}' if netns_name else 'local'
        self._sock = None
        self._src = {}

    def _open(self):
        if self._sock is None:
            try:
                self._sock = netns.socket_in_netns(
                    self.netns_name, socket.AF_INET, socket.SOCK_RAW,
                    socket.IPPROTO_RAW)
            except PermissionError as exc:
                raise SourceError(
                    f"probe source {self.name}: a raw socket needs "
                    f"CAP_NET_RAW: {exc}") from exc
        return self._sock

    def source_address(self, dst_ip):
        if dst_ip not in self._src:
            try:
                self._src[dst_ip] = netns.run_in_netns(
                    self.netns_name, _source_address, dst_ip)
            except OSError as exc:
                raise SourceError(
                    f"probe source {self.name} has no route to "
                    f"{dst_ip}: {exc}") from exc
        return self._src[dst_ip]

    def build(self, plan):
        """The packets of ``plan`` as ``[(dst_ip, bytes)]``."""
        out = []
        for p in plan.probes:
            src = socket.inet_aton(self.source_address(p.dst_ip))
            out.append((p.dst_ip, probe.build_ip(
                plan.protocol, plan.session, p.seq, src,
                socket.inet_aton(p.dst_ip), size=plan.size,
                port=plan.port)))
        return out

    def send(self, plan, deadline_s):
        sock = self._open()
        packets = self.build(plan)
        start = time.monotonic()
        sent = failed = 0
        errors = []
        for p, (dst, data) in zip(plan.probes, packets):
            due = start + p.offset_ns / 1e9
            now = time.monotonic()
            if due > deadline_s or now > deadline_s:
                LOG.warning('Probe source %(src)s stopped at its deadline: '
                            '%(left)d probes not sent',
                            {'src': self.name,
                             'left': len(plan.probes) - sent - failed})
                break
            if due > now:
                time.sleep(due - now)
            try:
                sock.sendto(data, (dst, 0))
                sent += 1
            except OSError as exc:
                failed += 1
                if len(errors) < 5:
                    errors.append(f"{dst}: {exc}")
        return SendResult(sent=sent, failed=failed, errors=tuple(errors))

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def parse_source(spec, **ssh_options):
    """A :class:`ProbeSource` from ``local``, ``netns:NAME`` or ``ssh://``."""
    if not spec or spec == 'local':
        return LocalSource()
    if spec.startswith('netns:'):
        name = spec[len('netns:'):]
        netns.netns_path(name)
        return LocalSource(netns_name=name)
    if spec.startswith('ssh://'):
        url = urllib.parse.urlsplit(spec)
        if not url.hostname:
            raise ValueError(f"probe source {spec!r} names no host")
        from netweaver_agent import remote
        return remote.SSHSource(host=url.hostname, port=url.port or 22,
                                username=url.username or 'root',
                                **ssh_options)
    raise ValueError(f"unknown probe source {spec!r}: expected 'local', "
                     "'netns:NAME' or 'ssh://user@host[:port]'")
