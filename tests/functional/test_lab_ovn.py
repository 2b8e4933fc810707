"""The OVN lab layout (``LabSpec(switch='ovn')``), measured.

Real daemons, started and removed by each test: private OVN Northbound
and Southbound ovsdb-servers and ovn-northd, and two chassis (the
hypervisor and the probe source), each a private ovsdb-server,
ovs-vswitchd (userspace datapath) and ovn-controller inside its
namespace; probes Geneve-encapsulated between them, captured with the
project's AF_PACKET window in the hypervisor's namespace.  Needs root.
"""

import glob
import json
import os
import statistics

import pytest

from netweaver_agent.agent import ovsdb
from netweaver_agent.agent import topology
from netweaver_agent.cli import offline
from netweaver_agent.core import netns
from netweaver_agent.core import window as probe_window
from netweaver_agent.lab import agent as labagent
from netweaver_agent.lab import build as lab_mod
from netweaver_agent.lab import ovn
from netweaver_agent.lab import proc as labproc
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import state as labstate
from netweaver_agent.lab import switch as labswitch
from tests.functional import conftest
from tests.functional import tcpdump


CLOCK_TOLERANCE_NS = 2000


def window(the_lab, **settings):
    paths = the_lab.paths()
    settings.setdefault('geneve_port', paths[0].encap_port('geneve'))
    return probe_window.run_window(paths, the_lab.layout.source(),
                                   probe_window.WindowSettings(**settings),
                                   capture_netns=the_lab.spec.hv_netns)


@pytest.fixture
def ovn_lab(lab_factory):
    def make(**fields):
        return lab_factory(switch='ovn', **fields)
    return make


def daemon_pids(the_lab):
    """Every pid in a pidfile under the lab's state directory."""
    pids = {}
    for path in glob.glob(os.path.join(the_lab.state_dir, '**', '*.pid'),
                          recursive=True):
        pid = labswitch.read_pid(path)
        if pid is not None:
            pids[path] = pid
    return pids


def test_geneve_probes_seen_encapsulated_on_pif_and_plain_on_tap(ovn_lab):
    the_lab = ovn_lab(guests=2)
    assert the_lab.spec.network_type == 'geneve'
    vni = the_lab.layout.tunnel_key()   # read from the Southbound DB
    paths = the_lab.paths()
    tunnels = the_lab.layout.hv.ovs.vsctl(
        '--bare', '--columns=name', 'find', 'Interface',
        'type=geneve').split()
    assert len(tunnels) == 1
    for path in paths:
        assert path.interfaces == (the_lab.spec.pif, path.vif)
        assert set(path.unseen) == {'br-phy', 'br-int', tunnels[0]}

    count = 20
    result = window(the_lab, protocol='icmp', count=count)
    assert result.capture.drops == 0
    pif = result.batch.interface_index(the_lab.spec.pif)
    for g in the_lab.guests:
        rep = result.reports[g.vif]
        assert rep.sent == count
        assert rep.unseen_at_pif == 0
        assert rep.ingress.count == count, rep
        assert rep.ingress.lost == 0
        assert rep.egress.count == count, rep.egress
        assert rep.vni == vni
        tap = result.batch.interface_index(g.vif)
        seen = conftest.probe_times(result.batch, the_lab.spec.pif, g.vif)
        assert len(seen) == count
        for seq in seen:
            key = seq << 1
            on_pif = result.batch.encap.get((key, pif))
            assert on_pif is not None and on_pif.vni == vni, seq
            assert on_pif.tunnel == 'geneve'
            assert (key, tap) not in result.batch.encap, 'plain on the tap'
    # Only the userspace datapath took the Geneve packets in: the kernel
    # of neither side answered one (ICMP port unreachable).
    for ns in (the_lab.spec.hv_netns, the_lab.spec.src_netns):
        assert icmp_errors_sent(ns) == 0, ns


def icmp_errors_sent(ns):
    text = netns.run(['cat', '/proc/net/snmp'], netns=ns).stdout
    head, values = [line.split() for line in text.splitlines()
                    if line.startswith('Icmp:')][:2]
    return int(dict(zip(head, values))['OutDestUnreachs'])


def test_flat_localnet_probes_plain_on_pif_and_tap(ovn_lab):
    the_lab = ovn_lab(guests=2, network_type='flat')
    for path in the_lab.paths():
        assert path.interfaces == (the_lab.spec.pif, path.vif)
        assert path.encap == ()
        assert path.unseen[0] == 'br-ex' and path.unseen[-1] == 'br-int'
    result = window(the_lab, protocol='icmp', count=20)
    for g in the_lab.guests:
        rep = result.reports[g.vif]
        assert rep.ingress.count == 20 and rep.egress.count == 20, rep
        assert rep.vni is None
    assert not result.batch.encap


