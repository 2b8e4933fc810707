"""The agent's own share of a polling cycle made cheaper, same answers.

* the matcher's reports: each direction sorted once for its statistics
  and histogram, a path of pif and vif alone checked for order without
  walking it: equal to the definitions (``DirectionStats.from_ns`` of
  the values in any order, the general order walk);
* a vNIC's probe address kept per (domain, interface): a changed domain
  XML gives the new address;
* a vif's master read once and its bridge's uplink told once;
* the devices of the paths asked once each after the window;
* the window's accepted sightings copied out only when read;
* samples: the base shared by a vNIC's meters without a ``Sample`` of
  its own, each id without libuuid: what Ceilometer's would be.
"""

import json
import socket
import time
import types
import uuid

from ceilometer.compute.pollsters import util
from hypothesis import given
from hypothesis import strategies as st
import pytest

from netweaver_agent.agent import inspector
from netweaver_agent.agent import samples
from netweaver_agent.agent import topology
from netweaver_agent.core import latency
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from netweaver_agent.core import vifpath
from netweaver_agent.core import window
from netweaver_agent.lab import virt
from tests.unit import fakes

SESSION = 4242
T0 = 1_700_000_000_000_000_000
US = 1000
TIMEOUT_NS = 200_000 * US

# --- the matcher's reports --------------------------------------------------

# Per probe: (pif, vif) times of the probe and of its reply, offsets in
# ns from the probe's start; None: not seen there.
_SEEN = st.one_of(st.none(), st.integers(-50 * US, 400_000 * US))
_PROBES = st.lists(st.tuples(_SEEN, _SEEN, _SEEN, _SEEN), min_size=1,
                   max_size=25)


def _reports(probes, interfaces):
    """The report of one vNIC along ``interfaces`` whose probes were seen
    as ``probes`` (no sighting on any hop in between)."""
    pif, vif = interfaces[0], interfaces[-1]
    path = vifpath.VifPath(vif=vif, address='198.18.0.10',
                           interfaces=interfaces)
    batch = sightings.SightingBatch(SESSION)
    for seq, times in enumerate(probes, start=1):
        t0 = T0 + seq * 10**9
        for reply, ifname, at, direction in (
                (0, pif, times[0], sightings.DIR_IN),
                (0, vif, times[1], sightings.DIR_OUT),
                (1, vif, times[2], sightings.DIR_IN),
                (1, pif, times[3], sightings.DIR_OUT)):
            if at is not None:
                batch.append(seq << 1 | reply, batch.interface_index(ifname),
                             t0 + at, direction)
    m = latency.Matcher(SESSION, [path], {s: vif for s in
                                          range(1, len(probes) + 1)},
                        TIMEOUT_NS)
    m.feed_batch(batch)
    return m.reports()[vif], m.accepted()


@given(probes=_PROBES)
def test_a_pif_vif_path_is_judged_as_the_general_walk_judges_it(probes):
    direct, _ = _reports(probes, ('eth1', 'tapa'))
    # The same sightings on a path with a hop nobody saw: the order
    # check walks the path.
    walked, _ = _reports(probes, ('eth1', 'qvb1', 'tapa'))
    for name in ('ingress', 'egress', 'turnaround', 'anomalies', 'late',
                 'unseen_at_pif', 'histograms'):
        assert getattr(direct, name) == getattr(walked, name), name


def test_a_probe_seen_at_once_on_pif_and_vif_takes_no_time():
    report, _ = _reports([(0, 0, 5 * US, 7 * US), (10, 0, None, None)],
                         ('eth1', 'tapa'))
    assert (report.ingress.count, report.ingress.min_us) == (1, 0.0)
    assert report.anomalies == 1


@given(probes=_PROBES)
def test_report_statistics_are_those_of_the_values_in_any_order(probes):
    report, accepted = _reports(probes, ('eth1', 'tapa'))
    values = {'ingress': [], 'egress': [], 'turnaround': []}
    for seq in range(1, len(probes) + 1):
        fwd = accepted.get((seq, False), {})
        back = accepted.get((seq, True), {})
        if 'eth1' in fwd and 'tapa' in fwd and (
                0 <= fwd['tapa'] - fwd['eth1'] <= TIMEOUT_NS):
            values['ingress'].append(fwd['tapa'] - fwd['eth1'])
        if 'tapa' in back and 'eth1' in back and (
                0 <= back['eth1'] - back['tapa'] <= TIMEOUT_NS):
            values['egress'].append(back['eth1'] - back['tapa'])
        if 'tapa' in back and 'tapa' in fwd and back['tapa'] >= fwd['tapa']:
            values['turnaround'].append(back['tapa'] - fwd['tapa'])
    for name, vals in values.items():
        got = getattr(report, name)
        want = latency.DirectionStats.from_ns(vals, got.lost)
        assert got == want, name
        assert report.histogram(name) == latency.log2_histogram(vals)


# --- addresses -----------------------------------------------------------

