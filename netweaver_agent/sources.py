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

from netweaver_agent import destinations
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
    """What a source actually sent.

    Sources send a plan in order and stop at a deadline, so the probes
    they tried are the plan's first :attr:`attempted`.
    """

    sent: int
    failed: int = 0
    errors: tuple = ()

    @property
    def attempted(self):
        """How many probes of the plan, from its start, were tried."""
        return self.sent + self.failed


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """One window's plan, and what its time budget left out.

    ``owner`` maps each planned sequence number to the index of its
    target; ``wanted`` is ``count × targets``; ``step_ns`` the spacing
    between two consecutive probes; ``skipped_targets`` the indexes of
    targets that got no probe at all.
    """

    plan: ProbePlan
    owner: dict
    wanted: int
    step_ns: int
    skipped_targets: tuple = ()

    @property
    def planned(self):
        return len(self.plan.probes)

    @property
    def skipped(self):
        """Probes wanted and left out of the plan by the budget."""
        return self.wanted - self.planned

    @property
    def rounds(self):
        """Probes every planned target gets (the last round may be short)."""
        targets = max(1, len(self.plan.targets()))
        return -(-self.planned // targets)


def probe_step_ns(targets, interval_ns, per_target_interval_ns=0):
    """Spacing of consecutive probes that honours both rate limits.

    ``interval_ns`` bounds the host's rate (any two probes),
    ``per_target_interval_ns`` one target's (two probes to one vNIC,
    ``targets`` apart in a round-robin).
    """
    if interval_ns < 0 or per_target_interval_ns < 0:
        raise ValueError(
            f"probe intervals {interval_ns!r} ns and "
            f"{per_target_interval_ns!r} ns must not be negative")
    n = max(1, targets)
    return max(int(interval_ns), -(-int(per_target_interval_ns) // n))


def schedule(session, protocol, targets, count, interval_ns,
             per_target_interval_ns=0, budget_ns=None, size=64, port=None,
             first_seq=0, rotate=0):
    """Plan ``count`` probes per target, round-robin, within a budget.

    Probes go out every :func:`probe_step_ns`, so neither the host's nor
    one target's rate limit is exceeded, and each target's probes are
    spread evenly over the window.  When ``count`` rounds do not fit in
    ``budget_ns`` (the time from the first probe to the last), the plan
    keeps as many whole rounds as fit: every target gets the same, smaller
    number of probes.  If not even one round fits, the first targets (in
    the order rotated by ``rotate``, so that cycles differ in which are
    left out) get one probe each and the others are skipped; otherwise
    targets are probed in the order given.

    :param targets: destination addresses (strings), one per vNIC
    :returns: a :class:`Schedule`
    """
    if count < 0:
        raise ValueError(f"probe count {count!r} is negative")
    targets = list(targets)
    n = len(targets)
    step = probe_step_ns(n, interval_ns, per_target_interval_ns)
    wanted = count * n
    fit = wanted
    if budget_ns is not None:
        if budget_ns < 0:
            fit = 0
        elif step > 0:
            fit = min(wanted, int(budget_ns) // step + 1)
        if n and fit >= n:
            fit -= fit % n
    # Rotation only matters when some targets get no probe.
    shift = rotate if fit < n else 0
    order = [(shift + i) % n for i in range(n)] if n else []
    probes = []
    owner = {}
    seq = first_seq
    for k in range(fit):
        index = order[k % n]
        probes.append(PlannedProbe(seq=seq, dst_ip=targets[index],
                                   offset_ns=k * step))
        owner[seq] = index
        seq += 1
    covered = set(owner.values())
    skipped = tuple(i for i in order if i not in covered) if count else ()
    plan = ProbePlan(session=session, protocol=protocol,
                     probes=tuple(probes), size=size, port=port)
    return Schedule(plan=plan, owner=owner, wanted=wanted, step_ns=step,
                    skipped_targets=skipped)


def interleaved_plan(session, protocol, targets, count, interval_ns,
                     per_target_interval_ns=0, size=64, port=None,
                     first_seq=0, budget_ns=None):
    """Plan ``count`` probes per target, round-robin, evenly spaced.

    :param targets: destination addresses (strings), one per vNIC
    :param interval_ns: spacing between consecutive probes of the window
    :param per_target_interval_ns: minimum spacing between two probes to
        the same target (the window stretches to honour it)
    :param budget_ns: if given, see :func:`schedule`
    Returns ``(plan, {seq: index of target})``.
    """
    sched = schedule(session, protocol, targets, count, interval_ns,
                     per_target_interval_ns, budget_ns=budget_ns, size=size,
                     port=port, first_seq=first_seq)
    return sched.plan, sched.owner


def family_of(address):
    """``AF_INET6`` for an IPv6 address string, else ``AF_INET``."""
    return socket.AF_INET6 if ':' in address else socket.AF_INET


def pack_address(address):
    """An IPv4 or IPv6 address string as packed bytes (4 or 16)."""
    try:
        return socket.inet_pton(family_of(address), address)
    except OSError as exc:
        raise ValueError(f"invalid probe address {address!r}") from exc


def build_packets(plan, source_address):
    """``[(dst_ip, packet bytes)]`` of ``plan``, in plan order.

    :param source_address: ``dst_ip -> source address`` (string)
    """
    seqs = {}
    for p in plan.probes:
        seqs.setdefault(p.dst_ip, []).append(p.seq)
    packets = {}
    for dst, numbers in seqs.items():
        built = probe.build_ip_seqs(
            plan.protocol, plan.session, numbers,
            pack_address(source_address(dst)), pack_address(dst),
            size=plan.size, port=plan.port)
        packets.update(zip(numbers, built))
    return [(p.dst_ip, packets[p.seq]) for p in plan.probes]


class ProbeSource:
    """Base class: sends a :class:`ProbePlan`.

    ``policy`` (a :class:`destinations.DestinationPolicy`) says where its
    probes may go; :func:`measure.run_window` leaves out the vNICs it
    refuses.
    """

    name = 'abstract'
    policy = destinations.DEFAULT

    def prepare(self, plan):
        """Get ready to send ``plan`` (e.g. build its packets).

        Called before the capture opens, so the capture socket is open
        only while probes fly.  Optional: :meth:`send` works without it.
        """

    def send(self, plan, deadline_s):
        """Send the plan; stop at ``deadline_s`` (time.monotonic())."""
        raise NotImplementedError

    def discard(self):
        """Forget what :meth:`prepare` built: the window failed first."""

    def close(self):
        pass


def _source_address(dst_ip):
    """The address routing would use to reach ``dst_ip`` from here."""
    with socket.socket(family_of(dst_ip), socket.SOCK_DGRAM) as s:
        s.connect((dst_ip, 9))
        return s.getsockname()[0]


class LocalSource(ProbeSource):
    """Sends from this host's stack, or from a network namespace's.

    Probes are complete IPv4 or IPv6 packets written to an
    ``IPPROTO_RAW`` socket of their family (the header included, the
    transport checksum computed when built), so the kernel routes them and
    resolves neighbours as for any packet.
    """

    def __init__(self, netns_name=None, policy=None):
        self.netns_name = netns_name
        self.name = f'netns:{netns_name}' if netns_name else 'local'
        # 'local' sends from the host's stack: only to probe_networks.
        self.policy = policy or destinations.DestinationPolicy(
            require_networks=netns_name is None)
        self._sock = None
        self._sock6 = None
        self._src = {}
        self._prepared = None

    def _open(self, family=socket.AF_INET):
        attr = '_sock6' if family == socket.AF_INET6 else '_sock'
        if getattr(self, attr) is None:
            try:
                setattr(self, attr, netns.socket_in_netns(
                    self.netns_name, family, socket.SOCK_RAW,
                    socket.IPPROTO_RAW))
            except PermissionError as exc:
                raise SourceError(
                    f"probe source {self.name}: a raw socket needs "
                    f"CAP_NET_RAW: {exc}") from exc
        return getattr(self, attr)

    def _socket_for(self, dst_ip):
        return self._open(family_of(dst_ip))

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
        """The packets of ``plan`` as ``[(dst_ip, bytes)]``, in plan order.

        :raises destinations.RefusedDestination: a target the policy
            refuses (before anything is built)
        """
        self.policy.check_all(plan.targets())
        return build_packets(plan, self.source_address)

    def prepare(self, plan):
        self._prepared = None
        self.policy.check_all(plan.targets())
        for dst in plan.targets():
            self._socket_for(dst)
        self._prepared = (plan, self.build(plan))

    def discard(self):
        self._prepared = None

    def _transmit(self, sock, dst, data):
        sock.sendto(data, (dst, 0))

    def send(self, plan, deadline_s):
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared[0] is plan:
            packets = prepared[1]
        else:
            packets = self.build(plan)
        socks = {dst: self._socket_for(dst) for dst in plan.targets()}
        transmit = self._transmit
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
                transmit(socks[dst], dst, data)
                sent += 1
            except OSError as exc:
                failed += 1
                if len(errors) < 5:
                    errors.append(f"{dst}: {exc}")
        return SendResult(sent=sent, failed=failed, errors=tuple(errors))

    def close(self):
        for attr in ('_sock', '_sock6'):
            sock = getattr(self, attr)
            if sock is not None:
                sock.close()
                setattr(self, attr, None)


def parse_source(spec, policy=None, **ssh_options):
    """A :class:`ProbeSource` from ``local``, ``netns:NAME`` or ``ssh://``.

    ``policy``: where ``local`` and ``netns:`` probes may go (None: the
    built-in classes only; ``local`` then sends nothing, see
    :class:`destinations.DestinationPolicy`).
    """
    if not spec or spec == 'local':
        return LocalSource(policy=policy)
    if spec.startswith('netns:'):
        name = spec[len('netns:'):]
        netns.netns_path(name)
        return LocalSource(netns_name=name, policy=policy)
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
