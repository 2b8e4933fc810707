"""Passive mode on the lab's Open vSwitch and OVN layouts, with real TCP
and UDP streams between the source and the guests (no probe measured).

Real private ovsdb-server and ovs-vswitchd (userspace datapath) in the
lab's hypervisor namespace, OVN's northd and controller for ``ovn``; the
guests' traffic reaches the pif plain, VLAN-tagged, inside VXLAN or inside
Geneve, and the tap plain.  Per guest: the matched fraction of what the
pif saw for it, no negative latency, nothing unmatched without loss.

Truth: on ``ovs-hybrid`` the NFQUEUE delayer on ``qbr`` holds every packet
to the delayed guest and records each hold by its passive key, so each
matched packet is checked against its hold.  On ``ovs-native`` and
``ovn`` the lab's OpenFlow delayers hold probes only: there the guests'
passive latencies are compared with the probes' of the same lab (the
same path, no injected delay), never with fixed numbers — userspace OVS
adds 150-400 us and the machine is shared.
"""

import statistics

import pytest

from netweaver_agent.core import passive
from netweaver_agent.core import passivecapture
from netweaver_agent.core import window as probe_window
from netweaver_agent.lab import build as labbuild
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import switch as labswitch
from netweaver_agent.lab import traffic as labtraffic
from tests.functional import conftest

MARKER = b'MARKER-5d2f-passive-ovs-'
DELAY_MS = 2.0
CLOCK_TOLERANCE_NS = 2000       # one clock, two readings (as test_lab)
MATCHED_FRACTION = 0.99
# Passive latency under streams against the probes' of the same path:
# the streams queue behind each other in vswitchd (a burst of TCP
# segments waits its turn where one probe does not).
PROBE_FACTOR = 20
# No VLAN network: the kernel here has no 802.1Q devices, so the
# source's own stack cannot carry real streams on one (the lab writes
# tagged probe frames itself).
LAYOUTS = [('ovs-hybrid', 'flat'), ('ovs-hybrid', 'vxlan'),
           ('ovs-native', 'flat'), ('ovs-native', 'vxlan'),
           ('ovn', 'geneve'), ('ovn', 'flat')]


def tunnel_ports(the_lab):
    path = the_lab.paths()[0]
    return {'vxlan_port': path.encap_port('vxlan') or (
                labswitch.VXLAN_PORT
                if the_lab.spec.network_type == 'vxlan' else None),
            'geneve_port': path.encap_port('geneve')}


def specs(the_lab):
    return [passive.VifSpec(g.vif, the_lab.spec.pif,
                            frozenset({passive.address(g.address)}))
            for g in the_lab.guests]


def probe_p50_us(the_lab):
    """Each guest's ICMP probes' ingress median through this layout."""
    ports = {k: v for k, v in tunnel_ports(the_lab).items() if v}
    res = probe_window.run_window(
        the_lab.paths(), the_lab.layout.source(),
        probe_window.WindowSettings(protocol='icmp', count=20, **ports),
        capture_netns=the_lab.spec.hv_netns)
    out = {}
    for g in the_lab.guests:
        rep = res.reports[g.vif]
        assert rep.ingress.count == 20, rep
        out[g.vif] = rep.ingress.p50_us
    return out


def streams(the_lab, sample=1):
    """Both guests exchange bounded streams with the source under one
    passive capture; ``(sightings, stats, {vif: StreamResult})``.  The
    lab's kernels fill in their transmit checksums and a Geneve network
    has its MTU (lab.offload, the layouts' builders): nothing to set
    here."""
    interfaces = [the_lab.spec.pif] + [g.vif for g in the_lab.guests]
    results = {}
    with passivecapture.PassiveCapture(
            sample, netns_name=the_lab.spec.hv_netns,
            interfaces=interfaces, cap=200_000,
            **tunnel_ports(the_lab)) as cap:
        for g in the_lab.guests:
            results[g.vif] = labtraffic.exchange(
                the_lab.spec.src_netns, g.netns, g.address,
                tcp_bytes=200_000, udp_count=60, payload=MARKER,
                udp_gap_s=0.002)
    return cap.sightings, cap.stats, results


def _us(value):
    return 'none' if value is None else f'{value:.0f} us'


