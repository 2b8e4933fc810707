"""The lab's OVN layout (``netweaver lab --switch ovn``).

An OVN compute node as Neutron's OVN driver and os-vif build it, on Open
vSwitch's userspace datapath (the kernel here has neither the Open
vSwitch module nor a Geneve device):

* central (in the hypervisor's namespace, files under
  ``<state dir>/ovn-central``): private Northbound and Southbound
  ovsdb-servers and ``ovn-northd``;
* chassis ``hv`` (the hypervisor's namespace, ``<state dir>/ovs-hv``): a
  private ovsdb-server and ovs-vswitchd (:class:`switch.OvsDaemons`)
  and ``ovn-controller``, with ``system-id``, ``ovn-remote``,
  ``ovn-encap-type=geneve``, ``ovn-encap-ip`` and
  ``ovn-bridge-datapath-type=netdev`` on its ``Open_vSwitch`` row.
  ``br-int`` (``datapath_type=netdev``, ``fail-mode=secure``) holds one
  ``tap<port id[:11]>`` per guest with ``external_ids`` ``iface-id``
  (the logical port: the Neutron port id), ``attached-mac``,
  ``iface-status=active`` and ``vm-uuid``, as os-vif sets them;
* the Northbound database: one logical switch ``neutron-<network id>``
  (its tunnel key, requested as the spec's ``segmentation_id``, is the
  Geneve VNI on the wire), one logical port per
  guest (addresses ``"<mac> <ip>"``) and one, ``source``, for the probe
  source; port groups as Neutron makes security groups: ``pg_<sg id>``
  with ``allow-related`` ACLs (egress: all IP; ingress: ICMP, UDP and
  TCP from the source), and ``neutron_pg_drop`` (priority 1001 drop both
  ways);
* each guest's ``eth0`` (the tap's veth peer) computes its transport
  checksums itself: a veth leaves them partial (IPv6 TCP resets, for
  one), the netdev datapath reads the tap with a packet socket, so its
  conntrack found them wrong and OVN dropped the packets as ``ct.inv``.

``network_type`` ``geneve`` (the default): the source runs its own
chassis ``src`` (ovsdb-server, ovs-vswitchd and ovn-controller in the
source's namespace, ``<state dir>/ovs-src``); its probe interface
``src0`` is an OVS internal port of its ``br-int`` bound to the logical
port ``source``, so probes leave the source Geneve-encapsulated (UDP
6081) over the physical link into the pif, and hv's userspace datapath
decapsulates them.  What makes the userspace tunnel work:

* the tunnel endpoint address (``LabSpec.underlay``: source .1,
  hypervisor .2) lives on the internal port of a bridge ``br-phy`` that
  holds the physical port (the pif; the source's ``eth0``), with the
  physical port's MAC as the bridge's (``other_config:hwaddr``).
  ovs-vswitchd's route table learns the route from the kernel
  (``ovs-appctl ovs/route/show``: ``198.18.254.0/24 dev br-phy``); the
  peer's MAC is set with ``ovs-appctl tnl/neigh/set`` (and a permanent
  kernel neighbour), so no ARP is needed;
* frames sent to the bridge's internal port (``tnl_pop``) are
  decapsulated in user space; but the kernel also receives every frame
  of the physical port (the netdev datapath reads it with a packet
  socket) and, the endpoint address being local, answers each Geneve
  packet with an ICMP port unreachable.  A raw-table ``iptables`` rule
  drops what the physical port brings to the kernel's stack (packet
  sockets, the capture's and the switch's, see it before netfilter).

``network_type`` ``flat``: a ``localnet`` port (``physnet1``) through
``br-ex`` holding the pif (``ovn-bridge-mappings=physnet1:br-ex``); the
source is the plain namespace stack on ``eth0``, as in the Linux-bridge
lab.

A window sees each probe on the pif (received; Geneve-encapsulated with
the logical switch's VNI) and on the tap (plain); ``br-phy``, the tunnel
port (``ovn-src-0``; the datapath's ``genev_sys_6081`` is no netdev on
the userspace datapath), ``br-ex`` and its patch ports, and ``br-int``
are crossed unseen (:meth:`OvnLayout.unseen`, ``VifPath.via``).

With ``ipv6=True`` the logical ports also carry the guests' (and the
source's) IPv6 addresses, the security group has the same rules for
``ip6`` (``icmp6``), and :meth:`OvnLayout.paths` ``(ipv6=True)`` gives
the guests' IPv6 addresses.  :meth:`OvnLayout.allow_only` moves a guest
into a security group without some rules (its probes of the other
protocols are then dropped by the ACLs: *filtered*).

Truth (the userspace datapath never passes netfilter and the kernel has
no netem, so both are made in the switch, on probes the lab source
marks: :mod:`netweaver_agent.lab.mark`, the IP TTL or IPv6 hop limit,
counted per address; one loss or delay per guest):

* loss, exact: every Nth probe to a guest is marked and an ACL
  ``to-lport`` above the allows drops what carries the mark.  A second,
  ``allow-stateless`` ACL with the same match keeps the marked probes
  out of conntrack: a stateful drop would mark the whole ICMP echo
  conversation's entry blocked (``ct_mark.blocked``), and on the
  userspace datapath some of the guest's replies to the next, unmarked
  probes were then dropped too (seen on the tap, never on the pif);
* delay, each hold recorded: every probe to the guest is marked; a flow
  in ``br-int``'s table 0 above ovn-controller's pauses the marked ones
  as they enter from the tunnel (or the localnet patch port) to
  :mod:`netweaver_agent.lab.ovndelay`, which resumes each after the delay
  (OVN's pipeline then runs as for any probe: the flow puts the TTL back
  and resubmits).  The hold sits between the pif and the tap sightings.
"""

