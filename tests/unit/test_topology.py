"""From a libvirt domain to a VifPath: netdev, pif, address."""

import json
import os
import re
import types
from xml.etree import ElementTree

from oslo_config import cfg
import pytest

from netweaver_agent.agent import opts
from netweaver_agent.agent import ovsdb
from netweaver_agent.agent import topology
from netweaver_agent.core import vifpath
from netweaver_agent.lab import virt

NOVA = virt.NOVA_NS
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def domain_xml(interfaces, ports=''):
    return (f"<domain type='kvm'><name>instance-00000001</name>"
            f"<uuid>3f2d6c1e-8a4b-4c5d-9e6f-7a8b9c0d1e2f</uuid>"
            f"<metadata><nova:instance xmlns:nova='{NOVA}'>"
            f"<nova:ports>{ports}</nova:ports></nova:instance></metadata>"
            f"<devices>{interfaces}</devices></domain>")


def bridge_iface(tap, mac, ip=None, interfaceid=None):
    fref = (f"<filterref filter='nova-instance-x'><parameter name='IP' "
            f"value='{ip}'/></filterref>" if ip else '')
    vport = (f"<virtualport type='openvswitch'><parameters "
             f"interfaceid='{interfaceid}'/></virtualport>"
             if interfaceid else '')
    return (f"<interface type='bridge'><mac address='{mac}'/>"
            f"<source bridge='brq1'/><target dev='{tap}'/>{vport}{fref}"
            "</interface>")


def port(uuid, *ips):
    inner = ''.join(f"<nova:ip type='fixed' address='{ip}' ipVersion='4'/>"
                    for ip in ips)
    return f"<nova:port uuid='{uuid}'>{inner}</nova:port>"


@pytest.fixture
def sysfs(tmp_path):
    """A sysfs-like tree: ``make({dev: master})``."""
    def make(masters):
        for dev, master in masters.items():
            (tmp_path / dev).mkdir(exist_ok=True)
            if master:
                os.symlink(os.path.join('..', master),
                           tmp_path / dev / 'master')
        return topology.SysfsLinks(str(tmp_path))
    return make


# --- parsing -------------------------------------------------------------

def test_parse_domain_reads_interfaces_and_nova_ports():
    xml = domain_xml(
        bridge_iface('tapaaa', 'fa:16:3e:00:00:01', ip='198.18.1.10') +
        bridge_iface('tapbbb', 'fa:16:3e:00:00:02', interfaceid='p2'),
        port('p2', '198.18.1.11') +
        "<nova:port uuid='p3'><nova:ip type='floating' address="
        "'198.19.9.9' ipVersion='4'/><nova:ip type='fixed' address="
        "'2001:db8::1' ipVersion='6'/></nova:port>")
    dom = topology.parse_domain(xml, domid=4)
    assert dom.name == 'instance-00000001'
    assert dom.domain_type == 'kvm'
    assert dom.domid == 4
    a, b = dom.interfaces
    assert (a.index, a.type, a.target, a.bridge, a.filter_ip) == \
        (0, 'bridge', 'tapaaa', 'brq1', '198.18.1.10')
    assert a.fref == 'nova-instance-x'
    assert (b.index, b.interface_id, b.filter_ip) == (1, 'p2', None)
    assert dom.ports == (topology.NovaPort('p2', ('198.18.1.11',)),
                         topology.NovaPort('p3', ()))
    assert dom.interface(target='tapbbb') is b
    assert dom.interface(mac='FA:16:3E:00:00:01') is a
    assert dom.interface(target='nope', mac='00:00:00:00:00:00') is None


def test_parse_domain_names_bad_xml():
    with pytest.raises(topology.TopologyError, match='unreadable domain'):
        topology.parse_domain('<domain')


def test_labvirt_node_round_trips():
    guest = virt.GuestDomain(index=2, name='web', uuid='u-1',
                             vif='tapzzz', mac='fa:16:3e:00:00:09',
                             address='198.18.1.12', bridge='brq1',
                             port_uuid='pz')
    node = ElementTree.fromstring(virt.node_xml([guest]))
    dom = topology.parse_domain(
        ElementTree.tostring(node.find('domain'), encoding='unicode'))
    assert dom.name == 'instance-00000003'
    (iface,) = dom.interfaces
    assert (iface.target, iface.mac, iface.filter_ip, iface.fref) == (
        'tapzzz', 'fa:16:3e:00:00:09', '198.18.1.12', guest.filter_name)
    assert dom.ports == (topology.NovaPort('pz', ('198.18.1.12',)),)


@pytest.mark.parametrize('iface, what', [
    ("<interface type='vhostuser'><mac address='fa:16:3e:00:00:01'/>"
     "<source type='unix' path='/run/x' mode='server'/></interface>",
     'vhost-user'),
    ("<interface type='hostdev'><mac address='fa:16:3e:00:00:01'/>"
     "</interface>", 'SR-IOV hostdev'),
    ("<interface type='vdpa'><mac address='fa:16:3e:00:00:01'/>"
     "</interface>", 'vDPA'),
    ("<interface type='direct'><mac address='fa:16:3e:00:00:01'/>"
     "<source dev='eth2' mode='passthrough'/><target dev='macvtap0'/>"
     "</interface>", 'macvtap passthrough'),
])
def test_vnics_without_host_netdev_are_not_measurable(iface, what, sysfs):
    dom = topology.parse_domain(domain_xml(iface))
    with pytest.raises(topology.NotMeasurable, match=what) as err:
        topology.resolve(dom, dom.interfaces[0], topology.LibvirtResolver(),
                         sysfs({}))
    assert 'instance-00000001' in str(err.value)
    assert 'not measurable' in str(err.value)


