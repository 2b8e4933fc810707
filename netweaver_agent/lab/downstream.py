"""What the lab's telemetry pipeline holds: each sample followed downstream.

:func:`follow` takes the polling agent's current sample of one vNIC from
its exporter and waits until Gnocchi and Prometheus hold the same value;
:func:`wait_alarms` and :func:`firing` read Aodh's alarms and
Prometheus' alerts.  :func:`run` is ``netweaver lab --pipeline``: the
real agent and the :class:`pipeline.Pipeline` on a lab, and, per guest,
what every stage holds next to the injected truth.
"""

import dataclasses
import os
import shutil
import sys
import tempfile
import time

from netweaver_agent.lab import agent as labagent
from netweaver_agent.lab import pipeline as labpipeline

ALARM_EXAMPLES = ('netweaver-vif-latency-high', 'netweaver-vif-probe-loss')
ALERTS = ('NetweaverVifLatencyHigh', 'NetweaverVifLatencyP99High',
          'NetweaverVifProbeLoss')


@dataclasses.dataclass(frozen=True, slots=True)
class FollowedSample:
    """One sample of one vNIC seen at every stage of the pipeline.

    ``timestamp`` is its Gnocchi bucket (the fine granularity), ``count``
    the number of samples Gnocchi holds in that bucket; ``scraped_at`` the
    time Prometheus first scraped it, ``prometheus`` the value an instant
    query at that time returns.
    """

    resource: str
    meter: str
    exporter: float
    gnocchi: float
    timestamp: float
    count: float
    prometheus: float
    scraped_at: float
    gnocchi_resource: str
    metric_id: str
    archive_policy: str


def metric_name(meter):
    """The exporter's metric name of a Ceilometer meter."""
    return 'ceilometer_' + meter.replace('.', '_')


def _same(a, b):
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def follow(pipeline, agent, resource, meter='network.vif.latency',
           timeout_s=60.0):
    """Follow the exporter's current sample of ``resource`` downstream.

    Scrapes the polling agent's exporter, then waits until Gnocchi holds
    a measure of the same value (its bucket and count) and Prometheus
    scraped it; tries newer samples until ``timeout_s``.  Returns a
    :class:`FollowedSample`.
    """
    name = metric_name(meter)
    deadline = time.monotonic() + timeout_s
    last_error = 'no sample in the exporter'
    while time.monotonic() < deadline:
        found = [s for s in agent.series(name)
                 if s.label('resource') == resource]
        if not found:
            time.sleep(0.5)
            continue
        value = found[0].value
        step_deadline = min(deadline, time.monotonic() + 20.0)
        while time.monotonic() < step_deadline:
            try:
                got = _downstream(pipeline, resource, meter, value)
            except labpipeline.PipelineError as exc:
                last_error = str(exc)
                got = None
            if got:
                return FollowedSample(resource=resource, meter=meter,
                                      exporter=value, **got)
            time.sleep(1.0)
        last_error = (f'exporter value {value!r} of {resource} not found '
                      f'downstream ({last_error})')
    raise labpipeline.PipelineError(f"{meter} of {resource}: {last_error}")


def _downstream(pipeline, resource, meter, value):
    res = pipeline.gnocchi_resource(resource)
    if res is None or meter not in res.get('metrics', {}):
        raise labpipeline.PipelineError(
            f"no Gnocchi resource with {meter} yet")
    metric_id = res['metrics'][meter]
    fine = pipeline.settings.fine_granularity_s
    means = pipeline.gnocchi_measures(metric_id, fine)
    hit = [m for m in means if _same(m.value, value)]
    if not hit:
        raise labpipeline.PipelineError(
            f"Gnocchi has {len(means)} measures of {meter}, none {value!r}")
    bucket = hit[-1]
    counts = {m.timestamp: m.value for m in
              pipeline.gnocchi_measures(metric_id, fine, 'count')}
    metric = pipeline.gnocchi('GET', f'/v1/metric/{metric_id}')
    window = int(pipeline.settings.scrape_interval_s * 60)
    data = pipeline.prometheus(
        '/api/v1/query',
        query=f'{metric_name(meter)}{{resource="{resource}"}}[{window}s]')
    scraped = None
    for series in data['result']:
        for t, v in series['values']:
            if _same(float(v), value) and t >= bucket.timestamp:
                scraped = t
                break
    if scraped is None:
        raise labpipeline.PipelineError(
            f"Prometheus has not scraped {value!r} yet")
    at = pipeline.query(f'{metric_name(meter)}{{resource="{resource}"}}',
                        at=scraped)
    if len(at) != 1:
        raise labpipeline.PipelineError(f"Prometheus at {scraped}: {at}")
    return {'gnocchi': bucket.value, 'timestamp': bucket.timestamp,
            'count': counts.get(bucket.timestamp, 0.0),
            'prometheus': at[0][1], 'scraped_at': scraped,
            'gnocchi_resource': res['id'], 'metric_id': metric_id,
            'archive_policy': metric['archive_policy']['name']}


