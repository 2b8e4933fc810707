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
``ovs-hybrid``, ``ovs-native``, ``ovn``) provides to :class:`lab.Lab`.
"""

import dataclasses
import json
import os
import signal
import time

from oslo_log import log

from netweaver_agent import netns

LOG = log.getLogger(__name__)

VSWITCH_SCHEMA = '/usr/share/openvswitch/vswitch.ovsschema'
DAEMON_START_TIMEOUT_S = 10.0
DAEMON_STOP_GRACE_S = 3.0
COMMAND_TIMEOUT_S = 20
# ovs-vsctl waits for ovs-vswitchd to apply a change unless --no-wait.
VSCTL_TIMEOUT_S = 10


class SwitchError(RuntimeError):
    """A lab switch could not be started, configured or stopped."""


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


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f'/proc/{pid}/stat', encoding='ascii') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return False


def stop_pidfile(pidfile, what):
    """SIGTERM the daemon of ``pidfile``, SIGKILL it after a grace."""
    pid = read_pid(pidfile)
    if pid is None or not _alive(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + DAEMON_STOP_GRACE_S
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    if _alive(pid):
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

    :class:`lab.Lab` builds the namespaces, the source and the guests, and
    asks its layout for the rest.  A layout knows its truth: which
    injections it can make, and the path (``VifPath``) every guest's
    probes take, with the devices they cross but no packet socket sees.
    """

    #: the ``--switch`` name
    name = 'abstract'
    #: network types this layout builds (``flat``, ``vlan``, ``vxlan``,
    #: ``geneve``)
    network_types = ()

    def __init__(self, lab):
        self.lab = lab

    def build_hypervisor(self):
        """The pif, the switch and one tap per guest, in the hv namespace."""
        raise NotImplementedError

    def build_source(self):
        """The probe source's side of the physical network."""
        raise NotImplementedError

    def paths(self, ipv6=False):
        """One ``topology.VifPath`` per guest: the truth of the layout."""
        raise NotImplementedError

    def inject_loss(self, loss):
        """Drop every Nth probe to a guest after the pif (LabError if the
        layout cannot)."""
        raise NotImplementedError

    def inject_delay(self, delay):
        """Hold probes to a guest; an ``ActiveDelay`` (LabError if the
        layout has no delay truth)."""
        raise NotImplementedError

    def truth(self):
        """One line saying which injected truth this layout has."""
        raise NotImplementedError

    def state(self):
        """What a kept lab's state file records of the layout (JSON)."""
        return {'switch': self.name}

    def teardown(self):
        """Stop what the layout started (before the namespaces go)."""