import os
import time
import uuid

from oslo_log import log

from netweaver_agent.core import netns
from netweaver_agent.core import vifpath
from netweaver_agent.lab import mark
from netweaver_agent.lab import offload
from netweaver_agent.lab import switch

LOG = log.getLogger(__name__)

NB_SCHEMA = '/usr/share/ovn/ovn-nb.ovsschema'
SB_SCHEMA = '/usr/share/ovn/ovn-sb.ovsschema'
GENEVE_PORT = 6081
HV_CHASSIS = 'hv'
SRC_CHASSIS = 'src'
SOURCE_PORT = 'source'
SOURCE_DEV = 'src0'
# Neutron's MTU for a Geneve network on a 1500-byte underlay (its OVN
# driver's 38-byte Geneve header allowance and IPv4's 20).
GENEVE_MTU = 1500 - 38 - 20
PHYSNET = 'physnet1'
READY_TIMEOUT_S = 30.0
# Neutron's OVN driver: security-group ACL priorities.
ACL_DROP_PRIORITY = 1001
ACL_ALLOW_PRIORITY = 1002
ACL_LOSS_PRIORITY = 1003
ACL_STATELESS_PRIORITY = 1000
# The delay's flow in br-int's table 0, above ovn-controller's (<= 150);
# its controller ids (0 is ovn-controller's own).
DELAY_FLOW_PRIORITY = 1000
DELAY_CONTROLLER_ID = 4242
DROP_PG = 'neutron_pg_drop'
_ACL_MATCH = {'icmp': 'icmp4', 'udp': 'udp', 'tcp': 'tcp'}
_ACL_MATCH6 = {'icmp': 'icmp6', 'udp': 'udp', 'tcp': 'tcp'}


def _env(root):
    """The environment OVS and OVN tools need for the files in ``root``."""
    env = switch.OvsPaths(root).env()
    env.update(OVN_RUNDIR=root, OVN_DBDIR=root, OVN_LOGDIR=root)
    return env


def _run(argv, root, netns_name=None, timeout=switch.COMMAND_TIMEOUT_S,
         check=True):
    try:
        return netns.run(argv, netns=netns_name, check=check,
                         timeout=timeout, env=_env(root))
    except netns.CommandError as exc:
        raise switch.SwitchError(str(exc)) from exc


def _wait(predicate, what, timeout_s=READY_TIMEOUT_S):
    end = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() > end:
            raise switch.SwitchError(
                f"{what} not ready within {timeout_s:.0f} s")
        time.sleep(0.05)


