"""IPv6, VLAN, VXLAN and Geneve probes: keys, encapsulation, the capture
filter.

The capture's classic BPF program is run here by a small interpreter of
the instructions it uses (the kernel runs it in the functional tests).
"""

import itertools
import struct

import dpkt
import pytest

from netweaver_agent.cli import report
from netweaver_agent.core import capture
from netweaver_agent.core import latency
from netweaver_agent.core import pcapkeys
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from netweaver_agent.core import vifpath
from tests import packets as pk
from tests.packets import frame4
from tests.packets import frame6
from tests.packets import reply6
from tests.packets import seq_of
from tests.unit import fakes
from tests.unit.bpf import run_bpf

V6 = pk.V6
V4 = pk.V4


@pytest.mark.parametrize('proto', probe.PROTOCOLS)
def test_ipv6_probe_and_reply_keys(proto):
    f = frame6(proto, 4321, 99)
    seq = seq_of(proto, 99)
    assert f[12:14] == b'\x86\xdd'
    key = pk.wire_key(proto, 4321, seq)
    assert probe.parse_key(f) == key
    assert probe.parse_key(reply6(f)) == pk.wire_key(proto, 4321, seq, True)
    if proto != 'tcp':          # TCP carries no session
        assert probe.parse_key(f, session=4322) is None
    assert probe.parse_packet_key(f[14:]) == key
    assert pcapkeys.frame_key(f, 0, len(f)) == (key.session, key.seq << 1)
    # A valid transport checksum over the IPv6 pseudo-header.
    ip = f[14:]
    pseudo = ip[8:40] + struct.pack('!IxxxB', len(ip) - 40, ip[6])
    data = pseudo + ip[40:]
    data += bytes(len(data) % 2)
    total = sum(struct.unpack(f'!{len(data) // 2}H', data))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    assert total == 0xffff


def test_ipv6_extension_headers_are_not_probes():
    f = bytearray(frame6('icmp', 1, 2))
    f[20] = 0                       # hop-by-hop options in front
    assert probe.parse_key(bytes(f)) is None


@pytest.mark.parametrize('vlan', [(), (7,), (300, 7)])
def test_vlan_tags_give_their_ids(vlan):
    f = probe.build_frame('udp', 5, 6, V4[0], V4[1], pk.MAC_A, pk.MAC_B,
                          vlan=vlan, priority=5)
    key, encap = probe.parse_frame(f)
    assert key == probe.ProbeKey(5, 6)
    assert encap == probe.Encap(vlan=vlan)
    expect = (5, 12) if not vlan else (5, 12, probe.Encap(vlan=vlan))
    assert pcapkeys.frame_key(f, 0, len(f)) == expect
    # Three tags: more than we read.
    triple = f[:12] + b'\x81\x00\x00\x01' * 3 + f[12:]
    assert probe.parse_frame(triple) is None


@pytest.mark.parametrize('v6_underlay', [False, True])
@pytest.mark.parametrize('inner6', [False, True])
def test_vxlan_keys_by_the_inner_frame(v6_underlay, inner6):
    inner = (frame6('icmp', 9, 10, vlan=(12,)) if inner6 else
             probe.build_frame('icmp', 9, 10, V4[0], V4[1], pk.MAC_A,
                               pk.MAC_B))
    outer = pk.vxlan(inner, 4242, v6_underlay=v6_underlay)
    assert probe.parse_frame(outer) == (probe.ProbeKey(9, 10),
                                        probe.Encap(vni=4242))
    assert pcapkeys.frame_key(outer, 0, len(outer)) == (
        9, 20, probe.Encap(vni=4242))
    # Not to a VXLAN port, or no I flag: foreign.
    other = pk.vxlan(inner, 4242, v6_underlay=v6_underlay, port=4790)
    assert probe.parse_frame(other) is None


OVN_OPTION = pk.geneve_option(0x0102, 0x80, b'\x00\x01\x00\x02')
GENEVE_OPTIONS = {
    0: b'',
    8: OVN_OPTION,
    24: OVN_OPTION + pk.geneve_option(0xffff, 0x01, bytes(12)),
}


