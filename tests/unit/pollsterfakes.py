"""The latency pollsters' test fixture: Ceilometer's pollster test base
with a fake libvirt inspector (vNICs and domain XML from
:mod:`netweaver_agent.lab.virt`), sysfs as a small tree of real files and
links, and the probe window patched to return canned
:class:`latency.LatencyReport` s: no sockets.  Used by test_pollsters and
test_passive; it holds no tests itself."""

import logging
import os
import threading
import time
from unittest import mock
from xml.etree import ElementTree

import fixtures

from ceilometer.compute.virt import inspector as virt_inspector
from ceilometer import service
from ceilometer.polling import manager
from ceilometer.tests.unit.compute.pollsters import base

from netweaver_agent.agent import opts
from netweaver_agent.agent import pollsters
from netweaver_agent.agent import privileged
from netweaver_agent.core import capture
from netweaver_agent.core import latency
from netweaver_agent.core import sightings
from netweaver_agent.core import sources
from netweaver_agent.core import window as probe_window
from netweaver_agent.lab import virt

# The public contract (entry point and meter names, units): pinned here,
# declared once in pollsters.METERS.
METERS = {
    'network.vif.latency': (pollsters.VifLatencyPollster, 'us'),
    'network.vif.latency.p50': (pollsters.VifLatencyP50Pollster, 'us'),
    'network.vif.latency.p99': (pollsters.VifLatencyP99Pollster, 'us'),
    'network.vif.latency.max': (pollsters.VifLatencyMaxPollster, 'us'),
    'network.vif.outgoing.latency':
        (pollsters.VifOutgoingLatencyPollster, 'us'),
    'network.vif.probe.loss': (pollsters.VifProbeLossPollster, '%'),
}
INSTANCE_ID = '3f2d6c1e-8a4b-4c5d-9e6f-7a8b9c0d1e2f'
PORT_B = 'bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb'
TAP_B = 'tap' + PORT_B[:11]


def stats(ingress_ns, lost=0):
    return latency.DirectionStats.from_ns(ingress_ns, lost)


def report(vif, ingress_ns=(), lost=0, egress_ns=(), unseen=0,
           hops=(), vlan=(), vni=None):
    return latency.LatencyReport(
        vif=vif, pif='eth1', protocol='icmp',
        sent=len(ingress_ns) + lost + unseen,
        ingress=stats(list(ingress_ns), lost),
        egress=stats(list(egress_ns)), turnaround=stats([]),
        hops=hops, unseen_at_pif=unseen, vlan=vlan, vni=vni)


class FakeDomain:
    def __init__(self, xml, domid=1):
        self.xml = xml
        self.domid = domid

    def XMLDesc(self, flags=0):
        return self.xml

    def ID(self):
        return self.domid


class FakeInspector:
    """``inspect_vnics`` and a connection serving domain XML."""

    def __init__(self):
        self.vifs = {}
        self.domains = {}
        self.calls = 0
        self.listed_at = []
        self.errors = {}
        self.connection = mock.Mock()
        self.connection.lookupByUUIDString.side_effect = self.domains.get

    def add(self, instance_id, guests, extra_interfaces=''):
        """One domain whose vNICs are those of ``guests``."""
        dom = virt.domain_element(guests[0])
        nova = '{%s}' % virt.NOVA_NS
        ports = dom.find(f'metadata/{nova}instance/{nova}ports')
        for g in guests[1:]:
            other = virt.domain_element(g)
            dom.find('devices').append(other.find('devices/interface'))
            ports.append(other.find(
                f'metadata/{nova}instance/{nova}ports/{nova}port'))
        xml = ElementTree.tostring(dom, encoding='unicode')
        if extra_interfaces:
            xml = xml.replace('</devices>', extra_interfaces + '</devices>')
        self.domains[instance_id] = FakeDomain(xml)
        self.vifs[instance_id] = [
            virt_inspector.InterfaceStats(
                name=g.vif, mac=g.mac,
                fref=g.filter_name if g.filterref else None,
                parameters=({'ip': g.address} if g.filterref else {}) |
                {'interfaceid': None, 'bridge': g.bridge},
                rx_bytes=1, rx_packets=2, rx_drop=3, rx_errors=4,
                tx_bytes=5, tx_packets=6, tx_drop=7, tx_errors=8,
                rx_bytes_delta=9, tx_bytes_delta=10)
            for g in guests]

    def inspected_domain(self, instance):
        return self.connection.lookupByUUIDString(instance.id)

    def inspect_vnics(self, instance, duration):
        self.calls += 1
        self.listed_at.append(time.monotonic())
        if instance.id in self.errors:
            raise self.errors[instance.id]
        return iter(self.vifs[instance.id])


