"""The lab's Linux-bridge layout (``netweaver lab --switch linuxbridge``).

As Neutron's linuxbridge agent builds a compute node: a bridge named
``brq`` + 11 characters of the network id, the pif as its port (flat) or
``vxlan-<VNI>`` over the pif (``vxlan``: the pif is the underlay), and one
nova-like ``tap<port id>`` per guest.  Static forwarding entries, so no
flooding disturbs a window.

Truth is injected by netfilter on the bridge, after the pif, for probes
bound to one guest (``-m physdev --physdev-out <tap> -d <address>``):
:class:`NetfilterTruth`, which the OVS hybrid layout shares (its ``qbr``
bridge is where Neutron's iptables firewall lives).
"""

from oslo_log import log

from netweaver_agent.core import netns
from netweaver_agent.lab import switch

LOG = log.getLogger(__name__)

VXLAN_DEV_PREFIX = 'vxlan-'


class NetfilterTruth:
    """Delay and loss injected by iptables on a Linux bridge (br_netfilter).

    * loss: ``-m statistic --mode nth --every N --packet N-1 -j DROP``:
      the Nth, 2Nth... probe to that guest is dropped;
    * delay: an NFQUEUE rule and the lab's delayer process, which records
      each hold.
    """

    delay_truth = ('NFQUEUE delayer on the bridge (iptables physdev), '
                   'each hold recorded')
    loss_truth = 'iptables nth drop on the bridge (physdev)'

    def _match(self, guest_index, protocol, ipv6=False):
        g = self.lab.guests[guest_index]
        rule = ['-m', 'physdev', '--physdev-out', g.vif, '-d',
                g.address6 if ipv6 else g.address]
        if protocol:
            if ipv6 and protocol == 'icmp':
                protocol = 'ipv6-icmp'
            rule[0:0] = ['-p', protocol]
        return rule

    def _bridge_netfilter(self):
        switch.sysctl(self.lab.spec.hv_netns,
                      [('net.bridge.bridge-nf-call-iptables', 1)] +
                      ([('net.bridge.bridge-nf-call-ip6tables', 1)]
                          if self.spec.ipv6 else []))

    def _filter_rule(self, position, guest, protocol, target):
        """``position`` (e.g. ``['-A', 'FORWARD']``), the guest's match,
        then ``target``: in iptables, and in ip6tables with IPv6."""
        ns = self.lab.spec.hv_netns
        switch.iptables(ns, [*position, *self._match(guest, protocol),
                             *target])
        if self.spec.ipv6:
            switch.iptables(ns, [*position,
                                 *self._match(guest, protocol, True),
                                 *target], tool='ip6tables')

    def inject_loss(self, loss):
        """Drop every Nth probe to a guest, on the bridge (after the pif)."""
        self._bridge_netfilter()
        self._filter_rule(
            ['-I', 'FORWARD', '1'], loss.guest, loss.protocol,
            # The counter starts so that --packet N-1 matches the Nth.
            ['-m', 'statistic', '--mode', 'nth', '--every', str(loss.every),
             '--packet', str(loss.every - 1), '-j', 'DROP'])

    def _nfqueue_delay(self, delay):
        active = self.lab.start_delayer(delay)
        self._bridge_netfilter()
        self._filter_rule(['-A', 'FORWARD'], delay.guest, delay.protocol,
                          ['-j', 'NFQUEUE', '--queue-num', str(active.queue)])
        return active

    def inject_delay(self, delay):
        """Hold every probe to a guest: the NFQUEUE delayer."""
        if delay.backend == 'netem':
            raise switch.LabError(
                f"lab switch {self.name!r}: no tc netem delay here; use the "
                "nfqueue delay backend")
        return self._nfqueue_delay(delay)


