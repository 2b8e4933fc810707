"""Ceilometer compute pollsters: in-host latency of every vNIC, as gauges.

Each meter is a declaration, as Ceilometer's own compute meters are
(``ceilometer.compute.pollsters.net``): its ``sample_name``,
``sample_type`` and ``sample_unit``, and in ``sample_stats_key`` the
statistic of a :class:`latency.LatencyReport` it publishes, a dotted
attribute path (``'ingress.p50_us'``).  The measuring is the latency
inspector's (:class:`inspector.LatencyInspector`): one window per polling
cycle for every vNIC of the host, which the meters share through
Ceilometer's ``cache``.  Everything else the window measured goes into
``resource_metadata`` (:mod:`netweaver_agent.core.reportdict`), with the
same keys on every sample.

The meters derive from Ceilometer's ``PollsterBase``, not from its
``GenericComputePollster``: that one's setup builds Ceilometer's shared
hypervisor inspector (a libvirt connection) and its ``get_samples`` calls
one method of it per instance, and our meters use neither (the latency
inspector lists vNICs with a libvirt inspector of its own, see
:mod:`inspector`).
"""

import operator

from ceilometer.polling import plugin_base
from ceilometer import sample
from oslo_log import log

from netweaver_agent.agent import inspector
from netweaver_agent.agent import opts
from netweaver_agent.agent import samples
from netweaver_agent.core import passive
from netweaver_agent.core import sources

LOG = log.getLogger(__name__)


def sample_from(base, name, type_, unit, volume):
    """A sample like ``base`` (see :meth:`inspector.CycleCache.sample_base`)
    with this meter's name, type, unit and volume; its own metadata dict
    and id (:func:`samples.sample_id`)."""
    return sample.Sample(
        name=name, type=type_, unit=unit, volume=volume,
        user_id=base.user_id, project_id=base.project_id,
        resource_id=base.resource_id,
        resource_metadata=dict(base.resource_metadata),
        monotonic_time=base.monotonic_time, id=samples.sample_id())


class TcpPortsError(ValueError):
    """TCP probes would reuse a source port within the SYN_SENT timeout."""


def meter_names():
    """The names of our meters (:data:`METERS`), in order: what
    polling.yaml, Gnocchi's resource definitions and the lab list."""
    return tuple(cls.sample_name for cls in METERS)


def polling_intervals(conf):
    """The polling intervals (s) of the polling.yaml sources with our meters.

    Ceilometer 27 tells a pollster nothing of its interval: the agent
    loads the pollsters, then reads polling.yaml ([polling] cfg_file) with
    ``PollingManager`` and runs one polling task per distinct interval.
    This reads the same file with the same class.  When it cannot be read,
    the most conservative interval Ceilometer accepts (1 s) is assumed.
    """
    from ceilometer.polling import manager
    try:
        polling = manager.PollingManager(conf)
    except Exception as exc:
        error = exc
    else:
        error = None
    if error is not None:
        LOG.warning('Cannot read the polling intervals from %(file)s '
                    '(%(err)s): assuming 1 s, the shortest Ceilometer '
                    'accepts', {'file': conf.polling.cfg_file, 'err': error})
        return (1,)
    ours = meter_names()
    return tuple(sorted({src.get_interval() for src in polling.sources
                         if any(src.support_meter(m) for m in ours)}))


def check_tcp_ports(conf, intervals=None):
    """``[netweaver] tcp_source_ports`` as a range, checked for the window.

    With ``probe_protocol = tcp``, raises :class:`TcpPortsError` when one
    vNIC's probes within conntrack's SYN_SENT timeout (probe_count per
    window, one window per polling cycle of each interval) need more
    source ports than the range holds: ports would come back while the
    firewalls on the way still track them.

    :param intervals: polling intervals in seconds (None: read them,
        :func:`polling_intervals`)
    """
    group = conf[opts.GROUP]
    name = f'[{opts.GROUP}] tcp_source_ports'
    try:
        ports = sources.parse_port_range(group.tcp_source_ports, name)
    except ValueError as exc:
        raise TcpPortsError(str(exc)) from None
    if group.probe_protocol != 'tcp':
        return ports
    if intervals is None:
        intervals = polling_intervals(conf)
    needed = sources.tcp_ports_needed(group.probe_count, intervals)
    if needed > len(ports):
        every = ', '.join(f'{i} s' for i in sorted(set(intervals)))
        raise TcpPortsError(
            f"[{opts.GROUP}] probe_protocol = tcp: each TCP probe needs a "
            f"source port that no other probe to the same vNIC uses within "
            f"{sources.SYN_SENT_TIMEOUT_S} s (conntrack's SYN_SENT "
            f"timeout), but [{opts.GROUP}] probe_count = "
            f"{group.probe_count} per polling cycle (polling interval "
            f"{every} for these meters in {conf.polling.cfg_file}) needs "
            f"{needed} ports within {sources.SYN_SENT_TIMEOUT_S} s and "
            f"{name} = {group.tcp_source_ports} holds {len(ports)}. "
            f"Lower probe_count, widen tcp_source_ports, lengthen the "
            f"polling interval, or use probe_protocol icmp or udp")
    return ports


