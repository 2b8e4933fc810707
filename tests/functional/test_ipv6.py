"""IPv6 probes on the namespace lab, measured like IPv4.

The lab gives the source and the guests addresses in 2001:2::/64 (RFC
5180's benchmarking range, routed nowhere); probes are ICMPv6 echo, UDP
(answered by ICMPv6 port unreachable, rate-limited by the guest) and TCP
SYN, sent from the source's IPv6 raw socket, captured with the same
filter and matched like IPv4.  The 2 ms delay injected on one guest
(ip6tables → NFQUEUE → the delayer) is seen, and each measured ingress
holds the delayer's recorded hold.  Needs root; fails (never skips)
without a lab.
"""

import ipaddress

import pytest

from netweaver_agent.core import probe
from netweaver_agent.core import window
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import switch as labswitch
from tests.functional import conftest

COUNT = 30
DELAY_MS = 2.0
BASELINE_P50_US = 200.0
CLOCK_TOLERANCE_NS = 2000


@pytest.mark.parametrize('protocol', ['icmp', 'udp', 'tcp'])
def test_ipv6_probes_measured_like_ipv4(lab_factory, protocol):
    the_lab = lab_factory(guests=2, ipv6=True, delays=(
        labspec.DelayInjection(guest=1, delay_ms=DELAY_MS,
                               backend='nfqueue'),))
    fast, slow = the_lab.guests
    paths = the_lab.paths(ipv6=True)
    for p, g in zip(paths, the_lab.guests):
        assert p.address == g.address6
        assert ipaddress.ip_address(p.address) in labspec.LAB_NET6
    result = window.run_window(
        paths, the_lab.layout.source(),
        window.WindowSettings(protocol=protocol, count=COUNT,
                              per_vnic_interval_ms=5.0),
        capture_netns=the_lab.spec.hv_netns)
    assert result.capture.drops == 0
    for g in the_lab.guests:
        rep = result.reports[g.vif]
        assert rep.sent == COUNT and rep.unseen_at_pif == 0
        assert rep.ingress.count == COUNT and rep.ingress.lost == 0, rep
        if protocol == 'udp':
            # ICMPv6 errors are rate-limited by the guest.
            assert rep.egress.count >= 1
        else:
            assert rep.egress.count == COUNT, rep.egress
    assert result.reports[fast.vif].ingress.p50_us < BASELINE_P50_US
    assert result.reports[slow.vif].ingress.p50_us >= DELAY_MS * 1000
    # Each probe to the slow guest was held once, inside pif → tap.
    # (TCP keys carry no session: the delayer records TCP_SESSION.)
    holds = {r.seq: r for r in the_lab.delay_records(1)
             if r.session in (result.session, probe.TCP_SESSION)
             and not r.reply}
    seen = conftest.probe_times(result.batch, the_lab.spec.pif, slow.vif)
    assert sorted(holds) == sorted(seen) and len(seen) == COUNT
    for seq, (t_pif, t_vif) in seen.items():
        assert t_vif - t_pif >= holds[seq].hold_ns - CLOCK_TOLERANCE_NS
    assert not the_lab.delay_records(0)


def test_dual_stack_lab_still_measures_ipv4(lab_factory):
    the_lab = lab_factory(guests=1, ipv6=True)
    v4 = window.run_window(the_lab.paths(), the_lab.layout.source(),
                           window.WindowSettings(count=COUNT),
                           capture_netns=the_lab.spec.hv_netns)
    v6 = window.run_window(the_lab.paths(ipv6=True), the_lab.layout.source(),
                           window.WindowSettings(count=COUNT),
                           capture_netns=the_lab.spec.hv_netns)
    tap = the_lab.guests[0].vif
    for result in (v4, v6):
        assert result.reports[tap].ingress.count == COUNT
        assert result.reports[tap].egress.count == COUNT


def test_ipv6_paths_need_an_ipv6_lab(lab_factory):
    the_lab = lab_factory(guests=1)
    with pytest.raises(labswitch.LabError, match='without IPv6'):
        the_lab.paths(ipv6=True)