class OvnCentral:
    """Private OVN Northbound and Southbound databases and ovn-northd.

    :param netns_name: the namespace the daemons run in (they talk over
        unix sockets only)
    :param root: a folder of its own for databases, sockets, pidfiles and
        logs (made if missing)
    """

    DAEMONS = ('ovn-northd', 'ovsdb-server-sb', 'ovsdb-server-nb')

    def __init__(self, netns_name, root):
        self.netns_name = netns_name
        self.root = root
        self.started = False

    def _path(self, name):
        return os.path.join(self.root, name)

    @property
    def nb_connection(self):
        return f"unix:{self._path('nb.sock')}"

    @property
    def sb_connection(self):
        return f"unix:{self._path('sb.sock')}"

    def pidfile(self, daemon):
        return self._path(f'{daemon}.pid')

    def pids(self):
        """``{daemon: pid}`` of the daemons with a pidfile."""
        out = {}
        for daemon in self.DAEMONS:
            pid = switch.read_pid(self.pidfile(daemon))
            if pid is not None:
                out[daemon] = pid
        return out

    def _daemon(self, daemon, argv):
        _run([*argv, f'--pidfile={self.pidfile(daemon)}',
              f'--unixctl={self._path(daemon + ".ctl")}',
              f'--log-file={self._path(daemon + ".log")}',
              '--detach', '--no-chdir'], self.root, self.netns_name)

    def start(self):
        """Create both databases and start their servers and northd."""
        os.makedirs(self.root, exist_ok=True)
        self.started = True
        for db, schema in (('nb', NB_SCHEMA), ('sb', SB_SCHEMA)):
            path = self._path(f'{db}.db')
            if not os.path.exists(path):
                _run(['ovsdb-tool', 'create', path, schema], self.root)
            self._daemon(f'ovsdb-server-{db}', [
                'ovsdb-server', path,
                f"--remote=punix:{self._path(db + '.sock')}"])
        for db in ('nb', 'sb'):
            sock = self._path(f'{db}.sock')
            _wait(lambda: os.path.exists(sock), f'OVN {db} database {sock}')
        self._daemon('ovn-northd', [
            'ovn-northd', f'--ovnnb-db={self.nb_connection}',
            f'--ovnsb-db={self.sb_connection}'])
        return self

    def nbctl(self, *args, timeout=switch.VSCTL_TIMEOUT_S):
        """Run ``ovn-nbctl`` against the Northbound database; its stdout."""
        return _run(['ovn-nbctl', f'--db={self.nb_connection}',
                     f'--timeout={int(timeout)}', *args], self.root,
                    timeout=timeout + 5).stdout

    def sbctl(self, *args, timeout=switch.VSCTL_TIMEOUT_S):
        """Run ``ovn-sbctl`` against the Southbound database; its stdout."""
        return _run(['ovn-sbctl', f'--db={self.sb_connection}',
                     f'--timeout={int(timeout)}', *args], self.root,
                    timeout=timeout + 5).stdout

    def chassis(self):
        """Names of the chassis registered in the Southbound database."""
        return set(self.sbctl('--bare', '--columns=name', 'list',
                              'Chassis').split())

    def stop(self):
        """Stop northd, then the databases; safe to repeat."""
        if not self.started:
            return
        for daemon in self.DAEMONS:
            switch.stop_pidfile(self.pidfile(daemon), daemon)
        self.started = False


class OvnChassis:
    """One OVN chassis: private Open vSwitch plus ``ovn-controller``.

    :param name: the chassis name (``system-id``)
    :param encap_ip: the Geneve endpoint address (None: no tunnels)
    :param bridge_mappings: ``ovn-bridge-mappings`` (None: none)
    """

    def __init__(self, netns_name, root, name, sb_connection,
                 encap_ip=None, bridge_mappings=None):
        self.netns_name = netns_name
        self.root = root
        self.name = name
        self.sb_connection = sb_connection
        self.encap_ip = encap_ip
        self.bridge_mappings = bridge_mappings
        self.ovs = switch.OvsDaemons(netns_name, root)

    @property
    def controller_pidfile(self):
        return os.path.join(self.root, 'ovn-controller.pid')

    def pidfile(self, daemon):
        """The pidfile of ``daemon`` (ovsdb-server, ovs-vswitchd or
        ovn-controller)."""
        if daemon == 'ovn-controller':
            return self.controller_pidfile
        return self.ovs.paths.pidfile(daemon)

    def pids(self):
        """``{daemon: pid}`` of the chassis' daemons with a pidfile."""
        out = self.ovs.pids()
        pid = switch.read_pid(self.controller_pidfile)
        if pid is not None:
            out['ovn-controller'] = pid
        return out

    def start(self):
        """Open vSwitch and ``br-int``; ovn-controller with :meth:`attach`."""
        self.ovs.start()
        self.ovs.add_bridge('br-int', 'fail-mode=secure',
                            'other_config:disable-in-band=true')
        return self

    def attach(self):
        """Point the chassis at the Southbound database; start
        ovn-controller."""
        ids = {'system-id': self.name, 'ovn-remote': self.sb_connection,
               'ovn-bridge-datapath-type': 'netdev'}
        if self.encap_ip:
            ids.update({'ovn-encap-type': 'geneve',
                        'ovn-encap-ip': self.encap_ip})
        else:
            # ovn-controller wants an encapsulation even where no tunnel
            # is ever made (a single chassis).
            ids.update({'ovn-encap-type': 'geneve',
                        'ovn-encap-ip': '127.0.0.1'})
        if self.bridge_mappings:
            ids['ovn-bridge-mappings'] = self.bridge_mappings
        self.ovs.vsctl('set', 'Open_vSwitch', '.',
                       *(f'external_ids:{k}="{v}"' for k, v in ids.items()))
        _run(['ovn-controller', self.ovs.db_connection,
              f'--pidfile={self.controller_pidfile}',
              f"--log-file={os.path.join(self.root, 'ovn-controller.log')}",
              '--detach', '--no-chdir'], self.root, self.netns_name)

    def physical_bridge(self, bridge, port, mac, address=None, peer=None):
        """``bridge`` holding the physical ``port`` (its MAC the bridge's);
        ``address`` (``ip/len``) on the bridge's internal port, and the
        ``peer`` ``(ip, mac)`` known to the kernel and to OVS' tunnel
        neighbour table."""
        self.ovs.add_bridge(bridge, f'other_config:hwaddr="{mac}"', '--',
                            '--may-exist', 'add-port', bridge, port)
        lines = [f'link set {bridge} up']
        if address:
            lines.insert(0, f'addr replace {address} dev {bridge}')
        if peer:
            lines.append(f'neigh replace {peer[0]} lladdr {peer[1]} dev '
                         f'{bridge} nud permanent')
        switch.ip_batch(self.netns_name, lines)
        if peer:
            self.ovs.appctl('tnl/neigh/set', bridge, *peer)
        # The netdev datapath reads the port with a packet socket; the
        # kernel's stack must not answer what arrives there too.
        switch.iptables(self.netns_name, ['-t', 'raw', '-A', 'PREROUTING',
                                          '-i', port, '-j', 'DROP'])

    def tunnel_ports(self):
        """Names of the Geneve ports ovn-controller made on br-int."""
        out = self.ovs.vsctl('--bare', '--columns=name', 'find', 'Interface',
                             'type=geneve')
        return tuple(sorted(out.split()))

    def stop(self):
        """Stop ovn-controller, then Open vSwitch; safe to repeat."""
        switch.stop_pidfile(self.controller_pidfile, 'ovn-controller')
        self.ovs.stop()