def inner_frame(proto, inner6, vlan=()):
    if inner6:
        return frame6(proto, 9, 10, vlan=vlan)
    return frame4(proto, 9, 10, vlan=vlan)


@pytest.mark.parametrize('opt_len', sorted(GENEVE_OPTIONS))
@pytest.mark.parametrize('v6_underlay', [False, True])
@pytest.mark.parametrize('inner6', [False, True])
def test_geneve_keys_by_the_inner_frame(opt_len, v6_underlay, inner6):
    options = GENEVE_OPTIONS[opt_len]
    assert len(options) == opt_len
    want = probe.Encap(vni=0xabcdef, tunnel='geneve')
    # (TCP keys hold the probe's port: their keys are checked elsewhere.)
    for proto in ('icmp', 'udp'):
        for inner in (inner_frame(proto, inner6),
                      inner_frame(proto, inner6, vlan=(12,))):
            outer = pk.geneve(inner, 0xabcdef, options=options,
                              v6_underlay=v6_underlay)
            assert probe.parse_frame(outer) == (probe.ProbeKey(9, 10), want)
            assert pcapkeys.frame_key(outer, 0, len(outer)) == (9, 20, want)
        # The guest's answer, carried back the same way.
        inner = inner_frame(proto, inner6)
        back = reply6(inner) if inner6 else pk.reply(inner)
        outer = pk.geneve(back, 0xabcdef, options=options,
                          v6_underlay=v6_underlay)
        assert pcapkeys.frame_key(outer, 0, len(outer)) == (9, 21, want)


def test_geneve_and_vxlan_are_told_apart():
    inner = inner_frame('icmp', False)
    gen = probe.parse_frame(pk.geneve(inner, 5))[1]
    vx = probe.parse_frame(pk.vxlan(inner, 5))[1]
    assert (gen.tunnel, gen.vni) == ('geneve', 5)
    assert (vx.tunnel, vx.vni) == ('vxlan', 5)
    assert gen != vx
    assert probe.Encap(vni=5) == vx
    assert probe.Encap().tunnel is None
    with pytest.raises(ValueError, match='gre'):
        probe.Encap(vni=5, tunnel='gre')


def test_tunnels_are_opened_once_not_nested():
    """A tunnel inside a tunnel is not a probe of ours (a guest's own
    overlay): neither the parser nor the fast path opens the inner one."""
    inner = inner_frame('icmp', False)
    for nested in (pk.geneve(pk.vxlan(inner, 1), 2),
                   pk.vxlan(pk.geneve(inner, 1), 2),
                   pk.geneve(pk.geneve(inner, 1), 2)):
        assert probe.parse_frame(nested) is None
        assert pcapkeys.frame_key(nested, 0, len(nested)) is None


@pytest.mark.parametrize('v6_underlay', [False, True])
def test_tunnels_on_configured_ports(v6_underlay):
    inner = inner_frame('icmp', False)
    gen = pk.geneve(inner, 5, port=7000, v6_underlay=v6_underlay)
    vx = pk.vxlan(inner, 6, port=4790, v6_underlay=v6_underlay)
    for frame in (gen, vx):
        assert probe.parse_frame(frame) is None
        assert pcapkeys.frame_key(frame, 0, len(frame)) is None
    ports = probe.tunnel_ports(vxlan_port=4790, geneve_port=7000)
    assert probe.tunnel_ports() == probe.TUNNEL_PORTS
    for frame, want in ((gen, probe.Encap(vni=5, tunnel='geneve')),
                        (vx, probe.Encap(vni=6, tunnel='vxlan'))):
        assert probe.parse_frame(frame, tunnels=ports) == (
            probe.ProbeKey(9, 10), want)
        for cut in range(len(frame) + 1):
            found = probe.parse_frame(frame[:cut], tunnels=ports)
            expect = None if found is None else (
                found[0].session, found[0].as_int(), found[1])
            assert pcapkeys.frame_key(frame, 0, cut, tunnels=ports) == \
                expect
    # The standard ports stay open beside the configured ones.
    std = pk.geneve(inner, 5)
    assert pcapkeys.frame_key(std, 0, len(std), tunnels=ports)[2].vni == 5


