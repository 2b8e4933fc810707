"""The lab's switches: private Open vSwitch daemons and the layout protocol.

The kernel here has no Open vSwitch datapath module, so the lab runs
ovsdb-server and ovs-vswitchd on the *userspace* datapath
(``datapath_type=netdev``), privately, inside the namespace that plays
the compute host (and, for OVN's Geneve, inside the source's namespace
too):

* every daemon keeps its database, sockets, pidfiles and logs in one
  folder of the lab's state directory (``OVS_RUNDIR``/``OVS_DBDIR``/
  ``OVS_LOGDIR``), so several labs and the host's own Open vSwitch never
  meet;
* ports must be created inside the namespace first and then added to a
  bridge; a port moved into another namespace afterwards stops working
  ("Network is down … No such device");
* the daemons are started with ``--detach`` from a fresh process (no lock
  descriptor of ours is inherited: ``close_fds``) and stopped by their
  pidfiles.

:class:`SwitchLayout` is what a lab layout (``--switch linuxbridge``,
``ovs-hybrid``, ``ovs-native``, ``ovn``) provides to :class:`build.Lab`.
Layout modules import this module (and the product's), never
:mod:`netweaver_agent.lab.build`, which loads them lazily by name: everything a
layout needs from the lab (errors, command helpers, :class:`ActiveDelay`)
is here, and the lab itself is passed to the layout.
"""

import dataclasses
import json
import os
import signal
import time

from oslo_log import log

from netweaver_agent.core import netns
from netweaver_agent.core import sources
from netweaver_agent.core import vifpath
from netweaver_agent.lab import proc

LOG = log.getLogger(__name__)

VSWITCH_SCHEMA = '/usr/share/openvswitch/vswitch.ovsschema'
DAEMON_START_TIMEOUT_S = 10.0
DAEMON_STOP_GRACE_S = 3.0
COMMAND_TIMEOUT_S = 20
# ovs-vsctl waits for ovs-vswitchd to apply a change unless --no-wait.
VSCTL_TIMEOUT_S = 10


VXLAN_PORT = 4789
GENEVE_PORT = 6081


class LabError(RuntimeError):
    """The lab could not be built, changed or removed."""


class SwitchError(LabError):
    """A lab switch could not be started, configured or stopped."""


@dataclasses.dataclass(frozen=True, slots=True)
class ActiveDelay:
    """A delay the lab put in place, and how."""

    injection: object            # spec.DelayInjection
    backend: str                 # 'netem' or 'nfqueue'
    queue: int | None = None
    records_path: str | None = None
    pid: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class HopDevices:
    """The devices a probe crosses between two seen interfaces.

    ``unseen`` are the netdevs, bridges and (OVS) ports in between, in
    path order, where no packet socket sees the probe.
    """

    src: str
    dst: str
    unseen: tuple = ()


# -- commands ---------------------------------------------------------------

def ip_batch(ns, lines, tool='ip'):
    """Run ``ip -batch -`` (or ``bridge``) lines inside namespace ``ns``."""
    argv = [tool, *(['-n', ns] if ns else []), '-batch', '-']
    try:
        netns.run(argv, input='\n'.join(lines) + '\n')
    except netns.CommandError as exc:
        raise LabError(f"{tool} in namespace {ns or '(host)'}: "
                       f"{exc}") from exc


def sysctl(ns, settings):
    """``sysctl -w`` each ``(key, value)`` of ``settings`` inside ``ns``."""
    argv = ['sysctl', '-q', '-w', *(f'{k}={v}' for k, v in settings)]
    try:
        netns.run(argv, netns=ns)
    except netns.CommandError as exc:
        raise LabError(f"sysctl in namespace {ns}: {exc}") from exc


def iptables(ns, rule, tool='iptables'):
    """One ``iptables`` (or ``ip6tables``) command inside ``ns``."""
    try:
        netns.run([tool, '-w', '5', *rule], netns=ns)
    except netns.CommandError as exc:
        raise LabError(f"{tool} in namespace {ns}: {exc}") from exc


