"""Passive mode with a NAT between the pif and one guest's tap (a floating
IP: the pif sees the outside address, the tap the guest's fixed one),
against the real kernel: the Linux-bridge lab, br_netfilter and the
iptables nat table in the hypervisor's namespace, real TCP and UDP
streams between the source and both guests.

Guest 1 sits behind a 1:1 DNAT/SNAT (floating 198.19.100.x <-> its fixed
198.18.0.x) and every packet to it is held by the lab's NFQUEUE delayer
(after the NAT, on the bridge): its passive latency must be measured
through the NAT (each matched packet in at least the hold), guest 0's
must be as it is without any NAT (below the hold).  Truth: the injected
hold and the streams' own counts, never fixed microsecond numbers.

A NAT that rewrites the guest's port too cannot be undone: that guest is
reported not measurable passively (with the reason), never measured from
wrong pairs.
"""

import ipaddress
import socket
import threading

from netweaver_agent.core import netns
from netweaver_agent.core import passive
from netweaver_agent.core import passivecapture
from netweaver_agent.core import sightings as sightings_mod
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import switch as labswitch
from netweaver_agent.lab import traffic as labtraffic

MARKER = b'MARKER-3b7a-passive-nat-'
DELAY_MS = 2.0
FLOATING_NET = ipaddress.ip_network('198.19.100.0/24')


def specs(the_lab):
    return [passive.VifSpec(g.vif, the_lab.spec.pif,
                            frozenset({passive.address(g.address)}))
            for g in the_lab.guests]


def floating_ip(guest):
    return str(FLOATING_NET[10 + guest.index])


def nat_guest(the_lab, guest):
    """A 1:1 NAT of ``guest``'s address on the bridge, between the pif
    and its tap (as a DVR router's floating IP): DNAT of the floating
    address to the fixed one on the way in, SNAT back on the way out;
    the source reaches the floating address at the guest's MAC."""
    spec, hv = the_lab.spec, the_lab.spec.hv_netns
    floating = floating_ip(guest)
    labswitch.sysctl(hv, [('net.bridge.bridge-nf-call-iptables', 1),
                          ('net.ipv4.ip_forward', 1)])
    # Bridged DNAT: br_netfilter routes the new destination, which must
    # lead out of the bridge (forwarding on: only this /32 route here).
    labswitch.ip_batch(hv, [f'route replace {guest.address}/32 dev '
                            f'{the_lab.layout.bridge}'])
    labswitch.iptables(hv, ['-t', 'nat', '-A', 'PREROUTING', '-d', floating,
                            '-j', 'DNAT', '--to-destination', guest.address])
    labswitch.iptables(hv, ['-t', 'nat', '-A', 'POSTROUTING', '-s',
                            guest.address, '-m', 'physdev', '--physdev-out',
                            spec.pif, '-j', 'SNAT', '--to-source', floating])
    labswitch.ip_batch(spec.src_netns, [
        f'route replace {floating}/32 dev eth0',
        f'neigh replace {floating} lladdr {guest.mac} dev eth0 '
        'nud permanent'])
    return floating


def run_streams(the_lab, natted):
    """Both guests exchange bounded streams with the source under one
    passive capture (``natted``: the guest reached at its floating IP)."""
    interfaces = [the_lab.spec.pif] + [g.vif for g in the_lab.guests]
    results = {}
    with passivecapture.PassiveCapture(
            1, netns_name=the_lab.spec.hv_netns, interfaces=interfaces,
            cap=200_000) as cap:
        for g in the_lab.guests:
            target = floating_ip(g) if g is natted else g.address
            results[g.vif] = labtraffic.exchange(
                the_lab.spec.src_netns, g.netns, target,
                tcp_bytes=200_000, udp_count=60, payload=MARKER,
                udp_gap_s=0.002, guest_bind=g.address)
    assert cap.stats.drops == 0 and cap.stats.over_cap == 0, cap.stats
    return cap.sightings, results


def show(name, r):
    rep = r.report
    print(f'{name}: ingress {rep.ingress.count} (min {rep.ingress.min_us}, '
          f'p50 {rep.ingress.p50_us} us), egress {rep.egress.count} (p50 '
          f'{rep.egress.p50_us} us), translated {r.translated}, unmatched '
          f'{r.unmatched}, local {r.local}, covered {r.covered}, ambiguous '
          f'{r.ambiguous}, not measurable: {r.not_measurable}')