def test_macvtap_bridge_mode_is_measurable():
    dom = topology.parse_domain(domain_xml(
        "<interface type='direct'><mac address='fa:16:3e:00:00:01'/>"
        "<source dev='eth2' mode='bridge'/><target dev='macvtap0'/>"
        "</interface>"))
    assert dom.interfaces[0].unmeasurable_reason is None


# --- resolvers -------------------------------------------------------------

def test_libvirt_resolver_takes_the_target_dev():
    dom = topology.parse_domain(domain_xml(
        bridge_iface('tapaaa', 'fa:16:3e:00:00:01')))
    assert topology.LibvirtResolver().netdev(dom, dom.interfaces[0]) == \
        'tapaaa'


def test_libvirt_resolver_names_a_vnic_without_target():
    dom = topology.parse_domain(domain_xml(
        "<interface type='bridge'><mac address='fa:16:3e:00:00:01'/>"
        "</interface>"))
    with pytest.raises(topology.TopologyError, match='fa:16:3e:00:00:01'):
        topology.LibvirtResolver().netdev(dom, dom.interfaces[0])


def test_xen_resolver_builds_vif_domid_index():
    xml = domain_xml(bridge_iface('x0', 'fa:16:3e:00:00:01') +
                     bridge_iface('x1', 'fa:16:3e:00:00:02'))
    dom = topology.parse_domain(xml, domid=7)
    xen = topology.XenResolver()
    names = [xen.netdev(dom, i) for i in dom.interfaces]
    assert names == ['vif7.0', 'vif7.1']
    stopped = topology.parse_domain(xml, domid=-1)
    with pytest.raises(topology.TopologyError, match='Xen domain id'):
        xen.netdev(stopped, stopped.interfaces[0])


def test_resolvers_load_through_their_entry_points():
    assert isinstance(topology.load_resolver('xen'), topology.XenResolver)
    import stevedore
    mgr = stevedore.DriverManager(topology.RESOLVER_NAMESPACE, 'libvirt',
                                  invoke_on_load=True)
    assert isinstance(mgr.driver, topology.LibvirtResolver)
    with pytest.raises(topology.TopologyError, match="'hyperv'"):
        topology.load_resolver('hyperv')


# --- pif -----------------------------------------------------------------

def test_pif_is_the_bridge_port_that_is_not_a_vif(sysfs):
    links = sysfs({'brq1': None, 'eth1': 'brq1', 'tapaaa': 'brq1',
                   'tapbbb': 'brq1', 'vnet3': 'brq1', 'eth2': None})
    assert topology.find_pif('tapaaa', links, ('tap', 'vnet')) == 'eth1'


def test_pif_from_configuration(sysfs):
    links = sysfs({'bond0': None, 'tapaaa': None})
    assert topology.find_pif('tapaaa', links, configured='bond0') == 'bond0'
    with pytest.raises(topology.TopologyError, match="'eth9'"):
        topology.find_pif('tapaaa', links, configured='eth9')


def test_pif_ambiguity_names_the_candidates(sysfs):
    links = sysfs({'brq1': None, 'eth1': 'brq1', 'eth2': 'brq1',
                   'tapaaa': 'brq1'})
    with pytest.raises(topology.TopologyError,
                       match=r"brq1.*\['eth1', 'eth2'\].*\[netweaver\] pif"):
        topology.find_pif('tapaaa', links)


def test_pif_of_an_unbridged_vif_asks_for_configuration(sysfs):
    with pytest.raises(topology.TopologyError, match='no master'):
        topology.find_pif('tapaaa', sysfs({'tapaaa': None}))


def test_real_sysfs_and_ip_link_agree_on_loopback():
    sys_links = topology.SysfsLinks()
    ip_links = topology.IpLinks()
    assert sys_links.exists('lo') and ip_links.exists('lo')
    assert sys_links.master('lo') is None and ip_links.master('lo') is None
    assert set(ip_links.names()) <= set(sys_links.names()) | {'lo'}


def test_live_netdevs_answer_for_real_and_impossible_names():
    assert topology.LiveNetdevs.exists('lo')
    # Longer than a netdev name may be, a NUL inside, empty: no netdev.
    for name in ('nosuch-netdev0', 'x' * 40, 'lo\0x', ''):
        assert not topology.LiveNetdevs.exists(name), name


# --- address -------------------------------------------------------------

def test_address_order_filterref_then_nova_never_neighbours():
    xml = domain_xml(
        bridge_iface('tapaaa', 'fa:16:3e:00:00:01', ip='198.18.1.10') +
        bridge_iface('tap' + 'p2xxxxxxxxx-yyyy'[:11], 'fa:16:3e:00:00:02') +
        bridge_iface('tapccc', 'FA:16:3E:00:00:03'),
        port('p2xxxxxxxxx-yyyy', '198.18.1.11') +
        port('fa-16-3e-01', '198.18.1.99'))
    dom = topology.parse_domain(xml)
    a, b, c = dom.interfaces
    # The filterref wins (no port of its own to contradict it).
    assert topology.target_address(dom, a) == ('198.18.1.10', 'filterref')
    # tap + 11 characters of the port uuid: nova's tap naming.
    assert topology.target_address(dom, b) == ('198.18.1.11',
                                               'nova-metadata')
    # No recorded address: not measurable, whatever the guest answers ARP
    # for (the neighbour table is never a source).
    with pytest.raises(topology.TopologyError,
                       match='tapccc.*filterref.*nova.*neighbour'):
        topology.target_address(dom, c)


