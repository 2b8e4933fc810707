"""Probe sources: where probes are sent from.

* ``local``: this host's own stack (valid only where routing takes the
  probes out and back in through the pif);
* ``netns:NAME``: a network namespace attached to the physical network
  (the lab's source; needs CAP_SYS_ADMIN to enter it);
* ``ssh://user@host[:port]``: a remote host, over SSH (see
  :mod:`netweaver_agent.ssh.probesource`).

A source takes a :class:`ProbePlan` (which packet, to which address, at
which offset in the window) and sends it, bounded in count and time.
:meth:`ProbeSource.prepare` makes it ready before the capture opens (a
:class:`Prepared`, taken by :meth:`ProbeSource.send`); every source paces
with :func:`pacing.pace`.

TCP probes each get a 5-tuple of their own: :func:`schedule` takes their
source ports from a :class:`PortCursor` that walks the configured range
per destination and is kept across windows (one per process by default),
so a port comes back for the same destination only when the cursor wraps.
Stateful firewalls (conntrack keeps a SYN_SENT entry 120 s) then never see
a SYN repeated on one connection.
"""

import collections
import dataclasses
import re
import secrets
import socket
import threading

from oslo_log import log

from netweaver_agent.core import destinations
from netweaver_agent.core import netns
from netweaver_agent.core import pacing
from netweaver_agent.core import probe
from netweaver_agent.core import sendloop

LOG = log.getLogger(__name__)


class SourceError(RuntimeError):
    """A probe source could not send."""


# Linux's conntrack keeps a TCP connection in SYN_SENT this long
# (nf_conntrack_tcp_timeout_syn_sent): a port must not come back for the
# same destination sooner.
SYN_SENT_TIMEOUT_S = 120
# Destinations a PortCursor remembers; the oldest is forgotten past this
# (it then starts again at a random place of the range).
MAX_CURSOR_DESTINATIONS = 65536


@dataclasses.dataclass(frozen=True, slots=True)
class PlannedProbe:
    """One probe to send: sequence, destination, offset in the window.

    For TCP, ``seq`` is a :func:`probe.tcp_ident`: it holds the probe's
    own source port (:attr:`sport`), which the matcher's key holds too.
    """

    seq: int
    dst_ip: str
    offset_ns: int

    @property
    def sport(self):
        """The TCP source port of this probe; None for ICMP/UDP."""
        return probe.tcp_ident_port(self.seq)


def parse_port_range(text, name='tcp_source_ports'):
    """A :class:`range` of ports from ``'LOW-HIGH'`` (both included).

    :param name: the option or flag that gave ``text``, for the error
    """
    found = re.fullmatch(r'\s*(\d{1,5})\s*-\s*(\d{1,5})\s*', text or '')
    if not found:
        raise ValueError(f"{name} {text!r} is not a port range like "
                         "'33000-60999'")
    low, high = int(found.group(1)), int(found.group(2))
    if not 1 <= low <= high <= 0xffff:
        raise ValueError(f"{name} {text!r}: need 1 <= first port <= last "
                         "port <= 65535")
    return range(low, high + 1)


