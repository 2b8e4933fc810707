"""From a libvirt domain to a VifPath: netdev, pif, address."""

import os
import subprocess
from xml.etree import ElementTree

import pytest

from netweaver_agent import labvirt
from netweaver_agent import topology

NOVA = labvirt.NOVA_NS


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
    guest = labvirt.GuestDomain(index=2, name='web', uuid='u-1',
                                tap='tapzzz', mac='fa:16:3e:00:00:09',
                                address='198.18.1.12', bridge='brq1',
                                port_uuid='pz')
    node = ElementTree.fromstring(labvirt.node_xml([guest]))
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


# --- address -------------------------------------------------------------

def test_address_order_filterref_then_nova_then_neighbours():
    calls = []

    def neighbours():
        calls.append(1)
        return {'fa:16:3e:00:00:03': '198.18.1.13'}

    xml = domain_xml(
        bridge_iface('tapaaa', 'fa:16:3e:00:00:01', ip='198.18.1.10') +
        bridge_iface('tap' + 'p2xxxxxxxxx-yyyy'[:11], 'fa:16:3e:00:00:02') +
        bridge_iface('tapccc', 'FA:16:3E:00:00:03'),
        port('p2xxxxxxxxx-yyyy', '198.18.1.11') +
        port('fa-16-3e-01', '198.18.1.99'))
    dom = topology.parse_domain(xml)
    a, b, c = dom.interfaces
    # The filterref wins even when a nova port also matches.
    assert topology.target_address(dom, a, neighbours) == ('198.18.1.10',
                                                           'filterref')
    # tap + 11 characters of the port uuid: nova's tap naming.
    assert topology.target_address(dom, b, neighbours) == (
        '198.18.1.11', 'nova-metadata')
    assert calls == []
    assert topology.target_address(dom, c, neighbours) == ('198.18.1.13',
                                                           'neighbours')
    assert calls == [1]


def test_address_from_port_by_interfaceid():
    dom = topology.parse_domain(domain_xml(
        bridge_iface('qvoxyz', 'fa:16:3e:00:00:02', interfaceid='p2'),
        port('p1', '198.18.1.10') + port('p2', '198.18.1.11')))
    assert topology.target_address(dom, dom.interfaces[0]) == (
        '198.18.1.11', 'nova-metadata')


def test_no_address_names_the_vnic_and_sources():
    dom = topology.parse_domain(domain_xml(
        bridge_iface('tapaaa', 'fa:16:3e:00:00:01') +
        bridge_iface('tapbbb', 'fa:16:3e:00:00:02'),
        port('p1', '198.18.1.10')))
    with pytest.raises(topology.TopologyError,
                       match='tapaaa.*filterref.*nova.*neighbour'):
        topology.target_address(dom, dom.interfaces[0], lambda: {})


def test_read_neighbours_of_a_real_namespace():
    # Our own namespace's table: whatever it holds, the shape is right.
    table = topology.read_neighbours()
    assert all(':' in mac and '.' in ip for mac, ip in table.items())


def test_resolve_builds_the_path(sysfs):
    links = sysfs({'brq1': None, 'eth1': 'brq1', 'tapaaa': 'brq1'})
    dom = topology.parse_domain(domain_xml(
        bridge_iface('tapaaa', 'fa:16:3e:00:00:01', ip='198.18.1.10')))
    path = topology.resolve(dom, dom.interfaces[0],
                            topology.LibvirtResolver(), links,
                            vif_prefixes=('tap',))
    assert path == topology.VifPath(vnic='tapaaa', address='198.18.1.10',
                                    interfaces=('eth1', 'tapaaa'),
                                    mac='fa:16:3e:00:00:01')
    assert path.spec().interfaces == ('eth1', 'tapaaa')


def test_resolve_names_a_vanished_vif(sysfs):
    dom = topology.parse_domain(domain_xml(
        bridge_iface('tapgone', 'fa:16:3e:00:00:01', ip='198.18.1.10')))
    with pytest.raises(topology.TopologyError,
                       match="vif 'tapgone' of domain instance-00000001"):
        topology.resolve(dom, dom.interfaces[0], topology.LibvirtResolver(),
                         sysfs({'eth1': None}))


def test_ip_links_reads_a_real_bridge_in_a_namespace():
    import secrets
    ns = f'nwtopo{os.getpid()}{secrets.token_hex(2)}'
    if os.geteuid() != 0:
        pytest.fail('this test builds a network namespace and needs root')
    subprocess.run(['ip', 'netns', 'add', ns], check=True)
    try:
        for argv in (['link', 'add', 'br0', 'type', 'bridge'],
                     ['link', 'add', 'eth1', 'type', 'veth', 'peer', 'name',
                      'tapx'],
                     ['link', 'set', 'eth1', 'master', 'br0'],
                     ['link', 'set', 'tapx', 'master', 'br0']):
            subprocess.run(['ip', '-n', ns, *argv], check=True)
        links = topology.IpLinks(ns)
        assert links.ports('br0') == ['eth1', 'tapx']
        assert topology.find_pif('tapx', links, ('tap',)) == 'eth1'
    finally:
        subprocess.run(['ip', 'netns', 'del', ns], check=True)