@pytest.mark.parametrize('network_type', ['geneve', 'flat'])
def test_topology_finds_the_lab_path_from_the_switch(ovn_lab, network_type):
    """The product's OVSDB topology agrees with the lab's truth."""
    the_lab = ovn_lab(guests=1, network_type=network_type)
    hv = the_lab.layout.hv
    switch = topology.SwitchView(
        snapshot=lambda: ovsdb.read_snapshot(hv.ovs.db_connection),
        addresses=lambda: topology.read_addresses(the_lab.spec.hv_netns))
    links = topology.IpLinks(the_lab.spec.hv_netns)
    want, = the_lab.paths()
    found = topology.find_path(want.vif, links, switch)
    assert found.interfaces == want.interfaces
    assert tuple(d for hop in found.via for d in hop) == want.unseen
    assert found.encap == want.encap


@pytest.mark.parametrize('network_type', ['geneve', 'flat'])
def test_loss_exact_through_the_acl(ovn_lab, network_type):
    the_lab = ovn_lab(guests=2, network_type=network_type, losses=(
        labspec.LossInjection(guest=0, every=10, protocol='icmp'),))
    lossy, clean = the_lab.guests
    for _ in range(2):   # the count carries over windows exactly
        result = window(the_lab, protocol='icmp', count=50)
        rep = result.reports[lossy.vif]
        assert rep.ingress.lost == 5, rep.ingress
        assert rep.ingress.count == 45
        # The drops touch nothing else: every probe that passed is
        # answered through the switch.
        assert (rep.egress.count, rep.egress.lost) == (45, 0), rep.egress
        assert result.reports[clean.vif].ingress.lost == 0
        assert result.reports[clean.vif].ingress.count == 50
        # Dropped after the pif, and the 10th, 20th... of the guest's.
        conftest.assert_every_nth_lost(result, the_lab, lossy, clean,
                                       every=10, probes=100)
    # UDP probes are not counted by an ICMP loss.
    result = window(the_lab, protocol='udp', count=20)
    assert result.reports[lossy.vif].ingress.lost == 0


def test_udp_filtered_by_the_security_group(ovn_lab):
    the_lab = ovn_lab(guests=2)
    open_, closed = the_lab.guests
    the_lab.layout.allow_only(closed.index, ('icmp', 'tcp'))
    result = window(the_lab, protocol='udp', count=20)
    rep = result.reports[closed.vif]
    assert rep.filtered, rep
    assert rep.ingress.lost == 20 and rep.unseen_at_pif == 0
    assert not result.reports[open_.vif].filtered
    assert result.reports[open_.vif].ingress.count == 20
    # The rest of the group's rules still hold for that guest.
    result = window(the_lab, protocol='icmp', count=10)
    assert result.reports[closed.vif].ingress.count == 10


def test_tcp_probes_through_conntrack_leave_vswitchd_alive(ovn_lab):
    the_lab = ovn_lab(guests=2)
    chassis = (the_lab.layout.hv, the_lab.layout.src)
    for _ in range(2):
        result = window(the_lab, protocol='tcp', count=30)
        for g in the_lab.guests:
            rep = result.reports[g.vif]
            assert rep.ingress.count == 30, rep
            assert rep.egress.count == 30, rep.egress
    # They did go through the ACLs' conntrack (on both chassis).
    for c in chassis:
        entries = c.ovs.appctl('dpctl/dump-conntrack')
        assert any(f'dst={g.address}' in entries and 'tcp' in entries
                   for g in the_lab.guests), entries
        pid = c.ovs.pids()['ovs-vswitchd']
        assert labproc.pid_alive(pid), f'ovs-vswitchd of {c.name} died'
        assert 'ovs-vswitchd' in c.ovs.appctl('version')


@pytest.mark.parametrize('network_type', ['geneve', 'flat'])
def test_delay_held_mid_pipeline_each_hold_recorded(ovn_lab, network_type):
    delay_ms, count = 2.0, 30
    the_lab = ovn_lab(guests=2, network_type=network_type, delays=(
        labspec.DelayInjection(guest=1, delay_ms=delay_ms),))
    fast, slow = the_lab.guests
    result = window(the_lab, protocol='icmp', count=count,
                    per_vnic_interval_ms=5.0)
    for g in the_lab.guests:
        rep = result.reports[g.vif]
        # Resumed into OVN's pipeline: conntrack saw the probes, so the
        # guest's answers pass the ACLs too.
        assert (rep.ingress.count, rep.egress.count) == (count, count), rep
    # Same clock: each hold sits inside pif → tap.
    held = conftest.held_probes(the_lab, result, slow, delay_ms,
                                CLOCK_TOLERANCE_NS)
    overheads = [t_vif - t_pif - rec.hold_ns
                 for t_pif, t_vif, rec in held.values()]
    # Pausing costs a trip through ovs-vswitchd's slow path (~0.3-0.5 ms
    # on a loaded 2-core machine), less than the delay itself.
    assert statistics.median(overheads) < delay_ms * 1e6, overheads
    assert not the_lab.delay_records(0)
    assert result.reports[fast.vif].ingress.p50_us < delay_ms * 1000 / 2
    # One mark per guest: no loss where the delay is; and only the
    # switch's own way.
    with pytest.raises(labswitch.LabError, match='already marked'):
        the_lab.inject_loss(labspec.LossInjection(guest=1, every=5))
    with pytest.raises(labswitch.LabError, match='netfilter'):
        the_lab.inject_delay(labspec.DelayInjection(
            guest=0, delay_ms=1.0, backend='nfqueue'))