def wait_alarms(pipeline, alarm_ids, timeout_s=60.0):
    """Aodh's state of each alarm (key → state) once none is still
    ``insufficient data``, or as they are after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = {k: pipeline.alarm_state(a) for k, a in alarm_ids.items()}
        if ('insufficient data' not in states.values()
                or time.monotonic() >= deadline):
            return states
        time.sleep(1.0)


def firing(pipeline, alertname):
    """Resources (``resource`` label) the alert fires for."""
    return {a['labels'].get('resource') for a in pipeline.alerts()
            if a['labels'].get('alertname') == alertname
            and a['state'] == 'firing'}


def run(lab, out=None, interval_s=3, timeout_s=90.0):
    """``netweaver lab --pipeline``: the agent and the pipeline on a lab.

    Prints, for each guest, the latency and loss as the exporter,
    Prometheus, Gnocchi and Aodh see them, next to the injected truth.
    Returns an exit status.
    """
    out = out or sys.stdout

    def say(line):
        out.write(line + '\n')
        out.flush()

    workdir = tempfile.mkdtemp(prefix=f'{lab.spec.prefix}pipeline-')
    agent = None
    try:
        with labpipeline.Pipeline(lab, progress=say) as pipe:
            files = labagent.write_files(
                lab, os.path.join(workdir, 'agent'), interval_s=interval_s,
                probe=lab_probe_options(lab, interval_s),
                extra=pipe.agent_extra())
            agent = labagent.PollingAgent(files, lab.spec.hv_netns)
            say('pipeline: starting ceilometer-polling in '
                f'{lab.spec.hv_netns}')
            agent.start()
            expected = labagent.resource_ids(lab)
            agent.wait_for(labagent.latency_ready(set(expected.values())),
                           timeout_s)
            rows = []
            for g in lab.guests:
                rid = expected[g.vif]
                lat = follow(pipe, agent, rid, timeout_s=timeout_s)
                loss = follow(pipe, agent, rid, 'network.vif.probe.loss',
                              timeout_s=timeout_s)
                rows.append((g, rid, lat, loss))
            say('pipeline: creating Aodh alarms from etc/aodh/*.json')
            alarms = {}
            for g, rid, lat, loss in rows:
                for example in ALARM_EXAMPLES:
                    alarm = pipe.create_alarm(example, lat.gnocchi_resource,
                                              f'{example}-{g.vif}')
                    alarms[(g.vif, example)] = alarm['alarm_id']
            states = wait_alarms(pipe, alarms, timeout_s)
            time.sleep(pipe.settings.alert_for_s + 2 *
                       pipe.settings.scrape_interval_s)
            alerts = {name: firing(pipe, name) for name in ALERTS}
            _report(say, lab, rows, states, alerts)
        return 0
    except (labpipeline.PipelineError, labagent.AgentError) as exc:
        say(f'netweaver lab --pipeline: {exc}')
        if agent is not None:
            for line in agent.log_text().splitlines()[-10:]:
                say(f'  {line}')
        return 1
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def lab_probe_options(lab, interval_s):
    """``[netweaver]`` options of the lab's agent (as ``--agent`` uses)."""
    delay = max((d.injection.delay_ms for d in lab.delays), default=0.0)
    return {'probe_count': 20, 'probe_interval_ms': 1.0,
            'probe_timeout_ms': max(100.0, 2 * delay + 100.0),
            'per_vnic_interval_ms': 4 * delay if delay else 0.0,
            'max_window_ms': 1000.0 * (interval_s - 1),
            'probe_networks': lab.spec.network}


def _report(say, lab, rows, states, alerts):
    for g, rid, lat, loss in rows:
        say(f'{g.name} {g.vif} {g.address} (resource {rid})')
        say(f'  network.vif.latency    exporter {lat.exporter:.1f} us, '
            f'Prometheus {lat.prometheus:.1f} us (scraped '
            f'{time.strftime("%H:%M:%S", time.gmtime(lat.scraped_at))}), '
            f'Gnocchi {lat.gnocchi:.1f} us (bucket '
            f'{time.strftime("%H:%M:%S", time.gmtime(lat.timestamp))}, '
            f'{lat.count:g} sample)')
        say(f'  network.vif.probe.loss exporter {loss.exporter:.1f} %, '
            f'Prometheus {loss.prometheus:.1f} %, Gnocchi '
            f'{loss.gnocchi:.1f} %')
        say(f'  Gnocchi resource {lat.gnocchi_resource}, metric '
            f'{lat.metric_id}, archive policy {lat.archive_policy}')
        say('  Aodh: ' + ', '.join(
            f'{ex} {states[(g.vif, ex)]}' for ex in ALARM_EXAMPLES))
        fired = [name for name, res in alerts.items() if rid in res]
        say(f'  Prometheus alerts firing: {", ".join(fired) or "none"}')
        truth = []
        for d in lab.delays:
            if d.injection.guest == g.index:
                holds = sorted(r.hold_ns for r in lab.delay_records(g.index)
                               if not r.reply)
                held = (f', {len(holds)} probes held, hold median '
                        f'{holds[len(holds) // 2] / 1000:.1f} us'
                        if holds else '')
                truth.append(f'delay {d.injection.delay_ms:g} ms '
                             f'({d.backend}{held})')
        for loss_inj in lab.losses:
            if loss_inj.guest == g.index:
                truth.append(f'drop every {loss_inj.every}th probe')
        say(f'  truth: {"; ".join(truth) or "nothing injected"}')
