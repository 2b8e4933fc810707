"""vNIC paths from a real Open vSwitch database.

Each test starts a private ``ovsdb-server`` (no ovs-vswitchd: topology
reads rows only) inside a network namespace it makes, listening on a unix
socket and on an ephemeral TCP port of the namespace's loopback, fills it
with ``ovs-vsctl --no-wait`` as Neutron's OVS agent and OVN's controller
would (br-int, br-ex / br-phy / br-tun, patch ports, hybrid ``qvo`` and
native tap ports with ``iface-id``/``attached-mac``/``vm-uuid``, VXLAN and
Geneve ports), and creates the kernel netdevs those rows name inside the
namespace (tap devices, the ``qbr`` Linux bridge, the ``qvb``/``qvo``
veth pair, pif veths whose peers sit in a second namespace, the tunnel
endpoint address).  Paths are resolved the way the pollsters do, with
``capture_netns`` pointing at the namespace.  Everything is removed in
teardown, also on failure.
"""

import functools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import types

import pytest

from netweaver_agent.agent import ovsdb
from netweaver_agent.agent import pollsters
from netweaver_agent.agent import topology
from netweaver_agent.cli import seedjob
from netweaver_agent.core import vifpath
from netweaver_agent.lab import virt
from netweaver_agent.ssh import session as ssh
from tests.functional import sshlab
from tests.functional.conftest import require_root
from tests.functional.conftest import stop_processes
from tests.functional.conftest import unique_prefix

SCHEMA = '/usr/share/openvswitch/vswitch.ovsschema'


