"""Fakes of a window's network boundary shared by unit tests of
:func:`measure.run_window`: a capture that sees nothing and a source
that sends everything, both without sockets; and oslo.privsep's wire
without the daemon."""

import socket
import types

from oslo_privsep import comm

from netweaver_agent.core import capture
from netweaver_agent.core import sightings
from netweaver_agent.core import sources


class SilentCapture:
    """A capture that opens nothing and sees nothing; :attr:`extra` is
    what it was made with beyond session, protocol, namespace and
    interfaces."""

    def __init__(self, session, protocol='icmp', netns_name=None,
                 interfaces=None, **extra):
        self.extra = extra
        self.batch = sightings.SightingBatch(session)
        self.stats = capture.CaptureStats(packets=0, drops=0, probes=0,
                                          foreign=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def settle(self, quiet_s, max_s=None):
        pass


def recording_capture(made):
    """A :class:`SilentCapture` class whose captures append their
    :attr:`SilentCapture.extra` to the list ``made``."""

    class RecordingCapture(SilentCapture):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self.extra)

    return RecordingCapture


class AllSentSource(sources.ProbeSource):
    """Says it sent every probe of the plan (sends nothing)."""

    name = 'recorder'

    def send(self, plan, deadline_s):
        return sources.SendResult(sent=len(plan.probes))


def through_privsep_wire(value):
    """``value`` after oslo.privsep's serializer and deserializer
    (msgpack over a socket pair), as between the daemon and the agent."""
    a, b = socket.socketpair()
    try:
        comm.Serializer(a).send(value)
        a.close()
        return next(iter(comm.Deserializer(b)))
    finally:
        a.close()
        b.close()


# A pacer's oversleep on the fake clock: every sleep ends this late.
OVERSLEEP_S = 80e-6


class Clock:
    """A monotonic clock that only moves when slept on (each sleep
    OVERSLEEP_S late); :func:`paced_clock` puts it under the pacing loop
    and the privsep daemon's pacer."""

    def __init__(self):
        self.t = 1000.0
        self.sleeps = 0

    def monotonic(self):
        return self.t

    def sleep(self, seconds):
        self.sleeps += 1
        self.t += max(seconds, 0.0) + OVERSLEEP_S


def paced_clock(monkeypatch):
    """A :class:`Clock` standing in for ``time`` in pacing and
    privileged."""
    from netweaver_agent.agent import privileged
    from netweaver_agent.core import pacing
    c = Clock()
    fake = types.SimpleNamespace(monotonic=c.monotonic, sleep=c.sleep)
    monkeypatch.setattr(pacing, 'time', fake)
    monkeypatch.setattr(privileged, 'time', fake)
    return c
