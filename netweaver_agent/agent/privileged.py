"""Privileged work in an oslo.privsep daemon; the polling agent stays plain.

Opening an ``AF_PACKET`` capture socket and the raw socket that sends
probes needs CAP_NET_RAW.  As Ceilometer does for its own privileged calls
(``ceilometer/privsep/``), that work runs in a separate daemon started
through ``privsep-helper``, which keeps only the capabilities its context
lists and drops every other one:

* :data:`capture_pctxt`, CAP_NET_RAW alone: production, where the capture
  is on the host's own interfaces and probes come from ``local`` or from a
  remote ``ssh://`` host;
* :data:`netns_pctxt`, also CAP_SYS_ADMIN (``setns`` into a network
  namespace) and CAP_NET_ADMIN (a forced capture buffer): the lab, where
  ``capture_netns`` or a ``netns:`` probe source is configured.

oslo.privsep passes neither sockets nor file descriptors, so the daemon
holds the sockets for a whole window: :class:`PrivsepCapture` opens,
settles and closes a :class:`capture.LiveCapture` there and gets the
window's sightings back as columns (bytes), with the VLAN ids and VNIs
they were carried with; :class:`PrivsepLocalSource` has the daemon build
the window's probes from the plan and send them.
The daemon sends nothing but probes it built itself, only to addresses
the :mod:`destinations` policy admits (checked again in the daemon, with
the agent's ``probe_networks``), checks every argument, stays within its
built-in :class:`daemonlimits.DaemonLimits`, and forgets captures
and prepared probes left behind after :data:`MAX_HOLD_S`.

When the agent runs as root and no helper command is configured, the
daemon is started as ``python -m oslo_privsep.daemon`` (no sudo): it still
keeps only its context's capabilities.
"""

import array
import dataclasses
import gc
import itertools
import math
import os
import shlex
import sys
import threading
import time

from oslo_config import cfg
from oslo_log import log
from oslo_privsep import capabilities as caps
from oslo_privsep import daemon as privsep_daemon
from oslo_privsep import priv_context

from netweaver_agent.agent import daemonlimits
from netweaver_agent.agent import opts
from netweaver_agent.core import capture
from netweaver_agent.core import destinations
from netweaver_agent.core import netns
from netweaver_agent.core import pacing
from netweaver_agent.core import probe
from netweaver_agent.core import sendloop
from netweaver_agent.core import sightings
from netweaver_agent.core import sources

LOG = log.getLogger(__name__)

CAPTURE_CAPS = (caps.CAP_NET_RAW,)
NETNS_CAPS = (caps.CAP_NET_RAW, caps.CAP_NET_ADMIN, caps.CAP_SYS_ADMIN)

# The daemons are started by these paths, which operators copy into
# sudoers or rootwrap (docs/deploying.md): they name the alias module
# netweaver_agent/privileged.py, kept where the first release put it.
PYPATH_PREFIX = 'netweaver_agent.privileged.'

capture_pctxt = priv_context.PrivContext(
    'netweaver_agent',
    cfg_section='netweaver_privsep',
    pypath=PYPATH_PREFIX + 'capture_pctxt',
    capabilities=list(CAPTURE_CAPS),
)

netns_pctxt = priv_context.PrivContext(
    'netweaver_agent',
    cfg_section='netweaver_privsep_netns',
    pypath=PYPATH_PREFIX + 'netns_pctxt',
    capabilities=list(NETNS_CAPS),
)

# A window lasts at most max_window_ms (300 s); whatever the daemon holds
# longer than this was left behind by a client that went away.
MAX_HOLD_S = 330.0
MAX_INTERFACES = 4096


class PrivilegeError(capture.CapturePermissionError):
    """The privsep daemon lacks a capability, or could not be started."""


# --- the daemon's side ------------------------------------------------------

@dataclasses.dataclass(slots=True)
class _Entry:
    kind: str              # 'capture' or 'probes'
    obj: object            # None while being opened / built
    closer: object         # closer(obj) releases it
    cost: int              # bytes of prepared probes
    expires: float