class OvsHost:
    """A namespace with kernel netdevs and a private ovsdb-server."""

    def __init__(self):
        prefix = unique_prefix('ovt')
        self.ns = prefix + 'hv'
        self.ext = prefix + 'ex'
        # Short: a unix socket path holds at most 107 bytes.
        self.dir = tempfile.mkdtemp(prefix='nwovt', dir='/tmp')
        self.sock = os.path.join(self.dir, 'db.sock')
        self.pidfile = os.path.join(self.dir, 'ovsdb-server.pid')
        self.log = os.path.join(self.dir, 'ovsdb-server.log')
        self.tcp_port = None
        self.namespaces = []
        self.procs = []

    @property
    def unix(self):
        return f'unix:{self.sock}'

    @property
    def tcp(self):
        return f'tcp:127.0.0.1:{self.tcp_port}'

    def _env(self):
        return {**os.environ, 'OVS_RUNDIR': self.dir, 'OVS_DBDIR': self.dir,
                'OVS_LOGDIR': self.dir}

    def run(self, *argv, netns=None):
        full = (['ip', 'netns', 'exec', netns] if netns else []) + list(argv)
        proc = subprocess.run(full, capture_output=True, text=True,
                              env=self._env(), timeout=30)
        if proc.returncode:
            pytest.fail(f'{" ".join(full)}: {proc.stderr.strip()}')
        return proc.stdout

    def start(self):
        require_root()
        for ns in (self.ns, self.ext):
            self.run('ip', 'netns', 'add', ns)
            self.namespaces.append(ns)
            self.run('ip', '-n', ns, 'link', 'set', 'lo', 'up')
        db = os.path.join(self.dir, 'conf.db')
        self.run('ovsdb-tool', 'create', db, SCHEMA)
        self.run('ovsdb-server', db, f'--remote=punix:{self.sock}',
                 '--remote=ptcp:0:127.0.0.1', f'--pidfile={self.pidfile}',
                 f'--unixctl={os.path.join(self.dir, "ovsdb-server.ctl")}',
                 f'--log-file={self.log}', '--detach', netns=self.ns)
        deadline = time.monotonic() + 10
        while self.tcp_port is None:
            if time.monotonic() > deadline:
                pytest.fail('ovsdb-server did not report its TCP port in '
                            f'{self.log}')
            try:
                with open(self.log, encoding='utf-8') as f:
                    found = re.search(r'listening on port (\d+)', f.read())
            except FileNotFoundError:
                found = None
            if found:
                self.tcp_port = int(found.group(1))
            else:
                time.sleep(0.05)
        self.vsctl('init')
        return self

    def vsctl(self, *args):
        return self.run('ovs-vsctl', f'--db={self.unix}', '--no-wait',
                        '--timeout=10', *args)

    def ip(self, *lines):
        subprocess.run(['ip', '-n', self.ns, '-batch', '-'], check=True,
                       input=''.join(f'{line}\n' for line in lines),
                       text=True, timeout=30)

    def stop_server(self):
        try:
            with open(self.pidfile, encoding='utf-8') as f:
                pid = int(f.read().strip())
        except (FileNotFoundError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    def start_sshd(self):
        """An sshd inside the namespace on 127.0.0.1:2222 whose sessions
        find this host's database as ovs-vsctl's default (OVS_RUNDIR);
        returns :class:`ssh.SSHOptions` to reach it."""
        key = os.path.join(self.dir, 'client_key')
        host_key = os.path.join(self.dir, 'host_key')
        for path in (key, host_key):
            self.run('ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C',
                     'netweaver-test', '-f', path)
        shutil.copy(key + '.pub', os.path.join(self.dir, 'authorized_keys'))
        with open(host_key + '.pub', encoding='utf-8') as f:
            kind, blob = f.read().split()[:2]
        known_hosts = os.path.join(self.dir, 'known_hosts')
        with open(known_hosts, 'w', encoding='utf-8') as f:
            f.write(f'[127.0.0.1]:2222 {kind} {blob}\n')
        os.makedirs('/run/sshd', mode=0o755, exist_ok=True)
        sshlab.start_sshd(
            self.ns, os.path.join(self.dir, 'sshd.conf'), [
                'Port 2222', 'ListenAddress 127.0.0.1',
                f'HostKey {host_key}',
                f'AuthorizedKeysFile {self.dir}/authorized_keys',
                f'PidFile {self.dir}/sshd.pid', 'UsePAM no',
                'StrictModes no', 'PermitRootLogin prohibit-password',
                'PasswordAuthentication no',
                'KbdInteractiveAuthentication no',
                f'SetEnv OVS_RUNDIR={self.dir}'],
            os.path.join(self.dir, 'sshd.log'), self.procs, self.ns)
        return ssh.SSHOptions(key_file=key, known_hosts_file=known_hosts,
                              connect_timeout_s=5.0,
                              command_timeout_s=30.0)

    def close(self):
        errors = []
        stop_processes(self.procs)
        self.stop_server()
        for ns in reversed(self.namespaces):
            proc = subprocess.run(['ip', 'netns', 'del', ns],
                                  capture_output=True, text=True)
            if proc.returncode:
                errors.append(proc.stderr.strip())
        shutil.rmtree(self.dir, ignore_errors=True)
        return errors

    # --- what the host holds ---------------------------------------------

    def pif(self, name, address=None):
        """A physical-like netdev: a veth whose peer is elsewhere."""
        self.ip(f'link add {name} type veth peer name {name}p',
                f'link set {name}p netns {self.ext}', f'link set {name} up')
        if address:
            self.ip(f'addr add {address}/24 dev {name}')

    def bridge(self, name, uplink=None):
        self.vsctl('add-br', name, '--', 'set', 'Bridge', name,
                   'datapath_type=netdev')
        if uplink:
            self.vsctl('add-port', name, uplink)

    def patch(self, bridge_a, port_a, bridge_b, port_b):
        for bridge, port, peer in ((bridge_a, port_a, port_b),
                                   (bridge_b, port_b, port_a)):
            self.vsctl('add-port', bridge, port, '--', 'set', 'Interface',
                       port, 'type=patch', f'options:peer={peer}')

    def _port(self, bridge, name, n, extra=()):
        self.vsctl('add-port', bridge, name, 'tag=1', '--', 'set',
                   'Interface', name, f'external_ids:iface-id=port-{n}',
                   f'external_ids:attached-mac=fa:16:3e:00:00:{n:02x}',
                   f'external_ids:vm-uuid=vm-{n}', *extra)

    def hybrid(self, n, bridge='br-int'):
        """tapN on qbrN, qvbN ~veth~ qvoN on ``bridge`` (hybrid plug)."""
        self.ip(f'link add qbr{n} type bridge',
                f'link add qvb{n} type veth peer name qvo{n}',
                f'tuntap add tap{n} mode tap',
                f'link set qvb{n} master qbr{n}',
                f'link set tap{n} master qbr{n}',
                *(f'link set {d}{n} up' for d in ('qbr', 'qvb', 'qvo')))
        self._port(bridge, f'qvo{n}', n)

    def native(self, n, bridge='br-int'):
        """tapN straight on ``bridge`` (native firewall, OVN)."""
        self.ip(f'tuntap add tap{n} mode tap')
        self._port(bridge, f'tap{n}', n)

    def linux_bridge(self, n, pif):
        """tapN on a plain Linux bridge brqN with ``pif``."""
        self.pif(pif)
        self.ip(f'link add brq{n} type bridge', f'tuntap add tap{n} mode tap',
                f'link set {pif} master brq{n}',
                f'link set tap{n} master brq{n}')

    def provider(self):
        """br-int patched to br-ex, whose uplink is eth1 (ML2/OVS flat)."""
        self.pif('eth1')
        self.bridge('br-int')
        self.bridge('br-ex', uplink='eth1')
        self.patch('br-int', 'int-br-ex', 'br-ex', 'phy-br-int')

    # --- resolving, as the pollsters do -------------------------------------

    def view(self, connection=None):
        return topology.SwitchView(
            functools.partial(ovsdb.read_snapshot, connection or self.unix,
                              timeout_s=5, netns_name=self.ns),
            functools.partial(topology.read_addresses, self.ns))

    def find(self, vif, view):
        return topology.find_path(vif, topology.IpLinks(self.ns), view)


@pytest.fixture
def host():
    made = []

    def make():
        made.append(OvsHost())
        return made[-1].start()
    yield make
    errors = [e for h in made for e in h.close()]
    if errors:
        pytest.fail('teardown left things behind: ' + '; '.join(errors))


TO_BR_INT = ('br-ex', 'phy-br-int', 'int-br-ex', 'br-int')


@pytest.mark.parametrize('over', ['unix', 'tcp'])
def test_hybrid_and_native_paths(host, over):
    h = host()
    h.provider()
    h.hybrid(1)
    h.native(2)
    view = h.view(h.unix if over == 'unix' else h.tcp)
    hybrid = h.find('tap1', view)
    assert hybrid.interfaces == ('eth1', 'qvo1', 'qvb1', 'tap1')
    assert hybrid.via == (TO_BR_INT, (), ('qbr1',))
    native = h.find('tap2', view)
    assert native.interfaces == ('eth1', 'tap2')
    assert native.via == (TO_BR_INT,)
    assert hybrid.encap == native.encap == ()
    assert view.reads == 1


def test_vxlan_pif_owns_local_ip(host):
    h = host()
    h.pif('eth1')
    h.pif('eth2', address='198.18.7.1')
    h.bridge('br-int')
    h.bridge('br-tun')
    h.patch('br-int', 'patch-tun', 'br-tun', 'patch-int')
    h.vsctl('add-port', 'br-tun', 'vxlan-c6120702', '--', 'set',
            'Interface', 'vxlan-c6120702', 'type=vxlan',
            'options:local_ip=198.18.7.1', 'options:remote_ip=198.18.7.2',
            'options:in_key=flow', 'options:out_key=flow')
    h.native(3)
    found = h.find('tap3', h.view())
    assert found.interfaces == ('eth2', 'tap3')
    assert found.encap == (vifpath.Encapsulation('vxlan', 4789),)
    assert found.via == (('vxlan-c6120702', 'br-tun', 'patch-int',
                          'patch-tun', 'br-int'),)


def test_geneve_local_ip_on_an_internal_port(host):
    # OVN: Geneve ports on br-int carry no local_ip; the chassis's
    # ovn-encap-ip is on br-phy's internal port, whose uplink is eth3.
    h = host()
    h.pif('eth3')
    h.bridge('br-int')
    h.bridge('br-phy', uplink='eth3')
    h.vsctl('set', 'Open_vSwitch', '.',
            'external_ids:ovn-encap-ip=198.18.8.1',
            'external_ids:ovn-encap-type=geneve')
    # The internal port's netdev (ovs-vswitchd would make it): a veth.
    h.ip('link add br-phy type veth peer name br-phyp',
         f'link set br-phyp netns {h.ext}', 'link set br-phy up',
         'addr add 198.18.8.1/24 dev br-phy')
    h.vsctl('add-port', 'br-int', 'ovn-chas02-0', '--', 'set', 'Interface',
            'ovn-chas02-0', 'type=geneve', 'options:remote_ip=198.18.8.2',
            'options:key=flow', 'options:csum=true')
    h.native(4)
    found = h.find('tap4', h.view())
    assert found.interfaces == ('eth3', 'tap4')
    assert found.encap == (vifpath.Encapsulation('geneve', 6081),)
    assert found.via == (('br-phy', 'ovn-chas02-0', 'br-int'),)


# --- through the pollsters' inspector ----------------------------------------

class _Recorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def prober_for(tmp_path):
    """``make(host, taps, **options) -> (LatencyInspector, instances,
    log lines)``."""
    from ceilometer.compute import discovery

    from tests.functional import inprocess
    made = []
    recorder = _Recorder()
    logger = logging.getLogger('netweaver_agent')

    def make(h, taps, **options):
        """``taps``: numbers of :class:`OvsHost` taps, or GuestDomains."""
        guests = [n if isinstance(n, virt.GuestDomain) else
                  virt.GuestDomain(
                      index=i, name=f'vm{n}',
                      uuid=f'3f2d6c1e-8a4b-4c5d-9e6f-{n:012d}',
                      vif=f'tap{n}', mac=f'fa:16:3e:00:00:{n:02x}',
                      address=f'198.18.9.{10 + n}', bridge='br-int')
                  for i, n in enumerate(taps)]
        uri = virt.write_node(str(tmp_path / 'node.xml'), guests)
        conf = inprocess.configure(uri, **{
            'privsep': False, 'probe_source': f'netns:{h.ext}',
            'capture_netns': h.ns, 'ovsdb_connection': h.unix, **options})
        prober = pollsters.new_inspector(conf)
        made.append(prober)
        logger.setLevel(logging.DEBUG)
        logger.addHandler(recorder)
        instances = discovery.InstanceDiscovery(conf).discover(None)
        return prober, instances, recorder.lines

    yield make
    logger.removeHandler(recorder)
    for prober in made:
        prober.source.close()


def by_tap(found):
    return {path.vif: path for _, _, path in found}


def test_prober_resolves_every_layout_with_one_snapshot(host, prober_for):
    h = host()
    h.provider()
    h.hybrid(1)
    h.native(2)
    h.linux_bridge(5, 'eth5')
    reads = []
    real = ovsdb.read_snapshot

    def counted(*args, **kwargs):
        reads.append(args[0])
        return real(*args, **kwargs)
    prober, instances, _ = prober_for(h, (1, 2, 5))
    ovsdb.read_snapshot = counted
    try:
        paths = by_tap(prober.paths(instances))
    finally:
        ovsdb.read_snapshot = real
    assert paths['tap1'].interfaces == ('eth1', 'qvo1', 'qvb1', 'tap1')
    assert paths['tap2'].interfaces == ('eth1', 'tap2')
    assert paths['tap5'].interfaces == ('eth5', 'tap5')
    assert paths['tap5'].via == (('brq5',),)
    assert reads == [h.unix]
    settings = prober.window_settings(list(paths.values()))
    assert settings.vxlan_port is None and settings.geneve_port is None


def test_prober_opens_the_window_for_the_tunnel_found(host, prober_for):
    h = host()
    h.pif('eth2', address='198.18.7.1')
    h.bridge('br-int')
    h.vsctl('add-port', 'br-int', 'vxlan-1', '--', 'set', 'Interface',
            'vxlan-1', 'type=vxlan', 'options:local_ip=198.18.7.1',
            'options:remote_ip=198.18.7.2', 'options:dst_port=4790')
    h.native(3)
    prober, instances, _ = prober_for(h, (3,))
    (path,) = by_tap(prober.paths(instances)).values()
    assert path.interfaces == ('eth2', 'tap3')
    settings = prober.window_settings([path])
    assert settings.vxlan_port == 4790
    assert settings.geneve_port is None
    assert settings.count == prober.settings.count


def test_two_uplinks_are_not_measurable_with_the_reason(host, prober_for):
    h = host()
    h.provider()
    h.pif('eth2')
    h.bridge('br-ex2', uplink='eth2')
    h.patch('br-int', 'int-br-ex2', 'br-ex2', 'phy-br-int2')
    h.native(2)
    h.linux_bridge(5, 'eth5')
    prober, instances, lines = prober_for(h, (2, 5))
    paths = by_tap(prober.paths(instances))
    assert set(paths) == {'tap5'}
    (line,) = [x for x in lines if 'tap2' in x and 'not probed' in x]
    assert 'eth1' in line and 'eth2' in line
    assert 'set [netweaver] pif' in line


def test_configured_pif_settles_two_uplinks(host, prober_for):
    h = host()
    h.provider()
    h.pif('eth2')
    h.bridge('br-ex2', uplink='eth2')
    h.patch('br-int', 'int-br-ex2', 'br-ex2', 'phy-br-int2')
    h.hybrid(1)
    prober, instances, _ = prober_for(h, (1,), pif='eth2')
    (path,) = by_tap(prober.paths(instances)).values()
    assert path.interfaces == ('eth2', 'qvo1', 'qvb1', 'tap1')
    assert path.via[0] == ('br-ex2', 'phy-br-int2', 'int-br-ex2', 'br-int')


@pytest.mark.parametrize('over', ['unix', 'tcp'])
def test_unreadable_ovsdb_only_stops_ovs_vnics(host, prober_for, over,
                                               request):
    h = host()
    h.provider()
    h.hybrid(1)
    h.native(2)
    h.linux_bridge(5, 'eth5')
    connection = h.unix if over == 'unix' else h.tcp
    h.stop_server()
    if over == 'unix':
        # A socket that nobody answers (a server hung or restarting):
        # refused.  (A missing socket means no Open vSwitch on the host.)
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        request.addfinalizer(dead.close)
        dead.bind(h.sock)
    prober, instances, lines = prober_for(h, (1, 2, 5),
                                          ovsdb_connection=connection)
    paths = by_tap(prober.paths(instances))
    assert set(paths) == {'tap5'}
    assert paths['tap5'].interfaces == ('eth5', 'tap5')
    for tap in ('tap1', 'tap2'):
        (line,) = [x for x in lines if tap in x and 'not probed' in x]
        assert "cannot read Open vSwitch's database" in line
        assert connection in line


def test_snapshot_over_unix_and_tcp_agree(host):
    h = host()
    h.provider()
    h.hybrid(1)
    by_unix = ovsdb.read_snapshot(h.unix)
    by_tcp = ovsdb.read_snapshot(h.tcp, netns_name=h.ns)
    by_vsctl = ovsdb.snapshot_from_vsctl(
        {table: h.run(*ovsdb.vsctl_argv(table, db=h.unix))
         for table in ovsdb.COLUMNS})
    for snap in (by_tcp, by_vsctl):
        for table in ('bridges', 'ports', 'interfaces'):
            assert sorted(getattr(snap, table), key=lambda r: r.uuid) == \
                sorted(getattr(by_unix, table), key=lambda r: r.uuid)
    qvo = by_unix.interface('qvo1')
    assert (qvo.iface_id, qvo.attached_mac) == (
        'port-1', 'fa:16:3e:00:00:01')
    assert by_unix.port_of('qvo1').tag == 1


# --- netweaver measure: ovs-vsctl over SSH ---------------------------------

def test_measure_finds_the_pif_with_ovs_vsctl_over_ssh(host):
    h = host()
    h.provider()
    h.hybrid(1)
    h.native(2)
    h.linux_bridge(5, 'eth5')
    h.pif('eth2', address='198.18.7.1')
    h.bridge('br-tun')
    h.patch('br-int', 'patch-tun', 'br-tun', 'patch-int')
    h.vsctl('add-port', 'br-tun', 'vxlan-1', '--', 'set', 'Interface',
            'vxlan-1', 'type=vxlan', 'options:local_ip=198.18.7.1',
            'options:remote_ip=198.18.7.2')
    # Neutron's OVS agent records each port's network type.
    h.vsctl('set', 'Port', 'qvo1', 'other_config:network_type=flat')
    h.vsctl('set', 'Port', 'tap2', 'other_config:network_type=vxlan')
    options = h.start_sshd()
    with ssh.RemoteHost('127.0.0.1', 2222, 'root', options,
                        netns_name=h.ns) as hv:
        hybrid = seedjob.discover_path(hv, 'tap1')
        tunnel = seedjob.discover_path(hv, 'tap2')
        bridged = seedjob.discover_path(hv, 'tap5')
        h.stop_server()
        with pytest.raises(seedjob.SeedJobError) as err:
            seedjob.discover_path(hv, 'tap2')
    assert hybrid.interfaces == ('eth1', 'qvo1', 'qvb1', 'tap1')
    assert hybrid.via == (TO_BR_INT, (), ('qbr1',))
    assert tunnel.interfaces == ('eth2', 'tap2')
    assert tunnel.encap == (vifpath.Encapsulation('vxlan', 4789),)
    assert bridged.interfaces == ('eth5', 'tap5')
    assert 'tap2' in str(err.value) and '--interface' in str(err.value)
    assert "ovs-vsctl on root@127.0.0.1:2222" in str(err.value)


def _frame(src, dst, inner=None, udp_port=None, header=b''):
    """An Ethernet frame: ICMP echo ``src`` → ``dst``, or that frame
    inside UDP to ``udp_port`` after ``header`` (a tunnel's)."""
    import socket as sk

    import dpkt
    icmp = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=1, seq=1))
    ip = dpkt.ip.IP(src=sk.inet_aton(src), dst=sk.inet_aton(dst), p=1,
                    data=icmp)
    eth = dpkt.ethernet.Ethernet(src=b'\x02' * 6, dst=b'\x04' * 6,
                                 data=ip)
    if udp_port is None:
        return bytes(eth)
    udp = dpkt.udp.UDP(sport=40000, dport=udp_port, data=header +
                       bytes(eth))
    udp.ulen = len(bytes(udp))
    outer = dpkt.ip.IP(src=sk.inet_aton('198.18.7.2'),
                       dst=sk.inet_aton('198.18.7.1'), p=17, data=udp)
    return bytes(dpkt.ethernet.Ethernet(src=b'\x06' * 6, dst=b'\x08' * 6,
                                        data=outer))


