"""The matcher and capture made cheaper, with the same answers.

* :func:`latency.log2_histogram` (bisecting the sorted values) puts every
  value in the bucket its definition names (the bit length of
  ``int(v) // 1000``, at least 0, at most the last);
* :meth:`capture.LiveCapture.settle` sleeps until the quiet time would
  be over (a few wake-ups), never returning before it is.
"""

import types

from hypothesis import given
from hypothesis import strategies as st

from netweaver_agent.core import capture
from netweaver_agent.core import latency


def _bucket(v):
    last = len(latency.HISTOGRAM_EDGES_US) - 1
    return min(max(int(v) // 1000, 0).bit_length(), last)


_VALUES = st.lists(st.one_of(
    st.integers(-10**4, 10**13),
    st.sampled_from([999, 1000, 1999, 2000, 2**20 * 1000 - 1,
                     2**20 * 1000, 2**21 * 1000]),
    st.floats(-5e3, 5e12, allow_nan=False)), max_size=60)


@given(values=_VALUES)
def test_every_value_lands_in_the_bucket_its_definition_names(values):
    want = [0] * len(latency.HISTOGRAM_EDGES_US)
    for v in values:
        want[_bucket(v)] += 1
    assert latency.log2_histogram(values) == tuple(want)


class Clock:
    def __init__(self):
        self.t = 100.0
        self.sleeps = []
        self.on_sleep = None

    def monotonic(self):
        return self.t

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.t += max(seconds, 0.0)
        if self.on_sleep:
            self.on_sleep(self.t)


def _capture(monkeypatch, clock):
    monkeypatch.setattr(capture, 'time', types.SimpleNamespace(
        monotonic=clock.monotonic, sleep=clock.sleep,
        monotonic_ns=lambda: int(clock.t * 1e9)))
    return capture.LiveCapture(1, 'icmp')


def test_settle_with_no_probe_sleeps_the_quiet_time_once(monkeypatch):
    clock = Clock()
    cap = _capture(monkeypatch, clock)
    cap.settle(0.2)
    assert clock.t - 100.0 >= 0.2
    assert len(clock.sleeps) == 1


def test_settle_waits_for_quiet_after_the_last_probe(monkeypatch):
    clock = Clock()
    cap = _capture(monkeypatch, clock)
    seen = []

    def probes_until(t):
        # Probes keep coming for the first 0.35 s.
        if t < 100.35:
            cap._last_probe_ns = int(t * 1e9)
            seen.append(t)
    clock.on_sleep = probes_until
    cap._last_probe_ns = int(100.0 * 1e9)
    cap.settle(0.2, max_s=5.0)
    last = cap._last_probe_ns / 1e9
    assert clock.t - last >= 0.2
    # Woken once per quiet time that a probe cut short, not every few ms.
    assert len(clock.sleeps) <= 4, clock.sleeps


def test_settle_stops_at_its_bound(monkeypatch):
    clock = Clock()
    cap = _capture(monkeypatch, clock)

    def always(t):
        cap._last_probe_ns = int(t * 1e9)
    clock.on_sleep = always
    cap._last_probe_ns = int(100.0 * 1e9)
    cap.settle(0.2, max_s=1.0)
    assert 1.0 <= clock.t - 100.0 < 1.0 + 0.2 + capture.SETTLE_SLACK_S
