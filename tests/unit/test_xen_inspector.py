"""A Xen vNIC, end to end through the inspector path.

libvirt's ``test:///`` driver (the real libvirt library, a recorded node
of Xen domains) is read by Ceilometer's real ``LibvirtInspector``, as in
the polling agent; the agent's :class:`inspector.LatencyInspector`
(``vif_resolver = xen``) reads each domain with its Xen domain id and
resolves its vNICs over a recorded ``ip -j link`` of a Xen host: backend
netdevs ``vif<domid>.<devid>`` on bridge ``xenbr0`` beside the pif.  The
test driver numbers running domains from 1 in node order, so the domain
under test (the third) runs as domid 3: neither its interfaces' index nor
a lost (None or -1) domid can give its names.
"""

import json
import types

import pytest

from netweaver_agent.agent import topology
from tests.unit import pollsterfakes

XEN_UUID = '0b5e7a1c-3d2f-4e6a-9b8c-1d2e3f4a5b6c'
OFF_UUID = '0b5e7a1c-3d2f-4e6a-9b8c-1d2e3f4a5b6d'
NODE = '''<node>
  <domain type='xen'><name>dom-a</name>
    <uuid>0b5e7a1c-3d2f-4e6a-9b8c-00000000000a</uuid>
    <memory>131072</memory><os><type>xen</type></os></domain>
  <domain type='xen'><name>dom-b</name>
    <uuid>0b5e7a1c-3d2f-4e6a-9b8c-00000000000b</uuid>
    <memory>131072</memory><os><type>xen</type></os></domain>
  <domain type='xen'><name>instance-0000002a</name>
    <uuid>{xen}</uuid>
    <memory>131072</memory><os><type>xen</type></os>
    <devices>
      <interface type='bridge'><mac address='fa:16:3e:2a:00:01'/>
        <source bridge='xenbr0'/><script path='vif-bridge'/>
        <filterref filter='nova-instance-0000002a-fa163e2a0001'>
          <parameter name='IP' value='198.18.2.10'/></filterref>
      </interface>
      <interface type='bridge'><mac address='fa:16:3e:2a:00:02'/>
        <source bridge='xenbr0'/><script path='vif-bridge'/>
        <filterref filter='nova-instance-0000002a-fa163e2a0002'>
          <parameter name='IP' value='198.18.2.11'/></filterref>
      </interface>
    </devices></domain>
  <domain type='xen'><name>instance-0000002b</name>
    <uuid>{off}</uuid>
    <memory>131072</memory><os><type>xen</type></os>
    <devices>
      <interface type='bridge'><mac address='fa:16:3e:2b:00:01'/>
        <source bridge='xenbr0'/></interface>
    </devices>
    <runstate xmlns='http://libvirt.org/schemas/domain/test/1.0'>5</runstate>
  </domain>
</node>
'''.format(xen=XEN_UUID, off=OFF_UUID)
# 'ip -j link show' of the Xen host (trimmed to the fields read).
LINKS = json.dumps([
    {'ifindex': 2, 'ifname': 'eth1', 'master': 'xenbr0'},
    {'ifindex': 3, 'ifname': 'xenbr0'},
    {'ifindex': 7, 'ifname': 'vif1.0', 'master': 'xenbr0'},
    {'ifindex': 8, 'ifname': 'vif3.0', 'master': 'xenbr0'},
    {'ifindex': 9, 'ifname': 'vif3.1', 'master': 'xenbr0'},
])


@pytest.fixture
def prober(tmp_path):
    node = tmp_path / 'node.xml'
    node.write_text(NODE)
    yield from pollsterfakes.libvirt_inspector(f'test://{node}',
                                               vif_resolver='xen')


def _paths(prober, uuid):
    instance = types.SimpleNamespace(id=uuid, name='xen-guest')
    vnics, domain = prober._inspect(instance)
    links = topology.IpLinks(text=LINKS, where='the recorded Xen host')
    out = []
    for vnic in vnics:
        iface = domain.interface(target=vnic.name, mac=vnic.mac)
        out.append(prober._resolve(instance, domain, iface, vnic, links))
    return domain, out


def test_a_xen_vnic_resolves_to_vif_domid_devid(prober):
    domain, paths = _paths(prober, XEN_UUID)
    assert domain.domain_type == 'xen'
    assert [(p.vif, p.pif, p.address) for p in paths] == [
        ('vif3.0', 'eth1', '198.18.2.10'),
        ('vif3.1', 'eth1', '198.18.2.11')]


def test_a_shut_off_xen_domain_has_no_domid_and_no_vif(prober, caplog):
    # Its vNICs are not listed at all: a stopped domain is no vif.
    instance = types.SimpleNamespace(id=OFF_UUID, name='stopped')
    assert prober._inspect(instance) is None
    dom = prober.libvirt.connection.lookupByUUIDString(OFF_UUID)
    info = prober.domain(instance)
    assert dom.ID() == -1 and info.domid is None
    with pytest.raises(topology.TopologyError, match='Xen domain id'):
        topology.XenResolver().netdev(info, info.interfaces[0])