def test_measure_pif_filter_opens_the_tunnels_found(tmp_path):
    import dpkt
    vxlan = b'\x08\x00\x00\x00\x00\x10\x00\x00'
    geneve = b'\x00\x00\x65\x58\x00\x10\x00\x00'
    geneve_opts = b'\x02\x00\x65\x58\x00\x10\x00\x00' + b'\x01' * 8
    src, dst, other = '198.18.0.2', '198.18.1.10', '198.18.1.99'
    frames = {
        'plain': (_frame(src, dst), True),
        'vxlan': (_frame(src, dst, udp_port=4789, header=vxlan), True),
        'vxlan reply': (_frame(dst, src, udp_port=4789, header=vxlan),
                        True),
        'vxlan other guest': (_frame(src, other, udp_port=4789,
                                     header=vxlan), False),
        'vxlan other port': (_frame(src, dst, udp_port=4790, header=vxlan),
                             False),
        'geneve': (_frame(src, dst, udp_port=6081, header=geneve), True),
        'geneve options': (_frame(src, dst, udp_port=6081,
                                  header=geneve_opts), True),
        'geneve other guest': (_frame(src, other, udp_port=6081,
                                      header=geneve_opts), False),
    }
    encap = (vifpath.Encapsulation('vxlan', 4789),
             vifpath.Encapsulation('geneve', 6081))
    for name, (frame, wanted) in frames.items():
        path = tmp_path / 'one.pcap'
        with open(path, 'wb') as f:
            writer = dpkt.pcap.Writer(f)
            writer.writepkt(frame, ts=1.0)
        kept = []
        for flt in (seedjob.tunnel_filter(src, dst, encap),
                    seedjob.capture_filter(src, dst)):
            out = tmp_path / 'kept.pcap'
            proc = subprocess.run(['tcpdump', '-n', '-r', str(path), '-w',
                                   str(out), flt], capture_output=True,
                                  text=True, timeout=30)
            assert proc.returncode == 0, proc.stderr
            with open(out, 'rb') as f:
                kept.append(len(list(dpkt.pcap.Reader(f))))
        assert kept[0] == int(wanted), name
        # The plain filter alone misses every encapsulated probe.
        assert kept[1] == int(name == 'plain'), name


