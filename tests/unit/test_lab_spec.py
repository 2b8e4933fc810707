"""The lab's spec (names, addresses, validation) and the delay records.

No namespaces here: the real lab is tested in tests/functional.
"""

import ipaddress
import socket

import pytest

from netweaver_agent.core import probe
from netweaver_agent.lab import delayer
from netweaver_agent.lab import spec as labspec
from tests import packets as pk


def test_names_are_nova_like_and_deterministic():
    spec = labspec.LabSpec(prefix='nwx1-', guests=3)
    again = labspec.LabSpec(prefix='nwx1-', guests=3)
    other = labspec.LabSpec(prefix='nwx2-', guests=3)
    guests = [spec.guest(i) for i in range(3)]
    assert guests == [again.guest(i) for i in range(3)]
    assert [g.uuid for g in guests] != [other.guest(i).uuid
                                        for i in range(3)]
    g = guests[2]
    assert g.name == 'instance-00000003'
    assert g.netns == 'nwx1-g2'
    assert g.vif == 'tap' + g.port_id[:11]
    assert len(g.vif) == 14
    assert g.mac.startswith('fa:16:3e:') and g.vif_mac == 'fe' + g.mac[2:]
    assert len({x.mac for x in guests}) == 3
    assert [x.address for x in guests] == [
        '198.18.0.10', '198.18.0.11', '198.18.0.12']
    assert spec.bridge == 'brq' + spec.network_id[:11]
    assert len(spec.bridge) <= labspec.IFNAMSIZ
    assert spec.src_address == '198.18.0.1'
    assert spec.namespaces() == ['nwx1-src', 'nwx1-hv', 'nwx1-g0',
                                 'nwx1-g1', 'nwx1-g2']


def test_every_address_is_in_the_lab_range():
    spec = labspec.LabSpec(prefix='nwx-', guests=5, mgmt=True)
    addrs = [spec.src_address] + [spec.guest(i).address for i in range(5)]
    m = spec.mgmt_addresses()
    addrs += [m.mgmt, m.src, m.hv]
    for a in addrs:
        assert ipaddress.ip_address(a) in labspec.LAB_NET
    assert spec.namespaces()[-1] == 'nwx-mgmt'
    assert labspec.LabSpec(prefix='nwx-').mgmt_addresses() is None


@pytest.mark.parametrize('fields, message', [
    ({'prefix': 'bad/name'}, 'lab prefix'),
    ({'prefix': ''}, 'lab prefix'),
    ({'network': '10.0.0.0/24'}, 'must be a /28 or larger inside'),
    ({'network': '192.168.1.0/24'}, 'must be a /28 or larger inside'),
    ({'network': '198.18.0.0/30'}, 'must be a /28'),
    ({'network': '2001:2::/64'}, 'lab network 2001:2::/64 must be'),
    ({'ipv6': True, 'network6': '2001:db8::/64'}, 'IPv6 network .* inside'),
    ({'ipv6': True, 'network6': '2001:2::/121'}, 'must be a /120'),
    ({'ipv6': True, 'network6': '198.18.0.0/24'}, 'IPv6 network'),
    ({'ipv6': True, 'network6': 'nonsense'}, "IPv6 network 'nonsense'"),
    ({'guests': 0}, 'lab guests'),
    ({'guests': 300, 'network': '198.18.0.0/24'},
     r'lab guests 300 do not fit lab network 198\.18\.0\.0/24'),
    ({'guests': 2000}, r"lab guests 2000 must be within .* 'linuxbridge'"),
    ({'guests': 251, 'switch': 'ovs-hybrid'},
     r"lab guests 251 must be within .* 'ovs-hybrid'"),
    ({'guests': 251, 'switch': 'ovn'}, r"lab guests 251 .* 'ovn'"),
    ({'guests': True}, 'lab guests True is not a number'),
    ({'guests': '5'}, "lab guests '5' is not a number"),
    ({'network': '198.18.0.0/16'},
     r'lab network 198\.18\.0\.0/16 overlaps the underlay network'),
    ({'network': '198.18.254.0/23'}, 'overlaps the underlay network'),
    ({'network': '198.19.0.0/22'},
     r'lab network 198\.19\.0\.0/22 overlaps the management network'),
    ({'network': '198.18.0.0/15'}, 'overlaps the underlay'),
    ({'network': '198.18.0.5/22'}, r"lab network '198\.18\.0\.5/22'"),
    ({'network': '198.18.0.0/22', 'underlay': '198.18.2.0/24'},
     r'overlaps the underlay network 198\.18\.2\.0/24'),
    ({'pif': 'a-very-long-interface'}, 'pif name'),
    ({'mgmt': True, 'mgmt_network': '198.18.0.0/23'}, 'overlaps'),
    ({'delays': (labspec.DelayInjection(guest=2, delay_ms=1),)}, 'guest 2'),
    ({'losses': (labspec.LossInjection(guest=-1, every=10),)}, 'guest -1'),
    ({'delays': (labspec.DelayInjection(guest=0, delay_ms=1),
                 labspec.DelayInjection(guest=0, delay_ms=2))}, 'two delays'),
])
def test_spec_rejects(fields, message):
    fields.setdefault('prefix', 'nwx-')
    with pytest.raises(ValueError, match=message):
        labspec.LabSpec(**fields)


