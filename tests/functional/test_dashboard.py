"""The Grafana dashboard's PromQL, evaluated against a real Prometheus.

The lab's unmodified ``ceilometer-polling`` exports the meters; Prometheus
2.42 (Debian) scrapes it from the lab's management namespace.  Every
expression of ``etc/grafana/netweaver-vif-latency.json`` (panel targets
and template variables), with its variables substituted as Grafana does
(the "All" value, then one project and one vNIC), must return the lab's
vNICs with the labels its legend uses, and only the vNICs selected.
"""

import json
import os
import re

import pytest

from netweaver_agent.lab import agent as labagent
from netweaver_agent.lab import pipeline
from netweaver_agent.lab import spec as labspec
from tests.functional import telemetry

DASHBOARD = os.path.join(pipeline.REPO, 'etc', 'grafana',
                         'netweaver-vif-latency.json')
INTERVAL_S = 3
WAIT_S = 60.0
LABEL_VALUES = re.compile(r'^label_values\((\w+),\s*(\w+)\)$')
LEGEND_LABEL = re.compile(r'\{\{\s*(\w+)\s*\}\}')


def _panels(node):
    for panel in node.get('panels', []):
        yield panel
        yield from _panels(panel)


def _dashboard():
    with open(DASHBOARD, encoding='utf-8') as f:
        return json.load(f)


def _targets(dashboard):
    out = []
    for panel in _panels(dashboard):
        for target in panel.get('targets', []):
            if target.get('expr'):
                out.append((panel.get('title'), target))
    return out


def _regex_value(value):
    """A value as Grafana puts a single selection into a PromQL regex."""
    escaped = re.escape(value)
    return escaped.replace('\\', '\\\\').replace('"', '\\"')


def _substitute(expr, values):
    for name, value in values.items():
        expr = expr.replace(f'${{{name}}}', value).replace(f'${name}', value)
    assert '$' not in expr, f'unknown variable left in {expr!r}'
    return expr


@pytest.fixture
def prometheus_lab(lab_factory, tmp_path):
    """``(lab, pipeline, agent)`` with Prometheus only (no Gnocchi)."""
    the_lab = lab_factory(
        guests=2, mgmt=True,
        delays=(labspec.DelayInjection(guest=1, delay_ms=2.0),),
        losses=(labspec.LossInjection(guest=0, every=4),))
    with telemetry.running(
            the_lab, str(tmp_path), INTERVAL_S,
            pipeline.PipelineSettings(gnocchi=False, aodh=False),
            what='Prometheus') as (pipe, agent):
        yield the_lab, pipe, agent


def _wait_scraped(pipe, metrics, resources, timeout_s):
    """Wait until Prometheus holds every metric for every resource."""
    import time
    deadline = time.monotonic() + timeout_s
    while True:
        missing = []
        for metric in metrics:
            got = {labels.get('resource')
                   for labels, _ in pipe.query(metric)}
            missing += [(metric, r) for r in resources - got]
        if not missing or time.monotonic() >= deadline:
            return missing
        time.sleep(1.0)


def test_every_dashboard_expression_against_prometheus(prometheus_lab):
    the_lab, pipe, agent = prometheus_lab
    rids = set(labagent.resource_ids(the_lab).values())
    dashboard = _dashboard()
    targets = _targets(dashboard)
    metrics = {m for _, t in targets
               for m in re.findall(r'\b(ceilometer_\w+)', t['expr'])}
    assert metrics, 'the dashboard has no ceilometer_ metric'
    agent.wait_for(labagent.latency_ready(rids), WAIT_S)
    assert _wait_scraped(pipe, metrics, rids, WAIT_S) == []

    exported = [s for s in agent.series('ceilometer_network_vif_latency')
                if s.label('resource') in rids]
    names = {s.label('resource'): s.label('resource_name')
             for s in exported}
    projects = {s.label('project') for s in exported}
    assert None not in names.values() and None not in projects, exported

    # Template variables: label_values(metric, label) as Grafana asks.
    variables = {}
    for var in dashboard['templating']['list']:
        if var.get('type') != 'query':
            continue
        m = LABEL_VALUES.match(var['definition'])
        assert m, f"variable {var['name']}: {var['definition']!r}"
        metric, label = m.groups()
        values = set(pipe.prometheus(f'/api/v1/label/{label}/values',
                                     **{'match[]': metric}))
        variables[var['name']] = (label, values, var.get('allValue'))
    assert variables['project'][1] >= projects
    assert variables['vnic'][1] >= set(names.values())

    # "All" first, then one project and one vNIC (the delayed guest's).
    delayed = labagent.resource_ids(the_lab)[the_lab.guests[1].vif]
    selections = [
        ({name: allv for name, (_, _, allv) in variables.items()}, rids),
        ({'project': _regex_value(sorted(projects)[0]),
          'vnic': _regex_value(names[delayed])}, {delayed}),
    ]
    checked = 0
    for values, want in selections:
        for title, target in targets:
            expr = _substitute(target['expr'], values)
            result = pipe.query(expr)
            got = {labels.get('resource') for labels, _ in result}
            assert got & rids == want, (title, expr, result)
            legend = LEGEND_LABEL.findall(target.get('legendFormat') or '')
            for labels, value in result:
                for label in legend:
                    assert labels.get(label), (title, label, labels)
                assert value == value, (title, labels)   # not NaN
            checked += 1
    assert checked == 2 * len(targets)