@dataclasses.dataclass(frozen=True, slots=True)
class OvsPaths:
    """Where one private Open vSwitch instance keeps its files."""

    root: str

    @property
    def db(self):
        return os.path.join(self.root, 'conf.db')

    @property
    def db_sock(self):
        return os.path.join(self.root, 'db.sock')

    @property
    def db_connection(self):
        """The OVSDB connection string (``unix:…``) of this instance."""
        return f'unix:{self.db_sock}'

    def pidfile(self, daemon):
        return os.path.join(self.root, f'{daemon}.pid')

    def ctl(self, daemon):
        return os.path.join(self.root, f'{daemon}.ctl')

    def log(self, daemon):
        return os.path.join(self.root, f'{daemon}.log')

    def mgmt(self, bridge):
        """ovs-vswitchd's OpenFlow management socket of ``bridge``."""
        return f'unix:{os.path.join(self.root, bridge)}.mgmt'

    def env(self):
        """The environment OVS tools need to find this instance."""
        return {**os.environ, 'OVS_RUNDIR': self.root,
                'OVS_DBDIR': self.root, 'OVS_LOGDIR': self.root}


def read_pid(pidfile):
    """The pid in ``pidfile``, or None if there is none."""
    try:
        with open(pidfile, encoding='ascii') as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def stop_pidfile(pidfile, what):
    """SIGTERM the daemon of ``pidfile``, SIGKILL it after a grace."""
    pid = read_pid(pidfile)
    if pid is None or not proc.pid_alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + DAEMON_STOP_GRACE_S
    while proc.pid_alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    if proc.pid_alive(pid):
        LOG.warning('Lab %(what)s (pid %(pid)d) ignored SIGTERM; killing',
                    {'what': what, 'pid': pid})
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class OvsDaemons:
    """A private ovsdb-server and ovs-vswitchd inside one namespace.

    :param netns_name: the namespace the daemons run in (their ports must
        be created there)
    :param root: a folder of its own for the database, sockets, pidfiles
        and logs (made if missing)
    """

    DAEMONS = ('ovsdb-server', 'ovs-vswitchd')

    def __init__(self, netns_name, root):
        self.netns_name = netns_name
        self.paths = OvsPaths(root)
        self.started = False

    @property
    def db_connection(self):
        return self.paths.db_connection

    def pids(self):
        """``{daemon: pid}`` of the daemons with a pidfile."""
        out = {}
        for daemon in self.DAEMONS:
            pid = read_pid(self.paths.pidfile(daemon))
            if pid is not None:
                out[daemon] = pid
        return out

    def _run(self, argv, timeout=COMMAND_TIMEOUT_S, netns_name=None,
             check=True):
        try:
            return netns.run(argv, netns=netns_name, check=check,
                             timeout=timeout, env=self.paths.env())
        except netns.CommandError as exc:
            raise SwitchError(str(exc)) from exc

    def start(self):
        """Create the database and start both daemons (detached)."""
        p = self.paths
        os.makedirs(p.root, exist_ok=True)
        if not os.path.exists(p.db):
            self._run(['ovsdb-tool', 'create', p.db, VSWITCH_SCHEMA])
        self.started = True
        self._run(['ovsdb-server', p.db, f'--remote=punix:{p.db_sock}',
                   '--remote=db:Open_vSwitch,Open_vSwitch,manager_options',
                   f'--pidfile={p.pidfile("ovsdb-server")}',
                   f'--unixctl={p.ctl("ovsdb-server")}',
                   f'--log-file={p.log("ovsdb-server")}',
                   '--detach', '--no-chdir'], netns_name=self.netns_name)
        self._wait_for(p.db_sock, 'ovsdb-server')
        self.vsctl('--no-wait', 'init')
        self._run(['ovs-vswitchd', p.db_connection,
                   f'--pidfile={p.pidfile("ovs-vswitchd")}',
                   f'--unixctl={p.ctl("ovs-vswitchd")}',
                   f'--log-file={p.log("ovs-vswitchd")}',
                   '--detach', '--no-chdir'], netns_name=self.netns_name)
        self._wait_for(p.ctl('ovs-vswitchd'), 'ovs-vswitchd')
        LOG.debug('Open vSwitch started in %(ns)s: %(pids)s',
                  {'ns': self.netns_name, 'pids': self.pids()})
        return self

    def _wait_for(self, path, daemon):
        end = time.monotonic() + DAEMON_START_TIMEOUT_S
        while time.monotonic() < end:
            if os.path.exists(path):
                return
            time.sleep(0.01)
        raise SwitchError(
            f"{daemon} in namespace {self.netns_name} did not create "
            f"{path} within {DAEMON_START_TIMEOUT_S:.0f} s; see "
            f"{self.paths.log(daemon)}")

    def vsctl(self, *args, timeout=VSCTL_TIMEOUT_S):
        """Run ``ovs-vsctl`` against this instance; its stdout."""
        argv = ['ovs-vsctl', f'--db={self.paths.db_connection}',
                f'--timeout={int(timeout)}', *args]
        return self._run(argv, timeout=timeout + 5).stdout

    def ofctl(self, command, bridge, *args):
        """Run ``ovs-ofctl COMMAND <bridge's mgmt socket> ARGS``."""
        argv = ['ovs-ofctl', '-O', 'OpenFlow13', command,
                self.paths.mgmt(bridge), *args]
        return self._run(argv).stdout

    def appctl(self, *args, daemon='ovs-vswitchd'):
        """Run ``ovs-appctl -t <daemon's control socket> ARGS``."""
        return self._run(['ovs-appctl', '-t', self.paths.ctl(daemon),
                          *args]).stdout

    def add_bridge(self, bridge, *extra):
        """A userspace (``netdev``) bridge, plus ``extra`` vsctl words."""
        self.vsctl('--may-exist', 'add-br', bridge, '--', 'set', 'bridge',
                   bridge, 'datapath_type=netdev', *extra)

    def interface(self, name):
        """The Interface row ``name`` as ``{column: value}`` (JSON)."""
        out = self.vsctl('--format=json', 'list', 'Interface', name)
        data = json.loads(out)
        return dict(zip(data['headings'], data['data'][0]))

    def stop(self):
        """Delete every bridge, then stop the daemons; safe to repeat."""
        if not self.started:
            return
        try:
            if os.path.exists(self.paths.db_sock):
                bridges = self._run(
                    ['ovs-vsctl', f'--db={self.paths.db_connection}',
                     '--timeout=5', 'list-br'], timeout=10,
                    check=False).stdout.split()
                for bridge in bridges:
                    self._run(['ovs-vsctl',
                               f'--db={self.paths.db_connection}',
                               '--timeout=5', '--if-exists', 'del-br',
                               bridge], timeout=10, check=False)
        except Exception as exc:  # stopping the daemons matters more
            LOG.warning('Lab Open vSwitch in %(ns)s: bridges not deleted: '
                        '%(exc)s', {'ns': self.netns_name, 'exc': exc})
        for daemon in reversed(self.DAEMONS):
            stop_pidfile(self.paths.pidfile(daemon), daemon)
        self.started = False