def test_default_network_is_one_24_up_to_what_it_holds():
    small = labspec.LabSpec(prefix='nwx-', guests=245)
    assert small.network == '198.18.0.0/24' and small.prefixlen == 24
    assert small.guest(244).address == '198.18.0.254'
    assert labspec.LabSpec(prefix='nwx-', guests=246).network == \
        '198.18.0.0/23'
    assert labspec.network_for(1000) == '198.18.0.0/22'
    # An explicit network is kept as given.
    assert labspec.LabSpec(prefix='nwx-', guests=2,
                           network='198.18.8.0/21').network == '198.18.8.0/21'


def test_a_thousand_guests_past_the_first_24():
    spec = labspec.LabSpec(prefix='nwk-', guests=1000)
    net = ipaddress.ip_network(spec.network)
    assert net.prefixlen < 24 and spec.prefixlen == net.prefixlen
    guests = [spec.guest(i) for i in range(1000)]
    assert guests[300].address == '198.18.1.54'
    assert guests[245].address == '198.18.0.255'
    assert guests[246].address == '198.18.1.0'
    assert guests[999].address == '198.18.3.241'
    for field in ('address', 'mac', 'vif_mac', 'vif', 'netns', 'uuid',
                  'port_id', 'name'):
        assert len({getattr(g, field) for g in guests}) == 1000, field
    addresses = {ipaddress.ip_address(g.address) for g in guests}
    assert all(a in net for a in addresses)
    assert ipaddress.ip_address(spec.src_address) not in addresses
    assert net.broadcast_address not in addresses
    assert {g.prefixlen for g in guests} == {net.prefixlen}
    assert all(len(g.vif) <= labspec.IFNAMSIZ for g in guests)
    # The first 256 guests keep the MACs a smaller lab gives them.
    small = labspec.LabSpec(prefix='nwk-', guests=245)
    assert [g.mac for g in guests[:245]] == [small.guest(i).mac
                                             for i in range(245)]
    six = labspec.LabSpec(prefix='nwk-', guests=1000, ipv6=True)
    assert six.guest(300).address6 == '2001:2::136'
    assert len({six.guest(i).address6 for i in range(1000)}) == 1000


def test_the_largest_network_still_fits_exactly():
    spec = labspec.LabSpec(prefix='nwx-', guests=1013,
                           network='198.18.0.0/22')
    assert spec.guest(1012).address == '198.18.3.254'
    with pytest.raises(ValueError, match='lab guests 1014 do not fit'):
        labspec.LabSpec(prefix='nwx-', guests=1014, network='198.18.0.0/22')
    assert labspec.LabSpec(prefix='nwx-', guests=1014).network == \
        '198.18.0.0/21'


