"""The lab's Open vSwitch layouts: ML2/OVS compute nodes in miniature.

``--switch ovs-hybrid`` (the iptables hybrid plug) and ``--switch
ovs-native`` (the tap on ``br-int``), built as Nova/os-vif and Neutron's
OVS agent build them, on a private ovsdb-server and ovs-vswitchd with
the userspace datapath inside the hypervisor's namespace
(:class:`switch.OvsDaemons`).  Every veth is created inside that
namespace first and then added to a bridge; no port moves afterwards.

Per guest (``<id>`` = the first 11 characters of its Neutron port id):

* hybrid: ``tap<id>`` → ``qbr<id>`` (a Linux bridge) → ``qvb<id>`` ~veth~
  ``qvo<id>`` → ``br-int``;
* native: ``tap<id>`` → ``br-int``;

the ``br-int`` port (``qvo`` or ``tap``) carries the local VLAN tag the
OVS agent gives the network and ``external_ids`` ``iface-id`` (port id),
``attached-mac`` (guest MAC), ``iface-status=active`` and ``vm-uuid``, as
os-vif sets them.

Between ``br-int`` and the pif, by network type:

* ``flat``: patch ports ``int-br-ex``/``phy-br-ex`` to ``br-ex``, which
  holds the pif; br-int tags untagged frames from br-ex with the local
  VLAN, br-ex strips it (the agent's provisioning flows);
* ``vlan``: the same bridges; br-int turns the segmentation id into the
  local VLAN, br-ex back.  The kernel has no 802.1Q devices: the lab's
  source writes tagged frames (:meth:`build.Lab.vlan_source`);
* ``vxlan``: ``patch-tun``/``patch-int`` to ``br-tun``, whose
  ``vxlan-<remote ip hex>`` port (``in_key``/``out_key=flow``) maps the
  VNI to the local VLAN and back (tables 0, 2, 4, 10, 20, 22 as the agent
  installs them, with the source's MAC l2pop'd); ``local_ip`` is on the
  internal port of ``br-phy``, which holds the pif, so userspace tunnels
  route through it (``ovs/route``; the source's underlay MAC set with
  ``tnl/arp/set``).  The source encapsulates with a kernel VXLAN device.

Forwarding is deterministic: ``fail_mode=secure`` on the agent's bridges,
static FDB entries (``fdb/add``) for the source's and the guests' MACs,
no flooding, no MAC learning surprises.  No conntrack (repeated TCP SYNs
on one 5-tuple crashed ovs-vswitchd 3.1's userspace conntrack).

Truth:

* hybrid: the Linux-bridge lab's netfilter truth on ``qbr`` (br_netfilter,
  ``-m physdev --physdev-out <tap>``), where Neutron's iptables firewall
  lives: the NFQUEUE delayer (shows in the ``qvb → tap`` hop only) and the
  nth drop;
* native: the userspace datapath never passes netfilter and the kernel
  has neither netem nor act_gact: exact loss by an OpenFlow drop on
  ``br-int`` of the probes the lab's source marks (every Nth probe to the
  guest gets a TTL of its own: :mod:`netweaver_agent.lab.mark`, and
  :class:`MarkingFrameSource` for VLAN frames); delay by an OpenFlow
  controller (:mod:`netweaver_agent.lab.ofdelay`) that br-int sends the
  guest's probes to (table 60, after the local VLAN is set): it holds
  each packet-in, records the hold, and sends it to the guest's port.
"""

import os
import struct
import time

from oslo_log import log

from netweaver_agent.lab import framesource
from netweaver_agent.lab import linuxbridge
from netweaver_agent.lab import mark as labmark
from netweaver_agent.lab import ofdelay
from netweaver_agent.lab import offload
from netweaver_agent.lab import proc
from netweaver_agent.lab import switch

LOG = log.getLogger(__name__)

