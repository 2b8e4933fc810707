"""Encapsulated probes on the namespace lab: 802.1Q/802.1ad tags, VXLAN.

* VLAN: the kernel here has no 802.1Q module, so nothing can untag; the
  lab's source writes whole tagged frames (:meth:`lab.Lab.vlan_source`)
  through the pif.  The live capture reads the VLAN id the kernel moved
  out of the frame from ``PACKET_AUXDATA``; tcpdump, on the same pif in
  the same window, writes the tag back into its pcap.  Both must give the
  same probes with the same VLAN ids.  The bridge is VLAN-unaware and
  forwards the tagged frames to the taps, where they are seen (ingress is
  measured, with its VID); the guests, with no VLAN device, drop them, so
  nothing comes back: no egress, as expected.
* VXLAN: the guests' network is an overlay over the pif (``vxlan-4242`` on
  the bridge); probes cross the pif as UDP/4789 and are matched by their
  inner identity, live and in tcpdump's pcap, with the VNI reported; the
  2 ms delay injected on one guest is measured through the overlay.
  Through the real pollsters and their privsep daemon, ``[netweaver]
  vxlan_port`` puts the VNI in every sample's metadata.

Needs root; fails (never skips) without a lab.
"""

import os

import dpkt
import pytest

from netweaver_agent.agent import pollsters
from netweaver_agent.cli import report
from netweaver_agent.core import pcapfile
from netweaver_agent.core import probe
from netweaver_agent.core import window
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import switch as labswitch
from tests.functional import inprocess
from tests.functional.tcpdump import Tcpdump

COUNT = 50
VNI = 4242
DELAY_MS = 2.0
BASELINE_P50_US = 200.0


def pif_rows(batch, pif):
    """``{(key, encap)}`` of the batch's sightings on the pif."""
    names = batch.ifnames
    out = set()
    for k, i in zip(batch.keys, batch.ifindex):
        if names[i] == pif:
            out.add((k, batch.encap.get((k, i), probe.NO_ENCAP)))
    return out


def run_with_tcpdump(the_lab, directory, source, limit, **settings):
    """One window from ``source`` with tcpdump on the pif; the result and
    tcpdump's pcap read back (same session)."""
    path = os.path.join(directory, 'pif.pcap')
    dump = Tcpdump(the_lab.spec.hv_netns, the_lab.spec.pif, path, [],
                   limit=limit)
    try:
        dump.wait_listening()
        try:
            result = window.run_window(
                the_lab.paths(), source, window.WindowSettings(**settings),
                capture_netns=the_lab.spec.hv_netns)
        finally:
            source.close()
        status = dump.stop()
    finally:
        dump.kill()
    assert status == 0, dump.stderr
    read = pcapfile.read_pcap(path, ifname=the_lab.spec.pif,
                              session=result.session)
    assert not read.truncated
    return result, read, path


@pytest.mark.parametrize('vlan', [(100,), (200, 100)],
                         ids=['802.1Q', 'QinQ'])
def test_vlan_tags_live_equal_tcpdump(lab_factory, workdir,
                                      vlan):
    the_lab = lab_factory(guests=2)
    result, read, path = run_with_tcpdump(
        the_lab, workdir, the_lab.vlan_source(vlan), limit=8 * COUNT,
        protocol='icmp', count=COUNT, timeout_ms=100)
    assert result.capture.drops == 0
    want = probe.Encap(vlan=vlan)
    live = pif_rows(result.batch, the_lab.spec.pif)
    from_pcap = pif_rows(read.batch, the_lab.spec.pif)
    # Every probe, on the pif, once, with its tags: live == tcpdump.
    assert len(live) == 2 * COUNT
    assert live == from_pcap
    assert {encap for _, encap in live} == {want}
    # tcpdump's frames hold the tags themselves.
    with open(path, 'rb') as f:
        tagged = [bytes(buf) for _, buf in dpkt.pcap.UniversalReader(f)
                  if probe.parse_key(buf, result.session)]
    assert len(tagged) == 2 * COUNT
    for frame in tagged:
        tpid = int.from_bytes(frame[12:14], 'big')
        assert tpid == (dpkt.ethernet.ETH_TYPE_8021AD if len(vlan) > 1 else
                        dpkt.ethernet.ETH_TYPE_8021Q)
        assert int.from_bytes(frame[14:16], 'big') & 0xfff == vlan[0]
    for g in the_lab.guests:
        rep = result.reports[g.vif]
        assert rep.vlan == vlan
        assert rep.unseen_at_pif == 0
        # The VLAN-unaware bridge forwards the tagged probes to the tap.
        assert rep.ingress.count == COUNT, rep
        assert rep.ingress.p50_us < BASELINE_P50_US
        # The guest has no VLAN device: it drops them, no answer.
        assert rep.egress.count == 0
    text = report.format_table(result.reports)
    assert 'vlan ' + '.'.join(str(v) for v in vlan) in text
    assert report.report_to_dict(result.reports[the_lab.guests[0].vif])[
        'vlan'] == list(vlan)