# --- the lab's layouts: what the switch says against what the lab built -----

LAB_LAYOUTS = [('ovs-hybrid', 'flat'), ('ovs-hybrid', 'vlan'),
               ('ovs-hybrid', 'vxlan'), ('ovs-native', 'flat'),
               ('ovs-native', 'vxlan'), ('ovn', 'flat'), ('ovn', 'geneve')]


def _lab_ovsdb(the_lab):
    """The unix: connection of the lab's hypervisor ovsdb-server."""
    layout = the_lab.layout
    daemons = getattr(layout, 'ovs', None) or layout.hv.ovs
    return daemons.db_connection


@pytest.mark.parametrize('switch, network_type', LAB_LAYOUTS)
def test_prober_finds_what_the_lab_built(lab_factory, prober_for, switch,
                                         network_type):
    from netweaver_agent.lab import agent
    the_lab = lab_factory(guests=2, switch=switch,
                          network_type=network_type)
    lab_host = types.SimpleNamespace(ns=the_lab.spec.hv_netns,
                                     ext=the_lab.spec.src_netns,
                                     unix=_lab_ovsdb(the_lab))
    prober, instances, _ = prober_for(
        lab_host, agent.guest_domains(the_lab))
    found = by_tap(prober.paths(instances))
    truth = {p.vif: p for p in the_lab.paths()}
    assert set(found) == set(truth)
    for tap, path in found.items():
        assert path.interfaces == truth[tap].interfaces, tap
        assert path.via == truth[tap].via, tap
        assert path.encap == truth[tap].encap, tap
    settings = prober.window_settings(list(found.values()))
    for kind in ('vxlan', 'geneve'):
        want = {p.encap_port(kind) for p in truth.values()} - {None}
        assert getattr(settings, f'{kind}_port') == (
            want.pop() if want else None), kind
