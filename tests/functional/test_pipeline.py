"""The telemetry pipeline, for real: pollster → RabbitMQ → Gnocchi, Aodh;
exporter → Prometheus with the project's alert rules.

Everything runs: the namespace lab (a guest behind an injected 2 ms
delay, another losing every 4th probe), the unmodified
``ceilometer-polling`` in the hypervisor namespace, and in the lab's
management namespace RabbitMQ, PostgreSQL, Gnocchi 4.7 (uwsgi, metricd),
Ceilometer's notification agent with the project's resource definitions,
Prometheus 2.42 with ``etc/prometheus/netweaver-alerts.yml`` and Aodh 23
with alarms made from ``etc/aodh/*.json``.  Each daemon is started and
stopped by pid; nothing the test made outlives it.  Needs root and
``tools/pipeline-bootstrap.sh`` (``tools/test.sh`` runs it); fails, never
skips, when a service cannot start.
"""

import json
import os
import re
import signal
# bandit B404: argument lists only
import subprocess  # nosec B404
import sys
import time

import pytest
import yaml

from netweaver_agent.core import netns
from netweaver_agent.lab import agent as labagent
from netweaver_agent.lab import downstream
from netweaver_agent.lab import pipeline
from netweaver_agent.lab import spec as labspec
from tests.functional import telemetry
from tests.functional.conftest import require_root
from tests.functional.conftest import unique_prefix

DELAY_MS = 2.0
LOSS_EVERY = 4
INTERVAL_S = 3
WAIT_S = 90.0
# A multiple of LOSS_EVERY: every window loses exactly 1/LOSS_EVERY.
PROBE_COUNT = 20


