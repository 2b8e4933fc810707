"""One probe window: capture on, probes out, capture off, match.

This is the one place where the pieces meet, in the design's one-way
order: sources → (network) → capture → latency.  The Ceilometer
pollsters, ``netweaver lab`` and the tests all measure through
:func:`run_window`.
"""

import collections.abc
import contextlib
import dataclasses
import math
import secrets
import time

from oslo_log import log

from netweaver_agent.core import capture
from netweaver_agent.core import destinations
from netweaver_agent.core import latency
from netweaver_agent.core import probe
from netweaver_agent.core import routes
from netweaver_agent.core import sightings
from netweaver_agent.core import sources

LOG = log.getLogger(__name__)

# CLOCK_REALTIME may be slewed by NTP (at most 500 ppm) but not stepped.
CLOCK_STEP_TOLERANCE_NS = 1_000_000
CLOCK_SLEW_PPM = 500
# Within a deadline_s, what preparing the probes and opening the capture
# (which alone waits capture.TIMESTAMP_WARMUP_S) are given before sending.
OPEN_RESERVE_S = capture.TIMESTAMP_WARMUP_S + 0.025
# What a passive capture takes beyond its window: opening (the timestamp
# warm-up), closing (the ring's last blocks) and a margin for the rest.
PASSIVE_OPEN_RESERVE_S = (capture.TIMESTAMP_WARMUP_S + capture.RING_FINISH_S
                          + 0.025)
# A probe (or reply) not seen on the other side this long after is lost:
# the default of WindowSettings and of [netweaver] probe_timeout_ms.
DEFAULT_TIMEOUT_MS = 200.0


class ClockStepError(RuntimeError):
    """CLOCK_REALTIME stepped during a window: its timestamps are void."""


def clock_offset_ns():
    """CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns."""
    return time.time_ns() - time.monotonic_ns()


@dataclasses.dataclass(frozen=True, slots=True)
class WindowSettings:
    """How one window probes.  Times in milliseconds."""

    protocol: str = 'icmp'
    count: int = 20
    interval_ms: float = 1.0
    per_vnic_interval_ms: float = 0.0
    timeout_ms: float = DEFAULT_TIMEOUT_MS
    max_window_ms: float = 10000.0
    size: int = 64
    port: int | None = None
    # Probes may reach the pif inside VXLAN to this UDP port (the capture
    # then lets those packets through too); None: no VXLAN.
    vxlan_port: int | None = None
    # The same for Geneve (RFC 8926, OVN's tunnels; IANA port 6081).
    geneve_port: int | None = None

    def __post_init__(self):
        for name in ('interval_ms', 'per_vnic_interval_ms', 'timeout_ms',
                     'max_window_ms'):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} is not a "
                                 "finite number")
        if self.count < 1:
            raise ValueError(f"probe count {self.count!r} must be >= 1")
        if self.timeout_ms <= 0:
            raise ValueError(
                f"probe timeout {self.timeout_ms!r} ms must be > 0")
        if self.max_window_ms <= self.timeout_ms:
            raise ValueError(
                f"probe window bound {self.max_window_ms!r} ms must exceed "
                f"the probe timeout {self.timeout_ms!r} ms: the last probe "
                "needs the timeout to be seen")

    @property
    def send_budget_ns(self):
        """Time from the first probe to the last that the window allows.

        The window's bound less the probe timeout (the last probe's wait).
        """
        return int((self.max_window_ms - self.timeout_ms) * 1e6)