# The OVS agent's local VLAN of the lab's one network.
LOCAL_VLAN = 1
LOSS_FLOW_PRIORITY = 200
DELAY_FLOW_PRIORITY = 150
CONTROLLER_CONNECT_TIMEOUT_S = 10.0
ROUTE_LEARN_TIMEOUT_S = 2.0
_IP6_PROTOCOLS = {'icmp': 'icmp6', 'udp': 'udp6', 'tcp': 'tcp6'}
_ETH_P_8021Q = (0x8100, 0x88a8)


def port_names(guest):
    """``(qbr, qvb, qvo)`` names of ``guest``'s hybrid plug (os-vif)."""
    short = guest.port_id[:11]
    return f'qbr{short}', f'qvb{short}', f'qvo{short}'


def tunnel_port_name(network_type, remote_ip):
    """Neutron's tunnel port name: ``vxlan-`` + the remote IP in hex."""
    return f'{network_type}-' + ''.join(
        f'{int(b):02x}' for b in remote_ip.split('.'))


class OvsLayout(switch.SwitchLayout):
    """ML2/OVS on the userspace datapath; see the module docstring."""

    network_types = ('flat', 'vlan', 'vxlan')
    # The source's veth leaves UDP checksums partial (offloaded) and the
    # userspace datapath's tnl_pop drops those: the source sends none,
    # as a VXLAN endpoint over IPv4 may.
    source_vxlan_options = ('noudpcsum',)
    INT = 'br-int'
    EX = 'br-ex'
    TUN = 'br-tun'
    PHY = 'br-phy'

    def __init__(self, lab):
        super().__init__(lab)
        self.ovs = switch.OvsDaemons(
            lab.spec.hv_netns, os.path.join(lab.state_dir, 'ovs'))
        # bridge -> the OpenFlow rules installed (replayed when a first
        # controller makes ovs-vswitchd flush the bridge's flows).
        self.flows = {}

    @property
    def bridge(self):
        return self.INT

    @property
    def ovsdb_connection(self):
        """The private ovsdb-server of the hypervisor (``unix:…``)."""
        return self.ovs.db_connection

    @property
    def tunnel_port(self):
        if not self.spec.tunnelled:
            return None
        src_u, _, _ = self.spec.underlay_addresses()
        return tunnel_port_name(self.spec.network_type, src_u)

    def int_port(self, guest):
        """``guest``'s port on br-int (``qvo…`` or the tap)."""
        raise NotImplementedError

    def switch_devices(self):
        """The OVS bridges and ports a probe crosses from the pif to
        br-int, none of them seen by a packet socket."""
        if self.spec.tunnelled:
            return (self.PHY, self.tunnel_port, self.TUN, 'patch-int',
                    'patch-tun', self.INT)
        return (self.EX, 'phy-br-ex', 'int-br-ex', self.INT)

    # -- building ------------------------------------------------------------

    def _veths(self):
        """``ip`` lines making the guests' veths (and their bridges)."""
        raise NotImplementedError

    def build_hypervisor(self):
        lab, spec = self.lab, self.spec
        pif = spec.pif
        lines = ['link set lo up',
                 f'link add {pif} type veth peer name eth0 netns '
                 f'{lab.spec.src_netns}' +
                 (f' address {spec.src_underlay_mac}'
                  if spec.tunnelled else ''),
                 f'link set {pif} up']
        lines += self._veths()
        switch.ip_batch(lab.spec.hv_netns, lines)
        self.ovs.start()
        lab.save_state()
        vs = []
        for br in (self.INT,) + ((self.TUN,) if spec.tunnelled
                                 else (self.EX,)):
            vs += ['--', '--may-exist', 'add-br', br, '--', 'set', 'bridge',
                   br, 'datapath_type=netdev', 'fail_mode=secure']
        for g in lab.guests:
            port = self.int_port(g)
            vs += ['--', '--may-exist', 'add-port', self.INT, port,
                   f'tag={LOCAL_VLAN}', '--', 'set', 'Interface', port,
                   f'external_ids:iface-id={g.port_id}',
                   f'external_ids:attached-mac={g.mac}',
                   'external_ids:iface-status=active',
                   f'external_ids:vm-uuid={g.uuid}']
        if spec.tunnelled:
            vs += self._tunnel_ports()
        else:
            vs += (self._patch(self.INT, 'int-br-ex', 'phy-br-ex') +
                   self._patch(self.EX, 'phy-br-ex', 'int-br-ex') +
                   ['--', '--may-exist', 'add-port', self.EX, pif])
        self.ovs.vsctl(*vs[1:])
        if spec.tunnelled:
            self._underlay()
        self._flows()
        self._fdb()

    def build_source(self):
        """The source as on every layout; its kernel and the guests'
        fill in their transmit checksums (:mod:`offload`), so real TCP
        and UDP streams cross the userspace datapath whole."""
        super().build_source()
        offload.software_checksums(self.lab.spec.src_netns)
        for g in self.lab.guests:
            offload.software_checksums(g.netns)

    @staticmethod
    def _patch(bridge, port, peer):
        return ['--', '--may-exist', 'add-port', bridge, port, '--', 'set',
                'Interface', port, 'type=patch', f'options:peer={peer}']

    def _tunnel_ports(self):
        src_u, hv_u, _ = self.spec.underlay_addresses()
        tun = self.tunnel_port
        return (self._patch(self.INT, 'patch-tun', 'patch-int') +
                self._patch(self.TUN, 'patch-int', 'patch-tun') +
                ['--', '--may-exist', 'add-port', self.TUN, tun, '--', 'set',
                 'Interface', tun, f'type={self.spec.network_type}',
                 f'options:remote_ip={src_u}', f'options:local_ip={hv_u}',
                 'options:in_key=flow', 'options:out_key=flow',
                 f'options:dst_port={switch.VXLAN_PORT}',
                 'options:df_default=true',
                 # br-phy: the bridge owning local_ip, with the pif.
                 '--', '--may-exist', 'add-br', self.PHY, '--', 'set',
                 'bridge', self.PHY, 'datapath_type=netdev',
                 f'other_config:hwaddr={self.spec.pif_mac}',
                 '--', '--may-exist', 'add-port', self.PHY, self.spec.pif])

    def _underlay(self):
        spec, ns = self.spec, self.lab.spec.hv_netns
        src_u, hv_u, plen = spec.underlay_addresses()
        switch.ip_batch(ns, [
            f'link set {self.PHY} address {spec.pif_mac}',
            f'addr add {hv_u}/{plen} dev {self.PHY}',
            f'link set {self.PHY} up',
            f'neigh replace {src_u} lladdr {spec.src_underlay_mac} '
            f'dev {self.PHY} nud permanent'])
        # ovs-vswitchd learns br-phy's route from the kernel (netlink);
        # userspace tunnels need it to send to the source.
        end = time.monotonic() + ROUTE_LEARN_TIMEOUT_S
        while f'dev {self.PHY} SRC {hv_u}' not in self.ovs.appctl(
                'ovs/route/show'):
            if time.monotonic() > end:
                self.ovs.appctl('ovs/route/add', f'{src_u}/32', self.PHY)
                break
            time.sleep(0.01)
        self.ovs.appctl('tnl/arp/set', self.PHY, src_u,
                        spec.src_underlay_mac)

    def _flows(self):
        """The OVS agent's flows for the lab's one network."""
        spec = self.spec
        seg = spec.segmentation_id
        lv = LOCAL_VLAN
        flows = {self.INT: ['table=0,priority=0,actions=resubmit(,60)',
                            'table=60,priority=3,actions=NORMAL']}
        if spec.tunnelled:
            tun = self.tunnel_port
            push = (f'strip_vlan,load:0->NXM_OF_IN_PORT[],set_tunnel:{seg},'
                    f'output:{tun}')
            flows[self.TUN] = [
                'table=0,priority=1,in_port=patch-int,actions=resubmit(,2)',
                f'table=0,priority=1,in_port={tun},actions=resubmit(,4)',
                'table=0,priority=0,actions=drop',
                'table=2,priority=0,dl_dst=00:00:00:00:00:00/'
                '01:00:00:00:00:00,actions=resubmit(,20)',
                'table=2,priority=0,dl_dst=01:00:00:00:00:00/'
                '01:00:00:00:00:00,actions=resubmit(,22)',
                'table=3,priority=0,actions=drop',
                f'table=4,priority=1,tun_id={seg},'
                f'actions=mod_vlan_vid:{lv},resubmit(,10)',
                'table=4,priority=0,actions=drop',
                'table=10,priority=1,actions=output:patch-int',
                f'table=20,priority=2,dl_vlan={lv},dl_dst={spec.src_mac},'
                f'actions={push}',
                'table=20,priority=0,actions=resubmit(,22)',
                f'table=22,priority=1,dl_vlan={lv},actions={push}',
                'table=22,priority=0,actions=drop']
        else:
            untagged = ('vlan_tci=0x0000/0x1fff' if spec.network_type ==
                        'flat' else f'dl_vlan={seg}')
            out = ('strip_vlan' if spec.network_type == 'flat'
                   else f'mod_vlan_vid:{seg}')
            flows[self.INT] += [
                f'table=0,priority=3,in_port=int-br-ex,{untagged},'
                f'actions=mod_vlan_vid:{lv},resubmit(,60)',
                'table=0,priority=2,in_port=int-br-ex,actions=drop']
            flows[self.EX] = [
                f'table=0,priority=4,in_port=phy-br-ex,dl_vlan={lv},'
                f'actions={out},NORMAL',
                'table=0,priority=2,in_port=phy-br-ex,actions=drop',
                'table=0,priority=0,actions=NORMAL']
        self.flows = flows
        for bridge in flows:
            self._install(bridge)

    def _install(self, bridge):
        """Add every flow of ``bridge`` in :attr:`flows` (again)."""
        path = os.path.join(self.ovs.paths.root, f'{bridge}.flows')
        with open(path, 'w', encoding='ascii') as f:
            f.write('\n'.join(self.flows[bridge]) + '\n')
        self.ovs.ofctl('add-flows', bridge, path)

    def add_flow(self, bridge, flow):
        """Add one flow, and keep it in :attr:`flows`."""
        self.flows[bridge].append(flow)
        self.ovs.ofctl('add-flow', bridge, flow)

    def _fdb(self):
        """Static forwarding entries: no learning, no flooding."""
        spec = self.spec
        lv = LOCAL_VLAN
        wire = 0 if spec.network_type == 'flat' else spec.segmentation_id
        uplink = 'patch-tun' if spec.tunnelled else 'int-br-ex'
        entries = [(self.INT, uplink, lv, spec.src_mac)]
        for g in self.lab.guests:
            entries.append((self.INT, self.int_port(g), lv, g.mac))
            if not spec.tunnelled:
                entries.append((self.EX, 'phy-br-ex', wire, g.mac))
        if spec.tunnelled:
            entries += [(self.PHY, spec.pif, 0, spec.src_underlay_mac),
                        (self.PHY, self.PHY, 0, spec.pif_mac)]
        else:
            entries.append((self.EX, spec.pif, wire, spec.src_mac))
        for bridge, port, vlan, mac in entries:
            self.ovs.appctl('fdb/add', bridge, port, str(vlan), mac)

    # -- truth, state --------------------------------------------------------

    def unseen(self, guest):
        seen = self.hops(guest)
        out = [switch.HopDevices(seen[0], seen[1], self.switch_devices())]
        for a, b in zip(seen[1:], seen[2:]):
            out.append(switch.HopDevices(
                a, b, (port_names(guest)[0],) if b == guest.vif else ()))
        return tuple(out)

    def pids(self):
        paths = self.ovs.paths
        return [{'pid': pid, 'marker': f'--pidfile={paths.pidfile(d)}'}
                for d, pid in self.ovs.pids().items()]

    def state(self):
        return {'switch': self.name, 'ovs_root': self.ovs.paths.root,
                'network_type': self.spec.network_type,
                'segmentation_id': self.spec.segmentation_id}

    def vswitchd_alive(self):
        """Whether this lab's ovs-vswitchd still runs."""
        pid = self.ovs.pids().get('ovs-vswitchd')
        return pid is not None and proc.pid_alive(pid)

    def teardown(self):
        self.ovs.stop()


