"""The latency pollsters, in Ceilometer's own pollster-test style.

The libvirt inspector is a fake (vNICs and domain XML from
:mod:`netweaver_agent.lab.virt`), sysfs is a small tree of real files and
links, and the probe window is patched to return canned
:class:`latency.LatencyReport` s: no sockets.  The real agent runs in
``tests/functional/test_agent.py``.
"""

import concurrent.futures
import gc
import threading
import time
from unittest import mock
import uuid

import fixtures
import stevedore

from ceilometer.compute import pollsters as compute_pollsters
from ceilometer.compute.pollsters import net
from ceilometer.compute.pollsters import util
from ceilometer.compute.virt import inspector as virt_inspector
from ceilometer.polling import manager
from ceilometer.polling import plugin_base

from netweaver_agent.agent import inspector
from netweaver_agent.agent import opts
from netweaver_agent.agent import pollsters
from netweaver_agent.core import capture
from netweaver_agent.core import sources
from netweaver_agent.lab import virt
from tests.unit import pollsterfakes
from tests.unit.pollsterfakes import INSTANCE_ID
from tests.unit.pollsterfakes import METERS
from tests.unit.pollsterfakes import report
from tests.unit.pollsterfakes import TAP_B


def _measurement(instance_id, vif):
    return inspector.VnicMeasurement(
        instance_id=instance_id, stats=None, path=None,
        report=report(vif, [1_000]), metadata={'vif': vif})


def test_cycle_cache_finds_an_instances_measurements_in_window_order():
    cache = inspector.CycleCache()
    first = inspector.CycleWindow(
        instance_ids=frozenset({'a', 'b', 'c'}), measurements=(
            _measurement('a', 'tap1'), _measurement('b', 'tap2'),
            _measurement('a', 'tap3')))
    failed = inspector.CycleWindow(instance_ids=frozenset({'d'}))
    second = inspector.CycleWindow(
        instance_ids=frozenset({'e'}), measurements=(
            _measurement('e', 'tap4'), _measurement('a', 'tap5')))
    for w in (first, failed, second):
        cache.add(w)
    assert cache.windows == (first, failed, second)
    assert cache.covered() == {'a', 'b', 'c', 'd', 'e'}
    for instance_id in 'abcdef':
        # What a scan of every window gives, in the same order.
        scan = [(w, m) for w in cache.windows for m in w.measurements
                if m.instance_id == instance_id]
        assert list(cache.for_instance(instance_id)) == scan, instance_id
    assert [m.report.vif for _, m in cache.for_instance('a')] == [
        'tap1', 'tap3', 'tap5']
    assert list(cache.for_instance('c')) == []
    assert cache.permanent_error() is None