def tcp_ports_needed(count, intervals_s):
    """Source ports one destination uses within a SYN_SENT timeout.

    ``count`` probes per window, one window per polling cycle of each
    interval in ``intervals_s`` (seconds; the polling task of each
    distinct interval runs its own window): at most
    ``ceil(SYN_SENT_TIMEOUT_S / interval)`` windows of each fall within
    :data:`SYN_SENT_TIMEOUT_S`.
    """
    return sum(count * -(-SYN_SENT_TIMEOUT_S // max(1, int(i)))
               for i in set(intervals_s))


class PortCursor:
    """Source ports for TCP probes: one cursor per destination.

    Each destination's ports walk ``ports`` in order from a random start
    (so two processes, or a restarted agent, do not walk in step), and a
    port comes back for that destination only after the whole range.
    Thread-safe; remembers :data:`MAX_CURSOR_DESTINATIONS` destinations.

    :param start: ``f(len(ports)) -> index`` of a new destination's first
        port (default: a random one)
    """

    def __init__(self, ports=probe.DEFAULT_TCP_SOURCE_PORTS, start=None):
        ports = range(ports.start, ports.stop)
        if not ports or ports[0] < 1 or ports[-1] > 0xffff:
            raise ValueError(f"TCP source port range {ports!r} is not a "
                             "non-empty range within 1..65535")
        self.ports = ports
        self._start = start or secrets.randbelow
        self._next = collections.OrderedDict()
        self._lock = threading.Lock()

    def take(self, dst_ip, n):
        """The next ``n`` source ports for ``dst_ip``, in order."""
        size = len(self.ports)
        with self._lock:
            at = self._next.pop(dst_ip, None)
            if at is None:
                at = self._start(size) % size
            self._next[dst_ip] = (at + n) % size
            while len(self._next) > MAX_CURSOR_DESTINATIONS:
                self._next.popitem(last=False)
        return [self.ports[(at + k) % size] for k in range(n)]


_cursor_lock = threading.Lock()
_cursor = None


def tcp_port_cursor(ports=None):
    """The process's :class:`PortCursor`, kept across windows.

    ``ports``: the configured range; a different range than the current
    cursor's starts a new cursor (None: keep the current one, or the
    default range).
    """
    global _cursor
    with _cursor_lock:
        if _cursor is None or (ports is not None and
                               range(ports.start, ports.stop) !=
                               _cursor.ports):
            _cursor = PortCursor(ports if ports is not None
                                 else probe.DEFAULT_TCP_SOURCE_PORTS)
        return _cursor


@dataclasses.dataclass(frozen=True, slots=True)
class ProbePlan:
    """Every probe of one window, in sending order.

    ``secret``: the window's secret, which tags its probes (see
    :mod:`netweaver_agent.core.probe`); never shown (not in the repr).  None:
    unauthenticated probes.
    """

    session: int
    protocol: str
    probes: tuple
    size: int = 64
    port: int | None = None
    secret: bytes | None = dataclasses.field(default=None, repr=False)

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
             first_seq=0, rotate=0, tcp_ports=None, secret=None):
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

    TCP probes get their source ports from ``tcp_ports`` (a
    :class:`PortCursor`; None: the process's, :func:`tcp_port_cursor`),
    and their ``seq`` is :func:`probe.tcp_ident` of port and number.

    :param targets: destination addresses (strings), one per vNIC
    :param secret: the window's secret (:attr:`ProbePlan.secret`)
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
    ports = _tcp_source_ports(protocol, tcp_ports, targets,
                              [order[k % n] for k in range(fit)])
    for k in range(fit):
        index = order[k % n]
        ident = (seq if ports is None else
                 probe.tcp_ident(next(ports[index]), seq))
        probes.append(PlannedProbe(seq=ident, dst_ip=targets[index],
                                   offset_ns=k * step))
        owner[ident] = index
        seq += 1
    covered = set(owner.values())
    skipped = tuple(i for i in order if i not in covered) if count else ()
    plan = ProbePlan(session=session, protocol=protocol,
                     probes=tuple(probes), size=size, port=port,
                     secret=secret)
    return Schedule(plan=plan, owner=owner, wanted=wanted, step_ns=step,
                    skipped_targets=skipped)


def _tcp_source_ports(protocol, cursor, targets, indexes):
    """``{target index: iterator of its ports}`` for a TCP plan, else None.

    Each target takes as many ports as it has probes in ``indexes``; a
    target listed twice shares one cursor entry.
    """
    if protocol != 'tcp':
        return None
    cursor = cursor or tcp_port_cursor()
    wanted = collections.Counter(indexes)
    by_dst = collections.Counter()
    for index, k in wanted.items():
        by_dst[targets[index]] += k
    taken = {dst: iter(cursor.take(dst, k)) for dst, k in by_dst.items()}
    return {index: taken[targets[index]] for index in wanted}


def pack_address(address):
    """An IPv4 or IPv6 address string as packed bytes (4 or 16)."""
    try:
        return socket.inet_pton(pacing.family_of(address), address)
    except OSError as exc:
        raise ValueError(f"invalid probe address {address!r}") from exc


def build_packets(plan, source_address):
    """``[(dst_ip, packet bytes)]`` of ``plan``, in plan order, tagged
    with the plan's secret.

    :param source_address: ``dst_ip -> source address`` (string)
    """
    seqs = {}
    for p in plan.probes:
        seqs.setdefault(p.dst_ip, []).append(p.seq)
    packets = {}
    v4 = None       # one probe.V4Builder for the plan's IPv4 ICMP/UDP
    for dst, numbers in seqs.items():
        src_ip, dst_ip = pack_address(source_address(dst)), pack_address(dst)
        if probe.v4_builder_fits(plan.protocol, numbers, src_ip, dst_ip):
            if v4 is None:
                v4 = probe.V4Builder(plan.protocol, plan.session,
                                     size=plan.size, port=plan.port,
                                     secret=plan.secret)
            built = v4.build(numbers, src_ip, dst_ip)
        else:
            built = probe.build_ip_seqs(
                plan.protocol, plan.session, numbers, src_ip, dst_ip,
                size=plan.size, port=plan.port, secret=plan.secret)
        packets.update(zip(numbers, built))
    return [(p.dst_ip, packets[p.seq]) for p in plan.probes]


@dataclasses.dataclass(frozen=True, slots=True)
class Prepared:
    """What a source made ready for one plan before the capture opened
    (its packets, their encoding, a daemon's handle): ``payload``, which
    only that source reads."""

    plan: ProbePlan
    payload: object


class ProbeSource:
    """Base class: sends a :class:`ProbePlan`.

    ``policy`` (a :class:`destinations.DestinationPolicy`) says where its
    probes may go; :func:`window.run_window` leaves out the vNICs it
    refuses.  The prepared-plan handoff is here, once: :meth:`prepare`
    checks the plan against the policy and keeps a :class:`Prepared` of
    what :meth:`_make_ready` returns; :meth:`_ready_for` (in
    :meth:`send`) takes it back, or makes it then; :meth:`discard` hands a
    payload never sent to :meth:`_forget`.
    """

    name = 'abstract'
    policy = destinations.DEFAULT
    #: its routing is this host's (or a namespace's of it): window.py
    #: checks each vNIC's route before a window (see :mod:`routes`)
    routes_here = False
    _prepared = None

    def prepare(self, plan):
        """Get ready to send ``plan`` (e.g. build its packets).

        Called before the capture opens, so the capture socket is open
        only while probes fly.  Optional: :meth:`send` works without it.

        :raises destinations.RefusedDestination: a target the policy
            refuses (before anything is made)
        """
        self.discard()
        self.policy.check_all(plan.targets())
        self._prepared = Prepared(plan, self._make_ready(plan))

    def _make_ready(self, plan):
        """What :meth:`send` needs for ``plan`` (policy checked)."""
        return None

    def _forget(self, payload):
        """Release a payload prepared and never sent."""

    def _ready_for(self, plan):
        """The payload prepared for ``plan`` (taken), or made now."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            if prepared.plan is plan:
                return prepared.payload
            self._forget(prepared.payload)
        self.policy.check_all(plan.targets())
        return self._make_ready(plan)

    def send(self, plan, deadline_s):
        """Send the plan; stop at ``deadline_s`` (time.monotonic())."""
        raise NotImplementedError

    def discard(self):
        """Forget what :meth:`prepare` made: the window failed first."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            self._forget(prepared.payload)

    def close(self):
        self.discard()


def _source_address(dst_ip):
    """The address routing would use to reach ``dst_ip`` from here."""
    with socket.socket(pacing.family_of(dst_ip), socket.SOCK_DGRAM) as s:
        s.connect((dst_ip, 9))
        return s.getsockname()[0]


def _source_addresses(dsts):
    """``{dst: source address or the OSError}`` of every address of
    ``dsts``, asked here: one namespace entry for a whole window."""
    out = {}
    for dst in dsts:
        try:
            out[dst] = _source_address(dst)
        except OSError as exc:
            out[dst] = exc
    return out


class LocalSource(ProbeSource):
    """Sends from this host's stack, or from a network namespace's.

    Probes are complete IPv4 or IPv6 packets written to an
    ``IPPROTO_RAW`` socket of their family (the header included, the
    transport checksum computed when built), so the kernel routes them and
    resolves neighbours as for any packet.
    """

    routes_here = True
    #: ``f(largest packet bytes, count)``, called before each batch of
    #: probes leaves (it may sleep), or None
    _gate = None

    def __init__(self, netns_name=None, policy=None):
        self.netns_name = netns_name
        self.name = f'netns:{netns_name}' if netns_name else 'local'
        # 'local' sends from the host's stack: only to probe_networks.
        self.policy = policy or destinations.DestinationPolicy(
            require_networks=netns_name is None)
        self._sock = None
        self._sock6 = None
        self._src = {}

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
        return self._open(pacing.family_of(dst_ip))

    def _c_gate(self):
        """The C loop's gate: :attr:`_gate`, or a
        :class:`sendloop.Limiter` the loop applies without Python."""
        return self._gate

    def source_address(self, dst_ip):
        if dst_ip not in self._src:
            self.source_addresses([dst_ip])
        return self._src[dst_ip]

    def source_addresses(self, dsts):
        """Learn the source address of every one of ``dsts`` not known
        yet, in one entry into the source's namespace (a window's
        hundreds of vNICs: one thread, not one each).

        :raises SourceError: the first of them with no route
        """
        missing = [d for d in dict.fromkeys(dsts) if d not in self._src]
        if not missing:
            return
        try:
            found = netns.run_in_netns(self.netns_name, _source_addresses,
                                       missing)
        except OSError as exc:
            raise SourceError(
                f"probe source {self.name} has no route to "
                f"{missing[0]}: {exc}") from exc
        for dst in missing:
            got = found[dst]
            if isinstance(got, OSError):
                raise SourceError(
                    f"probe source {self.name} has no route to "
                    f"{dst}: {got}") from got
            self._src[dst] = got

    def build(self, plan):
        """The packets of ``plan`` as ``[(dst_ip, bytes)]``, in plan order.

        :raises destinations.RefusedDestination: a target the policy
            refuses (before anything is built)
        """
        targets = plan.targets()
        self.policy.check_all(targets)
        self.source_addresses(targets)
        return build_packets(plan, self.source_address)

    def _make_ready(self, plan):
        """Sockets open, packets built: :class:`sendloop.PackedPackets`."""
        for dst in plan.targets():
            self._socket_for(dst)
        return sendloop.PackedPackets.pack([
            (p.offset_ns, dst, data)
            for p, (dst, data) in zip(plan.probes, self.build(plan))])

    def _transmit(self, sock, dst, data):
        sock.sendto(data, (dst, 0))

    def _send_batch(self, socks, batch):
        """Send the packets of one wake-up (``batch``, to different
        destinations; ``socks``: destination -> socket): the failed ones
        as ``[(packet, OSError)]``.  Each goes through :meth:`_transmit`
        when a subclass changes it."""
        bad = []
        if self._gate is not None:
            self._gate(max(len(p.data) for p in batch), len(batch))
        if type(self)._transmit is LocalSource._transmit:
            for p in batch:
                try:
                    socks[p.dst_ip].sendto(p.data, (p.dst_ip, 0))
                except OSError as exc:
                    bad.append((p, exc))
            return bad
        transmit = self._transmit
        for p in batch:
            try:
                transmit(socks[p.dst_ip], p.dst_ip, p.data)
            except OSError as exc:
                bad.append((p, exc))
        return bad

    def send(self, plan, deadline_s):
        packed = self._ready_for(plan)
        if sendloop.available() and \
                type(self)._transmit is LocalSource._transmit:
            # Written as they are: the C loop, no Python per probe.
            done = sendloop.send(packed, self._socket_for, deadline_s,
                                 gate=self._c_gate())
        else:
            socks = {dst: self._socket_for(dst) for dst in packed.dsts}
            send_batch = self._send_batch
            done = pacing.pace(packed.packets(), None, deadline_s,
                               transmit_many=lambda b: send_batch(socks, b))
        if done.left:
            LOG.warning('Probe source %(src)s stopped at its deadline: '
                        '%(left)d probes not sent',
                        {'src': self.name, 'left': done.left})
        return SendResult(sent=done.sent, failed=done.failed,
                          errors=done.errors)

    def close(self):
        super().close()
        for attr in ('_sock', '_sock6'):
            sock = getattr(self, attr)
            if sock is not None:
                sock.close()
                setattr(self, attr, None)
