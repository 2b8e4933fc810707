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
The daemon sends nothing but probes it built itself, checks every
argument, and forgets captures and prepared probes left behind after
:data:`MAX_HOLD_S`.

When the agent runs as root and no helper command is configured, the
daemon is started as ``python -m oslo_privsep.daemon`` (no sudo): it still
keeps only its context's capabilities.
"""

import dataclasses
import ipaddress
import itertools
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

from netweaver_agent import capture
from netweaver_agent import netns
from netweaver_agent import probe
from netweaver_agent import sources

LOG = log.getLogger(__name__)

CAPTURE_CAPS = (caps.CAP_NET_RAW,)
NETNS_CAPS = (caps.CAP_NET_RAW, caps.CAP_NET_ADMIN, caps.CAP_SYS_ADMIN)

capture_pctxt = priv_context.PrivContext(
    'netweaver_agent',
    cfg_section='netweaver_privsep',
    pypath=__name__ + '.capture_pctxt',
    capabilities=list(CAPTURE_CAPS),
)

netns_pctxt = priv_context.PrivContext(
    'netweaver_agent',
    cfg_section='netweaver_privsep_netns',
    pypath=__name__ + '.netns_pctxt',
    capabilities=list(NETNS_CAPS),
)

# A window lasts at most max_window_ms (300 s); whatever the daemon holds
# longer than this was left behind by a client that went away.
MAX_HOLD_S = 330.0
MAX_PROBES = 1_000_000
MAX_INTERFACES = 4096


class PrivilegeError(capture.CapturePermissionError):
    """The privsep daemon lacks a capability, or could not be started."""


# --- the daemon's side ------------------------------------------------------

_held = {}
_held_lock = threading.Lock()
_handles = itertools.count(1)


def _hold(obj, closer):
    """Keep ``obj`` under a new handle; ``closer(obj)`` runs if forgotten."""
    handle = next(_handles)

    def expire():
        with _held_lock:
            entry = _held.pop(handle, None)
        if entry is not None:
            LOG.warning('privsep: handle %d left open for %.0f s; closed',
                        handle, MAX_HOLD_S)
            try:
                closer(entry[0])
            except Exception as exc:  # logged: nobody is waiting for it
                LOG.warning('privsep: closing handle %d: %s', handle, exc)

    timer = threading.Timer(MAX_HOLD_S, expire)
    timer.daemon = True
    with _held_lock:
        _held[handle] = (obj, timer)
    timer.start()
    return handle


def _take(handle, kind):
    with _held_lock:
        entry = _held.pop(_int(handle, 'handle', 1, 2**62), None)
    if entry is None or not isinstance(entry[0], kind):
        raise ValueError(f"no open {kind.__name__} with handle {handle!r}")
    entry[1].cancel()
    return entry[0]


def _peek(handle, kind):
    with _held_lock:
        entry = _held.get(_int(handle, 'handle', 1, 2**62))
    if entry is None or not isinstance(entry[0], kind):
        raise ValueError(f"no open {kind.__name__} with handle {handle!r}")
    return entry[0]


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
                  vxlan_port=None, geneve_port=None):
    session = _int(session, 'probe session', 1, 0xffff)
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
    cap = capture.LiveCapture(session, protocol, netns_name=netns_name,
                              interfaces=interfaces, vxlan_port=vxlan_port,
                              geneve_port=geneve_port)
    cap.open()
    return _hold(cap, lambda c: c.close())


def _settle_capture(handle, quiet_s, max_s):
    cap = _peek(handle, capture.LiveCapture)
    cap.settle(_seconds(quiet_s, 'quiet time'),
               max_s=None if max_s is None else _seconds(max_s, 'settle'))


def _close_capture(handle):
    cap = _take(handle, capture.LiveCapture)
    cap.close()
    return batch_to_wire(cap.batch, cap.stats)


def batch_to_wire(batch, stats):
    """A window's :class:`capture.SightingBatch` and
    :class:`capture.CaptureStats` as the plain values privsep carries.

    Columns travel as bytes; ``encap`` (VLAN ids, VNI of the few tagged or
    VXLAN rows) as ``(key, ifindex, vlan ids, vni)`` rows.
    """
    return {
        't_ns': batch.t_ns.tobytes(), 'keys': batch.keys.tobytes(),
        'ifindex': batch.ifindex.tobytes(),
        'direction': batch.direction.tobytes(),
        'ifnames': [batch.ifnames[i] for i in range(len(batch.ifnames))],
        'encap': [(key, index, tuple(encap.vlan), encap.vni)
                  for (key, index), encap in batch.encap.items()],
        'packets': stats.packets, 'drops': stats.drops,
        'probes': stats.probes, 'foreign': stats.foreign,
    }


def batch_from_wire(raw, batch):
    """Fill ``batch`` from :func:`batch_to_wire`'s values; the stats."""
    batch.t_ns.frombytes(raw['t_ns'])
    batch.keys.frombytes(raw['keys'])
    batch.ifindex.frombytes(raw['ifindex'])
    batch.direction.frombytes(raw['direction'])
    batch.ifnames.update(enumerate(raw['ifnames']))
    for key, index, vlan, vni in raw.get('encap', ()):
        batch.encap[(key, index)] = probe.Encap(vlan=tuple(vlan), vni=vni)
    return capture.CaptureStats(
        packets=raw['packets'], drops=raw['drops'],
        probes=raw['probes'], foreign=raw['foreign'])