def test_live_encap_keeps_the_tunnel_kind():
    gen = probe.Encap(vni=9, tunnel='geneve')
    assert capture._live_encap(30, (1, 2, gen)) == probe.Encap(
        vlan=(30,), vni=9, tunnel='geneve')


@pytest.mark.parametrize('v6_underlay', [False, True])
def test_damaged_geneve_gives_no_key(v6_underlay):
    inner = inner_frame('icmp', False)
    opts24 = GENEVE_OPTIONS[24]

    def gnv(frame, **kwargs):
        return pk.geneve(frame, 1, v6_underlay=v6_underlay, **kwargs)

    bad = [
        # Options longer than the packet: the inner frame is not there.
        gnv(inner[:10], options=opts24),
        gnv(inner[:13], options=b''),
        gnv(inner, options=opts24, first=63),
        # Opt Len says 24 bytes, 8 are there: the inner frame is misread.
        gnv(inner, options=OVN_OPTION, first=6),
        # Version 1; not Ethernet inside; not to the Geneve port.
        gnv(inner, first=0x40 | 2),
        gnv(inner, ptype=dpkt.ethernet.ETH_TYPE_IP),
        gnv(inner, port=6082),
    ]
    for frame in bad:
        assert probe.parse_frame(frame) is None
        assert pcapkeys.frame_key(frame, 0, len(frame)) is None
    # Cut anywhere: no exception; the fast path agrees with the parser;
    # a key only once the whole inner probe is there.
    whole = gnv(inner, options=opts24)
    for cut in range(len(whole)):
        assert pcapkeys.frame_key(whole, 0, cut) == pk.key_of(whole[:cut])
    assert probe.parse_frame(whole) is not None
    assert probe.parse_frame(whole[:len(whole) - len(inner) + 40]) is None


def test_udp_probe_to_the_vxlan_port_is_still_a_probe():
    f = probe.build_frame('udp', 3, 4, V4[0], V4[1], pk.MAC_A, pk.MAC_B,
                          port=4789)
    assert probe.parse_frame(f) == (probe.ProbeKey(3, 4), probe.NO_ENCAP)
    assert pcapkeys.frame_key(f, 0, len(f)) == (3, 8)


# --------------------------------------------------------------------------
# The capture filter.

def frames_of(proto, vlan=()):
    f4 = frame4(proto, 1, 2, vlan=vlan)
    f6 = frame6(proto, 1, 2, vlan=vlan)
    return [f4, pk.reply(f4), f6, reply6(f6)]


@pytest.mark.parametrize('proto', probe.PROTOCOLS)
def test_bpf_accepts_probes_v4_v6_tagged(proto):
    prog = capture.bpf_filter(proto)
    for f in frames_of(proto):
        assert run_bpf(prog, f) == capture.SNAPLEN
    for vlan in ((5,), (6, 5)):
        f = frame4(proto, 1, 2, vlan=vlan)
        assert run_bpf(prog, f) == capture.SNAPLEN
        assert run_bpf(prog, frame6(proto, 1, 2, vlan=vlan)) == \
            capture.SNAPLEN
    # Other protocols, ARP: rejected.
    others = [p for p in probe.PROTOCOLS if p != proto and
              not (proto == 'udp' and p == 'icmp')]
    for p in others:
        f = frame4(p, 1, 2)
        assert run_bpf(prog, f) == 0
    assert run_bpf(prog, pk.MAC_A + pk.MAC_B + b'\x08\x06' +
                   bytes(28)) == 0