class HandleTable:
    """What the daemon holds for the agent between calls, capped.

    A handle is reserved (counted against the limits) before its object
    is opened or built, filled when ready, and taken or peeked only with
    its own kind: a wrong-kind call raises and leaves it in place.  One
    reaper thread closes what is held longer than ``hold_s`` (a client
    that went away).
    """

    KINDS = ('capture', 'probes')

    def __init__(self, limits=daemonlimits.LIMITS, hold_s=MAX_HOLD_S):
        self.limits = limits
        self.hold_s = hold_s
        self._entries = {}
        self._numbers = itertools.count(1)
        self._cond = threading.Condition()
        self._reaper = None

    def counts(self):
        """``{kind: handles held}``, and the prepared bytes under 'bytes'."""
        with self._cond:
            out = {k: 0 for k in self.KINDS}
            for e in self._entries.values():
                out[e.kind] += 1
            out['bytes'] = sum(e.cost for e in self._entries.values())
            return out

    def reserve(self, kind, cost=0):
        """A new handle of ``kind``, or :class:`daemonlimits.LimitError`."""
        lim = self.limits
        with self._cond:
            held = self._entries.values()
            if len(self._entries) >= lim.handles:
                raise daemonlimits.LimitError(
                    f"the privsep daemon holds {lim.handles} "
                    "handles already, its maximum")
            if kind == 'capture':
                open_caps = sum(e.kind == 'capture' for e in held)
                if open_caps >= lim.captures:
                    raise daemonlimits.LimitError(
                        f"the privsep daemon has {lim.captures} captures "
                        "open already, its maximum")
                threads = sum(t.name.startswith('netweaver-')
                              for t in threading.enumerate())
                if threads + 1 > lim.threads:
                    raise daemonlimits.LimitError(
                        f"the privsep daemon runs {threads} threads of its "
                        f"own; at most {lim.threads}")
            total = sum(e.cost for e in held) + cost
            if total > lim.prepared_bytes:
                raise daemonlimits.LimitError(
                    f"prepared probes would take {total} bytes in the "
                    f"privsep daemon; at most {lim.prepared_bytes}")
            handle = next(self._numbers)
            self._entries[handle] = _Entry(
                kind, None, None, cost, time.monotonic() + self.hold_s)
            self._start_reaper()
            return handle

    def fill(self, handle, obj, closer):
        """Make a reserved handle usable."""
        with self._cond:
            entry = self._entries[handle]
            entry.obj, entry.closer = obj, closer
            entry.expires = time.monotonic() + self.hold_s
            self._cond.notify()

    def release(self, handle):
        """Drop a reserved handle whose object could not be made."""
        with self._cond:
            self._entries.pop(handle, None)

    def _entry(self, handle, kind):
        handle = _int(handle, 'handle', 1, 2**62)
        entry = self._entries.get(handle)
        if entry is None or entry.kind != kind or entry.obj is None:
            what = 'prepared probes' if kind == 'probes' else f'open {kind}'
            raise ValueError(f"no {what} with handle {handle!r}")
        return handle, entry

    def peek(self, handle, kind):
        """The object of ``handle``, left held; ValueError if not ``kind``."""
        with self._cond:
            return self._entry(handle, kind)[1].obj

    def take(self, handle, kind):
        """The object of ``handle``, no longer held (the caller closes it).

        :raises ValueError: no such handle of this kind; nothing changes
        """
        with self._cond:
            handle, entry = self._entry(handle, kind)
            del self._entries[handle]
            return entry.obj

    def kind_of(self, handle):
        """The kind of a held handle, or None."""
        with self._cond:
            entry = self._entries.get(_int(handle, 'handle', 1, 2**62))
            return None if entry is None else entry.kind

    def _start_reaper(self):
        if self._reaper is None or not self._reaper.is_alive():
            self._reaper = threading.Thread(
                target=self._reap, daemon=True,
                name='netweaver-privsep-reaper')
            self._reaper.start()

    def expire(self, now=None):
        """Close what is held past its time; how many were closed."""
        now = time.monotonic() if now is None else now
        with self._cond:
            due = [(h, e) for h, e in self._entries.items()
                   if e.expires <= now and e.obj is not None]
            for h, _ in due:
                del self._entries[h]
        for h, e in due:
            LOG.warning('privsep: handle %d left open for %.0f s; closed',
                        h, self.hold_s)
            try:
                e.closer(e.obj)
            except Exception as exc:  # logged: nobody is waiting for it
                LOG.warning('privsep: closing handle %d: %s', h, exc)
        return len(due)

    def _reap(self):
        while True:
            with self._cond:
                soonest = min((e.expires for e in self._entries.values()),
                              default=None)
                wait = 60.0 if soonest is None else max(
                    0.0, soonest - time.monotonic())
                self._cond.wait(min(wait, 60.0) + 0.01)
            self.expire()