def test_address_from_port_by_interfaceid():
    dom = topology.parse_domain(domain_xml(
        bridge_iface('qvoxyz', 'fa:16:3e:00:00:02', interfaceid='p2'),
        port('p1', '198.18.1.10') + port('p2', '198.18.1.11')))
    assert topology.target_address(dom, dom.interfaces[0]) == (
        '198.18.1.11', 'nova-metadata')


def test_filterref_must_be_one_of_the_ports_fixed_ips():
    # A filterref naming another vNIC's address while the port records
    # its own: not measurable (probes would be steered to the other).
    tap = 'tap' + 'p2xxxxxxxxx-yyyy'[:11]
    dom = topology.parse_domain(domain_xml(
        bridge_iface(tap, 'fa:16:3e:00:00:02', ip='198.18.1.77'),
        port('p2xxxxxxxxx-yyyy', '198.18.1.11')))
    with pytest.raises(topology.TopologyError,
                       match=r"198\.18\.1\.77 is not one of port "
                             r"p2xxxxxxxxx-yyyy's fixed IPs"):
        topology.target_address(dom, dom.interfaces[0])
    ok = topology.parse_domain(domain_xml(
        bridge_iface(tap, 'fa:16:3e:00:00:02', ip='198.18.1.11'),
        port('p2xxxxxxxxx-yyyy', '198.18.1.11')))
    assert topology.target_address(ok, ok.interfaces[0]) == (
        '198.18.1.11', 'filterref')


@pytest.mark.parametrize('bad', ['198.18.0.300', 'guest1', '198.18.0.1 x',
                                 ''])
def test_an_address_that_is_no_address_names_it(bad):
    dom = topology.parse_domain(domain_xml(
        bridge_iface('tapaaa', 'fa:16:3e:00:00:01'),
        port('p1', bad or '-')))
    with pytest.raises(topology.TopologyError,
                       match='tapaaa.*is not an IP address'):
        topology.target_address(dom, dom.interfaces[0])
    filt = topology.parse_domain(domain_xml(
        bridge_iface('tapaaa', 'fa:16:3e:00:00:01', ip=bad or '-')))
    with pytest.raises(topology.TopologyError,
                       match='tapaaa.*filterref IP.*is not an IP address'):
        topology.target_address(filt, filt.interfaces[0])


def test_resolve_builds_the_path(sysfs):
    links = sysfs({'brq1': None, 'eth1': 'brq1', 'tapaaa': 'brq1'})
    dom = topology.parse_domain(domain_xml(
        bridge_iface('tapaaa', 'fa:16:3e:00:00:01', ip='198.18.1.10')))
    path = topology.resolve(dom, dom.interfaces[0],
                            topology.LibvirtResolver(), links,
                            vif_prefixes=('tap',))
    assert path == vifpath.VifPath(vif='tapaaa', address='198.18.1.10',
                                   interfaces=('eth1', 'tapaaa'),
                                   mac='fa:16:3e:00:00:01',
                                   via=(('brq1',),))
    assert path.unseen == ('brq1',) and path.encap == ()


def test_resolve_names_a_vanished_vif(sysfs):
    dom = topology.parse_domain(domain_xml(
        bridge_iface('tapgone', 'fa:16:3e:00:00:01', ip='198.18.1.10')))
    with pytest.raises(topology.TopologyError,
                       match="vif 'tapgone' of domain instance-00000001"):
        topology.resolve(dom, dom.interfaces[0], topology.LibvirtResolver(),
                         sysfs({'eth1': None}))


def test_every_documented_vif_prefix_is_never_the_pif(sysfs):
    """The deployment guide names the prefixes of ports never taken as the
    pif; the option's default and resolve()'s own both hold to it."""
    with open(os.path.join(ROOT, 'docs', 'deploying.md'),
              encoding='utf-8') as f:
        line = re.search(r'`vif_prefixes` \(([^)]*)\)', f.read())
    documented = re.findall(r'`(\w+)`', line.group(1))
    assert len(documented) >= 2, line
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf([])
    ports = {f'{prefix}1': 'br0' for prefix in documented}
    links = sysfs({'eth1': 'br0', **ports, 'br0': None})
    dom = topology.parse_domain(domain_xml(''.join(
        bridge_iface(dev, f'fa:16:3e:00:00:{n:02x}', ip=f'198.18.1.{n}')
        for n, dev in enumerate(ports, 10))))
    for iface in dom.interfaces:
        assert topology.find_pif(iface.target, links,
                                 conf.netweaver.vif_prefixes) == 'eth1'
        path = topology.resolve(dom, iface, topology.LibvirtResolver(),
                                links)
        assert path.interfaces == ('eth1', iface.target), path


# --- Open vSwitch: paths from the switch's database ------------------------
#
# Snapshots are built from rows shaped as ovs-vsctl / ovsdb-server return
# them (see tests/unit/test_ovsdb.py for verbatim output); links from
# ``ip -j link`` shapes (a veth peer in the same namespace is named in
# "link", one elsewhere has "link_netnsid").