def check_guest(name, r, res):
    """Matched fraction, no negative value, every datagram matched."""
    rep = r.report
    assert rep is not None, (name, r)
    on_pif = rep.ingress.count + r.unmatched
    fraction = rep.ingress.count / max(on_pif, 1)
    print(f'{name}: ingress {rep.ingress.count} (p50 '
          f'{_us(rep.ingress.p50_us)}, min {_us(rep.ingress.min_us)}), '
          f'egress {rep.egress.count} (p50 {_us(rep.egress.p50_us)}), '
          f'unmatched {r.unmatched}, covered {r.covered}, ambiguous '
          f'{r.ambiguous}, local {r.local}; matched fraction {fraction:.4f}')
    assert res.tcp_echoed == res.tcp_sent
    assert rep.anomalies == 0, rep
    assert rep.ingress.count >= res.udp_received
    assert rep.egress.count >= res.udp_back_received
    assert fraction >= MATCHED_FRACTION, (name, r)
    return fraction


@pytest.mark.parametrize('switch, network_type', LAYOUTS)
def test_streams_matched_on_the_layout(lab_factory, switch, network_type):
    the_lab = lab_factory(guests=2, switch=switch,
                          network_type=network_type)
    probes = probe_p50_us(the_lab)
    sightings, stats, results = streams(the_lab)
    assert stats.drops == 0 and stats.over_cap == 0, stats
    out = passive.match(sightings, specs(the_lab))
    for g in the_lab.guests:
        r = out[g.vif]
        check_guest(f'{switch}/{network_type} {g.vif}', r, results[g.vif])
        # No injected delay: as low as the same path is for probes.
        bound = PROBE_FACTOR * probes[g.vif]
        print(f'  probes p50 {probes[g.vif]:.0f} us')
        assert r.report.ingress.p50_us <= bound, (r.report.ingress, bound)
        assert r.report.egress.p50_us <= bound, (r.report.egress, bound)


# The delayers that hold all of a guest's traffic and record each packet's
# passive key: NFQUEUE on the hybrid plug's qbr, the OpenFlow controller
# on ovs-native's br-int.
DELAYERS = {'ovs-hybrid': 'nfqueue', 'ovs-native': 'auto'}


@pytest.mark.parametrize('switch', sorted(DELAYERS))
@pytest.mark.parametrize('network_type', ['flat', 'vxlan'])
def test_delayed_guest_recovers_each_hold(lab_factory, switch,
                                          network_type):
    """The layout's delayer holds all of guest 1's traffic: each of its
    matched packets is at least its hold, inside pif -> tap; the other
    guest is never held and stays below the delay."""
    the_lab = lab_factory(
        guests=2, switch=switch, network_type=network_type,
        delays=(labspec.DelayInjection(guest=1, delay_ms=DELAY_MS,
                                       backend=DELAYERS[switch],
                                       record='passive'),))
    sightings, stats, results = streams(the_lab)
    assert stats.drops == 0 and stats.over_cap == 0, stats
    out = passive.match(sightings, specs(the_lab))
    fast, slow = the_lab.guests
    for g in the_lab.guests:
        check_guest(f'{switch}/{network_type} {g.vif}', out[g.vif],
                    results[g.vif])
    assert out[slow.vif].report.ingress.min_us >= DELAY_MS * 1000 - 2
    assert out[fast.vif].report.ingress.p50_us < DELAY_MS * 1000
    assert not the_lab.passive_holds(0)
    overheads = conftest.passive_holds_met(
        the_lab, sightings, specs(the_lab)[1], 1, DELAY_MS,
        CLOCK_TOLERANCE_NS)
    # The path beyond the hold: no more than the undelayed guest's.
    fast_p50_ns = out[fast.vif].report.ingress.p50_us * 1000
    print(f'{switch}/{network_type}: {len(overheads)} packets against their '
          f'holds, overhead median {statistics.median(overheads) / 1e3:.0f}'
          f' us, undelayed guest p50 {fast_p50_ns / 1e3:.0f} us')
    assert statistics.median(overheads) <= PROBE_FACTOR * fast_p50_ns


def test_ovn_refuses_to_hold_a_guests_own_traffic():
    """OVN's delayer pauses only the probes the lab's source marks: asked
    for passive truth (all of a guest's packets) the lab says so and is
    removed, rather than record nothing."""
    conftest.require_root()
    prefix = conftest.unique_prefix()
    the_lab = labbuild.Lab(labspec.LabSpec(
        prefix=prefix, guests=1, switch='ovn', network_type='geneve',
        delays=(labspec.DelayInjection(guest=0, delay_ms=DELAY_MS,
                                       record='passive'),)))
    try:
        with pytest.raises(labswitch.LabError, match='own traffic'):
            the_lab.build()
    finally:
        the_lab.teardown()
    assert not conftest.lab_namespaces(prefix)