_table = HandleTable()


class _Pacer:
    """Spaces every probe the daemon sends, over all windows together:
    the limits hold over any ``burst_s`` (a source's several probes of
    one wake-up pass without a sleep each).

    Where the C loop was built (``compiled``), the spacing is
    :class:`sendloop.Limiter`'s, applied in C: the C pacing loop's
    batches (:meth:`gate`) and :meth:`wait` take their slots from its one
    state.  Otherwise :meth:`wait`, in Python.
    """

    def __init__(self, limits=daemonlimits.LIMITS,
                 burst_s=pacing.SEND_QUANTUM_S, compiled=None):
        self.limits = limits
        self.burst_s = burst_s
        self.compiled = sendloop.available() if compiled is None \
            else compiled
        # The C limiter's state: the next free slot, monotonic ns.
        self._state = array.array('q', [0])
        self._lock = threading.Lock()
        self._next = 0.0
        self._steps = {}

    def gate(self):
        """What a sender calls (or, a :class:`sendloop.Limiter`, the C
        loop applies) before each batch of probes."""
        return self._limiter() if self.compiled else self.wait

    def _limiter(self):
        return sendloop.Limiter(self._state, self.limits.probes_per_s,
                                self.limits.bytes_per_s,
                                int(self.burst_s * 1e9))

    def wait(self, nbytes, n=1):
        """Return when ``n`` probes of ``nbytes`` each may leave: the
        last of their ``n`` slots has come."""
        if self.compiled:
            sendloop.limit_wait(self._limiter(), nbytes, n)
            return
        step = self._steps.get(nbytes)
        if step is None:
            step = self._steps[nbytes] = self.limits.min_step_ns(nbytes) / 1e9
        with self._lock:
            now = time.monotonic()
            at = max(now - self.burst_s, self._next)
            self._next = at + n * step
        at += (n - 1) * step
        if at > now:
            time.sleep(at - now)


_pacer = _Pacer()


def _int(value, what, low, high):
    if isinstance(value, bool) or not isinstance(value, int) or \
            not low <= value <= high:
        raise ValueError(f"{what} {value!r} is not an integer within "
                         f"{low}..{high}")
    return value