@pytest.mark.parametrize('make, message', [
    (lambda: labspec.DelayInjection(guest=0, delay_ms=0), 'injected delay'),
    (lambda: labspec.DelayInjection(guest=0, delay_ms=1, backend='x'),
     'backend'),
    (lambda: labspec.DelayInjection(guest=0, delay_ms=1, protocol='sctp'),
     'protocol'),
    (lambda: labspec.LossInjection(guest=0, every=1), 'loss every'),
])
def test_injection_rejects(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_loss_pct():
    assert labspec.LossInjection(guest=0, every=10).loss_pct == 10.0


def test_delay_record_lines_round_trip():
    recs = [delayer.DelayRecord(7, 12, False, 10, 2_000_020, 2_000_010),
            delayer.DelayRecord(7, 13, True, 11, 12, 1),
            delayer.DelayRecord(None, None, False, 1, 2, 1)]
    for r in recs:
        assert delayer.DelayRecord.from_line(r.to_line()) == r
    assert recs[0].key == probe.ProbeKey(7, 12)
    assert recs[2].key is None
    with pytest.raises(ValueError, match='6'):
        delayer.DelayRecord.from_line('1 2 3')


def test_read_records_ignores_a_partial_last_line(tmp_path):
    path = tmp_path / 'r'
    rec = delayer.DelayRecord(1, 2, False, 3, 4, 1)
    path.write_text(rec.to_line() * 2 + '1 2 0 3')
    assert delayer.read_records(path) == [rec, rec]
    assert delayer.read_records(tmp_path / 'missing') == []
    path.write_text('garbage\n')
    with pytest.raises(delayer.DelayerError, match='r:1'):
        delayer.read_records(path)


@pytest.mark.parametrize('proto', probe.PROTOCOLS)
def test_packet_key_of_a_probe(proto):
    seq = probe.tcp_ident(40000, 17) if proto == 'tcp' else 17
    data = probe.build_ip(proto, 4242, seq, socket.inet_aton('198.18.0.1'),
                          socket.inet_aton('198.18.0.10'))
    assert delayer.packet_key(data) == pk.wire_key(proto, 4242, seq)
    assert delayer.packet_key(b'\x45junk') is None


def test_network_type_defaults_and_vxlan_vni_alias():
    flat = labspec.LabSpec(prefix='nwx-')
    assert (flat.switch, flat.network_type, flat.segmentation_id) == \
        ('linuxbridge', 'flat', None)
    assert flat.underlay_addresses() is None and flat.vxlan_dev is None
    old = labspec.LabSpec(prefix='nwx-', vxlan_vni=4242)
    new = labspec.LabSpec(prefix='nwx-', network_type='vxlan',
                          segmentation_id=4242)
    for spec in (old, new):
        assert spec.network_type == 'vxlan'
        assert spec.segmentation_id == spec.vxlan_vni == 4242
        assert spec.vxlan_dev == 'vxlan-4242'
        assert spec.underlay_addresses() is not None
    # A tunnel or VLAN with no id gets one, in range.
    vx = labspec.LabSpec(prefix='nwx-', network_type='vxlan')
    assert vx.vxlan_vni == vx.segmentation_id and 1 <= vx.vxlan_vni
    vlan = labspec.LabSpec(prefix='nwx-', switch='ovs-hybrid',
                           network_type='vlan')
    assert 1 <= vlan.segmentation_id <= 4094
    assert vlan.underlay_addresses() is None


@pytest.mark.parametrize('fields, message', [
    ({'switch': 'openflow'}, "unknown lab switch 'openflow'"),
    ({'network_type': 'gre'}, "unknown lab network type 'gre'"),
    ({'network_type': 'vlan'}, "'linuxbridge' builds no vlan"),
    ({'switch': 'ovs-native', 'network_type': 'geneve'},
     "'ovs-native' builds no geneve"),
    ({'network_type': 'flat', 'segmentation_id': 5}, 'flat network'),
    ({'switch': 'ovs-hybrid', 'network_type': 'vlan',
      'segmentation_id': 4095}, 'VLAN id 4095'),
    ({'switch': 'ovs-hybrid', 'network_type': 'vlan',
      'segmentation_id': 0}, 'VLAN id 0'),
    ({'network_type': 'vxlan', 'segmentation_id': 1 << 24}, 'VXLAN VNI'),
    ({'vxlan_vni': 0}, 'VXLAN VNI 0'),
    ({'vxlan_vni': 7, 'network_type': 'flat'}, 'vxlan_vni 7 given'),
    ({'vxlan_vni': 7, 'segmentation_id': 8}, 'differ'),
    ({'network_type': 'vxlan', 'underlay': '198.18.0.0/23'}, 'overlaps'),
])
def test_spec_rejects_switch_and_network(fields, message):
    with pytest.raises(ValueError, match=message):
        labspec.LabSpec(prefix='nwx-', **fields)