class SwitchLayout:
    """What one lab layout builds between the pif and the guests' taps.

    :class:`build.Lab` builds the namespaces, the guests and the management
    network, and asks its layout for the rest: the hypervisor's switch,
    the source's side of the physical network, the probe source, the
    paths, the injected truth and the teardown of what the layout
    started.  A layout knows its truth: which injections it can make
    (``delay_truth``/``loss_truth``: how, or None when it cannot), and the
    path every guest's probes take, with the devices they cross but no
    packet socket sees (:meth:`unseen`).

    ``lab`` is the :class:`build.Lab` being built: ``spec`` (names and
    addresses: ``spec.hv_netns``...), ``guests``, ``state_dir``,
    ``start_delayer()``, ``save_state()``.
    """

    #: the ``--switch`` name
    name = 'abstract'
    #: network types this layout builds (``flat``, ``vlan``, ``vxlan``,
    #: ``geneve``)
    network_types = ()
    #: how delay is injected (one phrase), or None: no delay truth
    delay_truth = None
    #: how loss is injected (one phrase), or None: no loss truth
    loss_truth = None
    #: extra ``ip link add … type vxlan`` words of the source's ``vx0``
    source_vxlan_options = ()

    def __init__(self, lab):
        self.lab = lab

    @property
    def spec(self):
        return self.lab.spec

    @property
    def bridge(self):
        """The bridge the taps hang off (``brq…``, ``br-int``...)."""
        raise NotImplementedError

    def build_hypervisor(self):
        """The pif, the switch and one tap per guest, in the hv namespace."""
        raise NotImplementedError

    def build_source(self):
        """The probe source's side of the physical network.

        Default: the source namespace's own stack on ``eth0`` (flat and
        VLAN), or over a kernel VXLAN device ``vx0`` whose underlay is
        ``eth0`` (``vxlan``).  Static neighbours for every guest.
        """
        spec, lab = self.spec, self.lab
        dev = 'eth0'
        lines = ['link set lo up']
        if spec.network_type == 'vxlan':
            src_u, hv_u, uplen = spec.underlay_addresses()
            dev = 'vx0'
            lines += [f'addr add {src_u}/{uplen} dev eth0', 'link set eth0 up',
                      f'neigh replace {hv_u} lladdr {spec.pif_mac} dev eth0 '
                      'nud permanent',
                      f'link add vx0 address {spec.src_mac} type vxlan id '
                      f'{spec.segmentation_id} local {src_u} remote {hv_u} '
                      f'dstport {VXLAN_PORT} dev eth0 nolearning'
                      + ''.join(f' {o}' for o in self.source_vxlan_options)]
        else:
            lines.append(f'link set eth0 address {spec.src_mac}')
        lines += [f'addr add {spec.src_address}/{spec.prefixlen} dev {dev}',
                  f'link set {dev} up']
        lines += [f'neigh replace {g.address} lladdr {g.mac} dev {dev} '
                  'nud permanent' for g in lab.guests]
        if spec.ipv6:
            lines.append(f'addr add {spec.src_address6}/{spec.prefixlen6} '
                         f'dev {dev} nodad')
            lines += [f'neigh replace {g.address6} lladdr {g.mac} dev {dev} '
                      'nud permanent' for g in lab.guests]
        ip_batch(lab.spec.src_netns, lines)

    def source(self):
        """The probe source: the source namespace's stack; on a VLAN
        network, tagged frames with the segmentation id."""
        if self.spec.network_type == 'vlan':
            return self.lab.vlan_source((self.spec.segmentation_id,))
        return sources.LocalSource(netns_name=self.lab.spec.src_netns)

    def hops(self, guest):
        """The interfaces where a packet socket sees ``guest``'s probes,
        pif first, tap last."""
        raise NotImplementedError

    def unseen(self, guest):
        """One :class:`HopDevices` per hop of :meth:`hops`: what is
        crossed in between (default: nothing)."""
        seen = self.hops(guest)
        return tuple(HopDevices(a, b) for a, b in zip(seen, seen[1:]))

    def encap(self):
        """The ``vifpath.Encapsulation`` carrying probes on the pif."""
        kind = self.spec.network_type
        port = {'vxlan': VXLAN_PORT, 'geneve': GENEVE_PORT}.get(kind)
        return (vifpath.Encapsulation(kind=kind, port=port),) if port \
            else ()

    def paths(self, ipv6=False):
        """One ``vifpath.VifPath`` per guest: the truth of the layout,
        with the devices crossed unseen (``via``) and the tunnel."""
        return [vifpath.VifPath(vif=g.vif,
                                address=g.address6 if ipv6 else g.address,
                                interfaces=tuple(self.hops(g)), mac=g.mac,
                                via=tuple(h.unseen for h in self.unseen(g)),
                                encap=self.encap())
                for g in self.lab.guests]

    @property
    def ovsdb_connection(self):
        """The OVSDB connection (``unix:…``) of the hypervisor's Open
        vSwitch, what ``[netweaver] ovsdb_connection`` names on such a
        host; None without Open vSwitch."""
        return None

    def interface_xml(self, guest):
        """``(bridge, virtualport interfaceid or None)`` of the guest's
        ``<interface type='bridge'>`` as Nova writes it."""
        return self.bridge, None

    def inject_loss(self, loss):
        """Drop every Nth probe to a guest after the pif (LabError if the
        layout cannot)."""
        raise LabError(f"lab switch {self.name!r} has no loss truth")

    def inject_delay(self, delay):
        """Hold probes to a guest; an ``ActiveDelay`` (LabError if the
        layout has no delay truth)."""
        raise LabError(f"lab switch {self.name!r} has no delay truth")

    def truth(self):
        """One line saying which injected truth this layout has."""
        return (f"delay: {self.delay_truth or 'none on this layout'}; "
                f"loss: {self.loss_truth or 'none on this layout'}")

    def pids(self):
        """``[{'pid': …, 'marker': …}]`` of the daemons the layout runs
        (a kept lab's teardown kills a pid only if ``marker`` is one of
        its command-line words)."""
        return []

    def state(self):
        """What a kept lab's state file records of the layout (JSON)."""
        return {'switch': self.name}

    def teardown(self):
        """Stop what the layout started (before the namespaces go)."""