@pytest.mark.parametrize('proto', probe.PROTOCOLS)
def test_bpf_vxlan_only_when_asked(proto):
    inner = frame4(proto, 1, 2)
    outer = pk.vxlan(inner, 4242)
    with_vx = capture.bpf_filter(proto, vxlan_port=4789)
    assert run_bpf(with_vx, outer) == capture.SNAPLEN
    assert run_bpf(with_vx, pk.vxlan(frame6(proto, 1, 2), 7)) == \
        capture.SNAPLEN
    if proto != 'udp':
        assert run_bpf(capture.bpf_filter(proto), outer) == 0
        # Another UDP port, or an inner frame of another protocol: no.
        assert run_bpf(with_vx, pk.vxlan(inner, 1, port=8472)) == 0
        wrong = 'udp' if proto == 'tcp' else 'tcp'
        f = frame4(wrong, 1, 2)
        assert run_bpf(with_vx, pk.vxlan(f, 1)) == 0


@pytest.mark.parametrize('proto', probe.PROTOCOLS)
def test_bpf_geneve_only_when_asked(proto):
    inner = frame4(proto, 1, 2)
    plain = capture.bpf_filter(proto)
    with_gn = capture.bpf_filter(proto, geneve_port=6081)
    both = capture.bpf_filter(proto, vxlan_port=4789, geneve_port=6081)
    vx_only = capture.bpf_filter(proto, vxlan_port=4789)
    for opt_len, options in GENEVE_OPTIONS.items():
        # (Inner frames are untagged: the filter, as for VXLAN, does not
        # read through an inner VLAN tag.)
        for f, v6 in itertools.product((inner, frame6(proto, 1, 2)),
                                       (False, True)):
            outer = pk.geneve(f, 77, options=options, v6_underlay=v6)
            assert run_bpf(with_gn, outer) == capture.SNAPLEN, opt_len
            assert run_bpf(both, outer) == capture.SNAPLEN, opt_len
            if proto != 'udp':
                assert run_bpf(plain, outer) == 0
                assert run_bpf(vx_only, outer) == 0
        # VLAN-tagged underlay too.
        tagged = outer[:12] + b'\x81\x00\x00\x07' + outer[12:]
        assert run_bpf(with_gn, tagged) == capture.SNAPLEN
    assert run_bpf(both, pk.vxlan(inner, 7)) == capture.SNAPLEN
    assert run_bpf(both, pk.vxlan(inner, 7, v6_underlay=True)) == \
        capture.SNAPLEN
    if proto == 'udp':
        return                          # UDP passes whole: nothing to check
    outer = pk.geneve(inner, 77)
    assert run_bpf(plain, outer) == 0
    assert run_bpf(vx_only, outer) == 0
    assert run_bpf(with_gn, pk.vxlan(inner, 7)) == 0
    # Another port, version, payload type; an inner frame of another
    # protocol; the options' length decides where the inner frame is.
    assert run_bpf(with_gn, pk.geneve(inner, 1, port=6082)) == 0
    assert run_bpf(with_gn, pk.geneve(inner, 1, first=0x80)) == 0
    assert run_bpf(with_gn, pk.geneve(inner, 1, ptype=0x0800)) == 0
    wrong = frame4('udp' if proto == 'tcp' else 'tcp', 1, 2)
    assert run_bpf(with_gn, pk.geneve(wrong, 1)) == 0
    assert run_bpf(with_gn, pk.geneve(inner, 1, options=GENEVE_OPTIONS[24],
                                      first=2)) == 0
    for v6 in (False, True):
        assert run_bpf(with_gn, pk.geneve(wrong, 1, v6_underlay=v6)) == 0
        assert run_bpf(with_gn, pk.geneve(inner, 1, v6_underlay=v6,
                                          port=4789)) == 0
        assert run_bpf(vx_only, pk.vxlan(wrong, 1, v6_underlay=v6)) == 0
        assert run_bpf(vx_only, pk.vxlan(inner, 1, v6_underlay=v6)) == \
            capture.SNAPLEN
    # Plain IPv6 UDP that is no tunnel: not an ICMP/TCP probe.
    assert run_bpf(with_gn, frame6('udp', 1, 2)) == 0
    assert run_bpf(capture.bpf_filter(proto, geneve_port=7000),
                   pk.geneve(inner, 1, port=7000)) == capture.SNAPLEN