class Switch:
    """OVSDB rows of a made-up host, in the server's JSON notation."""

    def __init__(self, external_ids=None):
        self.rows = {'Open_vSwitch': [{
            '_uuid': ['uuid', 'root'], 'bridges': ['set', []],
            'external_ids': ['map', sorted((external_ids or {}).items())]}],
            'Bridge': [], 'Port': [], 'Interface': []}
        self._n = 0

    def _uuid(self):
        self._n += 1
        return f'00000000-0000-4000-8000-{self._n:012d}'

    def bridge(self, name, datapath='netdev'):
        uuid = self._uuid()
        self.rows['Bridge'].append({'_uuid': ['uuid', uuid], 'name': name,
                                    'ports': ['set', []],
                                    'datapath_type': datapath})
        self.rows['Open_vSwitch'][0]['bridges'][1].append(['uuid', uuid])
        self.port(name, name, type='internal')
        return self

    def port(self, bridge, name, type='', options=None, external_ids=None,
             tag=None, other_config=None, members=None):
        iface_uuids = []
        for member in members or (name,):
            uuid = self._uuid()
            iface_uuids.append(uuid)
            self.rows['Interface'].append({
                '_uuid': ['uuid', uuid], 'name': member, 'type': type,
                'options': ['map', sorted((options or {}).items())],
                'external_ids': ['map',
                                 sorted((external_ids or {}).items())]})
        port_uuid = self._uuid()
        self.rows['Port'].append({
            '_uuid': ['uuid', port_uuid], 'name': name,
            'interfaces': (['uuid', iface_uuids[0]] if len(iface_uuids) == 1
                           else ['set', [['uuid', u] for u in iface_uuids]]),
            'tag': tag if tag is not None else ['set', []],
            'other_config': ['map', sorted((other_config or {}).items())]})
        row = next(b for b in self.rows['Bridge'] if b['name'] == bridge)
        row['ports'][1].append(['uuid', port_uuid])
        return self

    def patch(self, bridge_a, port_a, bridge_b, port_b):
        self.port(bridge_a, port_a, type='patch', options={'peer': port_b})
        return self.port(bridge_b, port_b, type='patch',
                         options={'peer': port_a})

    def vm(self, bridge, name, **other_config):
        return self.port(bridge, name, tag=1, other_config=other_config,
                         external_ids={'iface-id': 'port-' + name,
                                       'attached-mac': 'fa:16:3e:00:00:01',
                                       'vm-uuid': 'vm-1'})

    def snapshot(self):
        return ovsdb.snapshot_from_rows(self.rows, source='unix:/test.sock')

    def view(self, addresses=None):
        return topology.SwitchView(self.snapshot,
                                   lambda: dict(addresses or {}))


def ip_links(*links, cls=topology.IpLinks):
    """IpLinks from ``(ifname, master, link)`` as ``ip -j link`` shows."""
    rows = []
    for index, (name, master, link) in enumerate(links, start=2):
        row = {'ifindex': index, 'ifname': name,
               'flags': ['BROADCAST', 'UP'], 'address': '02:00:00:00:00:01'}
        if master:
            row['master'] = master
        if link == 'elsewhere':
            row.update(link_index=4, link_netnsid=0)
        elif link:
            row['link'] = link
        rows.append(row)
    return cls(text=json.dumps(rows), where='test')


def provider_switch():
    """br-int patched to br-ex, whose uplink is eth1 (ML2/OVS, flat)."""
    return (Switch().bridge('br-int').bridge('br-ex')
            .port('br-ex', 'eth1')
            .patch('br-int', 'int-br-ex', 'br-ex', 'phy-br-int'))


HYBRID_LINKS = (('eth1', None, 'elsewhere'), ('qbr1', None, None),
                ('qvb1', 'qbr1', 'qvo1'), ('qvo1', None, 'qvb1'),
                ('tap1', 'qbr1', None), ('br-int', None, None),
                ('br-ex', None, None))
TO_BR_INT = ('br-ex', 'phy-br-int', 'int-br-ex', 'br-int')


def test_hybrid_plug_path_is_pif_qvo_qvb_tap():
    switch = provider_switch().vm('br-int', 'qvo1').view()
    found = topology.find_path('tap1', ip_links(*HYBRID_LINKS), switch)
    assert found.interfaces == ('eth1', 'qvo1', 'qvb1', 'tap1')
    assert found.via == (TO_BR_INT, (), ('qbr1',))
    assert found.encap == ()


def test_hybrid_is_told_by_the_veth_peer_not_by_names():
    # A veth named nothing like qvb/qvo is still the hybrid chain; a port
    # named qvb… that is no veth to the switch is a plain pif.
    switch = provider_switch().vm('br-int', 'ovsside').view()
    links = ip_links(('eth1', None, 'elsewhere'), ('brx', None, None),
                     ('lbside', 'brx', 'ovsside'),
                     ('ovsside', None, 'lbside'), ('tap1', 'brx', None))
    assert topology.find_path('tap1', links, switch).interfaces == (
        'eth1', 'ovsside', 'lbside', 'tap1')
    plain = ip_links(('qvbfake', 'brq', 'elsewhere'), ('brq', None, None),
                     ('tap1', 'brq', None))
    assert topology.find_path('tap1', plain, switch).interfaces == (
        'qvbfake', 'tap1')


class CountingLinks(topology.IpLinks):
    """IpLinks that count the veth peer and port lookups asked of them."""

    def __init__(self, text, where):
        super().__init__(text=text, where=where)
        self.peer_calls = 0
        self.port_calls = 0
        self.vxlan_calls = 0

    def peer(self, dev):
        self.peer_calls += 1
        return super().peer(dev)

    def ports(self, master):
        self.port_calls += 1
        return super().ports(master)

    def _vxlan(self, dev):
        self.vxlan_calls += 1
        return super()._vxlan(dev)