def new_inspector(conf):
    """A :class:`inspector.LatencyInspector` for ``conf``, once its TCP
    source ports are checked against our meters' polling intervals
    (:func:`check_tcp_ports`; raises :class:`TcpPortsError`)."""
    try:
        ports = check_tcp_ports(conf)
    except TcpPortsError as exc:
        # Ceilometer logs a pollster that fails to load at DEBUG only.
        LOG.error('netweaver latency meters not loaded: %s', exc)
        raise
    return inspector.LatencyInspector(conf, ports)


# The agent process's one inspector, shared by every meter.
INSPECTOR = inspector.InspectorFactory(new_inspector)


class VifLatencyBase(plugin_base.PollsterBase):
    """Base of every latency meter: publishes ``sample_stats_key`` of each
    vNIC's report from the cycle's shared window.

    ``loss_verdict``: the statistic is a verdict of loss, published only
    for probes (passive matching never claims loss) that reached the tap
    (probes filtered before it are no loss in the host).
    """

    sample_name = None
    sample_type = sample.TYPE_GAUGE
    sample_unit = 'us'
    sample_stats_key = None
    loss_verdict = False

    @property
    def default_discovery(self):
        return 'local_instances'

    def setup_environment(self):
        super().setup_environment()
        opts.register_opts(self.conf)
        try:
            # Refuse what can never work, at load.  Ceilometer turns any
            # error here into a skip it logs at DEBUG only: say it loudly.
            opts.validate(self.conf)
        except opts.OptionsError as exc:
            LOG.error('Meter %(meter)s not loaded: %(err)s',
                      {'meter': self.sample_name, 'err': exc})
            raise
        self.inspector = INSPECTOR.get(self.conf)

    def volume(self, report):
        """This meter's value from a report, or None for no sample."""
        if self.loss_verdict and (report.filtered or
                                  report.protocol == passive.PROTOCOL):
            return None
        return operator.attrgetter(self.sample_stats_key)(report)

    def get_samples(self, manager, cache, resources):
        entry = self.inspector.poll_cycle(cache, resources)
        if entry.permanent_error():
            raise plugin_base.PollsterPermanentError(resources)
        for instance in resources:
            for window, m in entry.for_instance(instance.id):
                volume = self.volume(m.report)
                if volume is None:
                    LOG.debug('%(name)s: no value for vNIC %(vif)s of '
                              'instance %(id)s this cycle',
                              {'name': self.sample_name,
                               'vif': m.path.vif, 'id': instance.id})
                    continue
                base = entry.sample_base(self.conf, instance, window, m)
                yield sample_from(base, self.sample_name, self.sample_type,
                                  self.sample_unit, volume)


class VifLatencyPollster(VifLatencyBase):
    """Mean pif→vif latency of the cycle's probes."""

    sample_name = 'network.vif.latency'
    sample_stats_key = 'ingress.mean_us'


class VifLatencyP50Pollster(VifLatencyBase):
    """Median pif→vif latency."""

    sample_name = 'network.vif.latency.p50'
    sample_stats_key = 'ingress.p50_us'


class VifLatencyP99Pollster(VifLatencyBase):
    """99th percentile of the pif→vif latency."""

    sample_name = 'network.vif.latency.p99'
    sample_stats_key = 'ingress.p99_us'


class VifLatencyMaxPollster(VifLatencyBase):
    """Maximum pif→vif latency."""

    sample_name = 'network.vif.latency.max'
    sample_stats_key = 'ingress.max_us'


class VifOutgoingLatencyPollster(VifLatencyBase):
    """Mean vif→pif latency of the guest's replies."""

    sample_name = 'network.vif.outgoing.latency'
    sample_stats_key = 'egress.mean_us'


class VifProbeLossPollster(VifLatencyBase):
    """Probes received on the pif that never reached the vif, in %."""

    sample_name = 'network.vif.probe.loss'
    sample_unit = '%'
    sample_stats_key = 'ingress.loss_pct'
    loss_verdict = True


# Our meters, in the order operators read them: what setup.cfg's
# ceilometer.poll.compute entry points name, one each.
METERS = (VifLatencyPollster, VifLatencyP50Pollster, VifLatencyP99Pollster,
          VifLatencyMaxPollster, VifOutgoingLatencyPollster,
          VifProbeLossPollster)
