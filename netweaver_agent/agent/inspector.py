"""The latency inspector: one probe window per polling cycle for the host.

What Ceilometer's ``Inspector`` is to its compute meters, this is to
ours (:mod:`netweaver_agent.agent.pollsters`): the meters declare what
they publish, the inspector measures.  Each cycle it lists the host's
vNICs with ``LibvirtInspector.inspect_vnics`` on a libvirt inspector of
its own (Ceilometer's shared one keeps per-tap counters for the
``*.delta`` meters, which an extra call would cut short), resolves each
vNIC's path from pif to vif (:mod:`topology`), and measures them all in
one window (probe, passive or both).  The result is kept in Ceilometer's
``cache`` under :data:`CACHE_KEY`, behind a lock, since ``[polling]
threads_to_process_pollsters`` may run meters in parallel threads on one
cache.

Resource ids and vNIC metadata are those of Ceilometer's own
``NetworkPollster`` for the same vNIC, so latency joins
``network.incoming.bytes`` and friends.
"""

import collections
import dataclasses
import functools
import gc
import threading
import time

from ceilometer.compute.pollsters import net
from ceilometer.compute.virt import inspector as virt_inspector
from oslo_log import log

from netweaver_agent.agent import libvirterrors
from netweaver_agent.agent import opts
from netweaver_agent.agent import ovsdb
from netweaver_agent.agent import privileged
from netweaver_agent.agent import samples
from netweaver_agent.agent import topology
from netweaver_agent.core import capture
from netweaver_agent.core import destinations
from netweaver_agent.core import netns
from netweaver_agent.core import reportdict
from netweaver_agent.core import sources
from netweaver_agent.core import vifpath
from netweaver_agent.core import window as probe_window
from netweaver_agent.ssh import probesource

LOG = log.getLogger(__name__)

CACHE_KEY = 'netweaver_agent.probe_window'
_FROZEN = []        # gc.freeze() done (once per process)
# Listings a parsed domain XML is kept over without being met (a cycle
# lists once, or once per window when its meters' instances differ).
KEEP_PARSED_LISTINGS = 4
# How long the first cycle waits for the privsep daemon to start.
WARM_UP_WAIT_S = 60.0


@dataclasses.dataclass(frozen=True, slots=True)
class VnicMeasurement:
    """One vNIC of one window: the inspector's view and the report."""

    instance_id: str
    stats: virt_inspector.InterfaceStats
    path: vifpath.VifPath
    report: object          # latency.LatencyReport
    metadata: dict          # our resource_metadata keys


@dataclasses.dataclass(frozen=True, slots=True)
class CycleWindow:
    """What one probe window gave the pollsters of a cycle."""

    instance_ids: frozenset
    measurements: tuple = ()
    permanent_error: str | None = None
    polled_at: float = 0.0


class CycleCache:
    """The windows of one polling cycle, kept in Ceilometer's cache.

    Measurements are indexed by instance id as windows are added: each
    meter looks up each of its instances once per cycle.
    """

    def __init__(self):
        self._windows = []
        self._by_instance = {}
        self._bases = {}
        self._bases_lock = threading.Lock()

    @property
    def windows(self):
        """The cycle's :class:`CycleWindow` s, in the order they ran."""
        return tuple(self._windows)

    def add(self, window):
        """Record one :class:`CycleWindow` of the cycle."""
        self._windows.append(window)
        for m in window.measurements:
            self._by_instance.setdefault(m.instance_id, []).append(
                (window, m))

    def covered(self):
        return set().union(*(w.instance_ids for w in self._windows))

    def permanent_error(self):
        for w in self._windows:
            if w.permanent_error:
                return w.permanent_error
        return None

    def for_instance(self, instance_id):
        """``(CycleWindow, VnicMeasurement)`` of one instance's vNICs."""
        return iter(tuple(self._by_instance.get(instance_id, ())))

    def sample_base(self, conf, instance, window, m):
        """A :class:`samples.SampleBase` of vNIC ``m``: what the cycle's
        six meters share (user, project, resource id, resource_metadata,
        time), built once per vNIC and cycle; each meter copies it with
        its own name, unit and volume (``pollsters.sample_from``)."""
        key = (instance.id, m.path.vif)
        with self._bases_lock:
            base = self._bases.get(key)
            if base is None:
                metadata = net.NetworkPollster.get_additional_metadata(
                    instance, m.stats)
                metadata.update(m.metadata)
                base = self._bases[key] = samples.base_of(
                    conf, instance,
                    net.NetworkPollster.get_resource_id(instance, m.stats),
                    metadata, window.polled_at)
            return base