class TestLatencyPollsters(pollsterfakes.PollsterTestCase):

    # --- sample building -------------------------------------------------

    def test_each_meter_publishes_its_statistic(self):
        expected = {
            'network.vif.latency': {'tapaaa': 20.0, TAP_B: 50.0},
            'network.vif.latency.p50': {'tapaaa': 20.0, TAP_B: 50.0},
            'network.vif.latency.p99': {'tapaaa': 29.8, TAP_B: 59.8},
            'network.vif.latency.max': {'tapaaa': 30.0, TAP_B: 60.0},
            'network.vif.outgoing.latency': {'tapaaa': 5.0},
            'network.vif.probe.loss': {'tapaaa': 25.0, TAP_B: 0.0},
        }
        for name, (factory, unit) in METERS.items():
            samples = self.by_tap(self.samples(factory))
            self.assertEqual(set(expected[name]), set(samples), name)
            for tap, volume in expected[name].items():
                s = samples[tap]
                self.assertEqual(name, s.name)
                self.assertEqual('gauge', s.type)
                self.assertEqual(unit, s.unit)
                self.assertAlmostEqual(volume, s.volume, places=6)

    def test_every_sample_has_the_same_metadata_keys(self):
        keys = set()
        count = 0
        for factory, _ in METERS.values():
            for s in self.samples(factory):
                count += 1
                keys.add(frozenset(s.resource_metadata))
                for direction in ('latency_ingress', 'latency_egress',
                                  'latency_turnaround'):
                    self.assertEqual(
                        {'count', 'lost', 'min_us', 'max_us', 'mean_us',
                         'stdev_us', 'p50_us', 'p90_us', 'p99_us'},
                        set(s.resource_metadata[direction]))
        self.assertEqual(11, count)
        self.assertEqual(1, len(keys))
        key_set = next(iter(keys))
        for key in ('probe_protocol', 'capture_drops', 'latency_hops',
                    'pif', 'vif', 'probe_address', 'mac', 'fref',
                    'vnic_name', 'parameters', 'vlan', 'vni'):
            self.assertIn(key, key_set)

    def test_samples_equal_ceilometers_and_share_one_build_per_vnic(self):
        """Six meters on one cache: each sample is what Ceilometer's
        make_sample_from_instance gives for it, the shared part is built
        once per vNIC, and every sample owns its metadata."""
        calls = []
        real = util.make_sample_from_instance
        of_instance = util._get_metadata_from_object

        def counting(*args, **kwargs):
            calls.append(args)
            return of_instance(*args, **kwargs)

        # Ceilometer's instance metadata, read once per vNIC.
        self.useFixture(fixtures.MockPatch(
            'ceilometer.compute.pollsters.util._get_metadata_from_object',
            side_effect=counting))
        cache = {}
        out = []
        for factory, _ in METERS.values():
            out += self.samples(factory, cache=cache)
        self.assertEqual(11, len(out))
        self.assertEqual(2, len(calls))      # two vNICs, six meters
        entry = cache[inspector.CACHE_KEY]
        for s in out:
            (window, m), = [
                wm for wm in entry.for_instance(INSTANCE_ID)
                if wm[1].path.vif == s.resource_metadata['vif']]
            metadata = net.NetworkPollster.get_additional_metadata(
                self.instance, m.stats)
            metadata.update(m.metadata)
            want = real(self.CONF, self.instance, name=s.name,
                        type=s.type, unit=s.unit, volume=s.volume,
                        resource_id=net.NetworkPollster.get_resource_id(
                            self.instance, m.stats),
                        additional_metadata=metadata,
                        monotonic_time=window.polled_at)
            got, want = s.as_dict(), want.as_dict()
            self.assertNotEqual(want.pop('id'), got.pop('id'))
            self.assertEqual(want, got)
        self.assertEqual(len(out), len({s.id for s in out}))
        # Time-based ids of this host, as Ceilometer's own samples have.
        self.assertEqual({(1, uuid.getnode())},
                         {(uuid.UUID(s.id).version,
                           uuid.UUID(s.id).node) for s in out})
        out[0].resource_metadata['vif'] = 'changed'
        self.assertNotIn('changed',
                         {s.resource_metadata['vif'] for s in out[1:]})

    def test_the_loaded_agent_is_frozen_for_the_collector(self):
        self.samples(pollsters.VifLatencyPollster)
        self.assertGreater(gc.get_freeze_count(), 0)

    def test_metadata_carries_the_rest(self):
        s = self.by_tap(self.samples(pollsters.VifLatencyPollster))['tapaaa']
        md = s.resource_metadata
        self.assertEqual('icmp', md['probe_protocol'])
        self.assertEqual('eth1', md['pif'])
        self.assertEqual('198.18.1.10', md['probe_address'])
        self.assertEqual(3, md['latency_ingress']['count'])
        self.assertEqual(1, md['latency_ingress']['lost'])
        self.assertAlmostEqual(10.0, md['latency_ingress']['min_us'])
        self.assertAlmostEqual(10.0, md['latency_ingress']['stdev_us'])
        self.assertEqual(0, md['capture_drops'])
        self.assertEqual(7, md['window_session'])
        self.assertEqual([], md['latency_hops'])

    def test_metadata_says_how_probes_were_carried(self):
        self.window.reports['tapaaa'] = report('tapaaa', [10_000],
                                               vni=4242)
        self.window.reports[TAP_B] = report(TAP_B, [10_000],
                                            vlan=(200, 100))
        samples = self.by_tap(self.samples(pollsters.VifLatencyPollster))
        self.assertEqual((None, 4242), (
            samples['tapaaa'].resource_metadata['vlan'],
            samples['tapaaa'].resource_metadata['vni']))
        self.assertEqual(([200, 100], None), (
            samples[TAP_B].resource_metadata['vlan'],
            samples[TAP_B].resource_metadata['vni']))

    def test_untagged_probes_give_none(self):
        md = self.by_tap(self.samples(
            pollsters.VifLatencyPollster))['tapaaa'].resource_metadata
        self.assertIsNone(md['vlan'])
        self.assertIsNone(md['vni'])

    def test_vxlan_port_reaches_the_window(self):
        self.samples(pollsters.VifLatencyPollster)
        self.assertIsNone(self.window.settings[-1].vxlan_port)
        for value, expected in ((4789, 4789), (0, None)):
            self.CONF.set_override('vxlan_port', value, group='netweaver')
            pollsters.INSPECTOR.reset()
            self.samples(pollsters.VifLatencyPollster)
            self.assertEqual(expected, self.window.settings[-1].vxlan_port)

    def test_addresses_come_from_filterref_then_nova_metadata(self):
        self.samples(pollsters.VifLatencyPollster)
        (paths,) = self.window.calls
        self.assertEqual({'tapaaa': '198.18.1.10', TAP_B: '198.18.1.11'},
                         {p.vif: p.address for p in paths})
        self.assertEqual({('eth1', 'tapaaa'), ('eth1', TAP_B)},
                         {p.interfaces for p in paths})

    # --- identity: the same as Ceilometer's NetworkPollster ---------------

    def test_resource_ids_match_network_pollster(self):
        self.inspector.inspect_vnics = mock.Mock(
            return_value=self.fake.vifs[INSTANCE_ID])
        mgr = manager.AgentManager(0, self.CONF)
        theirs = {s.resource_metadata['name']: s
                  for s in net.IncomingBytesPollster(self.CONF).get_samples(
                      mgr, {}, [self.instance])}
        ours = self.by_tap(self.samples(pollsters.VifLatencyPollster))
        self.assertEqual(set(theirs), set(ours))
        # One vNIC with a filterref, one without: both id schemes.
        self.assertEqual(self.guests[0].filter_name,
                         ours['tapaaa'].resource_id)
        self.assertEqual(f'instance-00000001-{INSTANCE_ID}-{TAP_B}',
                         ours[TAP_B].resource_id)
        for tap, s in ours.items():
            t = theirs[tap]
            self.assertEqual(t.resource_id, s.resource_id)
            self.assertEqual(t.user_id, s.user_id)
            self.assertEqual(t.project_id, s.project_id)
            for key in ('name', 'mac', 'fref', 'parameters', 'vnic_name',
                        'display_name', 'instance_id', 'flavor',
                        'instance_type', 'image_ref'):
                self.assertEqual(t.resource_metadata[key],
                                 s.resource_metadata[key], key)

    def test_shared_inspector_is_never_called(self):
        for factory, _ in METERS.values():
            self.samples(factory)
        self.inspector.inspect_vnics.assert_not_called()
        self.assertEqual(len(METERS), self.fake.calls)

    # --- one window per cycle ---------------------------------------------

    def test_one_window_per_cycle_shared_through_cache(self):
        cache = {}
        for factory, _ in METERS.values():
            self.samples(factory, cache=cache)
        self.assertEqual(1, self.run_window.call_count)
        self.assertIn(inspector.CACHE_KEY, cache)
        self.samples(pollsters.VifLatencyPollster, cache={})
        self.assertEqual(2, self.run_window.call_count)

    def test_one_window_per_cycle_with_parallel_pollsters(self):
        self.window.delay_s = 0.05
        cache = {}
        mgr = manager.AgentManager(0, self.CONF)
        objs = [self.make(f) for f, _ in METERS.values()]
        start = threading.Barrier(len(objs))

        def run(p):
            start.wait()
            return list(p.get_samples(mgr, cache, [self.instance]))

        with concurrent.futures.ThreadPoolExecutor(len(objs)) as pool:
            results = list(pool.map(run, objs))
        self.assertEqual(1, self.run_window.call_count)
        self.assertEqual([2, 2, 2, 2, 1, 2], [len(r) for r in results])

    def test_instances_missing_from_the_window_get_their_own(self):
        other = mock.MagicMock()
        other.id = 'b1c2d3e4-0000-4000-8000-000000000002'
        other.name = 'instance-00000002'
        setattr(other, 'OS-EXT-SRV-ATTR:instance_name', other.name)
        other.flavor = self.instance.flavor
        other.image = self.instance.image
        other.status = 'active'
        other.metadata = {}
        self.fake.add(other.id, [virt.GuestDomain(
            index=1, name='db', uuid=other.id, vif='tapccc',
            mac='fa:16:3e:00:00:03', address='198.18.1.12',
            bridge='brq1')])
        self.sysfs_tree({'tapccc': 'brq1'})
        self.window.reports['tapccc'] = report('tapccc', [1_000])
        cache = {}
        self.samples(pollsters.VifLatencyPollster, cache=cache)
        samples = self.samples(pollsters.VifLatencyMaxPollster, cache=cache,
                               resources=[self.instance, other])
        self.assertEqual(2, self.run_window.call_count)
        self.assertEqual(['tapccc'], [p.vif for p in self.window.calls[1]])
        self.assertEqual({'tapaaa', TAP_B, 'tapccc'},
                         set(self.by_tap(samples)))

    # --- the cycle's deadline -----------------------------------------------

    def test_listing_and_window_share_max_window_ms(self):
        opts.register_opts(self.CONF)
        self.CONF.set_override('max_window_ms', 3000.0, group='netweaver')
        before = time.monotonic()
        self.samples(pollsters.VifLatencyPollster)
        after = time.monotonic()
        (deadline,) = self.window.deadlines
        # Counted from the cycle's start, before the vNICs were listed.
        start = deadline - 3.0
        self.assertLessEqual(before, start)
        self.assertLessEqual(start, self.fake.listed_at[0])
        self.assertLessEqual(start, after)

    def test_no_time_left_after_listing_is_no_window(self):
        opts.register_opts(self.CONF)
        self.CONF.set_override('max_window_ms', 300.0, group='netweaver')
        self.CONF.set_override('probe_timeout_ms', 200.0, group='netweaver')
        clock = [1000.0]
        listing = self.fake.inspect_vnics

        def slow_listing(instance, duration):
            clock[0] += 0.15    # 150 ms of a 300 ms bound
            return listing(instance, duration)

        self.fake.inspect_vnics = slow_listing
        with mock.patch('time.monotonic', lambda: clock[0]):
            samples = self.samples(pollsters.VifLatencyPollster)
        self.assertEqual([], samples)
        self.assertEqual(0, self.run_window.call_count)
        self.assertIn('Listing 2 vNICs took 150 ms of max_window_ms 300: '
                      'no time left to probe them', self.log.output)

    # --- failures ---------------------------------------------------------

    def test_a_failing_vnic_does_not_stop_the_others(self):
        gone = virt.GuestDomain(index=0, name='web', uuid=INSTANCE_ID,
                                vif='tapgone', mac='fa:16:3e:00:00:04',
                                address='198.18.1.13', bridge='brq1')
        mute = virt.GuestDomain(index=0, name='web', uuid=INSTANCE_ID,
                                vif='tapmute', mac='fa:16:3e:00:00:05',
                                address='198.18.1.14', bridge='brq1')
        nowhere = virt.GuestDomain(
            index=0, name='web', uuid=INSTANCE_ID, vif='tapnoip',
            mac='fa:16:3e:00:00:06', address='198.18.1.15', bridge='brq1',
            filterref=False)
        self.fake.add(INSTANCE_ID, self.guests + [gone, mute, nowhere])
        # tapnoip: no filterref, and its nova port is not identifiable.
        self.fake.domains[INSTANCE_ID].xml = \
            self.fake.domains[INSTANCE_ID].xml.replace(
                '198.18.1.15', '198.18.0.99')
        self.sysfs_tree({'tapmute': 'brq1', 'tapnoip': 'brq1'})
        self.window.reports['tapmute'] = report('tapmute', (), unseen=5)
        samples = self.by_tap(self.samples(pollsters.VifLatencyPollster))
        self.assertEqual({'tapaaa', TAP_B}, set(samples))
        out = self.log.output
        self.assertIn(f'vNIC tapgone of instance {INSTANCE_ID} not probed',
                      out)
        self.assertIn("vif 'tapgone'", out)
        self.assertIn(f'vNIC tapnoip of instance {INSTANCE_ID} not probed',
                      out)
        self.assertIn('no address recorded for vNIC tapnoip', out)
        self.assertIn(f'Instance {INSTANCE_ID} vNIC tapmute is not '
                      'measurable: none of 5 probes', out)

    def test_probes_not_received_on_the_pif_publish_nothing(self):
        # The guest answered and its replies left through the pif, but the
        # probes never entered through it: no meter, not even egress.
        mute = virt.GuestDomain(index=0, name='web', uuid=INSTANCE_ID,
                                vif='tapmute', mac='fa:16:3e:00:00:05',
                                address='198.18.1.14', bridge='brq1')
        self.fake.add(INSTANCE_ID, self.guests + [mute])
        self.sysfs_tree({'tapmute': 'brq1'})
        self.window.reports['tapmute'] = report(
            'tapmute', (), unseen=5, egress_ns=[4000, 5000])
        egress = self.by_tap(self.samples(
            pollsters.VifOutgoingLatencyPollster))
        self.assertIn('tapaaa', egress)
        for name, (meter, _) in METERS.items():
            taps = set(self.by_tap(self.samples(meter)))
            self.assertNotIn('tapmute', taps, name)
        self.assertIn('Set [netweaver] probe_source', self.log.output)

    def test_no_pif_sighting_while_the_capture_dropped_is_no_verdict(self):
        # The capture dropped packets: the pif sightings may be what was
        # lost.  The vNIC keeps its measurement (metadata, probe_unknown)
        # and nothing blames the probe source.
        mute = virt.GuestDomain(index=0, name='web', uuid=INSTANCE_ID,
                                vif='tapmute', mac='fa:16:3e:00:00:05',
                                address='198.18.1.14', bridge='brq1')
        self.fake.add(INSTANCE_ID, self.guests + [mute])
        self.sysfs_tree({'tapmute': 'brq1'})
        self.window.drops = 40
        self.window.reports['tapmute'] = report(
            'tapmute', (), unseen=5, egress_ns=[4000, 5000])
        egress = self.by_tap(self.samples(
            pollsters.VifOutgoingLatencyPollster))
        self.assertIn('tapmute', egress)
        self.assertNotIn('is not measurable', self.log.output)

    def test_a_failing_instance_does_not_stop_the_others(self):
        other = mock.MagicMock()
        other.id = 'b1c2d3e4-0000-4000-8000-000000000009'
        self.fake.errors[other.id] = virt_inspector.InspectorException(
            'libvirt says no')
        samples = self.samples(pollsters.VifLatencyPollster,
                               resources=[other, self.instance])
        self.assertEqual({'tapaaa', TAP_B}, set(self.by_tap(samples)))
        self.assertIn(f'Cannot list the vNICs of instance {other.id}: '
                      'libvirt says no', self.log.output)

    def test_filtered_probes_give_no_loss_and_name_the_rule(self):
        self.window.reports[TAP_B] = report(TAP_B, (), lost=20)
        loss = self.by_tap(self.samples(pollsters.VifProbeLossPollster))
        self.assertEqual({'tapaaa'}, set(loss))
        mean = self.by_tap(self.samples(pollsters.VifLatencyPollster))
        self.assertEqual({'tapaaa'}, set(mean))
        out = self.log.output
        self.assertIn(f'Instance {INSTANCE_ID} vNIC {TAP_B}: 20 probes', out)
        self.assertIn('filtered before the tap', out)
        self.assertIn('security group rule create --ingress --protocol icmp',
                      out)

    def test_missing_cap_net_raw_is_one_permanent_error(self):
        self.window.error = capture.CapturePermissionError(
            'opening an AF_PACKET capture socket needs CAP_NET_RAW')
        cache = {}
        for factory, _ in METERS.values():
            pollster = self.make(factory)
            self.assertRaises(
                plugin_base.PollsterPermanentError, list,
                pollster.get_samples(None, cache, [self.instance]))
        self.assertEqual(1, self.run_window.call_count)
        self.assertEqual(1, sum('CAP_NET_RAW' in line for line in
                                self.log.output.splitlines()))
        self.assertNotIn('Traceback', self.log.output)

    def test_source_without_permission_is_permanent(self):
        try:
            raise sources.SourceError('raw socket needs CAP_NET_RAW') \
                from PermissionError(1, 'Operation not permitted')
        except sources.SourceError as exc:
            self.window.error = exc
        pollster = self.make(pollsters.VifLatencyPollster)
        self.assertRaises(plugin_base.PollsterPermanentError, list,
                          pollster.get_samples(None, {}, [self.instance]))

    def test_a_failed_window_is_not_permanent(self):
        self.window.error = sources.SourceError('no route to 198.18.1.10')
        self.assertEqual([], self.samples(pollsters.VifLatencyPollster))
        self.assertIn('no latency this cycle', self.log.output)

    def test_an_unexpected_failure_is_logged_once_per_cycle(self):
        self.window.error = RuntimeError('capture thread died')
        cache = {}
        for factory, _ in METERS.values():
            self.assertEqual([], self.samples(factory, cache=cache))
        self.assertEqual(1, self.run_window.call_count)
        self.assertEqual(1, self.log.output.count('capture thread died'))

    def test_vnics_without_host_netdev_are_not_measurable(self):
        hostdev = (
            "<interface type='hostdev'><mac address='fa:16:3e:00:00:07'/>"
            "<source><address type='pci' domain='0x0000' bus='0x03' "
            "slot='0x00' function='0x1'/></source></interface>"
            "<interface type='vhostuser'><mac address='fa:16:3e:00:00:08'/>"
            "<source type='unix' path='/run/vhu0' mode='server'/>"
            "<target dev='vhu0'/></interface>"
            "<interface type='direct'><mac address='fa:16:3e:00:00:09'/>"
            "<source dev='eth2' mode='passthrough'/>"
            "<target dev='macvtap0'/></interface>")
        self.fake.add(INSTANCE_ID, self.guests, extra_interfaces=hostdev)
        self.fake.vifs[INSTANCE_ID].append(
            self.fake.vifs[INSTANCE_ID][0]._replace(
                name='vhu0', mac='fa:16:3e:00:00:08', fref=None))
        self.fake.vifs[INSTANCE_ID].append(
            self.fake.vifs[INSTANCE_ID][0]._replace(
                name='macvtap0', mac='fa:16:3e:00:00:09', fref=None))
        for _ in range(2):
            samples = self.samples(pollsters.VifLatencyPollster)
        self.assertEqual({'tapaaa', TAP_B}, set(self.by_tap(samples)))
        out = self.log.output
        for what in ('SR-IOV hostdev', 'vhost-user', 'macvtap passthrough'):
            self.assertIn(what, out)
        warnings = [r for r in out.splitlines()
                    if 'not measurable' in r]
        # Each vNIC: one line per cycle, the first only as a warning.
        self.assertEqual(6, len(warnings))

    def test_not_measurable_is_a_warning_once(self):
        self.fake.add(INSTANCE_ID, self.guests, extra_interfaces=(
            "<interface type='vdpa'><mac address='fa:16:3e:00:00:0a'/>"
            "<source dev='/dev/vhost-vdpa-0'/></interface>"))
        with self.assertLogs('netweaver_agent.agent.inspector',
                             level='WARNING') as cm:
            self.samples(pollsters.VifLatencyPollster)
            self.samples(pollsters.VifLatencyPollster)
        self.assertEqual(1, sum('vDPA' in r for r in cm.output))

    # --- loading ------------------------------------------------------------

    def test_entry_points_are_named_after_their_meter(self):
        mgr = stevedore.ExtensionManager('ceilometer.poll.compute',
                                         invoke_on_load=False)
        found = {e.name: e.plugin for e in mgr if e.name in METERS}
        self.assertEqual(set(METERS), set(found))
        for name, plugin in found.items():
            self.assertIs(METERS[name][0], plugin)
            self.assertEqual(name, plugin.sample_name)

    def test_options_are_registered_by_the_pollster(self):
        self.make(pollsters.VifLatencyPollster)
        self.assertEqual(20, self.CONF.netweaver.probe_count)
        self.assertEqual('local', self.CONF.netweaver.probe_source)

    def test_meters_are_declarations_listed_once(self):
        self.assertEqual(tuple(METERS), pollsters.meter_names())
        self.assertEqual([c for c, _ in METERS.values()],
                         list(pollsters.METERS))
        for cls in pollsters.METERS:
            self.assertEqual(
                {'sample_name', 'sample_stats_key'},
                {'sample_name', 'sample_stats_key'} & set(vars(cls)))
            # Nothing but declarations: the work is the base's.
            self.assertFalse({'get_samples', 'volume', 'setup_environment'}
                             & set(vars(cls)), cls)
            self.assertEqual('gauge', cls.sample_type)

    def test_ceilometers_shared_inspector_is_never_built(self):
        cache = {}
        for cls in pollsters.METERS:
            self.assertTrue(list(self.make(cls).get_samples(
                None, cache, [self.instance])))
        # TestPollsterBase patches both ways Ceilometer builds it (an
        # AgentManager would: it loads Ceilometer's own meters).
        virt_inspector.get_hypervisor_inspector.assert_not_called()
        compute_pollsters.GenericComputePollster._get_inspector.\
            assert_not_called()

    def test_one_inspector_per_process_until_reset(self):
        made = [self.make(cls) for cls in pollsters.METERS]
        self.assertEqual(1, len({id(p.inspector) for p in made}))
        self.assertIs(made[0].inspector, pollsters.INSPECTOR.current)
        pollsters.INSPECTOR.reset()
        self.assertIsNone(pollsters.INSPECTOR.current)
        again = self.make(pollsters.VifLatencyPollster)
        self.assertIsNot(made[0].inspector, again.inspector)

    def test_meters_loading_in_parallel_share_one_inspector(self):
        made = []
        real = pollsters.new_inspector

        def slow(conf):
            made.append(conf)
            time.sleep(0.05)
            return real(conf)

        self.useFixture(fixtures.MockPatchObject(
            pollsters.INSPECTOR, '_make', slow))
        start = threading.Barrier(len(pollsters.METERS))

        def load(cls):
            start.wait()
            return cls(self.CONF).inspector

        with concurrent.futures.ThreadPoolExecutor(len(METERS)) as pool:
            got = list(pool.map(load, pollsters.METERS))
        self.assertEqual(1, len(made))
        self.assertEqual(1, len({id(i) for i in got}))
