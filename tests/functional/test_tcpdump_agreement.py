"""tcpdump as an independent instrument: its pcaps agree with our capture.

In one probe window of the namespace lab, tcpdump records the pif and the
guest's tap (``--time-stamp-precision=nano``) while ``window.run_window``
captures live.  The per-probe latency (tap − pif) read from the two pcaps
by :mod:`netweaver_agent.core.pcapfile` must agree with the live capture's
within 1 µs for at least 99 % of the probes, and ``analyze_pcaps`` must
find the same probes.  Needs root; fails (never skips) without a lab.
"""

import os
import time

import pytest

from netweaver_agent.cli import offline
from netweaver_agent.core import probe
from netweaver_agent.core import window
from tests.functional import conftest
from tests.functional.tcpdump import pcap_times
from tests.functional.tcpdump import recording
from tests.functional.tcpdump import Tcpdump

COUNT = 300
TOLERANCE_NS = 1000
AGREEING = 0.99
FILTERS = {'icmp': ['icmp'], 'udp': ['udp', 'or', 'icmp'], 'tcp': ['tcp']}


@pytest.mark.parametrize('protocol', ['icmp', 'udp', 'tcp'])
def test_pcaps_agree_with_live_capture(lab_factory, workdir, protocol):
    the_lab = lab_factory(guests=1)
    guest = the_lab.guests[0]
    pif, vif = the_lab.spec.pif, guest.vif
    bpf = FILTERS[protocol] + ['and', 'host', guest.address]
    with recording(Tcpdump(the_lab.spec.hv_netns, iface,
                           os.path.join(workdir, f'{iface}.pcap'),
                           bpf, limit=2 * COUNT + 50)
                   for iface in (pif, vif)) as dumps:
        result = window.run_window(
            the_lab.paths(), the_lab.layout.source(),
            window.WindowSettings(protocol=protocol, count=COUNT,
                                  interval_ms=0.5, timeout_ms=200),
            capture_netns=the_lab.spec.hv_netns)
        time.sleep(0.2)

    live = conftest.probe_times(result.batch, pif, vif)
    assert len(live) >= AGREEING * COUNT, result.reports[vif]
    # TCP keys carry no session (the ISN is a keyed hash).
    session = probe.TCP_SESSION if protocol == 'tcp' else result.session
    files = pcap_times(dumps[0].path, dumps[1].path, pif, vif, session)
    diffs = []
    for seq, (t_pif, t_vif) in live.items():
        if seq in files:
            f_pif, f_vif = files[seq]
            diffs.append(abs((f_vif - f_pif) - (t_vif - t_pif)))
    agreeing = sum(1 for d in diffs if d <= TOLERANCE_NS)
    missing = sorted(live.keys() - files.keys())
    assert agreeing >= AGREEING * len(live), (
        f'{agreeing} of {len(live)} probes agree within {TOLERANCE_NS} ns '
        f'({len(diffs)} found in the pcaps, missing {missing[:20]}); worst '
        f'{max(diffs, default=0)} ns; tcpdump said: '
        + ' | '.join(d.stderr.decode(errors='replace') for d in dumps))

    # The command's analysis of the same files finds the same probes.
    found = offline.analyze_pcaps(dumps[0].path, dumps[1].path,
                                  session=session, pif_name=pif,
                                  vif_name=vif)
    live_rep = result.reports[vif]
    assert found.session == session
    assert found.report.ingress.count >= AGREEING * live_rep.ingress.count
    assert found.report.ingress.p50_us == pytest.approx(
        live_rep.ingress.p50_us, abs=TOLERANCE_NS / 1000)