@dataclasses.dataclass(frozen=True, slots=True)
class WindowResult:
    """What one window measured, for every vNIC of it."""

    session: int
    started_ns: int
    duration_ns: int
    reports: dict
    capture: capture.CaptureStats
    send: sources.SendResult
    batch: sightings.SightingBatch
    wanted: int = 0          # probes asked for: count × vNICs
    skipped: int = 0         # of those, not sent (window bound)
    skipped_vnics: tuple = ()  # vNICs that got no probe (no report)
    # destinations.Refusal of vNICs the source's policy left out.
    refused: tuple = ()
    # The window's secret (its probes' tags): for re-checking the batch
    # afterwards (tests, tools); never shown.
    secret: bytes | None = dataclasses.field(default=None, repr=False)
    # latency.Matcher.accepted(): the sightings the reports rest on (a
    # mapping made when first read, :class:`AcceptedSightings`).
    accepted: dict | None = dataclasses.field(default=None, repr=False)

    @property
    def trimmed(self):
        """The window's bound left probes out; reports hold fewer."""
        return self.skipped > 0


def timeout_for_delay_ms(delay_ms):
    """The probe timeout of a path that holds probes ``delay_ms``: long
    enough for a probe and its answer both held, with 100 ms to spare,
    and never below :data:`DEFAULT_TIMEOUT_MS`."""
    return max(DEFAULT_TIMEOUT_MS, 2 * delay_ms + 100.0)


def new_session():
    """A random 16-bit session number, never 0."""
    return secrets.randbelow(0xffff) + 1


def new_secret():
    """A random secret for one window's probe tags (never logged)."""
    return secrets.token_bytes(probe.SECRET_LEN)