def test_vxlan_overlay_measured_with_vni(lab_factory, workdir):
    the_lab = lab_factory(guests=2, vxlan_vni=VNI, delays=(
        labspec.DelayInjection(guest=1, delay_ms=DELAY_MS,
                               backend='nfqueue'),))
    fast, slow = the_lab.guests
    vx = the_lab.spec.vxlan_dev
    assert the_lab.paths()[0].interfaces == (the_lab.spec.pif, vx, fast.vif)
    result, read, _ = run_with_tcpdump(
        the_lab, workdir, the_lab.layout.source(), limit=8 * COUNT,
        protocol='icmp', count=COUNT, per_vnic_interval_ms=5.0,
        vxlan_port=labswitch.VXLAN_PORT)
    assert result.capture.drops == 0
    want = probe.Encap(vni=VNI)
    live = pif_rows(result.batch, the_lab.spec.pif)
    # Probes and replies crossed the pif inside VXLAN, keyed by the inner
    # frame, live and in tcpdump's pcap alike.
    assert len(live) == 2 * 2 * COUNT
    assert live == pif_rows(read.batch, the_lab.spec.pif)
    assert {encap for _, encap in live} == {want}
    for g in the_lab.guests:
        rep = result.reports[g.vif]
        assert rep.vni == VNI and rep.vlan == ()
        assert rep.ingress.count == COUNT and rep.ingress.lost == 0, rep
        assert rep.egress.count == COUNT, rep.egress
        assert [(h.src, h.dst) for h in rep.hops] == [(the_lab.spec.pif, vx),
                                                      (vx, g.vif)]
    assert result.reports[fast.vif].ingress.p50_us < BASELINE_P50_US
    slow_rep = result.reports[slow.vif]
    holds = [r.hold_ns for r in the_lab.delay_records(1)
             if r.session == result.session and not r.reply]
    assert len(holds) == COUNT
    assert slow_rep.ingress.min_us * 1000 >= min(holds) - 2000
    assert slow_rep.ingress.p50_us >= DELAY_MS * 1000
    assert f'vni {VNI}' in report.format_table(result.reports)


@pytest.fixture
def cycle_factory(tmp_path):
    yield from inprocess.cycles(tmp_path)


def test_vxlan_port_option_gives_the_vni_in_metadata(lab_factory,
                                                     cycle_factory):
    """``[netweaver] vxlan_port`` through the real pollsters and their
    privsep daemon: every sample of the overlay's vNICs carries the VNI.
    Without the option (and without ``pif``) the topology finds the
    overlay itself: the bridge's ``vxlan-<VNI>`` port, its underlay as the
    pif and its UDP port for the capture; the same samples, hop by hop.
    """
    the_lab = lab_factory(guests=2, vxlan_vni=VNI)
    options = {'probe_count': 10, 'probe_timeout_ms': 100.0,
               'max_window_ms': 2000.0, 'per_vnic_interval_ms': 2.0,
               'pif': the_lab.spec.pif}
    cycle = cycle_factory(the_lab, vxlan_port=labswitch.VXLAN_PORT, **options)
    assert cycle.conf.netweaver.privsep
    samples, _ = cycle.run()
    want = {cycle.resource_of(i) for i in range(2)}
    for name, found in samples.items():
        if name == 'network.vif.outgoing.latency':
            continue
        assert {s.resource_id for s in found} == want, name
    for found in samples.values():
        for s in found:
            md = s.resource_metadata
            assert md['vni'] == VNI and md['vlan'] is None, md
            assert md['pif'] == the_lab.spec.pif, md
            assert md['latency_ingress']['count'] == 10, md
    # A new agent: the inspector is one per process.
    pollsters.INSPECTOR.reset()
    del options['pif']
    plain = cycle_factory(the_lab, **options)
    assert plain.conf.netweaver.vxlan_port is None
    assert plain.conf.netweaver.pif is None
    samples, _ = plain.run()
    assert {s.resource_id for s in samples['network.vif.latency']} == want
    for found in samples.values():
        for s in found:
            md = s.resource_metadata
            assert md['vni'] == VNI and md['pif'] == the_lab.spec.pif, md
            assert md['latency_ingress']['count'] == 10, md
            assert [(h['src'], h['dst']) for h in md['latency_hops']] == [
                (the_lab.spec.pif, the_lab.spec.vxlan_dev),
                (the_lab.spec.vxlan_dev, s.resource_metadata['vif'])], md
