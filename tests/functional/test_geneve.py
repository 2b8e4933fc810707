"""Geneve (and VXLAN) on a real pif: the live capture, tcpdump, analyze.

The kernel here has no Geneve device, so Geneve frames are written whole
(options of 0, 8 and 24 bytes, IPv4 and IPv6 inside) by a packet socket
in a source namespace onto a veth whose peer is the pif of a hypervisor
namespace, as a Geneve tunnel endpoint would send them:

* the live capture (``capture.LiveCapture`` with ``geneve_port``: the
  kernel runs its BPF program) and tcpdump on the same pif in the same
  window see the same probes, keyed by the inner frame, with the same
  VNI and tunnel kind and the same kernel timestamps; without
  ``geneve_port`` the kernel's filter keeps every Geneve frame out;
* ``netweaver analyze --fingerprint`` on tcpdump's captures of foreign
  traffic (hping3-like SYNs and the RSTs answering them), Geneve or VXLAN
  on the pif file and plain on the vif file, with ARP, IGMP and router
  solicitations on both and one pair sent vif first: every SYN matched
  and none of the noise, the VNI reported, the out-of-order pair an
  anomaly, no negative latency, each latency within its send window;
* real VXLAN, decapsulated by the kernel's vxlan device on the lab's
  bridge: hping3 SYNs to a closed port of the guest (answered by RSTs)
  through the overlay, analysed from tcpdump's captures of the pif and
  the tap.

Addresses in 198.18.0.0/15 and 2001:2::/48 only; every namespace is
removed, also on failure.  Needs root; fails (never skips).
"""

import itertools
import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time

import dpkt
import pytest

from netweaver_agent.cli import offline
from netweaver_agent.core import capture
from netweaver_agent.core import netns
from netweaver_agent.core import pcapfile
from netweaver_agent.core import probe
from tests import packets as pk
from tests.functional import conftest
from tests.functional.tcpdump import recording
from tests.functional.tcpdump import Tcpdump

GENEVE_PORT = probe.GENEVE_PORTS[0]
VXLAN_PORT = probe.VXLAN_PORTS[0]
VNI = 0x5eed
OVN_OPTION = pk.OVN_OPTION
OPTIONS = (b'', OVN_OPTION,
           OVN_OPTION + pk.geneve_option(0xffff, 0x01, bytes(12)))
GUEST = socket.inet_ntoa(pk.V4[1])
MAC_HV = bytes.fromhex('020000000a01')
SPACING_S = 0.002


class TwoNamespaces:
    """A source namespace and a hypervisor namespace joined by two veth
    pairs: ``s0`` ~ ``eth1`` (the pif) and ``s1`` ~ ``vif0`` (a vif)."""

    def __init__(self):
        prefix = conftest.unique_prefix('g')
        self.src = prefix + 'src'
        self.hv = prefix + 'hv'
        self.pif, self.vif = 'eth1', 'vif0'
        self._socks = {}

    def build(self):
        for name in (self.src, self.hv):
            netns.run(['ip', 'netns', 'add', name])
        for near, far in (('s0', self.pif), ('s1', self.vif)):
            netns.run(['ip', 'link', 'add', near, 'type', 'veth', 'peer',
                       'name', far, 'netns', self.hv], netns=self.src)
            netns.run(['ip', 'link', 'set', near, 'up'], netns=self.src)
            netns.run(['ip', 'link', 'set', far, 'up'], netns=self.hv)
        return self

    def send(self, near, frame):
        sock = self._socks.get(near)
        if sock is None:
            sock = netns.socket_in_netns(self.src, socket.AF_PACKET,
                                         socket.SOCK_RAW, 0)
            sock.bind((near, 0))
            self._socks[near] = sock
        sock.send(frame)

    def teardown(self):
        for sock in self._socks.values():
            sock.close()
        left = []
        for name in (self.hv, self.src):
            if netns.exists(name):
                netns.run(['ip', 'netns', 'del', name], check=False)
            if netns.exists(name):
                left.append(name)
        return left


@pytest.fixture
def spaces():
    conftest.require_root()
    pair = TwoNamespaces()
    try:
        pair.build()
    except Exception as exc:
        left = pair.teardown()
        pytest.fail(f'cannot build the namespaces: {exc} (left: {left})')
    yield pair
    left = pair.teardown()
    assert not left, f'namespaces left behind: {left}'


def inner_probe(session, seq, six, reply):
    src, dst = pk.V6 if six else pk.V4
    f = probe.build_frame('icmp', session, seq, src, dst, pk.MAC_A,
                          pk.MAC_B)
    if not reply:
        return f
    if six:
        return probe.ethernet_frame(pk.icmp6_reply(f[14:]),
                                    dpkt.ethernet.ETH_TYPE_IP6, pk.MAC_B,
                                    pk.MAC_A)
    return pk.reply(f)