def _dead(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie of ours is dead too.
    try:
        with open(f'/proc/{pid}/stat', encoding='ascii') as f:
            return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
    except OSError:
        return True


def _assert_cleaned(pids, workdir):
    alive = [p for p in pids if not _dead(p)]
    assert not alive, f'pipeline processes left running: {alive}'
    assert workdir and not os.path.exists(workdir), workdir


@pytest.fixture
def pipeline_lab(lab_factory, tmp_path):
    """``(lab, pipeline, agent)``: the whole pipeline on a two-guest lab."""
    the_lab = lab_factory(
        guests=2, mgmt=True,
        delays=(labspec.DelayInjection(guest=1, delay_ms=DELAY_MS),),
        losses=(labspec.LossInjection(guest=0, every=LOSS_EVERY),))
    probe = downstream.lab_probe_options(the_lab, INTERVAL_S)
    probe['probe_count'] = PROBE_COUNT
    with telemetry.running(the_lab, str(tmp_path), INTERVAL_S,
                           probe=probe) as (pipe, agent):
        try:
            yield the_lab, pipe, agent
        finally:
            pids = [d.pid for d in pipe.daemons]
            workdir = pipe.workdir
    _assert_cleaned(pids, workdir)


def _policy_of(meter):
    """The archive policy our resource definitions give ``meter``."""
    with open(pipeline.RESOURCES_FILE, encoding='utf-8') as f:
        data = yaml.safe_load(f)
    (res,) = [r for r in data['resources']
              if r['resource_type'] == 'instance_network_interface']
    return res['metrics'][meter]['archive_policy_name']


def _seconds(text):
    """Seconds of Gnocchi's ``H:MM:SS`` granularity."""
    h, m, sec = text.split(':')
    return int(h) * 3600 + int(m) * 60 + float(sec)


def _alarm_example(name):
    with open(os.path.join(pipeline.ALARMS_DIR, f'{name}.json'),
              encoding='utf-8') as f:
        return json.load(f)['gnocchi_resources_threshold_rule']


def _wait_firing(pipe, expected, timeout_s):
    """Alert name → firing resources, once it equals ``expected``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = {name: downstream.firing(pipe, name) for name in expected}
        if got == expected or time.monotonic() >= deadline:
            return got
        time.sleep(1.0)


def test_one_sample_from_the_pollster_to_gnocchi_prometheus_and_aodh(
        pipeline_lab):
    the_lab, pipe, agent = pipeline_lab
    rids = labagent.resource_ids(the_lab)
    lossy, delayed = the_lab.guests[0], the_lab.guests[1]
    agent.wait_for(labagent.latency_ready(set(rids.values())), WAIT_S)

    samples = {}
    for g in the_lab.guests:
        for meter in ('network.vif.latency', 'network.vif.probe.loss'):
            s = downstream.follow(pipe, agent, rids[g.vif], meter,
                                  timeout_s=WAIT_S)
            samples[(g.vif, meter)] = s
            # One sample, the same value everywhere.
            assert s.exporter == s.gnocchi == s.prometheus, s
            # Gnocchi's finest bucket holds that one sample only.
            assert s.count == 1, s
            # Prometheus scraped it after Ceilometer took it, within a
            # polling interval (plus the delivery through RabbitMQ).
            assert 0 <= s.scraped_at - s.timestamp <= INTERVAL_S + 5, s
            assert s.archive_policy == _policy_of(meter), s

    # The Gnocchi resource is Ceilometer's vNIC: its original id, and the
    # name Ceilometer gives a vNIC (the filterref's, else the tap's).
    domains = {d.vif: d for d in labagent.guest_domains(the_lab)}
    for g in the_lab.guests:
        res = pipe.gnocchi_resource(rids[g.vif])
        assert res['original_resource_id'] == rids[g.vif]
        dom = domains[g.vif]
        assert res['name'] == (dom.filter_name if dom.filterref else g.vif)
        assert res['type'] == 'instance_network_interface'
        for meter in labagent.LATENCY_METERS:
            assert meter in res['metrics'], (meter, res['metrics'])
    # The lab's archive policy: buckets of 5 s or less.
    policy = pipe.gnocchi('GET', f'/v1/archive_policy/'
                          f'{_policy_of("network.vif.latency")}')
    grans = sorted(_seconds(d['granularity']) for d in policy['definition'])
    assert grans[0] <= 5, policy

    # The injected truth, as Gnocchi holds it.
    d = samples[(delayed.vif, 'network.vif.latency')].gnocchi
    p = samples[(lossy.vif, 'network.vif.latency')].gnocchi
    # No probe is faster than its hold; the mean is not slower than the
    # longest hold the delayer recorded (a loaded machine holds longer).
    holds_us = [r.hold_ns / 1000 for r in the_lab.delay_records(delayed.index)
                if not r.reply]
    assert holds_us, 'the delayer recorded no hold'
    assert DELAY_MS * 1000 <= d <= max(holds_us) + 500, (d, max(holds_us))
    assert 0 < p < 500, p
    assert samples[(lossy.vif, 'network.vif.probe.loss')].gnocchi == \
        pytest.approx(100.0 / LOSS_EVERY)
    assert samples[(delayed.vif, 'network.vif.probe.loss')].gnocchi == 0

    # Aodh: the shipped alarms on every vNIC; the state follows Gnocchi.
    alarms = {}
    for g in the_lab.guests:
        res = samples[(g.vif, 'network.vif.latency')].gnocchi_resource
        for example in downstream.ALARM_EXAMPLES:
            made = pipe.create_alarm(example, res, f'{example}-{g.vif}')
            alarms[(g.vif, example)] = made['alarm_id']
    states = downstream.wait_alarms(pipe, alarms, WAIT_S)
    assert states == {
        (lossy.vif, 'netweaver-vif-latency-high'): 'ok',
        (delayed.vif, 'netweaver-vif-latency-high'): 'alarm',
        (lossy.vif, 'netweaver-vif-probe-loss'): 'alarm',
        (delayed.vif, 'netweaver-vif-probe-loss'): 'ok',
    }, states
    for (tap, example), state in states.items():
        rule = _alarm_example(example)
        value = samples[(tap, rule['metric'])].gnocchi
        assert state == ('alarm' if value > rule['threshold'] else 'ok'), \
            (tap, example, value, rule)

    # Prometheus: the shipped rules fire for the right vNIC only.
    expected = {'NetweaverVifLatencyHigh': {rids[delayed.vif]},
                'NetweaverVifLatencyP99High': {rids[delayed.vif]},
                'NetweaverVifProbeLoss': {rids[lossy.vif]},
                'NetweaverVifLatencyAbsent': set()}
    assert _wait_firing(pipe, expected, WAIT_S) == expected

    # Every service listens on loopback or the lab's management address.
    listening = netns.run(['ss', '-Hltnu'],
                          netns=the_lab.spec.mgmt_netns).stdout
    local = [line.split()[4] for line in listening.splitlines()]
    assert local, listening
    allowed = ('127.0.0.1:', f'{the_lab.spec.mgmt_addresses().mgmt}:')
    assert [a for a in local if not a.startswith(allowed)] == [], listening

    # With Ceilometer's own definitions these meters would be dropped.
    with open(pipe.notification_log, encoding='utf-8',
              errors='replace') as f:
        notification = f.read()
    assert 'is not handled by Gnocchi' not in notification
    assert 'Traceback' not in agent.log_text()


def test_a_service_failing_to_start_stops_the_others(lab_factory, tmp_path):
    """Prometheus cannot bind (the port is taken): RabbitMQ, PostgreSQL,
    Gnocchi and the notification agent, already up, are stopped by pid
    and the work directory is removed."""
    the_lab = lab_factory(guests=1, mgmt=True)
    import socket
    blocker = netns.socket_in_netns(the_lab.spec.mgmt_netns, socket.AF_INET,
                                    socket.SOCK_STREAM)
    with blocker:
        blocker.bind(('127.0.0.1', pipeline.PROMETHEUS_PORT))
        blocker.listen(1)
        lines = []
        pipe = pipeline.Pipeline(
            the_lab, pipeline.PipelineSettings(aodh=False),
            progress=lines.append)
        with pytest.raises(pipeline.PipelineError) as err:
            with pipe:
                pass
    assert 'prometheus' in str(err.value)
    assert lines[-1] == 'pipeline: starting prometheus...', lines
    assert 'pipeline: starting gnocchi...' in lines, lines
    assert pipe.daemons == []
    assert not os.path.exists(pipe.workdir)
    # Every daemon that was started is gone (their pids were logged).
    assert not _pids_in_netns(the_lab.spec.mgmt_netns), \
        'processes left in the management namespace'


def _pids_in_netns(name):
    target = os.stat(netns.netns_path(name)).st_ino
    out = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f'/proc/{entry}/ns/net').st_ino == target:
                out.append(int(entry))
        except OSError:
            continue
    return [p for p in out if not _dead(p)]


def test_lab_pipeline_command_cleans_up_on_ctrl_c():
    """``netweaver lab --pipeline``: Ctrl-C while services start removes
    every daemon it started (by the pids its progress lines name), the
    namespaces and the work directory."""
    require_root()
    prefix = unique_prefix('pc')
    argv = [sys.executable, '-m', 'netweaver_agent.cli.main', 'lab',
            '--pipeline', '--prefix', prefix]
    # bandit B603: our own command, an argument list
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE,  # nosec B603
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + WAIT_S
        for line in proc.stdout:
            lines.append(line)
            if 'postgresql up' in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = ''.join(lines)
    assert 'postgresql up' in text, text
    pids = [int(p) for p in re.findall(r'\bpid (\d+)', text)]
    assert len(pids) >= 2, text
    assert not [p for p in pids if not _dead(p)], text
    assert not [n for n in os.listdir(netns.NETNS_RUN_DIR)
                if n.startswith(prefix)]
    assert not [n for n in os.listdir('/tmp')
                if n.startswith(f'{prefix}pipeline-')]


def test_alert_rules_pass_promtool():
    """The shipped rules load, and their unit tests (thresholds, ``for``,
    labels, annotations) pass in Debian's promtool."""
    rules = pipeline.RULES_FILE
    tests = os.path.join(os.path.dirname(rules), 'netweaver-alerts.test.yml')
    for argv in (['promtool', 'check', 'rules', rules],
                 ['promtool', 'test', 'rules', tests]):
        # bandit B603: promtool with our files
        proc = subprocess.run(argv, capture_output=True,  # nosec B603
                              text=True, timeout=60,
                              cwd=os.path.dirname(rules))
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
        assert 'SUCCESS' in proc.stdout + proc.stderr, proc