def test_a_shared_bridge_is_read_once_per_cycle_not_once_per_vif():
    # Many taps on one hybrid qbr: every vif asked each port of the
    # bridge for its veth peer (vifs² lookups a cycle).  The paths stay
    # what each vif alone gets.
    taps = [f'tap{n}' for n in range(40)]
    rows = HYBRID_LINKS + tuple((t, 'qbr1', None) for t in taps)
    links = ip_links(*rows, cls=CountingLinks)
    switch = provider_switch().vm('br-int', 'qvo1').view()
    found = [topology.find_path(t, links, switch) for t in taps]
    ports = len(links.ports('qbr1'))
    assert links.peer_calls <= ports
    assert links.port_calls <= 3
    for tap, path in zip(taps, found):
        alone = topology.find_path(tap, ip_links(*rows), provider_switch()
                                   .vm('br-int', 'qvo1').view())
        assert path == alone
        assert path.interfaces == ('eth1', 'qvo1', 'qvb1', tap)


def test_a_shared_linux_bridge_finds_its_pif_once_per_cycle():
    taps = [f'tap{n}' for n in range(40)]
    rows = (('eth1', 'br0', None), ('br0', None, None)) + tuple(
        (t, 'br0', None) for t in taps)
    links = ip_links(*rows, cls=CountingLinks)
    switch = provider_switch().view()
    found = [topology.find_path(t, links, switch) for t in taps]
    assert links.port_calls <= 3
    assert links.peer_calls <= len(rows)
    # Is the uplink a VXLAN port (``ip -d link`` in the capture
    # namespace)?  Asked once, not once per vif.
    assert links.vxlan_calls == 1
    assert all(f.interfaces == ('eth1', t) for f, t in zip(found, taps))


def test_vlan_parent_is_not_a_veth_peer():
    links = ip_links(('eth1', None, None), ('eth1.100', 'brq', 'eth1'),
                     ('brq', None, None), ('tap1', 'brq', None))
    assert links.peer('eth1.100') is None
    found = topology.find_path('tap1', links, provider_switch().view())
    assert found.interfaces == ('eth1.100', 'tap1')


def test_native_ovs_and_ovn_path_is_pif_tap():
    switch = provider_switch().vm('br-int', 'tap1').view()
    links = ip_links(('eth1', None, 'elsewhere'), ('tap1', None, None))
    found = topology.find_path('tap1', links, switch)
    assert found.interfaces == ('eth1', 'tap1')
    assert found.via == (TO_BR_INT,)


def test_kernel_datapath_master_is_not_a_linux_bridge():
    switch = provider_switch().vm('br-int', 'tap1').view()
    links = ip_links(('eth1', 'ovs-system', 'elsewhere'),
                     ('ovs-system', None, None),
                     ('tap1', 'ovs-system', None))
    assert topology.find_path('tap1', links, switch).interfaces == (
        'eth1', 'tap1')


def test_vxlan_pif_is_the_netdev_holding_local_ip():
    switch = (Switch().bridge('br-int').bridge('br-tun')
              .patch('br-int', 'patch-tun', 'br-tun', 'patch-int')
              .port('br-tun', 'vxlan-c6120002', type='vxlan',
                    options={'local_ip': '198.18.0.1',
                             'remote_ip': '198.18.0.2'})
              .vm('br-int', 'tap1'))
    links = ip_links(('eth1', None, 'elsewhere'), ('eth2', None, None),
                     ('tap1', None, None))
    found = topology.find_path('tap1', links, switch.view(
        {'198.18.0.1': 'eth1', '198.18.5.5': 'eth2'}))
    assert found.interfaces == ('eth1', 'tap1')
    assert found.encap == (vifpath.Encapsulation('vxlan', 4789),)
    assert found.via == (('vxlan-c6120002', 'br-tun', 'patch-int',
                          'patch-tun', 'br-int'),)


def test_tunnel_local_ip_on_an_internal_port_gives_its_bridge_uplink():
    switch = (Switch().bridge('br-int').bridge('br-tun').bridge('br-phy')
              .port('br-phy', 'eth1')
              .patch('br-int', 'patch-tun', 'br-tun', 'patch-int')
              .port('br-tun', 'vxlan-1', type='vxlan',
                    options={'local_ip': '198.18.0.1', 'dst_port': '8472',
                             'remote_ip': '198.18.0.2'})
              .port('br-tun', 'vxlan-2', type='vxlan',
                    options={'local_ip': '198.18.0.1', 'dst_port': '8472',
                             'remote_ip': '198.18.0.3'})
              .vm('br-int', 'tap1'))
    links = ip_links(('eth1', None, 'elsewhere'), ('br-phy', None, None),
                     ('tap1', None, None))
    found = topology.find_path('tap1', links,
                               switch.view({'198.18.0.1': 'br-phy'}))
    assert found.interfaces == ('eth1', 'tap1')
    assert found.encap == (vifpath.Encapsulation('vxlan', 8472),)
    assert found.via == (('br-phy', 'vxlan-1', 'vxlan-2', 'br-tun',
                          'patch-int', 'patch-tun', 'br-int'),)