class OvnLayout(switch.SwitchLayout):
    """OVN: taps on ``br-int``, Geneve to the source's chassis (or a
    ``localnet`` port through ``br-ex``); see the module."""

    name = 'ovn'
    network_types = ('geneve', 'flat')
    delay_truth = ('OpenFlow pause/resume in br-int (the probes the lab '
                   'source marks), each hold recorded')
    loss_truth = ('an OVN ACL drops every Nth probe to the guest, marked '
                  'by the lab source (IP TTL)')
    no_netfilter = ('the userspace datapath never passes netfilter and '
                    'the kernel has no netem')

    def __init__(self, lab):
        super().__init__(lab)
        root = lab.state_dir
        self.central = OvnCentral(lab.spec.hv_netns,
                                  os.path.join(root, 'ovn-central'))
        self.hv = None
        self.src = None
        self.marks = mark.MarkTable()
        self._losses = []
        self._delays = []
        # port group -> protocols it allows; logical port -> its group
        self._allowed = {}
        self._member = {}

    # -- names ---------------------------------------------------------------

    @property
    def network_type(self):
        return self.spec.network_type

    @property
    def bridge(self):
        return 'br-int'

    @property
    def ovsdb_connection(self):
        """The hypervisor chassis' Open vSwitch database (what the
        agent's ``[netweaver] ovsdb_connection`` names on this host)."""
        return self.hv.ovs.db_connection if self.hv else None

    @property
    def logical_switch(self):
        """Neutron's name of the network's logical switch."""
        return f'neutron-{self.spec.network_id}'

    @property
    def security_group(self):
        """The id of the guests' security group (its port group is
        ``pg_`` + the id with ``_`` for ``-``, as Neutron names it)."""
        return str(uuid.uuid5(uuid.UUID(self.spec.network_id),
                              'security-group'))

    def port_group(self, protocols=None):
        """The port group of the security group allowing ``protocols``
        from the source (None: all probe protocols)."""
        sg = self.security_group
        if protocols is not None:
            sg = str(uuid.uuid5(uuid.UUID(self.spec.network_id),
                                'security-group/' +
                                ','.join(sorted(protocols))))
        return 'pg_' + sg.replace('-', '_')

    def tunnel_key(self):
        """The logical switch's tunnel key: the Geneve VNI of its
        packets."""
        out = self.central.sbctl('--bare', '--columns=tunnel_key', 'find',
                                 'Datapath_Binding',
                                 f'external_ids:name="{self.logical_switch}"')
        return int(out.split()[0])

    # -- building ------------------------------------------------------------

    def build_hypervisor(self):
        lab, spec = self.lab, self.spec
        if self.network_type not in self.network_types:
            raise switch.LabError(
                f"lab switch 'ovn' builds network types "
                f"{', '.join(self.network_types)}, not "
                f"{self.network_type!r}")
        lines = [f'link add {spec.pif} address {spec.pif_mac} type veth peer '
                 f'name eth0 address {spec.src_underlay_mac} netns '
                 f'{lab.spec.src_netns}', 'link set lo up',
                 f'link set {spec.pif} up']
        for g in lab.guests:
            lines += [f'link add {g.vif} address {g.vif_mac} type veth '
                      f'peer name eth0 address {g.mac} netns {g.netns}',
                      f'link set {g.vif} up']
        switch.ip_batch(lab.spec.hv_netns, lines)
        for g in lab.guests:
            # A veth leaves the checksum of what its kernel sends partial
            # (IPv6 TCP resets, for one); the userspace datapath reads the
            # tap with a packet socket, so its conntrack would find the
            # checksum wrong and OVN drop the packet as ct.inv (see
            # offload).
            offload.tx_checksum_off(g.netns, 'eth0')
        self.central.start()
        geneve = self.network_type == 'geneve'
        src_u, hv_u, plen = spec.underlay_addresses() or (None,) * 3
        self.hv = OvnChassis(
            lab.spec.hv_netns, os.path.join(lab.state_dir, 'ovs-hv'),
            HV_CHASSIS,
            self.central.sb_connection, encap_ip=hv_u if geneve else None,
            bridge_mappings=None if geneve else f'{PHYSNET}:br-ex')
        self.hv.start()
        if geneve:
            self.hv.physical_bridge('br-phy', spec.pif, spec.pif_mac,
                                    f'{hv_u}/{plen}',
                                    (src_u, spec.src_underlay_mac))
        else:
            self.hv.physical_bridge('br-ex', spec.pif, spec.pif_mac)
        self.hv.attach()
        self._northbound()
        for g in lab.guests:
            self.hv.ovs.vsctl(
                '--may-exist', 'add-port', 'br-int', g.vif, '--', 'set',
                'Interface', g.vif, f'external_ids:iface-id="{g.port_id}"',
                f'external_ids:attached-mac="{g.mac}"',
                'external_ids:iface-status=active',
                f'external_ids:vm-uuid="{g.uuid}"')

    def _northbound(self):
        spec, guests = self.spec, self.lab.guests
        ls = self.logical_switch
        cmds = [['ls-add', ls], ['set', 'Logical_Switch', ls,
                                 f'external_ids:"neutron:network_name"='
                                 f'"lab-{spec.prefix}"']]
        if spec.segmentation_id is not None:
            # Neutron's segmentation id becomes the tunnel key (the VNI).
            cmds.append(['set', 'Logical_Switch', ls,
                         'other_config:requested-tnl-key='
                         f'{spec.segmentation_id}'])
        if self.network_type == 'geneve':
            cmds += [['lsp-add', ls, SOURCE_PORT],
                     ['lsp-set-addresses', SOURCE_PORT, ' '.join(
                         filter(None, (spec.src_mac, spec.src_address,
                                       spec.src_address6)))]]
        else:
            cmds += [['lsp-add', ls, f'provnet-{spec.network_id}'],
                     ['lsp-set-type', f'provnet-{spec.network_id}',
                      'localnet'],
                     ['lsp-set-addresses', f'provnet-{spec.network_id}',
                      'unknown'],
                     ['lsp-set-options', f'provnet-{spec.network_id}',
                      f'network_name={PHYSNET}']]
        for g in guests:
            addresses = ' '.join(filter(None, (g.mac, g.address,
                                               g.address6)))
            cmds += [['lsp-add', ls, g.port_id],
                     ['lsp-set-addresses', g.port_id, addresses],
                     ['lsp-set-port-security', g.port_id, addresses]]
        ports = [g.port_id for g in guests]
        cmds += [['pg-add', DROP_PG, *ports],
                 ['acl-add', DROP_PG, 'to-lport', str(ACL_DROP_PRIORITY),
                  f'outport == @{DROP_PG} && ip', 'drop'],
                 ['acl-add', DROP_PG, 'from-lport', str(ACL_DROP_PRIORITY),
                  f'inport == @{DROP_PG} && ip', 'drop']]
        cmds += self._security_group_cmds(None, ports)
        self._nb_batch(cmds)

    def _security_group_cmds(self, protocols, ports):
        """Commands making the port group of a security group allowing
        ``protocols`` (None: all) from the source, with ``ports``."""
        pg = self.port_group(protocols)
        allowed = sorted(_ACL_MATCH) if protocols is None else protocols
        spec = self.spec
        families = [('ip4', f'{spec.src_address}/{spec.prefixlen}',
                     _ACL_MATCH)]
        if spec.ipv6:
            families.append(('ip6', f'{spec.src_address6}/{spec.prefixlen6}',
                             _ACL_MATCH6))
        cmds = [['pg-add', pg, *ports]]
        for ip, src, match in families:
            cmds.append(['acl-add', pg, 'from-lport', str(ACL_ALLOW_PRIORITY),
                         f'inport == @{pg} && {ip}', 'allow-related'])
            for proto in allowed:
                cmds.append(['acl-add', pg, 'to-lport',
                             str(ACL_ALLOW_PRIORITY),
                             f'outport == @{pg} && {ip} && {ip}.src == {src}'
                             f' && {match[proto]}', 'allow-related'])
        self._allowed[pg] = tuple(allowed)
        self._member.update((p, pg) for p in ports)
        return cmds

    def _nb_batch(self, cmds, wait=True):
        argv = ['--wait=hv'] if wait else []
        for i, cmd in enumerate(cmds):
            argv += (['--'] if i else []) + cmd
        self.central.nbctl(*argv, timeout=READY_TIMEOUT_S)

    def build_source(self):
        lab, spec = self.lab, self.spec
        if self.network_type != 'geneve':
            super().build_source()
        else:
            src_u, hv_u, plen = self.spec.underlay_addresses()
            self.src = OvnChassis(
                lab.spec.src_netns, os.path.join(lab.state_dir, 'ovs-src'),
                SRC_CHASSIS, self.central.sb_connection, encap_ip=src_u)
            switch.ip_batch(lab.spec.src_netns, ['link set lo up',
                                                 'link set eth0 up'])
            self.src.start()
            self.src.physical_bridge('br-phy', 'eth0', spec.src_underlay_mac,
                                     f'{src_u}/{plen}',
                                     (hv_u, spec.pif_mac))
            self.src.attach()
            self.src.ovs.vsctl(
                '--may-exist', 'add-port', 'br-int', SOURCE_DEV, '--', 'set',
                'Interface', SOURCE_DEV, 'type=internal',
                f'mac="{spec.src_mac}"',
                f'external_ids:iface-id="{SOURCE_PORT}"')
            lines = [f'addr add {spec.src_address}/{spec.prefixlen} dev '
                     f'{SOURCE_DEV}', f'link set {SOURCE_DEV} up']
            lines += [f'neigh replace {g.address} lladdr {g.mac} dev '
                      f'{SOURCE_DEV} nud permanent' for g in lab.guests]
            if spec.ipv6:
                lines.append(f'addr add {spec.src_address6}/'
                             f'{spec.prefixlen6} dev {SOURCE_DEV} nodad')
                lines += [f'neigh replace {g.address6} lladdr {g.mac} dev '
                          f'{SOURCE_DEV} nud permanent' for g in lab.guests]
            switch.ip_batch(lab.spec.src_netns, lines)
        self._sender_offload()
        self._wait_ready()

    def _sender_offload(self):
        """Real TCP and UDP streams through the userspace datapath: the
        source's kernel fills in its checksums (:mod:`offload`), and on a
        Geneve network the source's and the guests' tenant interfaces
        take the network's MTU, as Neutron gives it, so a full segment
        still fits in the 1500-byte underlay once encapsulated."""
        lab = self.lab
        offload.software_checksums(lab.spec.src_netns)
        if self.network_type != 'geneve':
            return
        switch.ip_batch(lab.spec.src_netns,
                        [f'link set {SOURCE_DEV} mtu {GENEVE_MTU}'])
        for g in lab.guests:
            switch.ip_batch(g.netns, [f'link set eth0 mtu {GENEVE_MTU}'])

    def _wait_ready(self):
        """Every chassis registered, every port bound and up, and the
        chassis' flows up to date."""
        want = {HV_CHASSIS} | ({SRC_CHASSIS} if self.src else set())
        _wait(lambda: want <= self.central.chassis(),
              f"OVN chassis {', '.join(sorted(want))}")
        ports = [g.port_id for g in self.lab.guests]
        if self.src:
            ports.append(SOURCE_PORT)

        def down():
            out = self.central.nbctl('--bare', '--columns=name', 'find',
                                     'Logical_Switch_Port', 'up=true')
            return sorted(set(ports) - set(out.split()))

        try:
            _wait(lambda: not down(), 'OVN logical ports')
        except switch.SwitchError as exc:
            raise switch.SwitchError(
                f"{exc}: {', '.join(down())} not up (no OVS interface with "
                "that external_ids:iface-id on a chassis?); see "
                f"{self.lab.state_dir}/ovs-*/ovn-controller.log") from exc
        self.central.nbctl('--wait=hv', 'sync', timeout=READY_TIMEOUT_S)
        if self.src:
            _wait(lambda: bool(self.hv.tunnel_ports()),
                  'the Geneve tunnel port on the hypervisor')

    def source(self):
        """The source namespace's stack (``src0`` on its chassis with
        Geneve), marking probes for the loss ACLs."""
        return mark.MarkingSource(self.lab.spec.src_netns, self.marks)

    # -- paths ---------------------------------------------------------------

    def hops(self, guest):
        """pif → tap: nothing in between is a netdev a packet socket sees."""
        return (self.spec.pif, guest.vif)

    def unseen_devices(self):
        """What a probe crosses between the pif and the tap, unseen, in
        path order: ``br-phy`` (whose internal port holds the tunnel
        address: ``tnl_pop``), the Geneve port ovn-controller made
        (``ovn-src-0``; the datapath's ``genev_sys_6081`` is no netdev at
        all on the userspace datapath) and ``br-int``; with ``flat``,
        ``br-ex`` and ``br-int`` (joined by patch ports)."""
        if self.network_type == 'geneve':
            tunnels = self.hv.tunnel_ports() if self.hv else ()
            return ('br-phy', *tunnels, 'br-int')
        return ('br-ex', *self._patch_ports(), 'br-int')

    def _patch_ports(self):
        """br-ex's patch port to br-int, then br-int's to br-ex."""
        if not self.hv:
            return ()
        patches = set(self.hv.ovs.vsctl(
            '--bare', '--columns=name', 'find', 'Interface',
            'type=patch').split())
        return tuple(p for bridge in ('br-ex', 'br-int')
                     for p in self.hv.ovs.vsctl('list-ports', bridge).split()
                     if p in patches)

    def unseen(self, guest):
        return (switch.HopDevices(self.spec.pif, guest.vif,
                                  self.unseen_devices()),)

    def paths(self, ipv6=False):
        """pif → tap per guest, with the devices crossed unseen (``via``)
        and, with Geneve, the tunnel that carries the probes on the pif
        (``encap``)."""
        if ipv6 and not self.spec.ipv6:
            raise switch.LabError(f"lab {self.lab.spec.prefix!r} was built "
                                  "without IPv6")
        via = (self.unseen_devices(),)
        encap = ((vifpath.Encapsulation('geneve', GENEVE_PORT),)
                 if self.network_type == 'geneve' else ())
        return [vifpath.VifPath(vif=g.vif,
                                address=g.address6 if ipv6 else g.address,
                                interfaces=self.hops(g), mac=g.mac,
                                via=via, encap=encap)
                for g in self.lab.guests]

    def interface_xml(self, guest):
        """An openvswitch ``<virtualport>`` with the port id, as Nova
        writes it for OVN."""
        return self.bridge, guest.port_id

    # -- truth ---------------------------------------------------------------

    def inject_loss(self, loss):
        """Mark every Nth probe to the guest at the source; an ACL drops
        the marked ones (see the module)."""
        g = self.lab.guests[loss.guest]
        if any(m.dst_ip == g.address for m in self.marks.marks()):
            raise switch.LabError(
                f"lab {self.spec.prefix!r}: probes to guest {loss.guest} are "
                "already marked (one loss or delay per guest)")
        ttl = self.marks.free_ttl()
        pg = self._port_group_of(g.port_id)
        # One mark and one ACL per address family (the IPv6 hop limit is
        # ip.ttl too); each family's probes are counted on their own.
        targets = [('ip4', g.address, _ACL_MATCH)]
        if g.address6:
            targets.append(('ip6', g.address6, _ACL_MATCH6))
        cmds = []
        for ip, address, protos in targets:
            match = (f'outport == "{g.port_id}" && {ip}.dst == {address} && '
                     f'ip.ttl == {ttl}')
            if loss.protocol:
                match += f' && {protos[loss.protocol]}'
            cmds.append(['acl-add', pg, 'to-lport', str(ACL_LOSS_PRIORITY),
                         match, 'drop'])
            # Below every other rule: it only keeps them out of
            # conntrack (see the module).
            cmds.append(['acl-add', pg, 'to-lport',
                         str(ACL_STATELESS_PRIORITY), match,
                         'allow-stateless'])
        self._nb_batch(cmds)
        for _, address, _ in targets:
            self.marks.add(mark.Mark(dst_ip=address, every=loss.every,
                                     ttl=ttl, protocol=loss.protocol))
        self._losses.append((loss, ttl))
        LOG.info('Lab %(prefix)s: every %(n)dth probe to %(vif)s marked '
                 'TTL %(ttl)d and dropped by an OVN ACL',
                 {'prefix': self.spec.prefix, 'n': loss.every, 'vif': g.vif,
                  'ttl': ttl})

    def inject_delay(self, delay):
        """Hold every probe to a guest in br-int, mid-pipeline: the lab
        source marks them (IP TTL), a table-0 flow above ovn-controller's
        pauses the marked ones to :mod:`netweaver_agent.lab.ovndelay`,
        which resumes each after the delay and records it."""
        if delay.backend not in ('auto', 'openflow'):
            raise switch.LabError(
                f"lab {self.lab.spec.prefix!r}: the OVN layout delays with "
                f"OpenFlow pause/resume, not {delay.backend!r} "
                f"({self.no_netfilter})")
        if delay.record != 'probe':
            raise switch.LabError(
                f"lab {self.lab.spec.prefix!r}: the OVN layout holds only "
                "the probes the lab's source marks, not a guest's own "
                f"traffic (record {delay.record!r})")
        g = self.lab.guests[delay.guest]
        addresses = [a for a in (g.address, g.address6) if a]
        if any(m.dst_ip in addresses for m in self.marks.marks()):
            raise switch.LabError(
                f"lab {self.lab.spec.prefix!r}: probes to guest {delay.guest} "
                "are already marked (one loss or delay per guest)")
        ttl = self.marks.free_ttl()
        controller_id = DELAY_CONTROLLER_ID + len(self._delays)
        mgmt = self.hv.ovs.paths.mgmt(self.bridge)[len('unix:'):]
        active = self.lab.start_delayer(
            delay, module='netweaver_agent.lab.ovndelay',
            args=['--connect', mgmt, '--controller-id', str(controller_id)],
            backend='openflow')
        flows = []
        for port in self._entry_ports():
            for address in addresses:
                ip = (f'ipv6,ipv6_dst={address}' if ':' in address
                      else f'ip,nw_dst={address}')
                flows.append(
                    f'table=0,priority={DELAY_FLOW_PRIORITY},in_port={port},'
                    f'{ip},nw_ttl={ttl},actions=controller(pause,'
                    f'id={controller_id},max_len=65535),'
                    f'mod_nw_ttl:{mark.PROBE_TTL},resubmit(,0)')
        for flow in flows:
            self.hv.ovs.ofctl('add-flow', self.bridge, flow)
        for address in addresses:
            self.marks.add(mark.Mark(dst_ip=address, every=1, ttl=ttl,
                                     protocol=delay.protocol))
        self._delays.append((delay, ttl))
        return active

    def _entry_ports(self):
        """br-int's OpenFlow ports where probes enter it: the Geneve
        port(s), or the patch port from br-ex."""
        if self.network_type == 'geneve':
            names = self.hv.tunnel_ports()
        else:
            names = [p for p in self._patch_ports()
                     if p in self.hv.ovs.vsctl('list-ports',
                                               self.bridge).split()]
        return [int(self.hv.ovs.vsctl('get', 'Interface', n, 'ofport'))
                for n in names]

    def _port_group_of(self, port):
        return self._member[port]

    def allow_only(self, guest, protocols):
        """Put the guest's port in a security group that allows only
        ``protocols`` (a subset of icmp, udp, tcp) from the source: the
        other probes are dropped by the ACLs, as a security group without
        the rule does.  Before any loss is injected for the guest."""
        protocols = tuple(sorted(set(protocols)))
        unknown = set(protocols) - set(_ACL_MATCH)
        if unknown:
            raise ValueError(f"unknown probe protocols {sorted(unknown)!r}")
        g = self.lab.guests[guest]
        if any(loss.guest == guest for loss, _ in self._losses):
            raise switch.LabError(
                f"lab {self.spec.prefix!r}: guest {guest} has a loss ACL in "
                "its security group; change the group before the loss")
        old, new = self._member[g.port_id], self.port_group(protocols)
        if old == new:
            return
        cmds = [['pg-set-ports', old, *self._members(old, but=g.port_id)]]
        if len(cmds[0]) == 2:
            cmds[0] = ['clear', 'Port_Group', old, 'ports']
        if new in self._allowed:
            cmds.append(['pg-set-ports', new, *self._members(new),
                         g.port_id])
        else:
            cmds += self._security_group_cmds(protocols, [g.port_id])
        self._nb_batch(cmds)
        self._member[g.port_id] = new

    def _members(self, pg, but=None):
        return [p for p, group in self._member.items()
                if group == pg and p != but]

    # -- state and teardown --------------------------------------------------

    def pids(self):
        """Every daemon of the layout; its marker is the ``--pidfile=``
        word of its command line, which names this lab's state folder."""
        out = []
        parts = [(self.central, self.central.pidfile)]
        for chassis in (self.hv, self.src):
            if chassis:
                parts.append((chassis, chassis.pidfile))
        for part, pidfile in parts:
            out += [{'pid': pid, 'marker': f'--pidfile={pidfile(daemon)}'}
                    for daemon, pid in part.pids().items()]
        return out

    def state(self):
        return {'switch': self.name, 'network_type': self.network_type,
                'logical_switch': self.logical_switch,
                'pids': self.pids()}

    def teardown(self):
        """Stop both chassis, then central; the lab removes the rest."""
        errors = []
        for part in (self.src, self.hv, self.central):
            if part is None:
                continue
            try:
                part.stop()
            except Exception as exc:  # the others must stop too
                errors.append(f'{type(part).__name__}: {exc}')
        if errors:
            raise switch.LabError('OVN layout not stopped entirely: ' +
                                  '; '.join(errors))
