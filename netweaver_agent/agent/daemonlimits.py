"""The privsep daemon's built-in maxima, and what they mean for the
options.

The daemon (:mod:`netweaver_agent.agent.privileged`) holds to
:data:`LIMITS` whatever the agent asks; the options check
(:mod:`netweaver_agent.agent.opts`) refuses at load settings whose
windows would go past them (:func:`settings_problems`).  Here, apart
from the daemon, so that the options need not import it.
"""

import dataclasses
import math


# Memory of one prepared probe beyond its packet bytes (its plan entry,
# the bytes object, list slots): measured 220-290 B with tracemalloc.
PROBE_OVERHEAD_B = 320


@dataclasses.dataclass(frozen=True, slots=True)
class DaemonLimits:
    """The privsep daemon's maxima; built in, configuration only lowers.

    They bound what the daemon does for the agent: probes per second and
    bytes per second (over all windows together), probes per window,
    handles held (captures and prepared probes), captures open, memory
    of prepared probes (``PROBE_OVERHEAD_B`` + size per probe), the
    receive ring of one capture (sized from the window's expected
    sightings, never above ``ring_bytes``) and the threads it starts (one
    per capture, one reaper).  Under rootwrap
    (OpenStack's model) whoever runs as the agent's user can start a
    daemon of their own: the maxima guard against agent bugs, not
    against a compromised agent user.
    """

    probes_per_s: int = 100_000
    bytes_per_s: int = 25_000_000          # 200 Mbit/s
    probes_per_window: int = 500_000
    prepared_bytes: int = 256 * 2**20
    handles: int = 16
    captures: int = 4
    threads: int = 8
    ring_bytes: int = 64 * 2**20

    def lowered(self, **values):
        """These limits with some lowered (a higher value is ignored)."""
        for name, value in values.items():
            if value is not None and value < getattr(self, name):
                if value < 1:
                    raise ValueError(f"daemon limit {name} {value!r} must "
                                     "be >= 1")
                self = dataclasses.replace(self, **{name: int(value)})
        return self

    def min_step_ns(self, size):
        """Shortest spacing of two probes of ``size`` bytes."""
        return max(-(-10**9 // self.probes_per_s),
                   -(-size * 10**9 // self.bytes_per_s))

    def max_planned(self, size):
        """Most probes of ``size`` bytes one window may prepare."""
        return min(self.probes_per_window,
                   self.prepared_bytes // (size + PROBE_OVERHEAD_B))


LIMITS = DaemonLimits()


class LimitError(ValueError):
    """A request beyond the privsep daemon's :class:`DaemonLimits`."""


def settings_problems(interval_ms, size, max_window_ms, timeout_ms,
                      limits=LIMITS):
    """Why windows of these settings would exceed the daemon's limits.

    The schedule spaces probes at least ``interval_ms`` apart within
    ``max_window_ms`` less the timeout: that bounds the plan whatever the
    number of vNICs.  Returns messages naming the options (empty: fine).
    """
    out = []
    values = (interval_ms, max_window_ms, timeout_ms)
    if not all(math.isfinite(v) for v in values) or interval_ms <= 0:
        return out
    step_ns = int(interval_ms * 1e6)
    need_ns = limits.min_step_ns(size)
    if step_ns < need_ns:
        out.append(
            f"[netweaver] probe_interval_ms = {interval_ms:g} with "
            f"probe_size = {size} sends faster than the privsep daemon's "
            f"{limits.probes_per_s} probes/s and {limits.bytes_per_s} "
            f"bytes/s: raise probe_interval_ms to at least "
            f"{need_ns / 1e6:g}")
    budget_ns = max(0, int((max_window_ms - timeout_ms) * 1e6))
    planned = budget_ns // max(1, step_ns) + 1
    most = limits.max_planned(size)
    if planned > most:
        out.append(
            f"[netweaver] max_window_ms = {max_window_ms:g} with "
            f"probe_interval_ms = {interval_ms:g} lets one window plan "
            f"{planned} probes of {size} bytes; the privsep daemon takes "
            f"at most {most}: raise probe_interval_ms to at least "
            f"{budget_ns / max(1, most - 1) / 1e6:g} or lower "
            f"max_window_ms to at most "
            f"{(most - 1) * step_ns / 1e6 + timeout_ms:g}")
    return out
