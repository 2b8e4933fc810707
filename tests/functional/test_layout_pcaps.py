"""tcpdump's captures of the Open vSwitch and OVN layouts, read offline.

On each layout (ovs-hybrid VXLAN, ovs-native VLAN and VXLAN, OVN
Geneve), the real ``tcpdump --time-stamp-precision=nano -w`` records the
pif (where probes arrive encapsulated or tagged) and the guest's tap in
the hypervisor's namespace during one live probe window
(``window.run_window`` over the lab's paths and source).  Then the
``netweaver analyze PIF.pcap VIF.pcap --json`` command, in probe mode and
in fingerprint mode (``--fingerprint -d <guest address>``), must agree
with the live window: the same probes and answers counted, the same
latency per probe within the timestamp precision, the same VNI or VLAN,
and no negative latency anywhere.  Needs root.
"""

import json
import subprocess
import sys
import time

import pytest

from netweaver_agent.core import pcapfile
from netweaver_agent.core import sightings
from netweaver_agent.core import window
from tests.functional import conftest
from tests.functional import tcpdump

CLI = [sys.executable, '-m', 'netweaver_agent.cli.main']
COUNT = 100
# tcpdump and the window read the same kernel timestamps (ns): a probe's
# latency from the files may differ only by the clock's precision.
TOLERANCE_NS = 1000
LAYOUTS = [('ovs-hybrid', 'vxlan'), ('ovs-native', 'vlan'),
           ('ovs-native', 'vxlan'), ('ovn', 'geneve')]


def live_window(the_lab):
    settings = {'protocol': 'icmp', 'count': COUNT, 'interval_ms': 0.5,
                'timeout_ms': 200.0}
    paths = the_lab.paths()
    for kind in ('vxlan', 'geneve'):
        port = paths[0].encap_port(kind)
        if port is not None:
            settings[f'{kind}_port'] = port
    return window.run_window(paths, the_lab.layout.source(),
                             window.WindowSettings(**settings),
                             capture_netns=the_lab.spec.hv_netns)