def geneve_frames(session):
    """``[(seq, reply, options length, frame)]``: Geneve to the pif."""
    out = []
    seqs = itertools.count()
    for options, six, reply in itertools.product(OPTIONS, (False, True),
                                                 (False, True)):
        for _ in range(3):
            seq = next(seqs)
            out.append((seq, reply, len(options), pk.geneve(
                inner_probe(session, seq, six, reply), VNI,
                options=options, v6_underlay=six)))
    return out


def rows(batch, ifname):
    """``{key: (t_ns, encap)}`` of the batch's first sightings on
    ``ifname``."""
    names = batch.ifnames
    out = {}
    for k, i, t in zip(batch.keys, batch.ifindex, batch.t_ns):
        if names[i] == ifname and (k not in out or t < out[k][0]):
            out[k] = (t, batch.encap.get((k, i), probe.NO_ENCAP))
    return out


def live_and_tcpdump(spaces, directory, frames, **ports):
    """Send ``frames`` onto the pif with the live capture and tcpdump on
    it; ``(live batch, capture stats, pcap batch)``."""
    session = frames[0][0]
    path = os.path.join(directory, f'pif-{secrets.token_hex(3)}.pcap')
    with recording([Tcpdump(spaces.hv, spaces.pif, path, [],
                            limit=10 * len(frames))]):
        with capture.LiveCapture(session, 'icmp', netns_name=spaces.hv,
                                 interfaces={spaces.pif}, **ports) as cap:
            for _, frame in frames:
                spaces.send('s0', frame)
                time.sleep(SPACING_S)
            cap.settle(0.2)
        time.sleep(0.2)
    read = pcapfile.read_pcap(path, ifname=spaces.pif, session=session)
    assert not read.truncated
    return cap.batch, cap.stats, read.batch


def test_geneve_live_capture_equals_tcpdump(spaces, workdir):
    session = secrets.randbelow(0xfffe) + 1
    sent = geneve_frames(session)
    # Not ours: Geneve to another port, a damaged Geneve header (version
    # 1), VXLAN (its port is not open in this window).
    inner = inner_probe(session, 999, False, False)
    strays = [pk.geneve(inner, VNI, port=GENEVE_PORT + 1),
              pk.geneve(inner, VNI, first=0x40),
              pk.vxlan(inner, VNI)]
    frames = [(session, f) for *_, f in sent] + [(session, f)
                                                 for f in strays]
    live, stats, pcap = live_and_tcpdump(spaces, workdir, frames,
                                         geneve_port=GENEVE_PORT)
    assert stats.drops == 0
    want = probe.Encap(vni=VNI, tunnel='geneve')
    expected = {seq << 1 | reply for seq, reply, _, _ in sent}
    on_live, on_pcap = rows(live, spaces.pif), rows(pcap, spaces.pif)
    # Every Geneve probe and reply (any option length, IPv4 or IPv6),
    # keyed by its inner frame, once, with the VNI: nothing else.
    assert set(on_live) == expected
    # (A file is read whole: there, VXLAN to its port is opened too.)
    assert on_pcap.pop(999 << 1)[1] == probe.Encap(vni=VNI, tunnel='vxlan')
    assert set(on_pcap) == expected
    assert {e for _, e in on_live.values()} == {want}
    assert {e for _, e in on_pcap.values()} == {want}
    # One kernel timestamp, read through both.
    diffs = [abs(on_live[k][0] - on_pcap[k][0]) for k in expected]
    assert max(diffs) <= 1000, diffs
    # The filter let the strays through to nobody but tcpdump.
    assert stats.probes == len(sent)


def test_no_geneve_port_keeps_geneve_out(spaces, workdir):
    session = secrets.randbelow(0xfffe) + 1
    sent = geneve_frames(session)[:6]
    plain = [(session, inner_probe(session, 100 + i, False, False))
             for i in range(3)]
    vxlan = [(session, pk.vxlan(inner_probe(session, 200 + i, False, False),
                                VNI)) for i in range(3)]
    frames = [(session, f) for *_, f in sent] + plain + vxlan
    live, stats, pcap = live_and_tcpdump(spaces, workdir, frames,
                                         vxlan_port=VXLAN_PORT)
    on_live = rows(live, spaces.pif)
    # The kernel's filter took the plain probes and VXLAN, no Geneve
    # (which the reader would have keyed) ...
    assert set(on_live) == {(100 + i) << 1 for i in range(3)} | {
        (200 + i) << 1 for i in range(3)}
    assert stats.drops == 0
    # ... which was on the wire all along: tcpdump has it.
    assert {seq << 1 | r for seq, r, _, _ in sent} <= set(
        rows(pcap, spaces.pif))