# --------------------------------------------------------------------------
# Batches, the matcher and the report carry the encapsulation.

def test_encap_reaches_the_report():
    batch = sightings.SightingBatch(7)
    pif, tap = batch.interface_index('eth1'), batch.interface_index('tap0')
    tagged = probe.Encap(vlan=(100,))
    for seq in range(4):
        batch.append(seq << 1, pif, 1000 * seq, sightings.DIR_IN)
        batch.append(seq << 1, tap, 1000 * seq + 10, sightings.DIR_OUT)
        batch.encap[(seq << 1, pif)] = tagged
    merged = sightings.SightingBatch(7)
    merged.interface_index('other')
    merged.extend(batch)
    assert merged.encap[(0, merged.interface_index('eth1'))] == tagged
    m = latency.Matcher(7, [vifpath.VifPath('tap0', None, ('eth1', 'tap0'))],
                        {s: 'tap0' for s in range(4)}, 10 ** 9)
    m.feed_batch(merged)
    rep = m.reports()['tap0']
    assert (rep.vlan, rep.vni) == ((100,), None)
    assert rep.ingress.count == 4
    assert report.report_to_dict(rep)['vlan'] == [100]
    assert 'vlan 100' in report.format_table({'tap0': rep})


def test_plain_reports_have_no_encap():
    m = latency.Matcher(7, [vifpath.VifPath('tap0', None, ('eth1', 'tap0'))],
                        {0: 'tap0'}, 10 ** 9)
    rep = m.reports()['tap0']
    assert (rep.vlan, rep.vni) == ((), None)
    assert 'vlan' not in report.format_table({'tap0': rep})


def test_live_encap_puts_the_kernel_tag_first():
    assert capture._live_encap(None, (1, 2)) == probe.NO_ENCAP
    assert capture._live_encap(200, (1, 2)) == probe.Encap(vlan=(200,))
    assert capture._live_encap(200, (1, 2, probe.Encap(vlan=(100,)))) == \
        probe.Encap(vlan=(200, 100))


# --------------------------------------------------------------------------
# geneve_port travels like vxlan_port: option → settings → (privsep) capture.

def test_geneve_port_option_reaches_the_window_settings():
    from oslo_config import cfg

    from netweaver_agent.agent import inspector
    from netweaver_agent.agent import opts
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf([], project='netweaver-test')
    assert inspector.window_settings(conf).geneve_port is None
    for value, expected in ((6081, 6081), (0, None)):
        conf.set_override('geneve_port', value, group=opts.GROUP)
        assert inspector.window_settings(conf).geneve_port == expected


def test_the_capture_classes_take_the_geneve_port():
    from netweaver_agent.agent import privileged
    make = privileged.capture_class(privileged.netns_pctxt)
    cap = make(9, 'icmp', netns_name='hv', vxlan_port=4789,
               geneve_port=6081)
    assert (cap.vxlan_port, cap.geneve_port) == (4789, 6081)
    assert make(9).geneve_port is None
    live = capture.LiveCapture(9, 'icmp', geneve_port=6081)
    assert live.geneve_port == 6081
    with pytest.raises(ValueError, match='Geneve port'):
        privileged._open_capture(9, 'icmp', None, None, None, 70000)


def test_run_window_opens_the_capture_with_the_tunnel_ports():
    from netweaver_agent.core import window

    path = vifpath.VifPath(vif='tap0', address='198.18.0.10',
                           interfaces=('eth1', 'tap0'))
    for ports in ({}, {'geneve_port': 6081},
                  {'vxlan_port': 4789, 'geneve_port': 7000}):
        made = []
        settings = window.WindowSettings(count=1, timeout_ms=5.0,
                                         max_window_ms=200.0, **ports)
        window.run_window([path], fakes.AllSentSource(), settings,
                          capture_class=fakes.recording_capture(made))
        assert [{k: v for k, v in extra.items() if k.endswith('_port')}
                for extra in made] == [ports]