def run_window(paths, source, settings=None, capture_netns=None,
               session=None, deadline_s=None, capture_class=None):
    """Probe every :class:`vifpath.VifPath` of ``paths`` in one window.

    The probes are scheduled by :func:`sources.schedule` within the
    settings' rate limits (``interval_ms`` for the host,
    ``per_vnic_interval_ms`` for one vNIC) and bound (``max_window_ms``,
    or ``deadline_s`` if that comes first): when they do not all fit,
    fewer rounds are sent, every vNIC keeps the same share, what was
    skipped is logged, and the reports hold what was measured.  vNICs
    that got no probe have no report.

    :param source: a :class:`sources.ProbeSource`
    :param capture_netns: namespace of the host's interfaces (None: here)
    :param deadline_s: ``time.monotonic()`` by which the window must end
        (e.g. the polling cycle's), opening the capture included: the
        schedule keeps :data:`OPEN_RESERVE_S` for that; None:
        ``max_window_ms`` from when the capture is open
    :param capture_class: what opens the capture, with
        :class:`capture.LiveCapture`'s signature and interface (None: that
        class; the pollsters pass the privsep daemon's, see
        :mod:`netweaver_agent.agent.privileged`)
    """
    settings = settings or WindowSettings()
    if deadline_s is not None and not math.isfinite(deadline_s):
        raise ValueError(f"probe window deadline_s {deadline_s!r} is not a "
                         "finite time")
    paths = list(paths)
    if not paths:
        raise ValueError("a probe window needs at least one vNIC")
    paths, refused = allowed_paths(paths, source)
    session = session if session is not None else new_session()
    # Tenants see their own probes: only this secret tells ours from
    # their look-alikes (see netweaver_agent.core.probe).
    secret = new_secret()
    t0 = time.monotonic()
    deadline = t0 + settings.max_window_ms / 1000.0
    if deadline_s is not None:
        # The schedule leaves time to open the capture (which counts
        # against deadline_s) so whole rounds fit.
        deadline = min(deadline, deadline_s - OPEN_RESERVE_S)
    timeout_s = settings.timeout_ms / 1000.0
    sched = sources.schedule(
        session, settings.protocol, [p.address for p in paths],
        settings.count, int(settings.interval_ms * 1e6),
        int(settings.per_vnic_interval_ms * 1e6),
        budget_ns=int((deadline - t0 - timeout_s) * 1e9),
        size=settings.size, port=settings.port, rotate=session,
        secret=secret)
    plan = sched.plan
    if sched.skipped:
        _log_trimmed(session, settings, paths, sched)
    if not plan.probes:
        raise ValueError(
            f"probe window {session}: no probe fits in "
            f"{(deadline - t0) * 1000:.1f} ms with a "
            f"{settings.timeout_ms} ms probe timeout")
    source.prepare(plan)
    interfaces = {name for p in paths for name in p.interfaces}
    offset_before = clock_offset_ns()
    started_ns = time.time_ns()
    capture_class = capture_class or capture.LiveCapture
    extra = {name: getattr(settings, name)
             for name in ('vxlan_port', 'geneve_port')
             if getattr(settings, name) is not None}
    # Each probe and its answer, once on every interface of a path: what
    # the capture's receive ring is sized for.
    extra['expected_packets'] = 2 * len(plan.probes) * max(
        len(p.interfaces) for p in paths)
    if settings.protocol == 'tcp':
        # TCP keys carry no session: the capture keeps the handshakes of
        # the plan's source ports only.
        extra['tcp_ports'] = sorted({p.sport for p in plan.probes})
    with _discard_on_error(source, capture_class(
            session, settings.protocol, netns_name=capture_netns,
            interfaces=interfaces, **extra)) as cap:
        # The window runs from here: building packets and opening the
        # capture do not eat its time (a cycle's deadline_s still holds).
        deadline = time.monotonic() + settings.max_window_ms / 1000.0
        if deadline_s is not None:
            deadline = min(deadline, deadline_s)
        try:
            # A source running late may still send until half the timeout
            # is left; later probes are cut (and left out of the reports).
            sent = source.send(plan, deadline - timeout_s / 2)
        finally:
            remaining = max(0.0, deadline - time.monotonic())
            cap.settle(min(timeout_s, remaining), max_s=remaining)
    duration_ns = time.time_ns() - started_ns
    step = clock_offset_ns() - offset_before
    if abs(step) > (CLOCK_STEP_TOLERANCE_NS +
                    duration_ns * CLOCK_SLEW_PPM // 1_000_000):
        LOG.warning('Probe window %(session)d thrown away: the realtime '
                    'clock stepped by %(step).3f ms during it',
                    {'session': session, 'step': step / 1e6})
        raise ClockStepError(
            f"CLOCK_REALTIME stepped by {step / 1e6:.3f} ms during probe "
            f"window {session}; its measurements are discarded")
    # Sources send in plan order and stop at the deadline: only the
    # first ``attempted`` probes count; vNICs with none have no report.
    tried = plan.probes[:max(0, min(sent.attempted, len(plan.probes)))]
    owner = {p.seq: sched.owner[p.seq] for p in tried}
    probed = set(owner.values())
    skipped_vnics = tuple(p.vif for i, p in enumerate(paths)
                          if i not in probed)
    probed = sorted(probed)
    matcher = latency.Matcher(
        session, [paths[i] for i in probed],
        {seq: paths[i].vif for seq, i in owner.items()},
        int(settings.timeout_ms * 1e6), protocol=settings.protocol,
        capture_dropped=cap.stats.drops > 0, secret=secret,
        addresses={paths[i].vif: paths[i].address for i in probed})
    matcher.feed_batch(cap.batch)
    reports = matcher.reports()
    skipped = sched.wanted - len(tried)
    if len(tried) < len(plan.probes):
        LOG.warning('Probe window %(session)d: the source sent %(n)d of '
                    '%(planned)d planned probes by the deadline; reports '
                    'hold those', {'session': session, 'n': len(tried),
                                   'planned': len(plan.probes)})
    LOG.debug('Probe window %(session)d: %(sent)d probes to %(n)d vNICs in '
              '%(ms).1f ms, %(rows)d sightings, %(drops)d capture drops',
              {'session': session, 'sent': sent.sent, 'n': len(paths),
               'ms': duration_ns / 1e6, 'rows': len(cap.batch),
               'drops': cap.stats.drops})
    return WindowResult(session=session, started_ns=started_ns,
                        duration_ns=duration_ns, reports=reports,
                        capture=cap.stats, send=sent, batch=cap.batch,
                        wanted=sched.wanted, skipped=skipped,
                        skipped_vnics=skipped_vnics, refused=refused,
                        secret=secret,
                        accepted=AcceptedSightings(matcher))


class AcceptedSightings(collections.abc.Mapping):
    """A window's :meth:`latency.Matcher.accepted`, copied out of the
    matcher when first read: tools and tests read it, the agent's cycle
    never does (a copy of every sighting, ~2.5 ms at 250 vNICs)."""

    __slots__ = ('_matcher', '_accepted')

    def __init__(self, matcher):
        self._matcher = matcher
        self._accepted = None

    def _made(self):
        if self._accepted is None:
            self._accepted = self._matcher.accepted()
            self._matcher = None
        return self._accepted

    def __getitem__(self, key):
        return self._made()[key]

    def __iter__(self):
        return iter(self._made())

    def __len__(self):
        return len(self._made())


def allowed_paths(paths, source):
    """``(paths the source may probe, destinations.Refusal of the rest)``.

    A refused address (see :mod:`destinations`) leaves out its vNIC
    alone; when every one is refused, the first refusal is raised.
    """
    policy = getattr(source, 'policy', None) or destinations.DEFAULT
    kept, refused = [], []
    for path in paths:
        why = policy.refusal(path.address)
        if why is None:
            kept.append(path)
            continue
        refused.append(destinations.Refusal(vif=path.vif,
                                            address=path.address,
                                            reason=why))
        LOG.warning('vNIC %(vnic)s not probed: destination %(addr)r '
                    'refused: %(why)s',
                    {'vnic': path.vif, 'addr': path.address, 'why': why})
    if kept and getattr(source, 'routes_here', False):
        kept, unroutable = _routable(kept, source)
        refused += unroutable
    if not kept:
        first = refused[0]
        raise destinations.RefusedDestination(first.address, first.reason)
    return kept, tuple(refused)


def _routable(paths, source):
    """``(paths, refusals)``: a ``local``/``netns:`` source's routing
    checked per vNIC (see :mod:`routes`); unreadable routes skip it."""
    try:
        bad = routes.refusals(paths, source.netns_name,
                              local=source.netns_name is None)
    except routes.RouteLookupError as exc:
        LOG.warning('Probe source %(src)s: routes not checked: %(exc)s',
                    {'src': source.name, 'exc': exc})
        return paths, []
    for why in bad:
        LOG.warning('vNIC %(vnic)s not probed: %(why)s',
                    {'vnic': why.vif, 'why': why.reason})
    out = {r.vif for r in bad}
    return [p for p in paths if p.vif not in out], bad


@contextlib.contextmanager
def _discard_on_error(source, cap):
    """``cap`` open for the window; if the window fails (the capture
    cannot open, ...) the source forgets the probes it prepared."""
    try:
        with cap:
            yield cap
    except BaseException:
        source.discard()
        raise


def _log_trimmed(session, settings, paths, sched):
    """Say what the window's bound left out, and what would fit it all."""
    need_ms = ((sched.wanted - 1) * sched.step_ns / 1e6 +
               settings.timeout_ms)
    args = {'session': session, 'wanted': sched.wanted,
            'planned': sched.planned, 'skipped': sched.skipped,
            'n': len(paths), 'count': settings.count,
            'rounds': sched.rounds, 'step': sched.step_ns / 1e6,
            'need': need_ms, 'max': settings.max_window_ms}
    LOG.warning('Probe window %(session)d: %(count)d probes to each of '
                '%(n)d vNICs every %(step).3f ms need %(need).0f ms, more '
                'than the window allows (max_window_ms %(max).0f); sending '
                '%(planned)d of %(wanted)d (%(rounds)d per vNIC), '
                '%(skipped)d skipped. Lower probe_count, or raise '
                'max_window_ms or the probe rate.', args)
    if sched.skipped_targets:
        LOG.warning('Probe window %(session)d: no probe for %(k)d of '
                    '%(n)d vNICs this cycle (%(vnics)s); each cycle starts '
                    'at another vNIC',
                    {'session': session, 'k': len(sched.skipped_targets),
                     'n': len(paths),
                     'vnics': ', '.join(paths[i].vif
                                        for i in sched.skipped_targets)})


@dataclasses.dataclass(frozen=True, slots=True)
class PassiveWindowResult:
    """One passive window: ``{vnic: passive.PassiveResult}`` and the
    capture's :class:`passivecapture.PassiveStats`."""

    results: dict
    stats: object
    sample: int
    duration_ns: int
    # How long the capture watched (passive_window_ms, or less where the
    # cycle's deadline cut it).
    window_ms: float = 0.0


def passive_window_within(window_ms, deadline_s, now_s=None):
    """How many ms of a ``window_ms`` passive window fit by
    ``deadline_s`` (``time.monotonic()``), opening and closing the
    capture included (:data:`PASSIVE_OPEN_RESERVE_S`): ``window_ms``, or
    less, or 0.0 when nothing fits.  ``deadline_s`` None: ``window_ms``."""
    if deadline_s is None:
        return float(window_ms)
    if not math.isfinite(deadline_s):
        raise ValueError(f"passive window deadline_s {deadline_s!r} is not "
                         "a finite time")
    now_s = time.monotonic() if now_s is None else now_s
    left_ms = (deadline_s - now_s - PASSIVE_OPEN_RESERVE_S) * 1000.0
    return max(0.0, min(float(window_ms), left_ms))


def passive_specs(paths):
    """:class:`passive.VifSpec` of each path (vif, pif, its address)."""
    from netweaver_agent.core import passive
    return [passive.VifSpec(p.vif, p.pif,
                            frozenset({passive.address(p.address)}))
            for p in paths]


def run_passive_window(paths, sample, window_ms, max_packets,
                       capture_netns=None, capture_in=None, vxlan_port=None,
                       geneve_port=None, deadline_s=None):
    """Watch the instances' own traffic for ``window_ms`` (no probe
    sent) and match it per vNIC (:mod:`passive`).

    ``deadline_s``: ``time.monotonic()`` by which the window must be over,
    opening and closing the capture included (the polling cycle's): the
    window is cut to fit (:func:`passive_window_within`); ValueError when
    not even 1 ms fits.  None: ``window_ms`` whatever it takes.

    ``capture_in``: what captures elsewhere, called as
    ``capture_in(netns_name, interfaces, sample, window_ms, max_packets,
    vxlan_port, geneve_port)`` and returning ``(sightings, stats)`` (the
    agent passes its privsep daemon's, see
    ``netweaver_agent.agent.privileged.passive_window``); None: captured
    in this process.
    """
    from netweaver_agent.core import passive
    from netweaver_agent.core import passivecapture
    specs = passive_specs(paths)
    interfaces = sorted({s.pif for s in specs} | {s.vif for s in specs})
    start = time.monotonic_ns()
    wanted_ms = window_ms
    window_ms = passive_window_within(window_ms, deadline_s,
                                      start / 1e9)
    if window_ms < 1.0:
        raise ValueError(
            f"passive window: no time left by the cycle's deadline for "
            f"any of its {wanted_ms} ms (the capture needs "
            f"{PASSIVE_OPEN_RESERVE_S * 1000:.0f} ms to open and close)")
    if window_ms < wanted_ms:
        LOG.debug('Passive window cut from %(want).0f to %(ms).0f ms by '
                  "the cycle's deadline",
                  {'want': wanted_ms, 'ms': window_ms})
    if capture_in is not None:
        sightings, stats = capture_in(
            capture_netns, interfaces, sample, int(window_ms),
            max_packets, vxlan_port, geneve_port)
    else:
        with passivecapture.PassiveCapture(
                sample, netns_name=capture_netns, interfaces=interfaces,
                cap=max_packets, vxlan_port=vxlan_port,
                geneve_port=geneve_port) as cap:
            time.sleep(window_ms / 1000.0)
        sightings, stats = cap.sightings, cap.stats
    return PassiveWindowResult(results=passive.match(sightings, specs),
                               stats=stats, sample=sample,
                               duration_ns=time.monotonic_ns() - start,
                               window_ms=window_ms)