def test_geneve_on_a_configured_port(spaces, workdir):
    """A tunnel on another UDP port (OVSDB's options:dst_port) is captured
    and opened live when geneve_port names it."""
    session = secrets.randbelow(0xfffe) + 1
    port = GENEVE_PORT + 1000
    frames = [(session, pk.geneve(inner_probe(session, i, i % 2, False),
                                  VNI, options=OVN_OPTION, port=port))
              for i in range(6)]
    live, stats, _ = live_and_tcpdump(spaces, workdir, frames,
                                      geneve_port=port)
    on_live = rows(live, spaces.pif)
    assert set(on_live) == {i << 1 for i in range(6)}
    assert {e for _, e in on_live.values()} == {
        probe.Encap(vni=VNI, tunnel='geneve')}


# --------------------------------------------------------------------------
# Fingerprint mode: foreign traffic, tunnelled on the pif, plain on the vif.

def hping_syn(i, dst=pk.V4[1]):
    tcp = dpkt.tcp.TCP(sport=2000 + i, dport=0, win=512,
                       seq=(0x9e3779b9 * (i + 1)) & 0xffffffff,
                       flags=dpkt.tcp.TH_SYN)
    ip = dpkt.ip.IP(src=pk.V4[0], dst=dst, p=6, id=4000 + i, ttl=64,
                    data=tcp)
    ip.len = len(ip)
    return probe.ethernet_frame(bytes(ip), dpkt.ethernet.ETH_TYPE_IP, pk.MAC_A,
                                pk.MAC_B)


def rst_for(syn):
    return pk.reply(syn)


def noise_frames():
    """ARP, an IGMP report and a router solicitation from the guest."""
    arp = (b'\xff' * 6 + pk.MAC_B + b'\x08\x06' +
           struct.pack('!HHBBH6s4s6s4s', 1, 0x0800, 6, 4, 1, pk.MAC_B,
                       pk.V4[1], bytes(6), pk.V4[0]))
    igmp = dpkt.ip.IP(src=pk.V4[1], dst=socket.inet_aton('224.0.0.22'),
                      p=2, ttl=1, data=struct.pack(
                          '!BBH4s', 0x16, 0, 0,
                          socket.inet_aton('224.0.0.251')))
    igmp.len = len(igmp)
    rs = dpkt.ip6.IP6(src=socket.inet_pton(socket.AF_INET6, 'fe80::2'),
                      dst=socket.inet_pton(socket.AF_INET6, 'ff02::2'),
                      nxt=58, hlim=255, plen=8,
                      data=bytes([133, 0, 0, 0]) + bytes(4))
    return [arp,
            probe.ethernet_frame(bytes(igmp), dpkt.ethernet.ETH_TYPE_IP,
                                 pk.MAC_B, bytes.fromhex('01005e000016')),
            probe.ethernet_frame(bytes(rs), dpkt.ethernet.ETH_TYPE_IP6,
                                 pk.MAC_B, bytes.fromhex('333300000002'))]


N_SYNS = 30
BACKWARDS = 11          # this SYN is sent on the vif first


def fingerprint_traffic(spaces, directory, wrap):
    """SYNs in (pif, then vif), RSTs out (vif, then pif), noise on both;
    tcpdump on the pif and the vif.  The paths and the send windows
    ``{i: (before the first send, after the second)}`` of the SYNs."""
    paths = {name: os.path.join(directory, f'{name}.pcap')
             for name in (spaces.pif, spaces.vif)}
    windows = {}
    with recording(Tcpdump(spaces.hv, name, path, [], limit=20 * N_SYNS)
                   for name, path in paths.items()):
        for i in range(N_SYNS):
            syn = hping_syn(i)
            first, second = (('s0', wrap(syn)), ('s1', syn))
            if i == BACKWARDS:
                first, second = second, first
            before = time.time_ns()
            spaces.send(*first)
            spaces.send(*second)
            windows[i] = (before, time.time_ns())
            rst = rst_for(syn)
            spaces.send('s1', rst)
            spaces.send('s0', wrap(rst))
            time.sleep(SPACING_S)
        for frame in noise_frames():
            spaces.send('s1', frame)
            spaces.send('s0', wrap(frame))
        # Another host's SYN, on both: not the instance's traffic.
        other = hping_syn(99, dst=socket.inet_aton('198.18.0.20'))
        spaces.send('s0', wrap(other))
        spaces.send('s1', other)
        time.sleep(0.3)
    return paths[spaces.pif], paths[spaces.vif], windows