class LinuxBridgeLayout(NetfilterTruth, switch.SwitchLayout):
    """Neutron's linuxbridge agent: pif (or ``vxlan-<VNI>``) and taps on
    one ``brq…`` bridge."""

    name = 'linuxbridge'
    network_types = ('flat', 'vxlan')
    delay_truth = ('tc netem on the tap where the kernel has it, else the '
                   'NFQUEUE delayer on the bridge, each hold recorded')

    @property
    def bridge(self):
        return self.spec.bridge

    @property
    def vxlan_dev(self):
        """The hypervisor's VXLAN port of the bridge (Neutron's name)."""
        if self.spec.network_type != 'vxlan':
            return None
        return f'{VXLAN_DEV_PREFIX}{self.spec.segmentation_id}'

    def hops(self, guest):
        """pif → tap (pif → ``vxlan-<VNI>`` → tap with VXLAN)."""
        vx = self.vxlan_dev
        return (self.spec.pif,) + ((vx,) if vx else ()) + (guest.vif,)

    def unseen(self, guest):
        seen = self.hops(guest)
        return tuple(switch.HopDevices(a, b, (self.bridge,)
                                       if b == guest.vif else ())
                     for a, b in zip(seen, seen[1:]))

    def build_hypervisor(self):
        lab, spec = self.lab, self.spec
        br, pif, src = self.bridge, spec.pif, lab.spec.src_netns
        lines = [f'link add {br} type bridge stp_state 0 forward_delay 0']
        port = pif
        if self.vxlan_dev is None:
            lines += [f'link add {pif} type veth peer name eth0 netns {src}',
                      f'link set {pif} master {br}']
        else:
            port = self.vxlan_dev
            src_u, hv_u, _ = spec.underlay_addresses()
            lines += [f'link add {pif} address {spec.pif_mac} type veth '
                      f'peer name eth0 address {spec.src_underlay_mac} '
                      f'netns {src}',
                      f'link add {port} type vxlan id {spec.segmentation_id} '
                      f'local {hv_u} remote {src_u} '
                      f'dstport {switch.VXLAN_PORT} dev {pif} nolearning',
                      f'link set {port} master {br}']
        for g in lab.guests:
            lines += [f'link add {g.vif} address {g.vif_mac} type veth '
                      f'peer name eth0 address {g.mac} netns {g.netns}',
                      f'link set {g.vif} master {br}']
        lines += [f'link set {n} up' for n in
                  ('lo', br, pif, *(g.vif for g in lab.guests))]
        if self.vxlan_dev is not None:
            lines += [f'addr add {hv_u}/{spec.underlay_addresses()[2]} '
                      f'dev {pif}',
                      f'neigh replace {src_u} lladdr {spec.src_underlay_mac}'
                      f' dev {pif} nud permanent',
                      f'link set {port} up']
        switch.ip_batch(lab.spec.hv_netns, lines)
        fdb = [f'fdb replace {g.mac} dev {g.vif} master static'
               for g in lab.guests]
        fdb.append(f'fdb replace {spec.src_mac} dev {port} master static')
        switch.ip_batch(lab.spec.hv_netns, fdb, tool='bridge')

    def inject_delay(self, delay):
        """``tc netem`` on the tap where the kernel has it (backend auto or
        netem), else the NFQUEUE delayer."""
        if delay.backend in ('auto', 'netem'):
            if self._try_netem(delay):
                return switch.ActiveDelay(injection=delay,
                                          backend='netem')
            if delay.backend == 'netem':
                raise switch.LabError(
                    f"lab {self.spec.prefix!r}: the kernel has no tc netem "
                    "(CONFIG_NET_SCH_NETEM); use the nfqueue delay backend")
        return self._nfqueue_delay(delay)

    def _try_netem(self, delay):
        if delay.protocol is not None:
            LOG.debug('netem cannot restrict a delay to %s probes; using '
                      'nfqueue', delay.protocol)
            return False
        vif = self.lab.guests[delay.guest].vif
        proc = netns.run(['tc', 'qdisc', 'add', 'dev', vif, 'root', 'netem',
                          'delay', f'{delay.delay_ms}ms'],
                         netns=self.spec.hv_netns, check=False)
        if proc.returncode != 0:
            LOG.debug('tc netem unavailable on %(vif)s: %(err)s',
                      {'vif': vif, 'err': proc.stderr.strip()})
            return False
        return True