def test_teardown_leaves_no_namespace_daemon_or_state(lab_factory):
    conftest.require_root()
    prefix = conftest.unique_prefix('ovn')
    the_lab = lab_mod.Lab(labspec.LabSpec(prefix=prefix, switch='ovn'))
    try:
        the_lab.build()
        pids = daemon_pids(the_lab)
        # central (nb, sb, northd), two chassis (ovsdb-server,
        # ovs-vswitchd, ovn-controller each)
        assert len(pids) == 9, pids
        assert all(labproc.pid_alive(p) for p in pids.values())
        # The layout stops its daemons itself, before the lab ends what
        # is left in its namespaces.
        the_lab.layout.teardown()
        assert [p for p in pids.values() if labproc.pid_alive(p)] == []
        the_lab.teardown()
        assert not [n for n in os.listdir('/run/netns')
                    if n.startswith(prefix)]
        assert [p for p in pids.values() if labproc.pid_alive(p)] == []
        assert not os.path.exists(the_lab.state_dir)
    finally:
        labstate.teardown_kept(prefix)


def test_kept_lab_down_stops_every_daemon():
    """``netweaver lab --keep`` then ``netweaver lab down``: the daemons
    of a kept lab end with it, though no Lab object is left."""
    conftest.require_root()
    prefix = conftest.unique_prefix('ovk')
    try:
        the_lab = lab_mod.Lab(labspec.LabSpec(prefix=prefix, switch='ovn',
                                              persistent=True)).build()
        pids = daemon_pids(the_lab)
        assert pids and all(labproc.pid_alive(p) for p in pids.values())
        assert prefix in labstate.kept_prefixes()
        # The state file names each daemon by a word of its own command
        # line: 'lab down' ends exactly those (and what else runs in the
        # lab's namespaces).
        with open(os.path.join(the_lab.state_dir, labstate.STATE_FILE)) as f:
            recorded = json.load(f)['pids']
        assert sorted(e['pid'] for e in recorded) == sorted(pids.values())
        for entry in recorded:
            with open(f"/proc/{entry['pid']}/cmdline", 'rb') as f:
                assert entry['marker'].encode() in f.read().split(b'\0')
        assert labstate.teardown_kept(prefix) == [prefix]
        assert [p for p in pids.values() if labproc.pid_alive(p)] == []
        assert not [n for n in os.listdir('/run/netns')
                    if n.startswith(prefix)]
    finally:
        labstate.teardown_kept(prefix)


def test_cli_ovn_json_hops_truth_delay_and_loss():
    conftest.require_root()
    prefix = conftest.unique_prefix('ovc')
    try:
        proc = conftest.run_cli(
            'lab', '--switch', 'ovn', '--json', '--count', '20',
            '--loss-every', '5', '--loss-guest', '0', '--prefix', prefix)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert (out['switch'], out['network_type']) == ('ovn', 'geneve')
        assert 'ACL' in out['truth'] and 'pause' in out['truth']
        lossy, slow = out['guests']
        assert lossy['report']['ingress']['lost'] == 4
        assert lossy['injected']['expected_lost'] == 4
        # The default delay where the layout has delay truth.
        holds = slow['injected']['holds']
        assert holds['count'] == 20
        assert slow['report']['ingress']['count'] == 20
        assert slow['report']['ingress']['min_us'] >= holds['min_us']
        hop, = lossy['hops']
        assert (hop['src'], hop['dst']) == (out['pif'], lossy['tap'])
        assert 'br-int' in hop['unseen']
        assert lossy['report']['vni'] == out['segmentation_id']
        assert not [n for n in os.listdir('/run/netns')
                    if n.startswith(prefix)]
    finally:
        labstate.teardown_kept(prefix)