def latency_metadata(report, path, window, source_name):
    """Our resource_metadata keys for one vNIC of a probe window (the
    same every time): :func:`reportdict.report_metadata` and the
    window's."""
    return {**reportdict.report_metadata(report, path),
            **reportdict.window_metadata(source_name, window.capture.drops,
                                         window.session, window.duration_ns)}


def _source(conf):
    """The probe source of ``[netweaver] probe_source``.

    With ``privsep``, ``local`` and ``netns:`` probes are built and sent by
    the privsep daemon (:class:`privileged.PrivsepLocalSource`).
    """
    group = conf[opts.GROUP]
    spec = group.probe_source
    policy = destinations.for_source(spec, group.probe_networks)
    if spec and spec.startswith('ssh://'):
        return probesource.parse_source(
            spec, policy=policy, options=opts.ssh_options(conf))
    source = probesource.parse_source(spec, policy=policy)
    if group.privsep and isinstance(source, sources.LocalSource):
        return privileged.PrivsepLocalSource(
            source.netns_name, context=privileged.context_for(
                group.capture_netns, source.netns_name), policy=policy)
    return source


def window_settings(conf):
    """:class:`probe_window.WindowSettings` from ``[netweaver]``."""
    group = conf[opts.GROUP]
    return probe_window.WindowSettings(
        protocol=group.probe_protocol, count=group.probe_count,
        interval_ms=group.probe_interval_ms,
        per_vnic_interval_ms=group.per_vnic_interval_ms,
        timeout_ms=group.probe_timeout_ms,
        max_window_ms=group.max_window_ms, size=group.probe_size,
        port=group.probe_port, vxlan_port=group.vxlan_port or None,
        geneve_port=group.geneve_port or None)


def _open_rule(protocol, port, source_name):
    if protocol == 'icmp':
        what = 'ICMP echo request'
        cli = '--protocol icmp'
    else:
        what = f'{protocol.upper()} to port {port or "(default)"}'
        cli = f'--protocol {protocol} --dst-port {port or "<port>"}'
    return (f'allow {what} from the probe source ({source_name}) in the '
            f"instance's security group, e.g. 'openstack security group "
            f"rule create --ingress {cli} --remote-ip <source address> "
            f"<group>'")