def test_ovn_geneve_local_ip_from_ovn_encap_ip():
    switch = (Switch(external_ids={'ovn-encap-ip': '198.18.0.1',
                                   'ovn-encap-type': 'geneve'})
              .bridge('br-int')
              .port('br-int', 'ovn-chass2-0', type='geneve',
                    options={'remote_ip': '198.18.0.2', 'key': 'flow',
                             'csum': 'true'})
              .vm('br-int', 'tap1'))
    links = ip_links(('eth1', None, 'elsewhere'), ('tap1', None, None))
    found = topology.find_path('tap1', links,
                               switch.view({'198.18.0.1': 'eth1'}))
    assert found.interfaces == ('eth1', 'tap1')
    assert found.encap == (vifpath.Encapsulation('geneve', 6081),)
    assert found.via == (('ovn-chass2-0', 'br-int'),)


def test_provider_and_tunnel_on_the_same_pif_merge():
    # OVN with a localnet port on br-ex and Geneve whose encap address is
    # on br-ex's internal port: one pif either way.
    switch = (Switch(external_ids={'ovn-encap-ip': '198.18.0.1'})
              .bridge('br-int').bridge('br-ex').port('br-ex', 'eth1')
              .patch('br-int', 'patch-br-int-to-provnet',
                     'br-ex', 'patch-provnet-to-br-int')
              .port('br-int', 'ovn-chass2-0', type='geneve',
                    options={'remote_ip': '198.18.0.2'})
              .vm('br-int', 'tap1'))
    links = ip_links(('eth1', None, 'elsewhere'), ('tap1', None, None))
    found = topology.find_path('tap1', links,
                               switch.view({'198.18.0.1': 'br-ex'}))
    assert found.interfaces == ('eth1', 'tap1')
    assert found.encap == (vifpath.Encapsulation('geneve', 6081),)
    assert set(found.via[0]) == {
        'br-ex', 'patch-provnet-to-br-int', 'patch-br-int-to-provnet',
        'ovn-chass2-0', 'br-int'}


def two_uplinks():
    return (provider_switch().bridge('br-ex2').port('br-ex2', 'eth2')
            .patch('br-int', 'int-br-ex2', 'br-ex2', 'phy-br-int2'))


def test_two_uplinks_are_not_guessed():
    switch = two_uplinks().vm('br-int', 'tap1').view()
    links = ip_links(('eth1', None, None), ('eth2', None, None),
                     ('tap1', None, None))
    with pytest.raises(topology.TopologyError) as err:
        topology.find_path('tap1', links, switch)
    message = str(err.value)
    assert "'tap1'" in message and 'eth1' in message and 'eth2' in message
    assert 'set [netweaver] pif' in message


def test_bond_uplink_is_not_guessed():
    switch = (Switch().bridge('br-int').bridge('br-ex')
              .port('br-ex', 'bond0', members=('eth1', 'eth2'))
              .patch('br-int', 'int-br-ex', 'br-ex', 'phy-br-int')
              .vm('br-int', 'tap1').view())
    links = ip_links(('eth1', None, None), ('eth2', None, None),
                     ('tap1', None, None))
    with pytest.raises(topology.TopologyError, match='2 pifs'):
        topology.find_path('tap1', links, switch)


@pytest.mark.parametrize('network_type, pif, encap', [
    ('vlan', 'eth1', ()),
    ('flat', 'eth1', ()),
    ('vxlan', 'eth2', (vifpath.Encapsulation('vxlan', 4789),)),
])
def test_neutron_network_type_picks_the_uplink(network_type, pif, encap):
    switch = (provider_switch().bridge('br-tun')
              .patch('br-int', 'patch-tun', 'br-tun', 'patch-int')
              .port('br-tun', 'vxlan-1', type='vxlan',
                    options={'local_ip': '198.18.9.1'})
              .vm('br-int', 'qvo1', network_type=network_type))
    links = ip_links(*HYBRID_LINKS, ('eth2', None, None))
    found = topology.find_path('tap1', links,
                               switch.view({'198.18.9.1': 'eth2'}))
    assert found.interfaces == (pif, 'qvo1', 'qvb1', 'tap1')
    assert found.encap == encap


def test_neutron_local_network_is_not_measurable():
    switch = provider_switch().vm('br-int', 'tap1', network_type='local')
    links = ip_links(('eth1', None, None), ('tap1', None, None))
    with pytest.raises(topology.NotMeasurable, match="'local' network"):
        topology.find_path('tap1', links, switch.view())


def test_tunnel_without_local_ip_owner_is_not_guessed():
    switch = (Switch().bridge('br-int')
              .port('br-int', 'vxlan-1', type='vxlan',
                    options={'local_ip': '198.18.0.1'})
              .vm('br-int', 'tap1'))
    links = ip_links(('eth1', None, None), ('tap1', None, None))
    with pytest.raises(topology.TopologyError,
                       match='no netdev holds local_ip 198.18.0.1'):
        topology.find_path('tap1', links, switch.view({}))


def test_dpdk_uplink_has_no_netdev():
    switch = (Switch().bridge('br-int').port('br-int', 'dpdk0',
                                             type='dpdk')
              .vm('br-int', 'tap1'))
    links = ip_links(('tap1', None, None))
    with pytest.raises(topology.TopologyError, match="'dpdk' port"):
        topology.find_path('tap1', links, switch.view())


def test_tap_neither_bridged_nor_on_the_switch():
    links = ip_links(('eth1', None, None), ('tap1', None, None))
    with pytest.raises(topology.TopologyError,
                       match='not an interface of Open vSwitch'):
        topology.find_path('tap1', links, provider_switch().view())


def failing_view(exc):
    def snapshot():
        raise exc
    return topology.SwitchView(snapshot, dict)