def _domain(address, filterref=None):
    fref = (f"<filterref filter='f'><parameter name='IP' "
            f"value='{filterref}'/></filterref>" if filterref else '')
    return topology.parse_domain(
        f"<domain type='kvm'><name>instance-1</name><uuid>u1</uuid>"
        f"<metadata><nova:instance xmlns:nova='{virt.NOVA_NS}'>"
        f"<nova:ports><nova:port uuid='p1'><nova:ip type='fixed' "
        f"address='{address}' ipVersion='4'/></nova:port></nova:ports>"
        f"</nova:instance></metadata><devices><interface type='bridge'>"
        f"<mac address='fa:16:3e:00:00:01'/><source bridge='brq1'/>"
        f"<target dev='tapp1'/>{fref}</interface></devices></domain>")


def test_a_changed_domain_gives_its_new_address():
    first = _domain('198.18.0.10')
    iface = first.interfaces[0]
    assert topology.target_address(first, iface) == ('198.18.0.10',
                                                     'nova-metadata')
    # The port got another fixed IP: the interface itself is unchanged.
    moved = _domain('198.18.0.11')
    assert moved.interfaces[0] == iface
    assert topology.target_address(moved, iface) == ('198.18.0.11',
                                                     'nova-metadata')
    # A filterref contradicting the port is refused every time.
    bad = _domain('198.18.0.11', filterref='198.18.0.12')
    for _ in range(2):
        try:
            topology.target_address(bad, bad.interfaces[0])
        except topology.TopologyError as exc:
            assert 'is not one of port p1' in str(exc)
        else:
            raise AssertionError('a contradicting filterref was accepted')
    assert topology.target_address(first, iface)[0] == '198.18.0.10'


# --- devices after the window ---------------------------------------------

class CountingLinks:
    def __init__(self, missing):
        self.missing = set(missing)
        self.asked = []

    def exists(self, dev):
        self.asked.append(dev)
        return dev not in self.missing


def test_each_device_is_asked_once_and_every_vanished_one_is_named():
    paths = [vifpath.VifPath(vif=f'tap{i}', address=f'198.18.0.{i + 1}',
                             interfaces=('eth1', f'qvb{i}', f'tap{i}'))
             for i in range(4)]
    links = CountingLinks({'qvb1', 'tap2'})
    stub = types.SimpleNamespace(_presence=lambda: links)
    assert inspector.LatencyInspector._vanished(stub, paths) == {
        'tap1': 'qvb1', 'tap2': 'tap2'}
    assert sorted(links.asked) == sorted(set(links.asked))
    assert links.asked.count('eth1') == 1
    gone = CountingLinks({'eth1'})
    assert inspector.LatencyInspector._vanished(
        types.SimpleNamespace(_presence=lambda: gone), paths) == {
        p.vif: 'eth1' for p in paths}


# --- the window's accepted sightings -----------------------------------------

def _index(address):
    """tap<i> is at 198.18.0.<i + 1>."""
    return int(address.rsplit('.', 1)[1]) - 1


class SeeingCapture(fakes.SilentCapture):
    """Sees every probe the source was asked to send, genuine, on the
    pif and the vif (the plan is the one the source prepared)."""

    plan = None

    def settle(self, quiet_s, max_s=None):
        plan = SeeingCapture.plan
        pif = self.batch.interface_index('eth1')
        for n, p in enumerate(plan.probes):
            vif = self.batch.interface_index(f'tap{_index(p.dst_ip)}')
            auth = probe.expected_auth(plan.secret, plan.protocol,
                                       plan.session, p.seq,
                                       socket.inet_aton(p.dst_ip))
            self.batch.append(p.seq << 1, pif, T0 + n * US,
                              sightings.DIR_IN, auth)
            self.batch.append(p.seq << 1, vif, T0 + n * US + 7,
                              sightings.DIR_OUT, auth)


class PlanSource(fakes.AllSentSource):
    def prepare(self, plan):
        SeeingCapture.plan = plan


def test_the_accepted_sightings_are_the_matchers_when_read():
    paths = [vifpath.VifPath(vif=f'tap{i}', address=f'198.18.0.{i + 1}',
                             interfaces=('eth1', f'tap{i}'))
             for i in range(3)]
    result = window.run_window(
        paths, PlanSource(), window.WindowSettings(
            count=2, interval_ms=0.01, timeout_ms=1.0, max_window_ms=50.0),
        capture_class=SeeingCapture)
    plan = SeeingCapture.plan
    want = {(p.seq, False): {'eth1': T0 + n * US, f'tap{i}': T0 + n * US + 7}
            for n, p in enumerate(plan.probes)
            for i in (_index(p.dst_ip),)}
    assert len(result.accepted) == len(want) == 6
    assert dict(result.accepted) == want
    assert result.accepted == want
    assert sorted(result.accepted) == sorted(want)
    assert all(r.ingress.count == 2 for r in result.reports.values())


# --- samples -------------------------------------------------------------

