"""One probe window: capture on, probes out, capture off, match.

This is the one place where the pieces meet, in the design's one-way
order: sources → (network) → capture → latency.  The Ceilometer
pollsters, ``netweaver lab`` and the tests all measure through
:func:`run_window`.
"""

import dataclasses
import random
import time

from oslo_log import log

from netweaver_agent import capture
from netweaver_agent import latency
from netweaver_agent import sources

LOG = log.getLogger(__name__)

# CLOCK_REALTIME may be slewed by NTP (at most 500 ppm) but not stepped.
CLOCK_STEP_TOLERANCE_NS = 1_000_000
CLOCK_SLEW_PPM = 500


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
    timeout_ms: float = 200.0
    max_window_ms: float = 10000.0
    size: int = 64
    port: int | None = None

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"probe count {self.count!r} must be >= 1")
        if self.timeout_ms <= 0:
            raise ValueError(
                f"probe timeout {self.timeout_ms!r} ms must be > 0")


@dataclasses.dataclass(frozen=True, slots=True)
class WindowResult:
    """What one window measured, for every vNIC of it."""

    session: int
    started_ns: int
    duration_ns: int
    reports: dict
    capture: capture.CaptureStats
    send: sources.SendResult
    batch: capture.SightingBatch


def new_session():
    """A random 16-bit session number, never 0."""
    return random.randint(1, 0xffff)


def run_window(paths, source, settings=None, capture_netns=None,
               session=None):
    """Probe every :class:`topology.VifPath` of ``paths`` in one window.

    :param source: a :class:`sources.ProbeSource`
    :param capture_netns: namespace of the host's interfaces (None: here)
    """
    settings = settings or WindowSettings()
    paths = list(paths)
    if not paths:
        raise ValueError("a probe window needs at least one vNIC")
    session = session if session is not None else new_session()
    plan, owner = sources.interleaved_plan(
        session, settings.protocol, [p.address for p in paths],
        settings.count, int(settings.interval_ms * 1e6),
        int(settings.per_vnic_interval_ms * 1e6),
        size=settings.size, port=settings.port)
    interfaces = {name for p in paths for name in p.interfaces}
    offset_before = clock_offset_ns()
    started_ns = time.time_ns()
    t0 = time.monotonic()
    deadline = t0 + settings.max_window_ms / 1000.0
    timeout_s = settings.timeout_ms / 1000.0
    with capture.LiveCapture(session, settings.protocol,
                             netns_name=capture_netns,
                             interfaces=interfaces) as cap:
        try:
            sent = source.send(plan, deadline - timeout_s)
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
    matcher = latency.Matcher(
        session, [p.spec() for p in paths],
        {seq: paths[i].vnic for seq, i in owner.items()},
        int(settings.timeout_ms * 1e6), protocol=settings.protocol,
        capture_dropped=cap.stats.drops > 0)
    matcher.feed_batch(cap.batch)
    reports = matcher.reports()
    LOG.debug('Probe window %(session)d: %(sent)d probes to %(n)d vNICs in '
              '%(ms).1f ms, %(rows)d sightings, %(drops)d capture drops',
              {'session': session, 'sent': sent.sent, 'n': len(paths),
               'ms': duration_ns / 1e6, 'rows': len(cap.batch),
               'drops': cap.stats.drops})
    return WindowResult(session=session, started_ns=started_ns,
                        duration_ns=duration_ns, reports=reports,
                        capture=cap.stats, send=sent, batch=cap.batch)