def test_unreadable_ovsdb_makes_ovs_vnics_unmeasurable_only():
    view = failing_view(ovsdb.OvsdbError(
        'OVSDB at tcp:127.0.0.1:6640: cannot connect: refused'))
    links = ip_links(('eth1', 'brq', 'elsewhere'), ('brq', None, None),
                     ('tapl', 'brq', None), ('tapo', None, None),
                     *HYBRID_LINKS[1:])
    # A tap on a Linux bridge with a plain pif never reads the switch.
    assert topology.find_path('tapl', links, view).interfaces == (
        'eth1', 'tapl')
    assert view.reads == 0
    for tap in ('tapo', 'tap1'):
        with pytest.raises(topology.TopologyError) as err:
            topology.find_path(tap, links, view)
        assert "cannot read Open vSwitch's database" in str(err.value)
        assert 'tcp:127.0.0.1:6640' in str(err.value)
    assert view.reads == 1


def test_no_ovs_on_the_host_keeps_linux_bridge_behaviour():
    view = failing_view(ovsdb.OvsdbAbsent('OVSDB at unix:/x: no such file'))
    links = ip_links(('qbr1', None, None), ('qvb1', 'qbr1', 'qvo1'),
                     ('qvo1', None, 'qvb1'), ('tap1', 'qbr1', None))
    assert topology.find_path('tap1', links, view).interfaces == (
        'qvb1', 'tap1')


def test_disabled_ovs_lookup_names_the_option():
    links = ip_links(('eth1', None, None), ('tap1', None, None))
    with pytest.raises(topology.TopologyError, match='ovsdb_connection'):
        topology.find_path('tap1', links, topology.SwitchView())


def test_one_snapshot_for_many_vnics():
    switch = provider_switch().vm('br-int', 'tap1').vm('br-int', 'tap2')
    calls = []

    def snapshot():
        calls.append(1)
        return switch.snapshot()
    view = topology.SwitchView(snapshot, dict)
    links = ip_links(('eth1', None, None), ('tap1', None, None),
                     ('tap2', None, None))
    for tap in ('tap1', 'tap2', 'tap1'):
        assert topology.find_path(tap, links, view).interfaces[0] == 'eth1'
    assert len(calls) == 1


def test_configured_pif_wins_and_keeps_the_switch_hops():
    switch = two_uplinks().vm('br-int', 'qvo1').view()
    links = ip_links(*HYBRID_LINKS, ('eth2', None, None))
    found = topology.find_path('tap1', links, switch, configured='eth2')
    assert found.interfaces == ('eth2', 'qvo1', 'qvb1', 'tap1')
    assert found.via[0] == ('br-ex2', 'phy-br-int2', 'int-br-ex2', 'br-int')


def test_configured_pif_contradicting_the_switch_is_warned(caplog):
    switch = provider_switch().vm('br-int', 'tap9').view()
    links = ip_links(('eth1', None, None), ('eth7', None, None),
                     ('tap9', None, None))
    found = topology.find_path('tap9', links, switch, configured='eth7')
    assert found.interfaces == ('eth7', 'tap9') and found.via == ((),)
    assert 'eth7' in caplog.text and 'eth1' in caplog.text
    with pytest.raises(topology.TopologyError, match='does not exist'):
        topology.find_path('tap9', links, switch, configured='eth8')


def test_configured_pif_without_the_switch():
    view = failing_view(ovsdb.OvsdbError('OVSDB at unix:/x: refused'))
    links = ip_links(*HYBRID_LINKS, ('tapo', None, None))
    for tap in ('tap1', 'tapo'):
        found = topology.find_path(tap, links, view, configured='eth1')
        assert found.interfaces == ('eth1', tap) and found.via == ()


def test_vif_path_via_and_unseen():
    path = vifpath.VifPath(
        vif='tap1', address='198.18.0.10',
        interfaces=('eth1', 'qvo1', 'qvb1', 'tap1'),
        via=(TO_BR_INT, (), ('qbr1',)))
    assert path.unseen == TO_BR_INT + ('qbr1',)
    assert path.hop_via()[('qvb1', 'tap1')] == ('qbr1',)
    assert path.encap_port('vxlan') is None
    with pytest.raises(ValueError, match='via entries'):
        vifpath.VifPath(vif='tap1', address='198.18.0.10',
                        interfaces=('eth1', 'tap1'), via=((), ()))


def test_parse_addresses_of_ip_j_addr():
    text = json.dumps([
        {'ifname': 'lo', 'addr_info': [{'family': 'inet',
                                        'local': '127.0.0.1'}]},
        {'ifname': 'br-phy', 'addr_info': [
            {'family': 'inet', 'local': '198.18.0.1', 'prefixlen': 24},
            {'family': 'inet6', 'local': '2001:2::1'}]},
        {'ifname': 'eth9'}])
    assert topology.parse_addresses(text) == {
        '127.0.0.1': 'lo', '198.18.0.1': 'br-phy', '2001:2::1': 'br-phy'}
    with pytest.raises(topology.TopologyError, match='ip -j addr'):
        topology.parse_addresses('nope', 'host x')


def test_kernel_datapath_hybrid_needs_the_switch_even_without_socket():
    # qvo enslaved to ovs-system: Open vSwitch is there, whatever the
    # socket says; the path is not guessed as Linux bridge.
    view = failing_view(ovsdb.OvsdbAbsent('OVSDB at unix:/x: no such file'))
    links = ip_links(('qbr1', None, None), ('qvb1', 'qbr1', 'qvo1'),
                     ('qvo1', 'ovs-system', 'qvb1'), ('tap1', 'qbr1', None),
                     ('ovs-system', None, None))
    with pytest.raises(topology.TopologyError, match='unix:/x'):
        topology.find_path('tap1', links, view)