@pytest.mark.parametrize('tunnel', ['geneve', 'vxlan'])
def test_fingerprint_tunnel_on_the_pif(spaces, workdir,
                                       tunnel):
    def wrap(frame):
        if tunnel == 'geneve':
            return pk.geneve(frame, VNI, options=OPTIONS[2])
        return pk.vxlan(frame, VNI)

    pif_path, vif_path, windows = fingerprint_traffic(spaces, workdir,
                                                      wrap)
    result = offline.analyze_pcaps(pif_path, vif_path, destination=GUEST,
                                   mode='fingerprint', pif_name=spaces.pif,
                                   vif_name=spaces.vif)
    rep = result.report
    assert result.mode == 'fingerprint'
    assert rep.sent == N_SYNS
    assert (rep.ingress.count, rep.ingress.lost) == (N_SYNS - 1, 0)
    assert rep.anomalies == 1
    assert (rep.egress.count, rep.egress.lost) == (N_SYNS, 0)
    assert (rep.vni, rep.tunnel) == (VNI, tunnel)
    assert rep.ingress.min_us >= 0 and rep.egress.min_us >= 0
    # Each SYN's measured latency lies within the time it took to send it
    # on both interfaces (the kernel stamps it inside each send).
    per_syn = syn_latencies(result, spaces)
    assert sorted(per_syn) == sorted(set(range(N_SYNS)) - {BACKWARDS})
    for i, latency_ns in per_syn.items():
        before, after = windows[i]
        assert 0 <= latency_ns <= after - before, (i, latency_ns)
    # The command prints the same, and says what it left out.
    proc = subprocess.run(
        [sys.executable, '-m', 'netweaver_agent.cli.main', 'analyze',
         '--fingerprint', '-d', GUEST, '--json', pif_path, vif_path],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)['report']
    assert (out['sent'], out['anomalies'], out['vni'], out['tunnel']) == (
        N_SYNS, 1, VNI, tunnel)
    assert out['ingress']['count'] == N_SYNS - 1
    assert out['ingress']['min_us'] >= 0


def syn_latencies(result, spaces):
    """``{i: t(vif) - t(pif)}`` of the SYNs, from the two reads."""
    firsts = {}
    for read, name in ((result.pif, spaces.pif), (result.vif, spaces.vif)):
        for key, t in zip(read.batch.keys, read.batch.t_ns):
            if not key & 1:
                firsts.setdefault((name, key), t)
    out = {}
    for i in range(N_SYNS):
        key = pcap_key(hping_syn(i))
        t_pif = firsts.get((spaces.pif, key))
        t_vif = firsts.get((spaces.vif, key))
        if t_pif is not None and t_vif is not None and t_vif >= t_pif:
            out[i] = t_vif - t_pif
    return out


def pcap_key(frame):
    from netweaver_agent.core import pcapkeys
    return pcapkeys.fingerprint_key(frame, 0, len(frame),
                                    dst_ip=pk.V4[1])[1]


# --------------------------------------------------------------------------
# Real VXLAN: the kernel's vxlan device decapsulates on the lab's bridge.

def hping3_syns(netns_name, address, count, port=9):
    """The seed's traffic: ``count`` hping3 SYNs from ``netns_name`` to a
    closed port of ``address`` (each answered by a RST), bounded in time."""
    return netns.run(['timeout', '20', 'hping3', '-S', '-p', str(port),
                      '-c', str(count), '-i', 'u20000', '-q', address],
                     netns=netns_name, check=False, timeout=30)


def test_fingerprint_real_vxlan_overlay(lab_factory, workdir):
    count = 20
    the_lab = lab_factory(guests=1, vxlan_vni=VNI)
    guest = the_lab.guests[0]
    paths = {name: os.path.join(workdir, f'{name}.pcap')
             for name in (the_lab.spec.pif, guest.vif)}
    with recording(Tcpdump(the_lab.spec.hv_netns, name, path, [],
                           limit=20 * count)
                   for name, path in paths.items()):
        hping = hping3_syns(the_lab.spec.src_netns, guest.address, count)
        time.sleep(0.2)
    assert f'{count} packets received' in hping.stdout + hping.stderr, (
        hping.stdout + hping.stderr)
    result = offline.analyze_pcaps(paths[the_lab.spec.pif], paths[guest.vif],
                                   destination=guest.address,
                                   mode='fingerprint',
                                   pif_name=the_lab.spec.pif,
                                   vif_name=guest.vif)
    rep = result.report
    assert result.mode == 'fingerprint'
    assert rep.sent == count and rep.anomalies == 0
    assert (rep.ingress.count, rep.egress.count) == (count, count)
    assert (rep.vni, rep.tunnel) == (VNI, 'vxlan')
    assert rep.ingress.min_us > 0 and rep.egress.min_us > 0