def analyze_cli(pif_pcap, vif_pcap, *extra):
    proc = subprocess.run([*CLI, 'analyze', pif_pcap, vif_pcap, '--json',
                           *extra], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def negative_values(obj, where=''):
    """Every latency figure (``*_us``) below zero in a JSON report."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k.endswith('_us') and isinstance(v, (int, float)) and v < 0:
                out.append((f'{where}.{k}', v))
            out += negative_values(v, f'{where}.{k}')
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += negative_values(v, f'{where}[{i}]')
    return out


def pcap_reply_times(pif_pcap, vif_pcap, pif, vif, session):
    """``{seq: (t_vif, t_pif)}`` of the guest's answers in the files."""
    batch = sightings.SightingBatch(session)
    for path, name in ((pif_pcap, pif), (vif_pcap, vif)):
        batch.extend(pcapfile.read_pcap(path, ifname=name,
                                        session=session).batch)
    # A pcap file records no packet direction.
    return reply_times(batch, pif, vif, directed=False)


def reply_times(batch, pif, vif, directed=True):
    """``{seq: (t_vif, t_pif)}`` of the answers to probe ``seq``: the
    first sighting on the tap, the first one leaving by the pif."""
    at_pif, at_vif = {}, {}
    names = batch.ifnames
    for key, index, t_ns, direction in zip(batch.keys, batch.ifindex,
                                           batch.t_ns, batch.direction):
        if not key & 1:
            continue
        seq, name = key >> 1, names[index]
        if name == pif and (direction == sightings.DIR_OUT or not directed):
            at_pif[seq] = min(t_ns, at_pif.get(seq, t_ns))
        elif name == vif:
            at_vif[seq] = min(t_ns, at_vif.get(seq, t_ns))
    return {seq: (at_vif[seq], at_pif[seq])
            for seq in at_vif.keys() & at_pif.keys()}


def assert_same_latencies(live, files, what):
    """Every live probe is in the files, with the same latency."""
    assert live.keys() <= files.keys(), (
        what, sorted(live.keys() - files.keys())[:20])
    worst = max(abs((f1 - f0) - (l1 - l0)) for (l0, l1), (f0, f1) in
                ((live[s], files[s]) for s in live))
    assert worst <= TOLERANCE_NS, (what, worst)
    assert all(b >= a for a, b in files.values()), what
    return worst


@pytest.mark.parametrize('switch, network_type', LAYOUTS)
def test_analyze_agrees_with_the_live_window(lab_factory, tmp_path, switch,
                                             network_type):
    t0 = time.monotonic()
    the_lab = lab_factory(guests=1, switch=switch, network_type=network_type)
    guest, = the_lab.guests
    path, = the_lab.paths()
    pif, tap = the_lab.spec.pif, guest.vif
    pif_pcap, tap_pcap = str(tmp_path / f'{pif}.pcap'), str(
        tmp_path / f'{tap}.pcap')
    # No filter on the pif: the lab's static neighbours leave only
    # probes and answers there, in whatever the layout wraps them.
    with tcpdump.recording(
            tcpdump.Tcpdump(the_lab.spec.hv_netns, iface, out, bpf,
                            limit=2 * COUNT + 50)
            for iface, out, bpf in ((pif, pif_pcap, []),
                                    (tap, tap_pcap, ['icmp']))):
        result = live_window(the_lab)
        time.sleep(0.2)
    live = result.reports[tap]
    assert result.capture.drops == 0
    assert (live.ingress.count, live.egress.count) == (COUNT, COUNT), live
    encap = path.encap[0].kind if path.encap else None
    assert live.tunnel == encap
    if network_type == 'vlan':
        assert live.vlan == (the_lab.spec.segmentation_id,)
    else:
        assert live.vni == (the_lab.spec.segmentation_id
                            if switch != 'ovn' else
                            the_lab.layout.tunnel_key())

    # Per probe: the files' tap - pif is the live window's.
    worst_in = assert_same_latencies(
        conftest.probe_times(result.batch, pif, tap),
        tcpdump.pcap_times(pif_pcap, tap_pcap, pif, tap, result.session),
        'ingress')
    worst_out = assert_same_latencies(
        reply_times(result.batch, pif, tap),
        pcap_reply_times(pif_pcap, tap_pcap, pif, tap, result.session),
        'egress')

    for mode, extra in (('probe', ()),
                        ('fingerprint', ('--fingerprint', '-d',
                                         guest.address))):
        out = analyze_cli(pif_pcap, tap_pcap, *extra)
        assert out['mode'] == mode
        rep = out['report']
        assert (rep['pif'], rep['vnic']) == (pif, tap)
        if mode == 'probe':
            assert out['session'] == result.session
        for direction, stats in (('ingress', live.ingress),
                                 ('egress', live.egress)):
            got = rep[direction]
            assert (got['count'], got['lost']) == (stats.count,
                                                   stats.lost), (mode, got)
            for key in ('min_us', 'p50_us', 'max_us'):
                assert got[key] == pytest.approx(
                    getattr(stats, key), abs=TOLERANCE_NS / 1000), (
                        mode, direction, key, got, stats)
        assert rep['vni'] == live.vni, (mode, rep)
        assert rep['tunnel'] == live.tunnel, (mode, rep)
        assert tuple(rep['vlan']) == tuple(live.vlan or ()), (mode, rep)
        assert rep['anomalies'] == 0, (mode, rep)
        assert not negative_values(out), (mode, negative_values(out))
    print(f'\n{switch}/{network_type}: {COUNT} probes, ingress p50 '
          f'{live.ingress.p50_us:.1f} us, worst per-probe difference '
          f'{worst_in} ns in, {worst_out} ns out; {time.monotonic() - t0:.1f}'
          ' s')
