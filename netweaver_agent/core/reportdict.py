"""One :class:`latency.LatencyReport` as plain data, in its two shapes.

The ``netweaver`` command prints reports as JSON (``--json``) and the
agent publishes them as the ``resource_metadata`` of its samples.  Both
shapes are older than this module and others read them (dashboards,
alarms, scripts), so their keys never change; they differ in names
(``sent`` / ``probe_sent``) and in a few extras (JSON: ``loss_pct`` and
histograms; metadata: the devices a hop crosses unseen, ``vlan`` None when
untagged, ``rejected``).  Both are derived here from one canonical dict,
:func:`report_fields`, keyed by the report's own attribute names, through
one table of names, :data:`FIELDS`.
"""

from netweaver_agent.core import latency

STAT_FIELDS = ('count', 'lost', 'min_us', 'max_us', 'mean_us', 'stdev_us',
               'p50_us', 'p90_us', 'p99_us')
DIRECTIONS = ('ingress', 'egress', 'turnaround')

# (LatencyReport attribute, JSON key, resource_metadata key), in the
# order each shape lists them; None: not in that shape.  The metadata's
# ``vif`` is the path's (:func:`report_metadata`).
FIELDS = (
    ('vif', 'vnic', None),
    ('protocol', None, 'probe_protocol'),
    ('pif', 'pif', None),
    ('protocol', 'protocol', None),
    ('sent', 'sent', 'probe_sent'),
    ('unseen_at_pif', 'unseen_at_pif', 'probe_unseen_at_pif'),
    ('late', 'late', 'probe_late'),
    ('unknown', 'unknown', 'probe_unknown'),
    # Seen out of path order (vif before pif): no value, not in stats.
    ('anomalies', 'anomalies', 'probe_anomalies'),
    # Look-alikes of this vNIC's probes whose tag or address did not
    # verify (see netweaver_agent.core.probe): ignored, counted.
    ('rejected', None, 'probe_rejected'),
    ('filtered', 'filtered', 'probe_filtered'),
    ('pif', None, 'pif'),
    # How probes were carried on the pif: VLAN ids (outermost first),
    # tunnel network id and kind (vxlan, geneve).
    ('vlan', 'vlan', 'vlan'),
    ('vni', 'vni', 'vni'),
    ('tunnel', 'tunnel', 'tunnel'),
    ('ingress', 'ingress', 'latency_ingress'),
    ('egress', 'egress', 'latency_egress'),
    ('turnaround', 'turnaround', 'latency_turnaround'),
    # Per hop between seen interfaces.
    ('hops', 'hops', 'latency_hops'),
)
JSON, METADATA = 1, 2


def stats_fields(stats):
    """A :class:`latency.DirectionStats` as a dict of its fields."""
    return {f: getattr(stats, f) for f in STAT_FIELDS}


def stats_to_dict(stats):
    """A :class:`latency.DirectionStats` as JSON: its fields and
    ``loss_pct``."""
    return {**stats_fields(stats), 'loss_pct': stats.loss_pct}


def report_fields(report):
    """The canonical plain form of a report: ``{attribute: value}`` for
    every attribute :data:`FIELDS` names (tuples as lists, statistics as
    :func:`stats_fields`, hops as ``{'src', 'dst', **stats}``)."""
    out = {}
    for attr, _json, _md in FIELDS:
        value = getattr(report, attr)
        if attr in DIRECTIONS:
            value = stats_fields(value)
        elif attr == 'hops':
            value = [{'src': h.src, 'dst': h.dst, **stats_fields(h.stats)}
                     for h in value]
        elif attr == 'vlan':
            value = list(value)
        out[attr] = value
    return out


def _shape(fields, which):
    return {row[which]: fields[row[0]] for row in FIELDS if row[which]}


def report_to_dict(report):
    """A report as the JSON of ``netweaver ... --json``."""
    fields = report_fields(report)
    for direction in DIRECTIONS:
        fields[direction]['loss_pct'] = getattr(report, direction).loss_pct
    for hop, h in zip(fields['hops'], report.hops):
        hop['loss_pct'] = h.stats.loss_pct
    out = _shape(fields, JSON)
    # Histograms as counts per bucket (the edges once, for every one).
    edges = list(latency.HISTOGRAM_EDGES_US)
    for direction in DIRECTIONS:
        out[direction]['histogram'] = list(
            report.histogram(direction) or [0] * len(edges))
    head = list(out.items())
    at = [k for k, _ in head].index('ingress')
    return dict(head[:at] + [('histogram_edges_us', edges)] + head[at:])


def report_metadata(report, path):
    """A report of the vNIC along ``path`` (:class:`vifpath.VifPath`) as
    the agent's resource_metadata keys (without the window's: see
    :func:`window_metadata`)."""
    fields = report_fields(report)
    via = path.hop_via()
    for hop in fields['hops']:
        hop['via'] = list(via.get((hop['src'], hop['dst']), ()))
    fields['vlan'] = fields['vlan'] or None     # None when untagged
    out = _shape(fields, METADATA)
    out['probe_address'] = path.address
    out['vif'] = path.vif
    # Every device between pif and vif where no packet socket sees the
    # probes (bridges, OVS patch and tunnel ports), in path order.
    out['path_unseen'] = list(path.unseen)
    return out


def window_metadata(source_name, capture_drops, session, duration_ns):
    """The resource_metadata keys of the window that measured a vNIC
    (source_name and session None for a passive window)."""
    return {'probe_source': source_name, 'capture_drops': capture_drops,
            'window_session': session, 'window_ms': duration_ns / 1e6}


def passive_summary(result, pw):
    """The passive-only keys of one vNIC's passive result
    (:class:`passive.PassiveResult`) in passive window ``pw``."""
    report = result.report
    nat = {}
    if result.translated:
        # Of passive_packets, matched through a 1:1 NAT (floating IP).
        nat['passive_translated'] = result.translated
    if result.not_measurable:
        nat['passive_not_measurable'] = result.not_measurable
    return {
        **nat,
        'passive_packets': result.packets,
        # Seen on the pif and never on the tap (or the reverse for what
        # the guest sent): counted, never loss.
        'passive_unmatched': result.unmatched,
        # Never crossed the pif (instance to instance, DHCP, metadata).
        'passive_local': result.local,
        'passive_ambiguous': result.ambiguous,
        'passive_covered': result.covered,
        'passive_unkeyable': result.unkeyable,
        'passive_sample': pw.sample,
        'passive_over_cap': pw.stats.over_cap,
        'latency_ingress': None if report is None else
        stats_fields(report.ingress),
        'latency_egress': None if report is None else
        stats_fields(report.egress),
    }


def passive_metadata(result, path, pw):
    """The resource_metadata of a passive measurement: those of a probe
    window (nothing was sent) and the passive counts."""
    return {**report_metadata(result.report, path),
            **window_metadata(None, pw.stats.drops, None, pw.duration_ns),
            **passive_summary(result, pw)}


def probe_summary(report):
    """The probe result of a vNIC the passive one stands in for."""
    return {'probe_protocol': report.protocol, 'probe_sent': report.sent,
            'probe_entered_pif': report.entered_pif,
            'probe_filtered': report.filtered,
            'latency_ingress': stats_fields(report.ingress)}