def test_ceilometer_polling_measures_the_ovn_host(ovn_lab, tmp_path):
    """The real agent, told only where the switch's database is, finds
    the pif (and Geneve) from OVSDB and publishes latency under the
    resource ids of Ceilometer's own network.incoming.bytes."""
    the_lab = ovn_lab(guests=2)
    files = labagent.write_files(
        the_lab, str(tmp_path / 'agent'), interval_s=3,
        meters=('network.incoming.bytes', *labagent.LATENCY_METERS),
        probe={'probe_count': 10, 'max_window_ms': 2000.0,
               'ovsdb_connection': the_lab.layout.ovsdb_connection})
    expected = set(labagent.resource_ids(the_lab).values())

    def ready(series):
        got = {(s.name, s.label('resource')) for s in series}
        return series if all(
            (name, rid) in got for rid in expected
            for name in ('ceilometer_network_vif_latency',
                         'ceilometer_network_incoming_bytes')) else None

    with labagent.PollingAgent(files, the_lab.spec.hv_netns) as agent:
        series = agent.wait_for(ready, 60)
    for s in series:
        if s.name == 'ceilometer_network_vif_latency':
            assert s.value > 0, s


@pytest.mark.parametrize('mode', ['probe', 'fingerprint'])
def test_tcpdump_pcaps_of_the_geneve_pif_agree_with_the_window(
        ovn_lab, tmp_path, mode):
    """``netweaver analyze`` on tcpdump's pcaps of the pif (Geneve) and
    the tap finds the live window's probes, VNI and latencies."""
    the_lab = ovn_lab(guests=1)
    guest, = the_lab.guests
    count = 100
    with tcpdump.recording(
            tcpdump.Tcpdump(
                the_lab.spec.hv_netns, iface, str(tmp_path / f'{iface}.pcap'),
                bpf, limit=2 * count + 50)
            for iface, bpf in ((the_lab.spec.pif, ['udp', 'port', '6081']),
                               (guest.vif, ['icmp']))) as dumps:
        result = window(the_lab, protocol='icmp', count=count,
                        interval_ms=0.5)
    live = result.reports[guest.vif]
    assert live.ingress.count == count
    found = offline.analyze_pcaps(
        dumps[0].path, dumps[1].path, mode=mode,
        destination=guest.address if mode == 'fingerprint' else None,
        session=result.session if mode == 'probe' else None,
        pif_name=the_lab.spec.pif, vif_name=guest.vif)
    assert found.mode == mode
    assert found.report.ingress.count == count, found.report
    assert found.report.vni == live.vni
    assert found.report.ingress.p50_us == pytest.approx(
        live.ingress.p50_us, abs=1.0)


def test_failed_build_stops_the_daemons_it_started(monkeypatch):
    conftest.require_root()
    prefix = conftest.unique_prefix('ovf')
    started = {}

    def broken(layout):
        started.update(daemon_pids(layout.lab))
        raise labswitch.SwitchError('injected failure once the daemons run')

    monkeypatch.setattr(ovn.OvnLayout, '_wait_ready', broken)
    try:
        with pytest.raises(labswitch.LabError, match='injected failure'):
            lab_mod.Lab(labspec.LabSpec(prefix=prefix, switch='ovn')).build()
        assert len(started) == 9, started
        assert [p for p in started.values() if labproc.pid_alive(p)] == []
        assert not [n for n in os.listdir('/run/netns')
                    if n.startswith(prefix)]
        assert not os.path.exists(labstate.state_dir(prefix))
    finally:
        labstate.teardown_kept(prefix)


@pytest.mark.parametrize('network_type', ['geneve', 'flat'])
def test_ipv6_probes_and_exact_loss(ovn_lab, network_type):
    the_lab = ovn_lab(guests=2, ipv6=True, network_type=network_type,
                      losses=(labspec.LossInjection(guest=0, every=10,
                                                    protocol='icmp'),))
    lossy, clean = the_lab.guests
    paths = the_lab.paths(ipv6=True)
    assert [p.address for p in paths] == [lossy.address6, clean.address6]
    settings = {'geneve_port': paths[0].encap_port('geneve')}
    for protocol in ('icmp', 'udp', 'tcp'):
        result = probe_window.run_window(
            paths, the_lab.layout.source(),
            probe_window.WindowSettings(protocol=protocol, count=30,
                                        **settings),
            capture_netns=the_lab.spec.hv_netns)
        lost = 3 if protocol == 'icmp' else 0
        assert result.reports[lossy.vif].ingress.lost == lost
        assert result.reports[lossy.vif].ingress.count == 30 - lost
        assert result.reports[clean.vif].ingress.count == 30
        if protocol == 'tcp':
            # The guests' resets (IPv6: checksum left to the NIC) pass
            # the ACLs' conntrack.
            assert result.reports[clean.vif].egress.count == 30
    # The IPv4 probes to the same guest are counted on their own.
    result = window(the_lab, protocol='icmp', count=10)
    assert result.reports[lossy.vif].ingress.lost == 1