class OvsHybridLayout(linuxbridge.NetfilterTruth, OvsLayout):
    """ML2/OVS with the iptables hybrid plug: tap → qbr → qvb/qvo →
    br-int; netfilter truth on qbr."""

    name = 'ovs-hybrid'
    delay_truth = ('NFQUEUE delayer on qbr (iptables physdev, where '
                   "Neutron's iptables firewall lives), each hold recorded: "
                   'it shows in the qvb → tap hop')
    loss_truth = 'iptables nth drop on qbr (physdev)'

    def int_port(self, guest):
        return port_names(guest)[2]

    def hops(self, guest):
        _, qvb, qvo = port_names(guest)
        return (self.spec.pif, qvo, qvb, guest.vif)

    def interface_xml(self, guest):
        return port_names(guest)[0], None

    def _veths(self):
        lines = []
        for g in self.lab.guests:
            qbr, qvb, qvo = port_names(g)
            lines += [f'link add {g.vif} address {g.vif_mac} type veth '
                      f'peer name eth0 address {g.mac} netns {g.netns}',
                      f'link add {qbr} type bridge stp_state 0 '
                      'forward_delay 0',
                      f'link add {qvb} type veth peer name {qvo}',
                      f'link set {g.vif} master {qbr}',
                      f'link set {qvb} master {qbr}']
            lines += [f'link set {n} up' for n in (qbr, qvb, qvo, g.vif)]
        return lines

    def build_hypervisor(self):
        super().build_hypervisor()
        fdb = []
        for g in self.lab.guests:
            qvb = port_names(g)[1]
            fdb += [f'fdb replace {g.mac} dev {g.vif} master static',
                    f'fdb replace {self.spec.src_mac} dev {qvb} master '
                    'static']
        switch.ip_batch(self.lab.spec.hv_netns, fdb, tool='bridge')