def test_sample_ids_are_version_1_of_this_node_now_and_each_later():
    before = time.time_ns() // 100 + 0x01b21dd213814000
    ids = [samples.sample_id() for _ in range(2000)]
    after = time.time_ns() // 100 + 0x01b21dd213814000
    parsed = [uuid.UUID(s) for s in ids]
    assert all(str(u) == s for u, s in zip(parsed, ids))
    assert {(u.version, u.variant, u.node) for u in parsed} == {
        (1, uuid.RFC_4122, uuid.getnode())}
    stamps = [u.time for u in parsed]
    # Never the same time twice, even within one clock tick.
    assert all(a < b for a, b in zip(stamps, stamps[1:]))
    assert before <= stamps[0] and stamps[-1] <= after + len(ids)


class FakeInstance:
    id = 'inst-1'
    user_id = 'user-1'
    tenant_id = 'project-1'
    name = 'vm1'
    hostId = 'host'
    flavor = {'name': 'm1', 'vcpus': 1, 'ram': 512, 'disk': 1,
              'ephemeral': 0}
    status = 'ACTIVE'
    image = {'id': 'img'}
    metadata = {}


def test_the_base_is_ceilometers_sample_without_its_own(monkeypatch):
    conf = types.SimpleNamespace(reserved_metadata_namespace=[],
                                 reserved_metadata_length=256,
                                 reserved_metadata_keys=[])
    ours = {'vif': 'tap1', 'latency_ingress': {'count': 3}}
    want = util.make_sample_from_instance(
        conf, FakeInstance, name='', type='gauge', unit='', volume=0,
        resource_id='inst-1-tap1', additional_metadata=dict(ours),
        monotonic_time=12.5)
    got = samples.base_of(conf, FakeInstance, 'inst-1-tap1', dict(ours),
                          12.5)
    fields = ('user_id', 'project_id', 'resource_id', 'resource_metadata',
              'monotonic_time')
    assert {f: getattr(got, f) for f in fields} == {
        f: getattr(want, f) for f in fields}
    # A Ceilometer without the helper read: its own function, same base.
    monkeypatch.delattr(util, '_get_metadata_from_object')
    monkeypatch.setattr(util, 'make_sample_from_instance',
                        lambda *a, **k: want)
    assert samples.base_of(conf, FakeInstance, 'inst-1-tap1', dict(ours),
                           12.5) == got


def test_sample_ids_stay_unique_while_the_clock_stands_still(monkeypatch):
    monkeypatch.setattr(samples, 'time', types.SimpleNamespace(
        time_ns=lambda: T0))
    stamps = [uuid.UUID(samples.sample_id()).time for _ in range(5)]
    assert len(set(stamps)) == 5
    assert stamps == sorted(stamps)


# --- a vif's path on a Linux bridge ----------------------------------------

class MasterCountingLinks(topology.IpLinks):
    """Links from ``(name, master)`` rows that count the masters asked."""

    def __init__(self, rows, vxlan=None):
        super().__init__(text=json.dumps(
            [{'ifname': n, 'master': m} for n, m in rows]), where='test')
        self.asked = []
        self._vxlans = vxlan or {}

    def master(self, dev):
        self.asked.append(dev)
        return super().master(dev)

    def _vxlan(self, dev):
        if not isinstance(dev, str):     # as sysfs's path join would
            raise TypeError(f"no device {dev!r}")
        return self._vxlans.get(dev)


def test_a_vifs_master_is_read_once_and_its_uplink_told_once():
    links = MasterCountingLinks([('br0', None), ('eth1', 'br0'),
                                 ('tap1', 'br0'), ('bond0', None)])
    assert topology.find_path('tap1', links).interfaces == ('eth1', 'tap1')
    assert links.asked.count('tap1') == 1
    # A configured pif wins over the bridge's uplink.
    assert topology.find_path('tap1', links, configured='bond0') == (
        topology.SwitchPath(('bond0', 'tap1'), (('br0',),)))


def test_a_bridge_with_no_single_uplink_names_them_unless_configured():
    links = MasterCountingLinks([('br0', None), ('eth1', 'br0'),
                                 ('eth2', 'br0'), ('tap1', 'br0'),
                                 ('bond0', None)])
    with pytest.raises(topology.TopologyError,
                       match=r"br0.*\['eth1', 'eth2'\].*\[netweaver\] pif"):
        topology.find_path('tap1', links)
    assert topology.find_path('tap1', links, configured='bond0').interfaces \
        == ('bond0', 'tap1')


def test_a_vxlan_uplink_is_still_told_from_the_uplink():
    links = MasterCountingLinks(
        [('br0', None), ('vxlan-7', 'br0'), ('tap1', 'br0'), ('eth0', None)],
        vxlan={'vxlan-7': topology.VxlanPort('vxlan-7', link='eth0',
                                             port=4789)})
    found = topology.find_path('tap1', links)
    assert found.interfaces == ('eth0', 'vxlan-7', 'tap1')
    assert found.encap == (vifpath.Encapsulation('vxlan', 4789),)
    assert links.asked.count('tap1') == 1