class FakeWindow:
    """Stands in for :func:`probe_window.run_window`; counts its calls."""

    def __init__(self, reports, delay_s=0.0, error=None):
        self.drops = 0
        self.reports = reports
        self.delay_s = delay_s
        self.error = error
        self.calls = []
        self.settings = []
        self.deadlines = []
        self.lock = threading.Lock()

    def __call__(self, paths, source, settings=None, capture_netns=None,
                 session=None, deadline_s=None, capture_class=None):
        with self.lock:
            self.calls.append(list(paths))
            self.settings.append(settings)
            self.deadlines.append(deadline_s)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return probe_window.WindowResult(
            session=7, started_ns=1, duration_ns=2_500_000,
            reports={p.vif: self.reports[p.vif] for p in paths
                     if p.vif in self.reports},
            capture=capture.CaptureStats(packets=10, drops=self.drops,
                                         probes=10, foreign=0),
            send=sources.SendResult(sent=10),
            batch=sightings.SightingBatch(7))


class PollsterTestCase(base.TestPollsterBase):
    """Two vNICs of one instance on a Linux bridge (``tapaaa`` with a
    filterref, TAP_B named by its nova port), canned reports for both,
    :attr:`run_window` the patched window."""

    def setUp(self):
        super().setUp()
        self.instance.id = INSTANCE_ID
        self.fake = FakeInspector()
        # The inspector is one per process; every test gets a fresh one.
        pollsters.INSPECTOR.reset()
        self.addCleanup(pollsters.INSPECTOR.reset)
        self.useFixture(fixtures.MockPatch(
            'netweaver_agent.agent.inspector.new_libvirt_inspector',
            lambda conf: self.fake))
        # No privsep daemon in unit tests (run_window is faked below).
        self.useFixture(fixtures.MockPatch(
            'netweaver_agent.agent.privileged.warm_up'))
        # probe_source 'local' (the default) probes only probe_networks.
        opts.register_opts(self.CONF)
        self.CONF.set_override('probe_networks', ['198.18.0.0/15'],
                               group='netweaver')
        self.sysfs = self.useFixture(fixtures.TempDir()).path
        self.log = self.useFixture(fixtures.FakeLogger(
            name='netweaver_agent', level=logging.DEBUG))
        self.guests = [
            virt.GuestDomain(index=0, name='web', uuid=INSTANCE_ID,
                             vif='tapaaa', mac='fa:16:3e:00:00:01',
                             address='198.18.1.10', bridge='brq1'),
            # No filterref: the address comes from the nova port whose
            # uuid names the tap, as nova names taps.
            virt.GuestDomain(index=0, name='web', uuid=INSTANCE_ID,
                             vif=TAP_B, mac='fa:16:3e:00:00:02',
                             address='198.18.1.11', bridge='brq1',
                             filterref=False, port_uuid=PORT_B),
        ]
        self.fake.add(INSTANCE_ID, self.guests)
        self.sysfs_tree({'eth1': 'brq1', 'tapaaa': 'brq1',
                         TAP_B: 'brq1', 'brq1': None})
        self.window = FakeWindow({
            'tapaaa': report('tapaaa', [10_000, 20_000, 30_000],
                             lost=1, egress_ns=[5_000]),
            TAP_B: report(TAP_B, [40_000, 60_000]),
        })
        self.run_window = self.useFixture(fixtures.MockPatch(
            'netweaver_agent.core.window.run_window',
            side_effect=self.window)).mock

    def sysfs_tree(self, masters):
        for dev, master in masters.items():
            os.makedirs(os.path.join(self.sysfs, dev), exist_ok=True)
            if master:
                link = os.path.join(self.sysfs, dev, 'master')
                if os.path.lexists(link):
                    os.unlink(link)
                os.symlink(os.path.join('..', master), link)

    def make(self, factory):
        pollster = factory(self.CONF)
        pollster.inspector.sysfs_root = self.sysfs
        return pollster

    def samples(self, factory, cache=None, resources=None):
        mgr = manager.AgentManager(0, self.CONF)
        pollster = self.make(factory)
        return list(pollster.get_samples(
            mgr, {} if cache is None else cache,
            resources or [self.instance]))

    def by_tap(self, samples):
        return {s.resource_metadata['vif']: s for s in samples}


def libvirt_inspector(uri, **group_overrides):
    """Our latency inspector on the libvirt node at ``uri`` (privsep off,
    probes allowed to 198.18.0.0/15, ``[netweaver]`` overrides on top),
    as a fixture generator: yielded, then its connection closed."""
    conf = service.prepare_service([], [])
    opts.register_opts(conf)
    conf.set_override('libvirt_uri', uri)
    conf.set_override('hypervisor_inspector', 'libvirt')
    overrides = {'privsep': False, 'probe_networks': ['198.18.0.0/15'],
                 **group_overrides}
    for name, value in overrides.items():
        conf.set_override(name, value, group=opts.GROUP)
    found = pollsters.new_inspector(conf)
    yield found
    found.libvirt.connection.close()
    privileged.stop()