def test_veth_to_another_linux_bridge_stays_linux_bridge():
    view = failing_view(ovsdb.OvsdbError('OVSDB at unix:/x: refused'))
    links = ip_links(('brq', None, None), ('brx', None, None),
                     ('v1', 'brq', 'v2'), ('v2', 'brx', 'v1'),
                     ('tap1', 'brq', None))
    assert topology.find_path('tap1', links, view).interfaces == (
        'v1', 'tap1')
    assert view.reads == 0


# --- what the pollsters publish of a path ----------------------------------

def test_samples_name_the_devices_crossed_unseen():
    from netweaver_agent.agent import inspector
    from netweaver_agent.core import latency
    path = vifpath.VifPath(
        vif='tap1', address='198.18.0.10',
        interfaces=('eth1', 'qvo1', 'qvb1', 'tap1'),
        via=(TO_BR_INT, (), ('qbr1',)))
    stats = latency.DirectionStats.from_ns([5000, 7000])
    report = latency.LatencyReport(
        vif='tap1', pif='eth1', protocol='icmp', sent=2, ingress=stats,
        egress=stats, turnaround=stats,
        hops=tuple(latency.HopStats(a, b, stats) for a, b in
                   zip(path.interfaces, path.interfaces[1:])))
    window = types.SimpleNamespace(capture=types.SimpleNamespace(drops=0),
                                   session=7, duration_ns=1_000_000)
    md = inspector.latency_metadata(report, path, window, 'local')
    assert [(h['src'], h['dst'], h['via']) for h in md['latency_hops']] == [
        ('eth1', 'qvo1', list(TO_BR_INT)), ('qvo1', 'qvb1', []),
        ('qvb1', 'tap1', ['qbr1'])]
    assert md['path_unseen'] == list(TO_BR_INT) + ['qbr1']
    plain = vifpath.VifPath(vif='tap1', address='198.18.0.10',
                            interfaces=('eth1', 'tap1'))
    md = inspector.latency_metadata(report, plain, window, 'local')
    assert md['path_unseen'] == []


# --- Linux bridge with a VXLAN uplink (Neutron's linuxbridge agent) ----------

class VxlanLinks:
    """``ip_links`` rows plus :class:`topology.VxlanPort` of some ports."""

    def __init__(self, vxlans, *links):
        self._rows = ip_links(*links)
        self._vxlans = vxlans

    def exists(self, dev):
        return self._rows.exists(dev)

    def master(self, dev):
        return self._rows.master(dev)

    def ports(self, master):
        return self._rows.ports(master)

    def peer(self, dev):
        return self._rows.peer(dev)

    def bridge_veths(self, master):
        return self._rows.bridge_veths(master)

    def pif_candidates(self, master, prefixes):
        return self._rows.pif_candidates(master, prefixes)

    def vxlan(self, dev):
        return self._vxlans.get(dev)


def linuxbridge_vxlan(vxlan):
    return VxlanLinks({'vxlan-42': vxlan},
                      ('eth1', None, None), ('eth2', None, None),
                      ('brq1', None, None), ('vxlan-42', 'brq1', None),
                      ('tapaaa', 'brq1', None))


def test_linux_bridge_vxlan_uplink_enters_through_its_dev():
    links = linuxbridge_vxlan(topology.VxlanPort('vxlan-42', link='eth1',
                                                 local='198.18.254.2',
                                                 port=8472))
    found = topology.find_path('tapaaa', links, topology.SwitchView(
        addresses=lambda: {'198.18.254.2': 'eth2'}))
    assert found.interfaces == ('eth1', 'vxlan-42', 'tapaaa')
    assert found.via == ((), ('brq1',))
    assert found.encap == (vifpath.Encapsulation('vxlan', 8472),)


def test_linux_bridge_vxlan_without_dev_uses_the_local_address_owner():
    links = linuxbridge_vxlan(topology.VxlanPort('vxlan-42',
                                                 local='198.18.254.2'))
    found = topology.find_path('tapaaa', links, topology.SwitchView(
        addresses=lambda: {'198.18.254.2': 'eth2'}))
    assert found.interfaces == ('eth2', 'vxlan-42', 'tapaaa')


def test_linux_bridge_vxlan_with_no_known_underlay_is_not_guessed():
    links = linuxbridge_vxlan(topology.VxlanPort('vxlan-42',
                                                 local='198.18.254.9'))
    with pytest.raises(topology.TopologyError,
                       match="VXLAN port 'vxlan-42'.*set \\[netweaver\\] pif"):
        topology.find_path('tapaaa', links, topology.SwitchView(
            addresses=lambda: {}))


def test_linux_bridge_vxlan_configured_pif():
    links = linuxbridge_vxlan(topology.VxlanPort('vxlan-42', link='eth1'))
    view = topology.SwitchView(addresses=lambda: {})
    # The operator names the underlay: the VXLAN hop is kept.
    assert topology.find_path('tapaaa', links, view,
                              configured='eth1').interfaces == (
        'eth1', 'vxlan-42', 'tapaaa')
    # Another pif wins as configured, with nothing guessed in between.
    assert topology.find_path('tapaaa', links, view,
                              configured='eth2').interfaces == (
        'eth2', 'tapaaa')