class OvsNativeLayout(OvsLayout):
    """ML2/OVS with the native firewall: the tap on br-int; exact loss by
    an OpenFlow drop of marked probes, no delay truth."""

    name = 'ovs-native'
    loss_truth = ('OpenFlow drop on br-int of the probes the lab source '
                  'marks (every Nth to the guest, by IP TTL)')
    delay_truth = ('OpenFlow controller delayer on br-int (packet-in, '
                   'hold, packet-out), each hold recorded')

    def __init__(self, lab):
        super().__init__(lab)
        # Shared by every source made: counts carry over windows.
        self.marks = labmark.MarkTable()
        self._controller = None

    def int_port(self, guest):
        return guest.vif

    def hops(self, guest):
        return (self.spec.pif, guest.vif)

    def interface_xml(self, guest):
        return self.INT, guest.port_id

    def _veths(self):
        lines = []
        for g in self.lab.guests:
            lines += [f'link add {g.vif} address {g.vif_mac} type veth '
                      f'peer name eth0 address {g.mac} netns {g.netns}',
                      f'link set {g.vif} up']
        return lines

    def inject_loss(self, loss):
        g = self.lab.guests[loss.guest]
        flows = []
        for address, match in ((g.address, f'ip,nw_dst={g.address}'),
                               (g.address6, f'ipv6,ipv6_dst={g.address6}')):
            if not address:
                continue
            mark = labmark.Mark(dst_ip=address, every=loss.every,
                                ttl=self.marks.free_ttl(),
                                protocol=loss.protocol)
            try:
                self.marks.add(mark)
            except ValueError as exc:
                raise switch.LabError(
                    f"lab {self.lab.spec.prefix!r}: guest {loss.guest}: "
                    f"{exc}") from exc
            flows.append(f'table=0,priority={LOSS_FLOW_PRIORITY},{match},'
                         f'nw_ttl={mark.ttl},actions=drop')
        for flow in flows:
            self.add_flow(self.INT, flow)

    def inject_delay(self, delay):
        """Hold every probe to a guest in an OpenFlow controller
        (:mod:`netweaver_agent.lab.ofdelay`): a flow on br-int sends them
        to it, it sends each back to the guest's port after the delay
        (with no ``protocol``: every IP packet to the guest, the truth of
        passive mode with ``record='passive'``)."""
        if delay.backend == 'netem':
            raise switch.LabError(
                f"lab switch {self.name!r}: no tc netem here (and the "
                "userspace datapath would bypass it); use the auto backend")
        if self._controller:
            raise switch.LabError(
                f"lab {self.lab.spec.prefix!r}: {self.name} delays one guest "
                "(one controller on br-int)")
        g = self.lab.guests[delay.guest]
        ofport = int(self.ovs.vsctl('get', 'Interface', g.vif, 'ofport'))
        listen = os.path.join(self.ovs.paths.root,
                              f'ofdelay-g{delay.guest}.sock')
        active = self.lab.start_delayer(
            delay, module='netweaver_agent.lab.ofdelay',
            args=['--listen', listen, '--output-port', str(ofport)],
            backend='openflow')
        self._controller = f'unix:{listen}'
        # A bridge's first controller makes ovs-vswitchd flush its flows
        # (connmgr_set_controllers): install them again, then the delay's.
        self.ovs.vsctl('set-controller', self.INT, self._controller)
        self._wait_connected(listen + ofdelay.CONNECTED_SUFFIX)
        self._install(self.INT)
        matches = [delay.protocol or 'ip', f'nw_dst={g.address}']
        flows = [','.join(matches)]
        if g.address6:
            flows.append(','.join([_IP6_PROTOCOLS.get(delay.protocol,
                                                      'ipv6'),
                                   f'ipv6_dst={g.address6}']))
        for match in flows:
            self.add_flow(self.INT,
                          f'table=60,priority={DELAY_FLOW_PRIORITY},'
                          f'dl_vlan={LOCAL_VLAN},{match},'
                          'actions=CONTROLLER:65535')
        return active

    def _wait_connected(self, marker):
        end = time.monotonic() + CONTROLLER_CONNECT_TIMEOUT_S
        while time.monotonic() < end:
            if os.path.exists(marker):
                return
            time.sleep(0.01)
        raise switch.LabError(
            f"lab {self.lab.spec.prefix!r}: br-int did not connect to the "
            f"delaying controller {self._controller} within "
            f"{CONTROLLER_CONNECT_TIMEOUT_S:.0f} s")

    def source(self):
        """The layout's source, marking every Nth probe to a guest with
        loss (its frames on a VLAN network)."""
        base = super().source()
        if not self.marks.marks():
            return base
        if isinstance(base, framesource.FrameSource):
            return MarkingFrameSource(
                self.marks, netns_name=base.netns_name, ifname=base.ifname,
                src_mac=_mac_text(base.src_mac),
                macs={a: _mac_text(m) for a, m in base.macs.items()},
                vlan=base.vlan, priority=base.priority)
        return labmark.MarkingSource(base.netns_name, self.marks)


def _mac_text(raw):
    return ':'.join(f'{b:02x}' for b in raw)


def _ip_offset(frame):
    """Offset of the IP header in an Ethernet frame (after any tags)."""
    offset = 12
    while struct.unpack_from('!H', frame, offset)[0] in _ETH_P_8021Q:
        offset += 4
    return offset + 2


class MarkingFrameSource(labmark.Marking, framesource.FrameSource):
    """Tagged probe frames (VLAN network), every Nth to a guest marked as
    :class:`labmark.MarkingSource` marks its packets."""

    def _transmit(self, sock, dst, data):
        offset = _ip_offset(data)
        super()._transmit(sock, dst,
                          data[:offset] + self.mark(dst, data[offset:]))