def test_guest_behind_a_floating_ip_is_measured_through_the_nat(
        lab_factory):
    the_lab = lab_factory(
        guests=2, delays=(labspec.DelayInjection(
            guest=1, delay_ms=DELAY_MS, backend='nfqueue'),))
    plain, natted = the_lab.guests
    floating = nat_guest(the_lab, natted)
    sightings, results = run_streams(the_lab, natted)
    for res in results.values():
        assert res.tcp_echoed == res.tcp_sent
    # The NAT is real: the pif saw the floating address, the tap never.
    outside = passive.address(floating)
    on_pif = [s for s in sightings if s.ifname == the_lab.spec.pif and
              outside in s.header.flow[1:3]]
    assert on_pif
    assert not [s for s in sightings if s.ifname == natted.vif and
                outside in s.header.flow[1:3]]
    out = passive.match(sightings, specs(the_lab))
    r, other = out[natted.vif], out[plain.vif]
    show('natted guest', r)
    show('plain guest', other)
    res = results[natted.vif]
    rep = r.report
    assert r.not_measurable is None
    assert rep.anomalies == 0
    # Every datagram each way, and TCP segments, matched through the NAT.
    assert rep.ingress.count >= res.udp_received
    assert rep.egress.count >= res.udp_back_received
    assert r.translated == r.packets
    # Matched fraction of what the pif saw for the floating address.
    assert rep.ingress.count + rep.egress.count + r.covered >= (
        0.99 * (rep.ingress.count + rep.egress.count + r.covered +
                r.unmatched))
    # Each packet in was held at least the injected delay; the plain
    # guest's were not held at all.
    assert rep.ingress.min_us >= DELAY_MS * 1000 - 2
    assert rep.egress.p50_us < DELAY_MS * 1000
    orep = other.report
    assert other.translated == 0 and other.not_measurable is None
    assert orep.anomalies == 0 and other.unmatched == 0
    assert orep.ingress.count >= results[plain.vif].udp_received
    assert orep.ingress.p50_us < DELAY_MS * 1000


def test_without_the_guests_own_packets_no_nat_is_learnt(lab_factory):
    """The same lab, the pif's and taps' sightings of what the guests
    sent left out: nothing teaches the floating address, the NATed
    guest's ingress stays unmatched to it (local on its tap), never
    paired with packets to another address; the plain guest as before."""
    the_lab = lab_factory(guests=2)
    plain, natted = the_lab.guests
    nat_guest(the_lab, natted)
    sightings, _results = run_streams(the_lab, natted)
    pif = the_lab.spec.pif
    inbound = [s for s in sightings if s.direction == (
        sightings_mod.DIR_IN if s.ifname == pif else sightings_mod.DIR_OUT)]
    out = passive.match(inbound, specs(the_lab))
    r = out[natted.vif]
    assert r.translated == 0 and r.packets == 0
    assert r.local > 0
    assert out[plain.vif].translated == 0
    assert out[plain.vif].report.ingress.count > 0


def echo_through_port_nat(the_lab, guest, outside, outside_port, port,
                          size=100_000, timeout_s=10.0):
    """One TCP connection from the source to ``outside``:``outside_port``,
    which the NAT sends to ``guest``'s ``port``; ``size`` bytes each
    way.  The bytes echoed."""
    listener = netns.socket_in_netns(guest.netns, socket.AF_INET,
                                     socket.SOCK_STREAM)
    client = netns.socket_in_netns(the_lab.spec.src_netns, socket.AF_INET,
                                   socket.SOCK_STREAM)
    data = MARKER * (size // len(MARKER))
    echoed = []

    def serve():
        conn, _peer = listener.accept()
        with conn:
            conn.settimeout(timeout_s)
            got = b''
            while len(got) < len(data):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                got += chunk
            conn.sendall(got)

    with listener, client:
        listener.settimeout(timeout_s)
        listener.bind((guest.address, port))
        listener.listen(1)
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        client.settimeout(timeout_s)
        client.connect((outside, outside_port))
        client.sendall(data)
        while sum(echoed) < len(data):
            chunk = client.recv(65536)
            if not chunk:
                break
            echoed.append(len(chunk))
        server.join(timeout_s)
    return sum(echoed)


def test_guest_behind_a_nat_rewriting_its_ports_is_not_measurable(
        lab_factory):
    """A NAT that also rewrites the guest's port (outside 6301 -> inside
    5301): no pair of its packets can be trusted; the guest is reported
    not measurable passively, with the reason, and no latency is taken
    from such pairs; the other guest is measured as ever."""
    the_lab = lab_factory(guests=2)
    plain, natted = the_lab.guests
    hv = the_lab.spec.hv_netns
    floating = floating_ip(natted)
    nat_guest(the_lab, natted)
    labswitch.iptables(hv, ['-t', 'nat', '-I', 'PREROUTING', '1', '-p',
                            'tcp', '-d', floating, '--dport', '6301', '-j',
                            'DNAT', '--to-destination',
                            f'{natted.address}:5301'])
    interfaces = [the_lab.spec.pif] + [g.vif for g in the_lab.guests]
    with passivecapture.PassiveCapture(
            1, netns_name=hv, interfaces=interfaces, cap=200_000) as cap:
        echoed = echo_through_port_nat(the_lab, natted, floating, 6301,
                                       5301)
        res = labtraffic.exchange(the_lab.spec.src_netns, plain.netns,
                                  plain.address, tcp_bytes=100_000,
                                  udp_count=30, payload=MARKER)
    assert echoed > 0 and res.tcp_echoed == res.tcp_sent
    out = passive.match(cap.sightings, specs(the_lab))
    r, other = out[natted.vif], out[plain.vif]
    show('port-rewritten guest', r)
    show('plain guest', other)
    assert r.not_measurable is not None
    assert 'ports' in r.not_measurable and floating in r.not_measurable
    assert r.packets == r.translated == 0
    assert other.not_measurable is None and other.translated == 0
    assert other.unmatched == 0 and other.report.anomalies == 0
    assert other.report.ingress.count >= res.udp_received