def _seconds(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0 <= value <= MAX_HOLD_S:
        raise ValueError(f"{what} {value!r} is not a time within "
                         f"0..{MAX_HOLD_S} s")
    return float(value)


def _check_netns(name):
    """Refuse a namespace unless this daemon may enter it (setns)."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise ValueError(f"network namespace {name!r} is not a name")
    netns.netns_path(name)
    effective = caps.get_caps()[0]
    if caps.CAP_SYS_ADMIN not in effective:
        raise PrivilegeError(
            f"entering network namespace {name!r} needs CAP_SYS_ADMIN, "
            "which this privsep daemon does not hold: capture_netns and "
            "netns: probe sources are for the lab")
    return name


def _check_protocol(protocol):
    if protocol not in probe.PROTOCOLS:
        raise ValueError(f"unknown probe protocol {protocol!r}")
    return protocol


def _open_capture(session, protocol, netns_name, interfaces,
                  vxlan_port=None, geneve_port=None, expected_packets=None,
                  tcp_ports=None):
    session = _int(session, 'probe session', 1, 0xffff)
    if tcp_ports is not None:
        if not isinstance(tcp_ports, (list, tuple)) or \
                len(tcp_ports) > 0xffff:
            raise ValueError("TCP ports: expected a list of ports")
        tcp_ports = [_int(p, 'TCP source port', 1, 65535)
                     for p in tcp_ports]
    if expected_packets is not None:
        expected_packets = _int(expected_packets, 'expected packets', 0,
                                2**40)
    if vxlan_port is not None:
        vxlan_port = _int(vxlan_port, 'VXLAN port', 1, 65535)
    if geneve_port is not None:
        geneve_port = _int(geneve_port, 'Geneve port', 1, 65535)
    protocol = _check_protocol(protocol)
    netns_name = _check_netns(netns_name)
    if interfaces is not None:
        interfaces = list(interfaces)
        if len(interfaces) > MAX_INTERFACES or not all(
                isinstance(i, str) and 0 < len(i) <= 15
                for i in interfaces):
            raise ValueError(f"interfaces {interfaces[:5]!r}...: expected "
                             f"at most {MAX_INTERFACES} interface names")
    handle = _table.reserve('capture')
    cap = capture.LiveCapture(session, protocol, netns_name=netns_name,
                              interfaces=interfaces, vxlan_port=vxlan_port,
                              geneve_port=geneve_port,
                              expected_packets=expected_packets,
                              max_ring_bytes=_table.limits.ring_bytes,
                              tcp_ports=tcp_ports)
    try:
        cap.open()
    except BaseException:
        _table.release(handle)
        cap.close()
        raise
    _table.fill(handle, cap, lambda c: c.close())
    return handle


def _passive_window(netns_name, interfaces, sample, window_ms, cap,
                    vxlan_port=None, geneve_port=None):
    """One passive window (:class:`passivecapture.PassiveCapture`):
    open, wait ``window_ms``, close; the sampled packets' key fields and
    timestamps (never payload), as :meth:`passivecapture.PassiveCapture.wire`
    gives them."""
    # Imported here: a daemon that only probes stays as it was.
    from netweaver_agent.core import passivecapture
    netns_name = _check_netns(netns_name)
    sample = _int(sample, 'passive sample', 1, 1 << 16)
    window_s = _seconds(_int(window_ms, 'passive window (ms)', 1,
                             int(MAX_HOLD_S * 1000)) / 1000.0,
                        'passive window')
    cap = _int(cap, 'passive packet cap', 1, passivecapture.MAX_CAP)
    if vxlan_port is not None:
        vxlan_port = _int(vxlan_port, 'VXLAN port', 1, 65535)
    if geneve_port is not None:
        geneve_port = _int(geneve_port, 'Geneve port', 1, 65535)
    if interfaces is not None:
        interfaces = list(interfaces)
        if len(interfaces) > MAX_INTERFACES or not all(
                isinstance(i, str) and 0 < len(i) <= 15
                for i in interfaces):
            raise ValueError(f"interfaces {interfaces[:5]!r}...: expected "
                             f"at most {MAX_INTERFACES} interface names")
    handle = _table.reserve('capture')
    try:
        cap = passivecapture.PassiveCapture(
            sample, netns_name=netns_name, interfaces=interfaces, cap=cap,
            vxlan_port=vxlan_port, geneve_port=geneve_port,
            max_ring_bytes=_table.limits.ring_bytes)
        cap.open()
        try:
            time.sleep(window_s)
        finally:
            cap.close()
    finally:
        _table.release(handle)
    return cap.wire()


def _settle_capture(handle, quiet_s, max_s):
    cap = _table.peek(handle, 'capture')
    cap.settle(_seconds(quiet_s, 'quiet time'),
               max_s=None if max_s is None else _seconds(max_s, 'settle'))


def _close_capture(handle):
    cap = _table.take(handle, 'capture')
    cap.close()
    return batch_to_wire(cap.batch, cap.stats)


def batch_to_wire(batch, stats):
    """A window's :class:`sightings.SightingBatch` and
    :class:`capture.CaptureStats` as the plain values privsep carries.

    Columns travel as bytes; ``encap`` (VLAN ids, VNI, tunnel of the few
    tagged or tunnelled rows) as ``(key, ifindex, vlan ids, vni, tunnel)``
    rows.
    """
    return {
        't_ns': batch.t_ns.tobytes(), 'keys': batch.keys.tobytes(),
        'ifindex': batch.ifindex.tobytes(),
        'direction': batch.direction.tobytes(),
        'auth': batch.auth_column().tobytes(),
        'ifnames': [batch.ifnames[i] for i in range(len(batch.ifnames))],
        'encap': [(key, index, tuple(encap.vlan), encap.vni, encap.tunnel)
                  for (key, index), encap in batch.encap.items()],
        'packets': stats.packets, 'drops': stats.drops,
        'probes': stats.probes, 'foreign': stats.foreign,
        'reader': stats.reader,
    }


def batch_from_wire(raw, batch):
    """Fill ``batch`` from :func:`batch_to_wire`'s values; the stats."""
    batch.t_ns.frombytes(raw['t_ns'])
    batch.keys.frombytes(raw['keys'])
    batch.ifindex.frombytes(raw['ifindex'])
    batch.direction.frombytes(raw['direction'])
    batch.auth.frombytes(raw.get('auth', b''))
    batch.auth_column()     # a daemon sending no auth: zeros
    batch.ifnames.update(enumerate(raw['ifnames']))
    for key, index, vlan, vni, *tunnel in raw.get('encap', ()):
        batch.encap[(key, index)] = probe.Encap(
            vlan=tuple(vlan), vni=vni, tunnel=tunnel[0] if tunnel else None)
    return capture.CaptureStats(
        packets=raw['packets'], drops=raw['drops'],
        probes=raw['probes'], foreign=raw['foreign'],
        reader=raw.get('reader', ''))


def _plan(session, protocol, size, port, probes, policy=None,
          limits=daemonlimits.LIMITS, secret=None):
    """A :class:`sources.ProbePlan` from checked plain values.

    Every destination passes ``policy`` (None: the built-in classes
    only), probes are at least ``limits.min_step_ns`` apart and no more
    than ``limits.max_planned`` of them.  ``secret``: the window's, which
    tags the probes (16 to 64 bytes; None: untagged).
    """
    if secret is not None:
        secret = probe.check_secret(secret, 'window secret')
    session = _int(session, 'probe session', 1, 0xffff)
    protocol = _check_protocol(protocol)
    size = _int(size, 'probe size', 64, 1500)
    if port is not None:
        port = _int(port, 'probe port', 1, 65535)
    if not isinstance(probes, (list, tuple)):
        raise ValueError(f"probes {type(probes).__name__}: expected a list")
    most = limits.max_planned(size)
    if len(probes) > most:
        raise daemonlimits.LimitError(
            f"{len(probes)} probes of {size} bytes in one "
            f"window: the privsep daemon takes at most {most}")
    policy = policy or destinations.DEFAULT
    min_step = limits.min_step_ns(size)
    checked = {}
    planned = []
    last = 0
    # A TCP probe's seq is probe.tcp_ident(source port 1.., number): the
    # plan hands each probe's own source port to the daemon.
    low, high = ((probe.TCP_IDENT | 1 << 16, probe.TCP_IDENT | 0xffffffff)
                 if protocol == 'tcp' else (0, 0xffffffff))
    hold_ns = int(MAX_HOLD_S * 1e9)
    planned_probe = sources.PlannedProbe
    for seq, dst, offset_ns in probes:
        if type(dst) is not str or dst not in checked:
            # One str per destination, checked once, before anything is
            # built.
            if not isinstance(dst, str):
                raise ValueError(f"probe destination {dst!r} is not an "
                                 "address string")
            checked[dst] = policy.check(dst)
        dst = checked[dst]
        # The common case inline (an int within bounds); _int says why not.
        least = last + min_step if planned else 0
        if type(offset_ns) is not int or \
                not least <= offset_ns <= hold_ns:
            offset_ns = _int(offset_ns, 'probe offset', least, hold_ns)
        if type(seq) is not int or not low <= seq <= high:
            seq = _int(seq, 'probe sequence', low, high)
        planned.append(planned_probe(seq, dst, offset_ns))
        last = offset_ns
    return sources.ProbePlan(session=session, protocol=protocol,
                             probes=tuple(planned), size=size, port=port,
                             secret=secret)


class _DaemonSource(sources.LocalSource):
    """The daemon's sender: each probe paced by the daemon-wide limits."""

    def _gate(self, nbytes, n):
        _pacer.wait(nbytes, n)

    def _c_gate(self):
        return _pacer.gate()


def configured_networks(conf=None):
    """``[netweaver] probe_networks`` of the daemon's own configuration.

    privsep-helper parses the configuration files on its command line:
    the sudo line of docs/deploying.md gives it
    /etc/ceilometer/ceilometer.conf, which the agent's user cannot
    change, so these bound what even a compromised agent can ask for.
    Empty when none is set (the daemon then takes the agent's).
    """
    conf = conf or cfg.CONF
    # The agent's own option (the same object may be registered twice).
    (opt,) = [o for o in opts.OPTS if o.name == 'probe_networks']
    conf.register_opt(opt, group=opts.GROUP)
    try:
        values = conf[opts.GROUP].probe_networks
    except cfg.Error as exc:
        raise ValueError(f"the privsep daemon cannot read [netweaver] "
                         f"probe_networks: {exc}") from exc
    return destinations.parse_networks(values)


def _narrowed(agent, configured):
    """The parts of the agent's networks inside the configured ones."""
    if not configured:
        return agent
    if not agent:
        return configured
    out = []
    for a in agent:
        for c in configured:
            if a.version == c.version:
                if a.subnet_of(c):
                    out.append(a)
                elif c.subnet_of(a):
                    out.append(c)
    if not out:
        raise destinations.RefusedDestination(
            ', '.join(str(a) for a in agent),
            'outside the privsep daemon\'s configured probe_networks (' +
            ', '.join(str(c) for c in configured) + ')')
    return tuple(dict.fromkeys(out))


def _policy(netns_name, networks):
    """The daemon's destination policy: the built-in classes, and the
    agent's probe_networks (required for the host's own stack), within
    the daemon's own :func:`configured_networks` when set."""
    if networks is not None and (
            not isinstance(networks, (list, tuple)) or len(networks) > 1024
            or not all(isinstance(n, str) for n in networks)):
        raise ValueError(f"probe networks {networks!r}: expected a list of "
                         "CIDR strings")
    return destinations.DestinationPolicy(
        networks=_narrowed(destinations.parse_networks(networks),
                           configured_networks()),
        require_networks=netns_name is None)


def _raw_source(netns_name, policy):
    """A LocalSource whose errors say what the daemon lacks."""
    return _DaemonSource(netns_name=_check_netns(netns_name), policy=policy)


def _prepare_probes(netns_name, session, protocol, size, port, probes,
                    networks=None, secret=None):
    policy = _policy(netns_name, networks)
    size = _int(size, 'probe size', 64, 1500)
    if not isinstance(probes, (list, tuple)):
        raise ValueError(f"probes {type(probes).__name__}: expected a list")
    handle = _table.reserve(
        'probes', cost=len(probes) * (size + daemonlimits.PROBE_OVERHEAD_B))
    src = None
    try:
        plan = _plan(session, protocol, size, port, probes, policy,
                     secret=secret)
        src = _raw_source(netns_name, policy)
        src.prepare(plan)
    except sources.SourceError as exc:
        _table.release(handle)
        if src is not None:
            src.close()
        if isinstance(exc.__cause__, PermissionError):
            raise PrivilegeError(str(exc)) from exc
        raise
    except BaseException:
        _table.release(handle)
        if src is not None:
            src.close()
        raise
    _table.fill(handle, (src, plan), lambda held: held[0].close())
    return handle


def _send_probes(handle, deadline_s):
    # Checked before the handle is taken: a bad call leaves it held.
    if isinstance(deadline_s, bool) or \
            not isinstance(deadline_s, (int, float)) or \
            not math.isfinite(deadline_s) or \
            deadline_s > time.monotonic() + MAX_HOLD_S:
        raise ValueError(f"send deadline {deadline_s!r} is not within "
                         f"{MAX_HOLD_S} s from now")
    src, plan = _table.take(handle, 'probes')
    try:
        result = src.send(plan, float(deadline_s))
    finally:
        src.close()
    return [result.sent, result.failed, list(result.errors)]


def _discard(handle):
    if _table.kind_of(handle) is None:
        return      # sent, discarded or expired already
    # Prepared probes only: another kind raises and stays held.
    src, _plan = _table.take(handle, 'probes')
    src.close()


def _status():
    effective, permitted, _ = caps.get_caps()
    return {'pid': os.getpid(), 'uid': os.getuid(),
            'effective': sorted(effective), 'permitted': sorted(permitted),
            'held': _table.counts(),
            'threads': sorted(t.name for t in threading.enumerate())}


_OPS = {
    'open_capture': _open_capture,
    'settle_capture': _settle_capture,
    'close_capture': _close_capture,
    'passive_window': _passive_window,
    'prepare_probes': _prepare_probes,
    'send_probes': _send_probes,
    'discard_probes': _discard,
    'status': _status,
}


_FROZEN = []        # gc.freeze() done in this daemon


def _dispatch(op, args):
    func = _OPS.get(op)
    if func is None:
        raise ValueError(f"unknown privileged operation {op!r}")
    if not _FROZEN:
        # What the daemon loaded to get here (oslo.privsep, eventlet, its
        # options) lives as long as it: out of the garbage collector's
        # full scans, which a window's allocations would otherwise set off.
        _FROZEN.append(True)
        gc.collect()
        gc.freeze()
    return func(*args)


@capture_pctxt.entrypoint
def call_capture(op, *args):
    """Run one operation of :data:`_OPS` in the CAP_NET_RAW daemon."""
    return _dispatch(op, args)


@netns_pctxt.entrypoint
def call_netns(op, *args):
    """Run one operation of :data:`_OPS` in the lab's daemon."""
    return _dispatch(op, args)


# --- the agent's side -------------------------------------------------------

_ENTRYPOINTS = {capture_pctxt: call_capture, netns_pctxt: call_netns}
_CAPS = {capture_pctxt: CAPTURE_CAPS, netns_pctxt: NETNS_CAPS}
_start_lock = threading.Lock()


def context_for(capture_netns=None, source_netns=None):
    """The context a window needs: the lab's one when a namespace is set."""
    if capture_netns or source_netns:
        return netns_pctxt
    return capture_pctxt


def configure(helper_command=None):
    """Set the command that starts the daemons (None: the default).

    The default is oslo.privsep's: the root helper given to
    ``priv_context.init`` (``ceilometer-polling`` passes ``sudo
    ceilometer-rootwrap /etc/ceilometer/rootwrap.conf``) followed by
    ``privsep-helper``.  A process already running as root starts the
    daemon with ``python -m oslo_privsep.daemon`` instead.
    """
    for ctx in _ENTRYPOINTS:
        if helper_command:
            cfg.CONF.set_override('helper_command', helper_command,
                                  group=ctx.cfg_section)
        else:
            cfg.CONF.clear_override('helper_command', group=ctx.cfg_section)


def _ensure_helper(ctx):
    if ctx.conf.helper_command or os.geteuid() != 0:
        return
    cfg.CONF.set_default(
        'helper_command',
        # -W ignore: the import-time deprecation notices of oslo.privsep's
        # dependencies would land in the agent's log as warnings.
        shlex.join([sys.executable, '-W', 'ignore', '-m',
                    'oslo_privsep.daemon']),
        group=ctx.cfg_section)


def _cap_names(values):
    return ', '.join(caps.CAPS_BYVALUE.get(c, str(c)) for c in sorted(values))


def bounding_set(status_path='/proc/self/status'):
    """The capabilities this process and any child could ever hold."""
    with open(status_path, encoding='ascii') as f:
        for line in f:
            if line.startswith('CapBnd:'):
                mask = int(line.split()[1], 16)
                return {c for c in range(64) if mask >> c & 1}
    return set()


def _start(ctx):
    # The default helpers (sudo, or this root process) start the daemon as
    # our descendant: it can never hold what our bounding set lacks.
    missing = set()
    if not ctx.conf.helper_command:
        missing = set(_CAPS[ctx]) - bounding_set()
    if missing:
        raise PrivilegeError(
            f"the privsep daemon {ctx.pypath} needs {_cap_names(missing)}, "
            "which the capability bounding set of the polling agent lacks: "
            "no helper can grant it")
    _ensure_helper(ctx)
    try:
        ctx.start()
    except (privsep_daemon.FailedToDropPrivileges, OSError) as exc:
        error = exc
    else:
        return
    ctx.stop()
    raise PrivilegeError(
        f"the privsep daemon {ctx.pypath} could not start with "
        f"{_cap_names(_CAPS[ctx])}: {error}. The polling agent "
        "starts it with its root helper (sudo privsep-helper, see "
        "docs/deploying.md)") from error


def call(ctx, op, *args):
    """Run ``op`` in ``ctx``'s daemon, starting it the first time."""
    entry = _ENTRYPOINTS[ctx]
    if ctx.client_mode and ctx.channel is None:
        with _start_lock:
            if ctx.channel is None:
                _start(ctx)
                LOG.info('privsep daemon %(ctx)s started: %(status)s',
                         {'ctx': ctx.pypath, 'status': entry('status')})
    return entry(op, *args)


def warm_up(ctx):
    """Start ``ctx``'s daemon in the background, at agent start.

    The first window then does not pay for it (nor shift the cycle's
    other meters).  A failure is left for that window to report.
    """
    def start():
        try:
            call(ctx, 'status')
        except Exception as exc:  # reported by the first window
            LOG.debug('privsep daemon %(ctx)s not started yet: %(exc)s',
                      {'ctx': ctx.pypath, 'exc': exc})

    thread = threading.Thread(target=start, daemon=True,
                              name='netweaver-privsep-start')
    thread.start()
    return thread


def stop(ctx=None):
    """Stop one context's daemon (None: both), e.g. at the end of a test."""
    for c in ([ctx] if ctx else list(_ENTRYPOINTS)):
        c.stop()


@dataclasses.dataclass(frozen=True, slots=True)
class DaemonStatus:
    """Who the privsep daemon is and which capabilities it holds."""

    pid: int
    uid: int
    effective: tuple
    permitted: tuple


def status(ctx):
    """:class:`DaemonStatus` of ``ctx``'s daemon (started if needed)."""
    raw = call(ctx, 'status')
    return DaemonStatus(pid=raw['pid'], uid=raw['uid'],
                        effective=tuple(raw['effective']),
                        permitted=tuple(raw['permitted']))


class PrivsepCapture:
    """:class:`capture.LiveCapture`'s interface; the socket is the daemon's.

    ``measure.run_window(..., capture_class=...)`` takes it as is (see
    :func:`capture_class`).
    """

    def __init__(self, session, protocol='icmp', netns_name=None,
                 interfaces=None, context=None, vxlan_port=None,
                 geneve_port=None, expected_packets=None, tcp_ports=None):
        self.session = session
        self.expected_packets = expected_packets
        self.tcp_ports = sorted(tcp_ports) if tcp_ports else None
        self.vxlan_port = vxlan_port
        self.geneve_port = geneve_port
        self.protocol = protocol
        self.netns_name = netns_name
        self.interfaces = sorted(interfaces) if interfaces else None
        self.context = context or context_for(netns_name)
        self.batch = sightings.SightingBatch(session)
        self.stats = None
        self._handle = None

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def open(self):
        self._handle = call(self.context, 'open_capture', self.session,
                            self.protocol, self.netns_name, self.interfaces,
                            self.vxlan_port, self.geneve_port,
                            self.expected_packets, self.tcp_ports)

    def settle(self, quiet_s, max_s=None):
        call(self.context, 'settle_capture', self._handle, quiet_s, max_s)

    def close(self):
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        raw = call(self.context, 'close_capture', handle)
        self.stats = batch_from_wire(raw, self.batch)


def passive_window(context, netns_name, interfaces, sample, window_ms,
                   cap, vxlan_port=None, geneve_port=None):
    """Run one passive window in ``context``'s daemon: ``(sightings,
    passivecapture.PassiveStats)``."""
    from netweaver_agent.core import passivecapture
    raw = call(context, 'passive_window', netns_name,
               sorted(interfaces) if interfaces else None, sample,
               window_ms, cap, vxlan_port, geneve_port)
    return passivecapture.from_wire(raw)


def capture_class(context):
    """A ``capture_class`` for :func:`measure.run_window` using ``context``."""
    def make(session, protocol='icmp', netns_name=None, interfaces=None,
             vxlan_port=None, geneve_port=None, expected_packets=None,
             tcp_ports=None):
        return PrivsepCapture(session, protocol, netns_name=netns_name,
                              interfaces=interfaces, context=context,
                              vxlan_port=vxlan_port, geneve_port=geneve_port,
                              expected_packets=expected_packets,
                              tcp_ports=tcp_ports)
    return make


class PrivsepLocalSource(sources.ProbeSource):
    """``local`` / ``netns:NAME`` probes, built and sent by the daemon.

    The daemon builds the packets of the plan itself (it sends nothing
    else) in :meth:`prepare`, before the capture opens, and paces them in
    :meth:`send`.  ``policy`` (:class:`destinations.DestinationPolicy`)
    is checked here first, and its networks again by the daemon.
    """

    routes_here = True

    def __init__(self, netns_name=None, context=None, policy=None):
        self.netns_name = netns_name
        self.name = f'netns:{netns_name}' if netns_name else 'local'
        self.context = context or context_for(source_netns=netns_name)
        self.policy = policy or destinations.DestinationPolicy(
            require_networks=netns_name is None)

    def _make_ready(self, plan):
        """The daemon's handle of the plan's probes, built there."""
        most = daemonlimits.LIMITS.max_planned(plan.size)
        if len(plan.probes) > most:
            # Not sent at all: the daemon would refuse it after receiving
            # every probe of it.
            raise daemonlimits.LimitError(
                f"{len(plan.probes)} probes of {plan.size} bytes in one "
                f"window: the privsep daemon takes at most {most}")
        handle = call(self.context, 'prepare_probes', self.netns_name,
                      plan.session, plan.protocol, plan.size, plan.port,
                      [(p.seq, p.dst_ip, p.offset_ns) for p in plan.probes],
                      self.policy.cidrs(), plan.secret)
        return handle

    def _forget(self, handle):
        """Have the daemon forget the prepared probes (window failed)."""
        if self.context.channel is not None:
            call(self.context, 'discard_probes', handle)

    def send(self, plan, deadline_s):
        sent, failed, errors = call(self.context, 'send_probes',
                                    self._ready_for(plan), deadline_s)
        return sources.SendResult(sent=sent, failed=failed,
                                  errors=tuple(errors))
