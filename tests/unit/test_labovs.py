"""The lab's switch layouts without namespaces: names, paths, libvirt XML,
marked VLAN frames, the ``netweaver lab`` switch options.

The layouts themselves run in tests/functional/test_lab_ovs.py.
"""

import io
import socket
import struct
import time
from xml.etree import ElementTree  # nosec B405: our own XML

import dpkt
import pytest

from netweaver_agent.agent import topology
from netweaver_agent.cli import lab as cmd_lab
from netweaver_agent.cli import main
from netweaver_agent.core import probe
from netweaver_agent.lab import build
from netweaver_agent.lab import delayer
from netweaver_agent.lab import mark
from netweaver_agent.lab import ofdelay
from netweaver_agent.lab import ovs
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import switch as labswitch
from netweaver_agent.lab import virt


def make_lab(**fields):
    return build.Lab(labspec.LabSpec(prefix='nwu-', guests=2, **fields))


def interface_of(the_lab, guest):
    xml = ElementTree.tostring(
        virt.domain_element(the_lab.guest_domain(guest)), 'unicode')
    dom = topology.parse_domain(xml)
    (iface,) = dom.interfaces
    return iface


def test_hybrid_names_and_path_are_os_vif_s():
    the_lab = make_lab(switch='ovs-hybrid')
    g = the_lab.guests[0]
    qbr, qvb, qvo = ovs.port_names(g)
    # os-vif: the 11 characters of the port id after the prefix, 14 in all.
    for name, prefix in ((qbr, 'qbr'), (qvb, 'qvb'), (qvo, 'qvo')):
        assert name == prefix + g.vif[3:] and len(name) == 14
    path = the_lab.paths()[0]
    assert path.interfaces == (the_lab.spec.pif, qvo, qvb, g.vif)
    assert path.via[1:] == ((), (qbr,))
    assert 'br-int' in path.via[0] and 'br-ex' in path.via[0]
    assert path.encap == ()
    assert the_lab.layout.bridge == 'br-int'


def test_native_vxlan_path_crosses_the_tunnel_unseen():
    the_lab = make_lab(switch='ovs-native', network_type='vxlan')
    path = the_lab.paths()[1]
    assert path.interfaces == (the_lab.spec.pif, the_lab.guests[1].vif)
    (via,) = path.via
    src_u, _, _ = the_lab.spec.underlay_addresses()
    tunnel = 'vxlan-' + socket.inet_aton(src_u).hex()
    assert tunnel in via and 'br-tun' in via and via[-1] == 'br-int'
    assert path.encap_port('vxlan') == labswitch.VXLAN_PORT


def test_linuxbridge_path_unchanged_with_its_bridge_named():
    the_lab = make_lab()
    g = the_lab.guests[0]
    path = the_lab.paths()[0]
    assert path.interfaces == (the_lab.spec.pif, g.vif)
    assert path.via == ((the_lab.spec.bridge,),)


def test_domain_xml_per_layout_as_nova_writes_it():
    lb, hybrid, native = (make_lab(switch=s) for s in
                          ('linuxbridge', 'ovs-hybrid', 'ovs-native'))
    g = lb.guests[0]
    iface = interface_of(lb, g)
    assert (iface.type, iface.bridge, iface.target, iface.interface_id) == \
        ('bridge', lb.spec.bridge, g.vif, None)
    iface = interface_of(hybrid, g)
    assert (iface.type, iface.bridge, iface.target, iface.interface_id) == \
        ('bridge', ovs.port_names(g)[0], g.vif, None)
    iface = interface_of(native, g)
    assert (iface.type, iface.bridge, iface.target, iface.interface_id) == \
        ('bridge', 'br-int', g.vif, g.port_id)


class FakeSocket:
    def __init__(self):
        self.frames = []

    def send(self, data):
        self.frames.append(data)


def test_vlan_frames_every_nth_to_the_guest_marked():
    table = mark.MarkTable()
    table.add(mark.Mark(dst_ip='198.18.0.10', every=3, ttl=40,
                        protocol='icmp'))
    src = ovs.MarkingFrameSource(
        table, netns_name=None, ifname='eth0', src_mac='02:00:00:00:00:01',
        macs={'198.18.0.10': 'fa:16:3e:00:00:00',
              '198.18.0.11': 'fa:16:3e:00:00:01'}, vlan=(100,))
    src._protocol = 'icmp'
    sock = FakeSocket()
    sent = []
    for seq in range(7):
        for dst in ('198.18.0.10', '198.18.0.11'):
            ip = probe.build_ip('icmp', 7, seq, socket.inet_aton('198.18.0.1'),
                                socket.inet_aton(dst))
            frame = probe.ethernet_frame(ip, dpkt.ethernet.ETH_TYPE_IP,
                                         src.src_mac, src.macs[dst], (100,),
                                         0)
            sent.append((dst, seq, frame))
            src._transmit(sock, dst, frame)
    marked = []
    for (dst, seq, before), after in zip(sent, sock.frames):
        eth = dpkt.ethernet.Ethernet(after)
        assert [t.id for t in eth.vlan_tags] == [100]
        ip = eth.data
        header = after[18:18 + ip.hl * 4]
        assert sum(struct.unpack('!10H', header)) % 0xffff == 0, 'checksum'
        assert probe.parse_key(after) == probe.parse_key(before)
        if ip.ttl != 64:
            marked.append((dst, seq, ip.ttl))
        else:
            assert after == before
    assert marked == [('198.18.0.10', 2, 40), ('198.18.0.10', 5, 40)]