class LatencyInspector:
    """Lists the host's vNICs and measures them in one window, per cycle.

    One per agent process (:class:`InspectorFactory`), shared by every
    meter; :meth:`poll_cycle` is what a meter calls each cycle.

    :param tcp_ports: ``[netweaver] tcp_source_ports`` as a range, checked
        against the polling intervals (``pollsters.check_tcp_ports``)
    """

    def __init__(self, conf, tcp_ports):
        self.conf = conf
        group = conf[opts.GROUP]
        self.group = group
        # The process's cursor walks the configured range, across windows.
        self.tcp_ports = sources.tcp_port_cursor(tcp_ports)
        self.settings = window_settings(conf)
        self.resolver = topology.load_resolver(group.vif_resolver)
        self.source = _source(conf)
        # Where probes may go, whatever the source (ssh:// included).
        self.policy = destinations.for_source(group.probe_source,
                                              group.probe_networks)
        self.capture_class = None
        self.passive_capture_in = None
        self._warming = None
        if group.privsep:
            privileged.configure(group.privsep_helper_command)
            context = privileged.context_for(
                group.capture_netns, getattr(self.source, 'netns_name', None))
            self.capture_class = privileged.capture_class(context)
            self.passive_capture_in = functools.partial(
                privileged.passive_window, context)
            self._warming = privileged.warm_up(context)
        self.sysfs_root = topology.SYSFS_NET
        # Ours, not Ceilometer's shared one (see the module's docstring).
        self.libvirt = new_libvirt_inspector(conf)
        self._reported = set()
        self._cycle_lock = threading.Lock()
        # {instance id: ((XML, domid), DomainInfo, listing)}: a domain
        # whose XML and id did not change is not parsed again; one no
        # listing met for KEEP_PARSED_LISTINGS is forgotten.
        self._parsed = {}
        self._listing = 0

    def _on_this_host(self):
        """Whether the vifs are this process's own namespace's, seen
        through the real sysfs (no capture namespace, no test tree)."""
        return (not self.group.capture_netns and
                self.sysfs_root == topology.SYSFS_NET)

    def links(self):
        """A cycle's links: this host's from one rtnetlink dump, else the
        capture namespace's, else a sysfs tree of another root, read as
        files."""
        if self._on_this_host():
            return topology.HostLinks(self.sysfs_root)
        if self.group.capture_netns:
            return topology.IpLinks(self.group.capture_netns)
        return topology.SysfsLinks(self.sysfs_root)

    def _presence(self):
        """What tells whether a netdev exists now: this host's asked name
        by name (:class:`topology.LiveNetdevs`), else :meth:`links`."""
        if self._on_this_host():
            return topology.LiveNetdevs()
        return self.links()

    def switch_view(self):
        """A cycle's :class:`topology.SwitchView`: Open vSwitch's database
        (``[netweaver] ovsdb_connection``) and the host's addresses, each
        read at most once, and only if some vif needs them."""
        netns_name = self.group.capture_netns
        addresses = functools.partial(topology.read_addresses, netns_name)
        connection = self.group.ovsdb_connection
        if not connection:
            return topology.SwitchView(addresses=addresses)
        # Listing the vNICs counts against the window's bound.
        timeout_s = min(ovsdb.DEFAULT_TIMEOUT_S,
                        self.settings.max_window_ms / 4000.0)
        return topology.SwitchView(
            functools.partial(ovsdb.read_snapshot, connection,
                              timeout_s=timeout_s, netns_name=netns_name),
            addresses, where=connection)

    def window_settings(self, paths):
        """The settings of a window over ``paths``: the tunnels their
        switch carries them in (``VifPath.encap``) open the capture for
        what ``[netweaver] vxlan_port`` / ``geneve_port`` leave unset."""
        found = {}
        for kind in ('vxlan', 'geneve'):
            name = f'{kind}_port'
            if getattr(self.settings, name) is not None:
                continue
            ports = collections.Counter(
                p.encap_port(kind) for p in paths
                if p.encap_port(kind) is not None)
            if not ports:
                continue
            found[name] = ports.most_common(1)[0][0]
            if len(ports) > 1:
                self._once(('encap', kind, tuple(sorted(ports))),
                           'vNICs of this host are carried in %(kind)s on '
                           'UDP ports %(ports)s; one window captures one: '
                           '%(port)d. Set [netweaver] %(name)s to choose.',
                           {'kind': kind, 'ports': sorted(ports),
                            'port': found[name], 'name': name})
        return dataclasses.replace(self.settings, **found)

    def domain(self, instance):
        """The :class:`topology.DomainInfo` of an instance: from the
        domain its ``inspect_vnics`` just read (its XML fetched once per
        cycle, :class:`OnceXmlDomain`), else looked up."""
        dom = self.libvirt.inspected_domain(instance)
        key = (dom.XMLDesc(0), libvirterrors.domain_id(dom))
        known = self._parsed.get(instance.id)
        if known is not None and known[0] == key:
            info = known[1]
        else:
            info = topology.parse_domain(*key)
        self._parsed[instance.id] = (key, info, self._listing)
        return info

    def _once(self, key, message, args):
        if key in self._reported:
            LOG.debug(message, args)
        else:
            self._reported.add(key)
            LOG.warning(message, args)

    def poll_cycle(self, cache, instances):
        """The cycle's :class:`CycleCache` (``cache[CACHE_KEY]``), after
        one window over the ``instances`` no window of it covered yet."""
        with self._cycle_lock:
            if not _FROZEN:
                # Everything loaded by now (Ceilometer, the meters, their
                # options) lives as long as the agent: out of the garbage
                # collector's full scans, which each cycle would pay for.
                gc.collect()
                gc.freeze()
                _FROZEN.append(True)
            entry = cache.get(CACHE_KEY)
            if entry is None:
                entry = cache[CACHE_KEY] = CycleCache()
            covered = entry.covered()
            missing = [i for i in instances if i.id not in covered]
            if missing:
                try:
                    window = self._cycle_window(missing)
                except Exception:
                    # Once per cycle, not once per meter: record the miss.
                    LOG.exception('Probe window failed unexpectedly; no '
                                  'latency this cycle')
                    window = CycleWindow(
                        instance_ids=frozenset(i.id for i in missing),
                        polled_at=time.monotonic())
                entry.add(window)
            return entry

    # Logging happens outside ``except`` blocks: oslo.log would append the
    # exception (and its traceback) to every line logged inside one.

    def _inspect(self, instance):
        """``(vNICs, DomainInfo)`` of an instance, or None (logged)."""
        try:
            vifs = list(self.libvirt.inspect_vnics(instance, None))
            return vifs, self.domain(instance)
        except (virt_inspector.InstanceNotFoundException,
                virt_inspector.InstanceShutOffException) as exc:
            gone, error = True, exc
        except Exception as exc:
            gone, error = False, exc
        if gone:
            LOG.debug('Instance %(id)s not probed: %(exc)s',
                      {'id': instance.id, 'exc': error})
        else:
            LOG.warning('Cannot list the vNICs of instance %(id)s: '
                        '%(exc)s', {'id': instance.id, 'exc': error})
        return None

    def _resolve(self, instance, domain, iface, stats, links, switch=None):
        """The :class:`vifpath.VifPath` of one vNIC, or None (logged)."""
        try:
            return topology.resolve(
                domain, iface, self.resolver, links,
                vif_prefixes=self.group.vif_prefixes, pif=self.group.pif,
                switch=switch)
        except topology.TopologyError as exc:
            error = exc
        if isinstance(error, topology.NotMeasurable):
            self._once(('unmeasurable', instance.id, iface.mac),
                       'Instance %(id)s: %(exc)s',
                       {'id': instance.id, 'exc': error})
        else:
            LOG.warning('vNIC %(vif)s of instance %(id)s not probed: '
                        '%(exc)s', {'vif': stats.name, 'id': instance.id,
                                    'exc': error})
        return None

    def _allowed(self, instance, path):
        """Whether probes may go to ``path``'s address (else logged).
        Passive and both modes measure every vNIC: nothing or not only
        probes (both mode leaves the refused ones out of the probe
        window, :meth:`_cycle_window`)."""
        if getattr(self.group, 'mode', 'probe') != 'probe':
            return True
        try:
            self.policy.check(path.address)
        except destinations.RefusedDestination as exc:
            error = exc
        else:
            return True
        self._once(('refused', instance.id, path.vif, path.address),
                   'Instance %(id)s vNIC %(vif)s is not measurable: '
                   '%(exc)s', {'id': instance.id, 'vif': path.vif,
                               'exc': error})
        return False

    def paths(self, instances):
        """``[(instance, InterfaceStats, VifPath)]`` of measurable vNICs."""
        links = self.links()
        switch = self.switch_view()
        found = []
        seen_vifs = set()
        self._listing += 1
        for instance in instances:
            inspected = self._inspect(instance)
            if inspected is None:
                continue
            vifs, domain = inspected
            listed = set()
            for stats in vifs:
                iface = domain.interface(target=stats.name, mac=stats.mac)
                if iface is None:
                    LOG.warning('vNIC %(vif)s of instance %(id)s is not in '
                                'its domain XML; not probed',
                                {'vif': stats.name, 'id': instance.id})
                    continue
                listed.add(iface.index)
                path = self._resolve(instance, domain, iface, stats, links,
                                     switch)
                if path is None or not self._allowed(instance, path):
                    continue
                if path.vif in seen_vifs:
                    LOG.warning('vif %(vif)s of instance %(id)s is listed '
                                'twice; probed once',
                                {'vif': path.vif, 'id': instance.id})
                    continue
                seen_vifs.add(path.vif)
                found.append((instance, stats, path))
            for iface in domain.interfaces:
                reason = iface.unmeasurable_reason
                if iface.index not in listed and reason:
                    self._once(('unmeasurable', instance.id, iface.mac),
                               'Instance %(id)s: vNIC %(mac)s is %(why)s; '
                               'in-host latency is not measurable',
                               {'id': instance.id, 'mac': iface.mac,
                                'why': reason})
        self._forget_parsed()
        return found

    def _forget_parsed(self):
        """Forget the domains no recent listing met (gone ones)."""
        oldest = self._listing - KEEP_PARSED_LISTINGS
        for uuid in [u for u, e in self._parsed.items() if e[2] <= oldest]:
            del self._parsed[uuid]

    def _window(self, paths, deadline_s):
        """``(WindowResult, None)`` or ``(None, exception)``."""
        try:
            return probe_window.run_window(
                paths, self.source, self.window_settings(paths),
                capture_netns=self.group.capture_netns,
                deadline_s=deadline_s,
                capture_class=self.capture_class), None
        except (capture.CaptureError, probe_window.ClockStepError,
                sources.SourceError, netns.NetnsError, OSError,
                ValueError) as exc:
            return None, exc

    def _cycle_window(self, instances):
        """One window for every measurable vNIC of ``instances``.

        Listing the vNICs and the probe window together last at most
        ``max_window_ms``: the window gets what the listing left.
        """
        ids = frozenset(i.id for i in instances)
        if self._warming is not None:
            # Starting the privsep daemon (once) is not the cycle's work.
            self._warming.join(WARM_UP_WAIT_S)
            self._warming = None
        deadline_s = time.monotonic() + self.settings.max_window_ms / 1000.0
        found = self.paths(instances)
        if not found:
            return CycleWindow(instance_ids=ids, polled_at=time.monotonic())
        mode = getattr(self.group, 'mode', 'probe')
        if mode == 'passive':
            return self._passive_cycle(ids, found, None, deadline_s)
        if mode == 'both':
            probed = [f for f in found
                      if self.policy.refusal(f[2].address) is None]
            for instance, _stats, path in found:
                if self.policy.refusal(path.address) is not None:
                    self._once(('refused', instance.id, path.vif),
                               'Instance %(id)s vNIC %(vif)s: %(addr)s '
                               'is no probe destination; measured '
                               'passively only',
                               {'id': instance.id, 'vif': path.vif,
                                'addr': path.address})
            # The passive window comes after the probes, within the same
            # deadline: the probes end early enough to leave it its time.
            probe_deadline_s = deadline_s - (
                self.group.passive_window_ms / 1000.0 +
                probe_window.PASSIVE_OPEN_RESERVE_S)
            left_ms = (probe_deadline_s - time.monotonic()) * 1000.0
            if probed and left_ms <= self.settings.timeout_ms + (
                    probe_window.OPEN_RESERVE_S * 1000.0):
                LOG.warning('max_window_ms %(max).0f leaves no time to '
                            'probe %(n)d vNICs before the passive window '
                            '(passive_window_ms %(ms).0f); measured '
                            'passively only this cycle. Raise '
                            'max_window_ms or lower passive_window_ms.',
                            {'max': self.settings.max_window_ms,
                             'n': len(probed),
                             'ms': self.group.passive_window_ms})
                probed = []
            window = (self._probe_cycle(ids, instances, probed,
                                        probe_deadline_s)
                      if probed else CycleWindow(instance_ids=ids))
            if window.permanent_error:
                return window
            return self._passive_cycle(ids, found, window, deadline_s)
        return self._probe_cycle(ids, instances, found, deadline_s)

    def _probe_cycle(self, ids, instances, found, deadline_s):
        """The probe window over ``found`` (probe and both modes)."""
        left_ms = (deadline_s - time.monotonic()) * 1000.0
        open_ms = probe_window.OPEN_RESERVE_S * 1000.0
        if left_ms <= self.settings.timeout_ms + open_ms:
            LOG.warning('Listing %(n)d vNICs took %(took).0f ms of '
                        'max_window_ms %(max).0f: no time left to probe '
                        'them (the capture needs %(open).0f ms to open, '
                        'probe_timeout_ms is %(timeout).0f); no latency '
                        'this cycle. Raise max_window_ms.',
                        {'n': len(found),
                         'took': self.settings.max_window_ms - left_ms,
                         'max': self.settings.max_window_ms,
                         'open': open_ms,
                         'timeout': self.settings.timeout_ms})
            return CycleWindow(instance_ids=ids, polled_at=time.monotonic())
        window, error = self._window([p for _, _, p in found], deadline_s)
        if isinstance(error, capture.CapturePermissionError) or (
                isinstance(error, sources.SourceError)
                and isinstance(error.__cause__, PermissionError)):
            return self._permanent(ids, error)
        if isinstance(error, probe_window.ClockStepError):
            LOG.warning('Probe window for %(n)d vNICs discarded, no latency '
                        'this cycle: %(exc)s', {'n': len(found),
                                                'exc': error})
        elif isinstance(error, sources.SourceError):
            LOG.error('Probe source %(src)s failed; no latency this cycle: '
                      '%(exc)s', {'src': self.source.name, 'exc': error})
        elif error is not None:
            LOG.error('Probe window for %(n)d vNICs failed; no latency '
                      'this cycle: %(exc)s', {'n': len(found), 'exc': error})
        if error is not None:
            return CycleWindow(instance_ids=ids, polled_at=time.monotonic())
        polled_at = time.monotonic()
        LOG.info('Probe window %(session)d: %(vnics)d vNICs of %(inst)d '
                 'instances, %(sent)d probes in %(ms).1f ms',
                 {'session': window.session, 'vnics': len(found),
                  'inst': len(instances), 'sent': window.send.sent,
                  'ms': window.duration_ns / 1e6})
        if window.capture.drops:
            LOG.warning('Probe window %(session)d: the capture dropped '
                        '%(drops)d packets; %(unknown)d probes of unknown '
                        'fate are left out of the loss (probe_unknown)',
                        {'session': window.session,
                         'drops': window.capture.drops,
                         'unknown': sum(r.unknown for r in
                                        window.reports.values())})
        vanished = self._vanished([p for _, _, p in found])
        measurements = []
        for instance, stats, path in found:
            report = window.reports.get(path.vif)
            if report is None:
                continue
            if path.vif in vanished:
                LOG.warning('Instance %(id)s vNIC %(vif)s: %(dev)s '
                            'disappeared during probe window %(session)d; '
                            'no sample this cycle',
                            {'id': instance.id, 'vif': path.vif,
                             'dev': vanished[path.vif],
                             'session': window.session})
                continue
            dropped = bool(window.capture.drops)
            self._explain(instance, path, report, dropped)
            if report.sent and report.entered_pif == 0 and not dropped:
                # Probes that never entered through the pif measured no
                # in-host path: not even the replies' egress is published.
                # (When the capture dropped packets, the pif sightings may
                # be what was lost: the report says so, probe_unknown.)
                continue
            measurements.append(VnicMeasurement(
                instance_id=instance.id, stats=stats, path=path,
                report=report,
                metadata=latency_metadata(report, path, window,
                                          self.source.name)))
        return CycleWindow(instance_ids=ids, measurements=tuple(measurements),
                           polled_at=polled_at)

    def _passive_window(self, paths, deadline_s):
        """A :class:`probe_window.PassiveWindowResult`, or None (logged).
        ``deadline_s``: the cycle's; the window is cut to end by it."""
        group = self.group
        settings = self.window_settings(paths)
        if probe_window.passive_window_within(
                group.passive_window_ms, deadline_s) < 1.0:
            LOG.warning('No time left by max_window_ms %(max).0f for the '
                        'passive window (passive_window_ms %(ms).0f) of '
                        '%(n)d vNICs: no passive latency this cycle. '
                        'Raise max_window_ms.',
                        {'max': self.settings.max_window_ms,
                         'ms': group.passive_window_ms, 'n': len(paths)})
            return None
        try:
            return probe_window.run_passive_window(
                paths, group.passive_sample, group.passive_window_ms,
                group.passive_max_packets,
                capture_netns=group.capture_netns,
                capture_in=self.passive_capture_in,
                vxlan_port=settings.vxlan_port,
                geneve_port=settings.geneve_port, deadline_s=deadline_s)
        except (capture.CaptureError, netns.NetnsError, OSError,
                ValueError) as exc:
            error = exc
        LOG.error('Passive window for %(n)d vNICs failed; no passive '
                  'latency this cycle: %(exc)s',
                  {'n': len(paths), 'exc': error})
        return None

    def _passive_cycle(self, ids, found, probed, deadline_s):
        """One passive window over ``found``, over by ``deadline_s``.
        ``probed``: the cycle's
        probe window (both mode): each vNIC whose probes reached its tap
        keeps the probe measurement, the others get the passive one; the
        other result goes in metadata (``other_result``)."""
        pw = self._passive_window([p for _, _, p in found], deadline_s)
        polled_at = time.monotonic()
        by_vif = {} if probed is None else {
            m.path.vif: m for m in probed.measurements}
        measurements = []
        for instance, stats, path in found:
            result = None if pw is None else pw.results.get(path.vif)
            if result is not None and result.not_measurable:
                self._once(('passive-not-measurable', path.vif),
                           'vNIC %(vif)s of instance %(id)s is not '
                           'measurable passively: %(why)s',
                           {'vif': path.vif, 'id': instance.id,
                            'why': result.not_measurable})
            probe_m = by_vif.get(path.vif)
            if probe_m is not None and probe_m.report.ingress.count:
                metadata = dict(probe_m.metadata, other_result=None if
                                result is None else
                                reportdict.passive_summary(result, pw))
                measurements.append(dataclasses.replace(
                    probe_m, metadata=metadata))
                continue
            if result is None or result.report is None or not (
                    result.report.ingress.count or
                    result.report.egress.count):
                continue        # idle (or nothing matched): no sample
            metadata = reportdict.passive_metadata(result, path, pw)
            if probed is not None:
                metadata['other_result'] = (
                    None if probe_m is None else
                    reportdict.probe_summary(probe_m.report))
            measurements.append(VnicMeasurement(
                instance_id=instance.id, stats=stats, path=path,
                report=result.report, metadata=metadata))
        if pw is not None:
            LOG.info('Passive window: %(vnics)d vNICs, %(kept)d sampled '
                     'packets (1 flow in %(sample)d) in %(ms).1f ms',
                     {'vnics': len(found), 'kept': pw.stats.kept,
                      'sample': pw.sample, 'ms': pw.duration_ns / 1e6})
        return CycleWindow(instance_ids=ids, measurements=tuple(measurements),
                           polled_at=polled_at)

    def _vanished(self, paths):
        """``{vif: netdev}`` of paths that lost an interface meanwhile."""
        try:
            links = self._presence()
        except (topology.TopologyError, OSError) as exc:
            error = exc
        else:
            error = None
        if error is not None:
            LOG.warning('Cannot list the host interfaces after the probe '
                        'window: %s', error)
            return {}
        out = {}
        # Each device asked once: every path shares its pif.
        exists = {}
        for path in paths:
            for dev in path.interfaces:
                there = exists.get(dev)
                if there is None:
                    there = exists[dev] = links.exists(dev)
                if not there:
                    out[path.vif] = dev
                    break
        return out

    def _explain(self, instance, path, report, dropped=False):
        """Log why a vNIC got no latency, naming instance and vNIC."""
        args = {'id': instance.id, 'vif': path.vif, 'pif': path.pif,
                'addr': path.address, 'sent': report.sent,
                'entered': report.entered_pif, 'src': self.source.name}
        if report.filtered:
            args['rule'] = _open_rule(report.protocol, self.settings.port,
                                      self.source.name)
            LOG.warning('Instance %(id)s vNIC %(vif)s: %(entered)d probes to '
                        '%(addr)s entered through %(pif)s and none reached '
                        'the tap: they were filtered before the tap (security '
                        'group / port security), not lost in the host. To '
                        'measure, %(rule)s.', args)
        elif report.entered_pif == 0 and not dropped:
            LOG.warning('Instance %(id)s vNIC %(vif)s is not measurable: '
                        'none of %(sent)d probes to %(addr)s entered the host '
                        'through pif %(pif)s; they do not come from the '
                        'physical network (probe source %(src)s). Set '
                        '[netweaver] probe_source to a host on the physical '
                        'network, or pif to where they enter.', args)
        elif report.ingress.count == 0:
            LOG.warning('Instance %(id)s vNIC %(vif)s: no probe reached '
                        'the tap', args)

    def _permanent(self, ids, exc):
        LOG.error('netweaver latency pollsters disabled: %(exc)s. '
                  'Capturing and sending probes needs CAP_NET_RAW: in the '
                  'privsep daemon (privsep = True, see docs/deploying.md), '
                  'else in the polling agent.', {'exc': exc})
        return CycleWindow(instance_ids=ids, permanent_error=str(exc),
                           polled_at=time.monotonic())