def test_the_tunnel_kind_survives_privsep():
    from netweaver_agent.agent import privileged
    batch = sightings.SightingBatch(5)
    pif = batch.interface_index('eth1')
    kinds = {2: probe.Encap(vni=7, tunnel='geneve'),
             4: probe.Encap(vni=7), 6: probe.Encap(vlan=(3,))}
    for key, encap in kinds.items():
        batch.append(key, pif, 1000 + key, sightings.DIR_IN)
        batch.encap[(key, pif)] = encap
    stats = capture.CaptureStats(3, 0, 3, 0)
    raw = fakes.through_privsep_wire(privileged.batch_to_wire(batch, stats))
    got = sightings.SightingBatch(5)
    privileged.batch_from_wire(raw, got)
    assert got.encap == batch.encap
    assert got.encap[(2, pif)].tunnel == 'geneve'
    # Rows of a daemon that sends no tunnel kind are VXLAN (as before).
    raw['encap'] = [row[:4] for row in raw['encap']]
    old = sightings.SightingBatch(5)
    privileged.batch_from_wire(raw, old)
    assert old.encap[(2, pif)] == probe.Encap(vni=7, tunnel='vxlan')


@pytest.mark.parametrize('v2', [False, True])
def test_cooked_captures_read_tunnels_the_same(v2):
    link = pcapkeys.LINKS[pcapkeys.LINKTYPE_LINUX_SLL2 if v2 else
                          pcapkeys.LINKTYPE_LINUX_SLL]
    inner = inner_frame('icmp', False)
    for frame in (pk.geneve(inner, 8, options=GENEVE_OPTIONS[24]),
                  pk.geneve(inner, 8, v6_underlay=True),
                  pk.vxlan(inner, 8)):
        c = pk.cooked(frame, v2)
        assert pcapkeys.frame_key(c, 0, len(c), link) == \
            pcapkeys.frame_key(frame, 0, len(frame))
        assert pcapkeys.frame_key(c, 0, len(c), link)[2].vni == 8
    # Fingerprints: the same key through either link type; noise is none.
    syn = pk.geneve(pk.hping_syn(1234, 99, 7), 8)
    c = pk.cooked(syn, v2)
    want = pcapkeys.fingerprint_key(syn, 0, len(syn), dst_ip=pk.V4[1])
    assert want[2] == probe.Encap(vni=8, tunnel='geneve')
    assert pcapkeys.fingerprint_key(c, 0, len(c), link, pk.V4[1]) == want
    igmp = bytearray(pk.hping_syn(1234, 99, 7))
    igmp[23] = 2                                   # IP protocol: IGMP
    c = pk.cooked(pk.geneve(bytes(igmp), 8), v2)
    assert pcapkeys.fingerprint_key(c, 0, len(c), link, pk.V4[1]) is None


def test_pcap_runs_of_tunnelled_probes_keep_each_vni(tmp_path):
    """A capture of a Geneve pif is read as runs: every probe keyed, with
    its own VNI and tunnel, as frame by frame."""
    from netweaver_agent.core import pcapfile
    frames = []
    for seq in range(64):
        inner = probe.build_frame('icmp', 321, seq, V4[0], V4[1], pk.MAC_A,
                                  pk.MAC_B)
        vni = 100 if seq < 40 else 200 + seq % 3
        frames.append(pk.geneve(inner, vni, options=OVN_OPTION))
    for seq in range(64, 96):
        inner = probe.build_frame('icmp', 321, seq, V4[0], V4[1], pk.MAC_A,
                                  pk.MAC_B)
        frames.append(pk.vxlan(inner, 4242))
    path = pk.write_pcap_raw(tmp_path / 'pif.pcap', frames,
                             [10 ** 18 + i for i in range(len(frames))])
    read = pcapfile.read_pcap(path, ifname='eth1')
    assert read.probes == len(frames) and read.session == 321
    index = read.batch.interface_index('eth1')
    want = {}
    for f in frames:
        session, key, encap = pcapkeys.frame_key(f, 0, len(f))
        want[(key, index)] = encap
    assert read.batch.encap == want
    assert {e.tunnel for e in want.values()} == {'geneve', 'vxlan'}