def parse(*argv):
    return main.build_parser().parse_args(['lab', *argv])


def test_cli_switch_defaults(monkeypatch):
    spec = cmd_lab._spec(parse('--prefix', 'nwu-'))
    assert (spec.switch, spec.network_type) == ('linuxbridge', 'flat')
    assert [d.delay_ms for d in spec.delays] == [cmd_lab.DEFAULT_DELAY_MS]
    native = cmd_lab._spec(parse('--prefix', 'nwu-', '--switch',
                                 'ovs-native', '--network-type', 'vlan'))
    assert (native.switch, native.network_type) == ('ovs-native', 'vlan')
    assert [d.delay_ms for d in native.delays] == [cmd_lab.DEFAULT_DELAY_MS]
    # A layout without delay truth: no default delay; one asked for is
    # kept (the build then says why it cannot be made).
    monkeypatch.setattr(ovs.OvsNativeLayout, 'delay_truth', None)
    native = cmd_lab._spec(parse('--prefix', 'nwu-', '--switch',
                                 'ovs-native'))
    assert native.delays == ()
    asked = cmd_lab._spec(parse('--prefix', 'nwu-', '--switch', 'ovs-native',
                                '--delay-ms', '1'))
    assert [d.delay_ms for d in asked.delays] == [1.0]
    hybrid = cmd_lab._spec(parse('--prefix', 'nwu-', '--switch',
                                 'ovs-hybrid'))
    assert [d.delay_ms for d in hybrid.delays] == [cmd_lab.DEFAULT_DELAY_MS]


def test_cli_rejects_a_network_the_switch_cannot_build():
    with pytest.raises(ValueError, match="'linuxbridge' builds no vlan"):
        cmd_lab._spec(parse('--prefix', 'nwu-', '--network-type', 'vlan'))
    with pytest.raises(SystemExit):
        parse('--switch', 'openflow')


def test_openflow_packet_in_and_out_wire_format():
    frame = bytes(range(60))
    # OXM match: in_port=7 and eth_type=0x0800: 18 bytes, padded to 24.
    oxms = struct.pack('!IIIH', 0x80000004, 7, 0x80000a02, 0x0800)
    match = struct.pack('!HH', 1, 4 + len(oxms)) + oxms
    match += b'\0' * (-len(match) % 8)
    body = struct.pack('!IHBBQ', 0xffffffff, len(frame), 1, 60, 0) + \
        match + b'\0\0' + frame
    assert ofdelay.parse_packet_in(body) == (7, frame)
    with pytest.raises(ValueError, match='in_port'):
        ofdelay.parse_packet_in(body[:16] + struct.pack('!HH4x', 1, 4)
                                + b'\0\0' + frame)
    out = ofdelay.packet_out(9, 7, 3, frame)
    version, msg_type, length, xid = struct.unpack_from('!BBHI', out)
    assert (version, msg_type, length, xid) == (4, 13, len(out), 9)
    buffer_id, in_port, actions_len = struct.unpack_from('!IIH', out, 8)
    assert (buffer_id, in_port) == (0xffffffff, 7)
    actions = out[24:24 + actions_len]
    # POP_VLAN, then OUTPUT to port 3.
    assert struct.unpack_from('!HH', actions) == (18, 8)
    assert struct.unpack_from('!HHI', actions, 8) == (0, 16, 3)
    assert out[24 + actions_len:] == frame


class _SlowSwitch:
    """A switch connection that takes 1 ms to accept a packet-out and
    notes when each was handed over (the earliest a guest could see it)."""

    def __init__(self):
        self.handed = []

    def sendall(self, data):
        self.handed.append(time.time_ns())
        time.sleep(0.001)


@pytest.mark.parametrize('keys', delayer.KEYS)
def test_openflow_controller_records_the_release_before_the_packet_out(keys):
    """A hold's recorded release is read before the packet goes back, so
    it is never later than the guest's tap seeing it, however long the
    controller takes to send it."""
    records = io.StringIO()
    controller = ofdelay.Controller('/nonexistent', 3, 0, records, keys=keys)
    switch = _SlowSwitch()
    for _ in range(3):
        controller.hold((7, bytes(60)))
    controller._release_due(switch, everything=True)
    lines = records.getvalue().splitlines()
    parse = (delayer.PassiveHold if keys == 'passive'
             else delayer.DelayRecord).from_line
    released = [parse(line).released_ns for line in lines]
    assert len(released) == len(switch.handed) == 3
    assert all(r <= h for r, h in zip(released, switch.handed)), (
        released, switch.handed)