class OnceXmlDomain:
    """A libvirt domain whose XML (``XMLDesc(0)``) is fetched at most once:
    what ``inspect_vnics`` reads is what :meth:`LatencyInspector.domain`
    parses, without a second round trip to libvirtd.  Anything else goes
    to the domain itself."""

    __slots__ = ('_dom', '_xml')

    def __init__(self, dom):
        self._dom = dom
        self._xml = None

    def XMLDesc(self, flags=0):
        if flags:
            return self._dom.XMLDesc(flags)
        if self._xml is None:
            self._xml = self._dom.XMLDesc(0)
        return self._xml

    def __getattr__(self, name):
        return getattr(self._dom, name)


@functools.cache
def _cycle_libvirt_class():
    from ceilometer.compute.virt.libvirt import inspector

    class CycleLibvirtInspector(inspector.LibvirtInspector):
        """Ceilometer's libvirt inspector, keeping the domain its last
        ``inspect_vnics`` looked up (:class:`OnceXmlDomain`) for
        :meth:`inspected_domain`.  Ours alone: one thread at a time
        (:meth:`LatencyInspector.poll_cycle`)."""

        def __init__(self, conf):
            super().__init__(conf)
            self._last = None       # (instance id, OnceXmlDomain)

        def _get_domain(self, instance, raise_if_shutoff):
            self._last = None
            dom = OnceXmlDomain(super()._get_domain(instance,
                                                    raise_if_shutoff))
            self._last = (instance.id, dom)
            return dom

        def inspected_domain(self, instance):
            """The domain ``inspect_vnics(instance)`` just read (taken:
            asked again, it is looked up anew), else a fresh lookup."""
            last, self._last = self._last, None
            if last is not None and last[0] == instance.id:
                return last[1]
            return self.connection.lookupByUUIDString(instance.id)

    return CycleLibvirtInspector


def new_libvirt_inspector(conf):
    """Ceilometer's libvirt inspector, quiet (:mod:`libvirterrors`): what
    lists an instance's vNICs and serves its domain XML, fetched once
    (:class:`OnceXmlDomain`)."""
    libvirterrors.quiet_libvirt()
    return _cycle_libvirt_class()(conf)


class InspectorFactory:
    """The one :class:`LatencyInspector` of the agent process, shared by
    every meter, made by ``make(conf)`` on first use.

    :meth:`reset` forgets it (a new agent, a test), so the next
    :meth:`get` makes a new one.
    """

    def __init__(self, make):
        self._make = make
        self._lock = threading.Lock()
        self._inspector = None

    def get(self, conf):
        """The process's inspector, made from ``conf`` if none is yet."""
        with self._lock:
            if self._inspector is None:
                self._inspector = self._make(conf)
            return self._inspector

    @property
    def current(self):
        """The inspector made so far, or None."""
        return self._inspector

    def reset(self):
        """Forget the inspector: the next :meth:`get` makes a new one."""
        with self._lock:
            self._inspector = None