def _plan(session, protocol, size, port, probes):
    """A :class:`sources.ProbePlan` from checked plain values."""
    session = _int(session, 'probe session', 1, 0xffff)
    protocol = _check_protocol(protocol)
    size = _int(size, 'probe size', 64, 1500)
    if port is not None:
        port = _int(port, 'probe port', 1, 65535)
    if len(probes) > MAX_PROBES:
        raise ValueError(f"{len(probes)} probes in one window: at most "
                         f"{MAX_PROBES}")
    planned = []
    last = 0
    max_seq = probe.TCP_SEQ_MASK if protocol == 'tcp' else 0xffffffff
    for seq, dst, offset_ns in probes:
        dst = str(ipaddress.ip_address(dst))
        offset_ns = _int(offset_ns, 'probe offset', last,
                         int(MAX_HOLD_S * 1e9))
        planned.append(sources.PlannedProbe(
            seq=_int(seq, 'probe sequence', 0, max_seq), dst_ip=dst,
            offset_ns=offset_ns))
        last = offset_ns
    return sources.ProbePlan(session=session, protocol=protocol,
                             probes=tuple(planned), size=size, port=port)


def _raw_source(netns_name):
    """A LocalSource whose errors say what the daemon lacks."""
    return sources.LocalSource(netns_name=_check_netns(netns_name))


def _prepare_probes(netns_name, session, protocol, size, port, probes):
    plan = _plan(session, protocol, size, port, probes)
    src = _raw_source(netns_name)
    try:
        src.prepare(plan)
    except sources.SourceError as exc:
        src.close()
        if isinstance(exc.__cause__, PermissionError):
            raise PrivilegeError(str(exc)) from exc
        raise
    except BaseException:
        src.close()
        raise
    return _hold((src, plan), lambda held: held[0].close())


def _send_probes(handle, deadline_s):
    with _held_lock:
        entry = _held.pop(_int(handle, 'handle', 1, 2**62), None)
    if entry is None or not isinstance(entry[0], tuple):
        raise ValueError(f"no prepared probes with handle {handle!r}")
    entry[1].cancel()
    src, plan = entry[0]
    if not isinstance(deadline_s, (int, float)) or \
            deadline_s > time.monotonic() + MAX_HOLD_S:
        raise ValueError(f"send deadline {deadline_s!r} is not within "
                         f"{MAX_HOLD_S} s from now")
    try:
        result = src.send(plan, float(deadline_s))
    finally:
        src.close()
    return [result.sent, result.failed, list(result.errors)]


def _discard(handle):
    try:
        src, _plan = _take(handle, tuple)
    except ValueError:
        return
    src.close()


def _status():
    effective, permitted, _ = caps.get_caps()
    return {'pid': os.getpid(), 'uid': os.getuid(),
            'effective': sorted(effective), 'permitted': sorted(permitted)}


_OPS = {
    'open_capture': _open_capture,
    'settle_capture': _settle_capture,
    'close_capture': _close_capture,
    'prepare_probes': _prepare_probes,
    'send_probes': _send_probes,
    'discard_probes': _discard,
    'status': _status,
}


def _dispatch(op, args):
    func = _OPS.get(op)
    if func is None:
        raise ValueError(f"unknown privileged operation {op!r}")
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
                 geneve_port=None):
        self.session = session
        self.vxlan_port = vxlan_port
        self.geneve_port = geneve_port
        self.protocol = protocol
        self.netns_name = netns_name
        self.interfaces = sorted(interfaces) if interfaces else None
        self.context = context or context_for(netns_name)
        self.batch = capture.SightingBatch(session)
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
                            self.vxlan_port, self.geneve_port)

    def settle(self, quiet_s, max_s=None):
        call(self.context, 'settle_capture', self._handle, quiet_s, max_s)

    def close(self):
        if self._handle is None:
            return
        handle, self._handle = self._handle, None
        raw = call(self.context, 'close_capture', handle)
        self.stats = batch_from_wire(raw, self.batch)


def capture_class(context):
    """A ``capture_class`` for :func:`measure.run_window` using ``context``."""
    def make(session, protocol='icmp', netns_name=None, interfaces=None,
             vxlan_port=None, geneve_port=None):
        return PrivsepCapture(session, protocol, netns_name=netns_name,
                              interfaces=interfaces, context=context,
                              vxlan_port=vxlan_port, geneve_port=geneve_port)
    return make


class PrivsepLocalSource(sources.ProbeSource):
    """``local`` / ``netns:NAME`` probes, built and sent by the daemon.

    The daemon builds the packets of the plan itself (it sends nothing
    else) in :meth:`prepare`, before the capture opens, and paces them in
    :meth:`send`.
    """

    def __init__(self, netns_name=None, context=None):
        self.netns_name = netns_name
        self.name = f'netns:{netns_name}' if netns_name else 'local'
        self.context = context or context_for(source_netns=netns_name)
        self._prepared = None

    def prepare(self, plan):
        handle = call(self.context, 'prepare_probes', self.netns_name,
                      plan.session, plan.protocol, plan.size, plan.port,
                      [(p.seq, p.dst_ip, p.offset_ns) for p in plan.probes])
        self._prepared = (plan, handle)

    def send(self, plan, deadline_s):
        prepared, self._prepared = self._prepared, None
        if prepared is None or prepared[0] is not plan:
            self.prepare(plan)
            prepared, self._prepared = self._prepared, None
        sent, failed, errors = call(self.context, 'send_probes',
                                    prepared[1], deadline_s)
        return sources.SendResult(sent=sent, failed=failed,
                                  errors=tuple(errors))

    def close(self):
        prepared, self._prepared = self._prepared, None
        if prepared is not None and self.context.channel is not None:
            call(self.context, 'discard_probes', prepared[1])
