"""Render :class:`latency.LatencyReport` objects as a table or as JSON.

Used by every ``netweaver`` command, so ``lab``, ``analyze`` and
``measure`` print the same shape.

Each direction's latencies are also counted on fixed log2 µs buckets
(:data:`latency.HISTOGRAM_EDGES_US`: [0, 1), [1, 2), [2, 4) ... [2**19,
2**20) µs, then everything above): JSON carries the counts
(``histogram``, with the edges as ``histogram_edges_us``), the table a
one-line picture of them, so a bimodal path or a long tail shows.
"""

import dataclasses

from netweaver_agent.core import latency
from netweaver_agent.core import reportdict

DIRECTIONS = reportdict.DIRECTIONS
# The JSON shape is core's (one report-to-dict for JSON and samples).
stats_to_dict = reportdict.stats_to_dict
report_to_dict = reportdict.report_to_dict


_LEVELS = '▁▂▃▄▅▆▇█'


def _edge(us):
    if us >= 1000:
        return f'{us / 1000:g} ms'
    return f'{us} µs'


def histogram_line(counts):
    """One line picturing histogram ``counts`` (see
    :meth:`latency.LatencyReport.histogram`) from its first to its last
    non-empty bucket (each character one bucket, twice the one before;
    ``·`` empty), or None when nothing was measured."""
    if not counts or not any(counts):
        return None
    edges = latency.HISTOGRAM_EDGES_US
    first = next(i for i, c in enumerate(counts) if c)
    last = max(i for i, c in enumerate(counts) if c)
    top = max(counts)
    bar = ''.join(
        '·' if not c else _LEVELS[-(-c * len(_LEVELS) // top) - 1]
        for c in counts[first:last + 1])
    high = _edge(edges[last + 1]) if last + 1 < len(edges) else '∞'
    return f'{_edge(edges[first])} {bar} {high}'


def seed_summary(stats):
    """The seed's ``{'average','minimum','maximum','stdev'}`` (µs)."""
    return {'average': stats.mean_us, 'minimum': stats.min_us,
            'maximum': stats.max_us, 'stdev': stats.stdev_us}


def _fmt(value, width=9):
    if value is None:
        return '-'.rjust(width)
    if isinstance(value, float):
        return f'{value:{width}.1f}'
    return f'{value:{width}d}'


def format_table(reports, capture=None, title=None, undirected=()):
    """A readable table: one block per vNIC, one row per direction.

    :param reports: ``{name: LatencyReport}`` (name is shown as given)
    :param capture: optional :class:`capture.CaptureStats`
    :param undirected: pifs whose capture does not say which way packets
        went (classic pcap on Ethernet): "received" cannot be known there,
        so the table says "seen" and why
    """
    lines = []
    if title:
        lines.append(title)
    head = ('vnic/direction'.ljust(28) + ''.join(
        h.rjust(9) for h in ('count', 'lost', 'min', 'mean', 'stdev',
                             'p50', 'p90', 'p99', 'max')))
    lines.append(head + '   (µs)')
    lines.append('-' * len(head))
    for name, rep in reports.items():
        carried = ''.join(
            [f', vlan {".".join(str(v) for v in rep.vlan)}' if rep.vlan
             else '', f', {rep.tunnel or "vxlan"} vni {rep.vni}'
             if rep.vni is not None else ''])
        verb = 'seen' if rep.pif in undirected else 'received'
        lines.append(f'{name}  (pif {rep.pif}{carried}, {rep.protocol}, '
                     f'{rep.sent} sent, {rep.unseen_at_pif} not {verb} '
                     'on the pif)')
        rows = [(d, getattr(rep, d)) for d in DIRECTIONS]
        rows += [(f'  {h.src}→{h.dst}', h.stats) for h in rep.hops]
        for label, s in rows:
            lines.append(('  ' + label).ljust(28) + ''.join(
                _fmt(v) for v in (s.count, s.lost, s.min_us, s.mean_us,
                                  s.stdev_us, s.p50_us, s.p90_us, s.p99_us,
                                  s.max_us)))
        pictures = [(d, histogram_line(rep.histogram(d)))
                    for d in DIRECTIONS]
        if any(p for _, p in pictures):
            lines.append('  distribution (log2 buckets, each twice the '
                         'one before):')
            lines.extend(('    ' + d).ljust(28) + p for d, p in pictures
                         if p)
        if rep.pif in undirected:
            lines.append('  ! the pif\'s capture does not say which way '
                         'packets went (classic pcap on Ethernet): whether '
                         'a probe was received on the pif or sent out of '
                         'it by this host cannot be known; pcapng with '
                         'epb_flags or tcpdump -i any (Linux cooked) '
                         'says it')
        if rep.unknown:
            lines.append(f'  ! {rep.unknown} probes of unknown fate (the '
                         'capture dropped packets): not counted as lost')
        if rep.anomalies:
            lines.append(f'  ! {rep.anomalies} anomalies: packets seen out '
                         'of path order (on the vif before the pif, or a '
                         'reply before its probe): no latency, left out '
                         'of the statistics')
        if rep.filtered:
            lines.append('  ! probes reached the pif but none reached the '
                         'vif: filtered before the tap (security group or '
                         'port security?)')
        elif rep.sent and rep.entered_pif == 0:
            lines.append('  ! no probe was received on the pif: the probe '
                         'source does not send through the physical '
                         'network; configure a probe source outside the '
                         'host')
    if capture is not None:
        lines.append(f'capture: {capture.packets} packets passed the '
                     f'filter, {capture.drops} dropped by the kernel, '
                     f'{capture.probes} probe sightings')
    return '\n'.join(lines)


def to_jsonable(obj):
    """Dataclasses (reports, stats, capture stats) as plain structures."""
    if isinstance(obj, latency.LatencyReport):
        return report_to_dict(obj)
    if isinstance(obj, latency.DirectionStats):
        return stats_to_dict(obj)
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name))
                for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj
