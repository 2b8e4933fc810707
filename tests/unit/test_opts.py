"""The [netweaver] options: bounds, units, help, the generated sample."""

import filecmp
import os
import subprocess
import sys

from oslo_config import cfg
from oslo_config import types
import pytest
import stevedore

from netweaver_agent.agent import opts
from netweaver_agent.agent import pollsters
from netweaver_agent.core import vifpath

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
GENERATOR_CONF = os.path.join(
    ROOT, 'etc', 'netweaver-agent', 'netweaver-agent-config-generator.conf')
SAMPLE = os.path.join(ROOT, 'etc', 'netweaver-agent',
                      'netweaver-agent.conf.sample')


def test_list_opts_is_one_group_with_ours_and_the_ssh_ones():
    ((group, options),) = opts.list_opts()
    assert group == 'netweaver'
    names = [o.name for o in options]
    assert len(names) == len(set(names))
    for name in ('probe_source', 'probe_protocol', 'probe_count',
                 'probe_interval_ms', 'per_vnic_interval_ms',
                 'probe_timeout_ms', 'max_window_ms', 'probe_size', 'pif',
                 'capture_netns', 'vif_resolver'):
        assert name in names
    assert {o.name for o in opts.SSH_OPTS} <= set(names)


@pytest.mark.parametrize('opt', opts.all_opts(), ids=lambda o: o.name)
def test_every_option_has_help_and_numbers_have_bounds(opt):
    assert opt.help and len(opt.help) > 20
    if isinstance(opt.type, (types.Integer, types.Float)):
        assert opt.type.min is not None and opt.type.max is not None
    if isinstance(opt.type, types.Float):
        assert opt.name.endswith(('_ms', '_s')), 'a time needs its unit'


def test_generator_entry_point_finds_list_opts():
    mgr = stevedore.NamedExtensionManager(
        'oslo.config.opts', names=['netweaver_agent'], invoke_on_load=True)
    ((group, options),) = mgr['netweaver_agent'].obj
    assert group == 'netweaver'
    assert len(options) == len(opts.all_opts())


def test_registering_twice_is_harmless_and_bounds_are_enforced(tmp_path):
    conf_file = tmp_path / 'agent.conf'
    conf_file.write_text('[netweaver]\nprobe_count = 0\n'
                         'probe_source = netns:lab-src\n')
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    opts.register_opts(conf)
    conf(['--config-file', str(conf_file)])
    assert conf.netweaver.probe_source == 'netns:lab-src'
    with pytest.raises(cfg.ConfigFileValueError, match='probe_count'):
        conf.netweaver.probe_count


def test_the_sample_config_is_up_to_date(tmp_path):
    out = tmp_path / 'sample.conf'
    generator = os.path.join(os.path.dirname(sys.executable),
                             'oslo-config-generator')
    subprocess.run([generator, '--config-file', GENERATOR_CONF,
                    '--output-file', str(out)], check=True, cwd=ROOT,
                   timeout=60)
    assert filecmp.cmp(out, SAMPLE, shallow=False), (
        'etc/netweaver-agent/netweaver-agent.conf.sample is stale: run '
        'tox -e genconfig')


# --- the other files operators install ---------------------------------------

ETC = os.path.join(ROOT, 'etc')
# What the files must list: the meters as the product declares them.
METERS = pollsters.meter_names()


def _gnocchi_definitions(path):
    from ceilometer.publisher import gnocchi
    from ceilometer import service
    conf = service.prepare_service([], [])
    return gnocchi.GnocchiPublisher._load_definitions(conf, None, path)


def test_gnocchi_definitions_store_our_meters_with_max():
    from ceilometer import sample
    ours, policies = _gnocchi_definitions(
        os.path.join(ETC, 'netweaver-agent', 'gnocchi_resources.yaml'))
    metric_map = {m: rd for rd in ours for m in rd.metrics}
    policy = {p['name']: p for p in policies}['netweaver-latency']
    assert {'mean', 'max'} <= set(policy['aggregation_methods'])
    for meter in METERS:
        rd = metric_map[meter]
        assert rd.cfg['resource_type'] == 'instance_network_interface'
        assert rd.metrics[meter]['archive_policy_name'] == \
            'netweaver-latency'
    s = sample.Sample(
        name='network.vif.latency', type='gauge', unit='us', volume=12.5,
        user_id='u', project_id='p', resource_id='nova-instance-x',
        resource_metadata={'vnic_name': 'nova-instance-x',
                           'instance_id': 'i-1', 'pif': 'eth1'})
    assert metric_map['network.vif.latency'].sample_attributes(s) == {
        'name': 'nova-instance-x', 'instance_id': 'i-1'}


def test_gnocchi_definitions_keep_all_of_ceilometers():
    # resources_definition_file replaces Ceilometer's file: lose nothing.
    import ceilometer.publisher
    theirs, their_policies = _gnocchi_definitions(os.path.join(
        os.path.dirname(ceilometer.publisher.__file__), 'data',
        'gnocchi_resources.yaml'))
    ours, our_policies = _gnocchi_definitions(
        os.path.join(ETC, 'netweaver-agent', 'gnocchi_resources.yaml'))
    assert len(ours) == len(theirs)
    for mine, theirs_rd in zip(ours, theirs):
        assert mine.cfg['resource_type'] == theirs_rd.cfg['resource_type']
        for meter, extra in theirs_rd.metrics.items():
            assert mine.metrics[meter] == extra, meter
        assert set(mine.metrics) - set(theirs_rd.metrics) <= set(METERS)
    assert our_policies[:len(their_policies)] == their_policies


def test_sample_polling_yaml_lists_every_meter_once_in_one_source():
    import yaml
    with open(os.path.join(ETC, 'netweaver-agent', 'polling.yaml')) as f:
        data = yaml.safe_load(f)
    holders = [s for s in data['sources']
               if set(METERS) & set(s['meters'])]
    assert len(holders) == 1
    assert sorted(holders[0]['meters']) == sorted(METERS)
    names = stevedore.ExtensionManager('ceilometer.poll.compute').names()
    assert set(METERS) <= set(names)


def test_grafana_dashboard_queries_every_exported_series():
    import json
    with open(os.path.join(ETC, 'grafana',
                           'netweaver-vif-latency.json')) as f:
        dash = json.load(f)
    exprs = ' '.join(t['expr'] for p in dash['panels']
                     for t in p['targets'])
    for meter in METERS:
        series = 'ceilometer_' + meter.replace('.', '_') + '{'
        assert series in exprs, meter


# --- start-up validation: values and combinations that can never work ------

def _conf(**overrides):
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf([])
    for name, value in overrides.items():
        conf.set_override(name, value, group='netweaver')
    return conf


def test_defaults_validate():
    assert opts.problems(_conf()) == []
    opts.validate(_conf())


@pytest.mark.parametrize('opt', [o for o in opts.all_opts()
                                 if isinstance(o.type, types.Float)],
                         ids=lambda o: o.name)
@pytest.mark.parametrize('bad', ['nan', '-nan', 'NaN'])
def test_nan_is_refused_for_every_float_option(opt, bad):
    with pytest.raises(opts.OptionsError) as err:
        opts.validate(_conf(**{opt.dest: bad}))
    assert f'[netweaver] {opt.name} = nan is not a finite number' in \
        str(err.value)


def test_nan_in_a_config_file_is_refused(tmp_path):
    conf_file = tmp_path / 'agent.conf'
    conf_file.write_text('[netweaver]\nprobe_interval_ms = nan\n'
                         'ssh_command_timeout_s = nan\n')
    conf = cfg.ConfigOpts()
    opts.register_opts(conf)
    conf(['--config-file', str(conf_file)])
    msg = '; '.join(opts.problems(conf))
    assert 'probe_interval_ms = nan' in msg
    assert 'ssh_command_timeout_s = nan' in msg


def test_inf_is_refused_by_the_bounds_or_the_check():
    for opt in opts.all_opts():
        if not isinstance(opt.type, types.Float):
            continue
        conf = _conf()
        try:
            conf.set_override(opt.dest, 'inf', group='netweaver')
        except ValueError:
            continue                  # its max refuses it already
        assert any(opt.name in p for p in opts.problems(conf)), opt.name


def test_probe_timeout_not_below_the_window_is_refused():
    for timeout, window in ((5000.0, 5000.0), (6000.0, 5000.0),
                            (4990.0, 5000.0)):
        with pytest.raises(opts.OptionsError) as err:
            opts.validate(_conf(probe_timeout_ms=timeout,
                                max_window_ms=window))
        msg = str(err.value)
        assert '[netweaver] max_window_ms' in msg
        assert '[netweaver] probe_timeout_ms' in msg
    # Room to open the capture and send: fine.
    assert opts.problems(_conf(probe_timeout_ms=200.0,
                               max_window_ms=1000.0)) == []


def test_the_window_check_agrees_with_the_window_itself():
    """Just above the refused combination, a window has room for a probe:
    the check refuses exactly what run_window could never send."""
    from netweaver_agent.core import sources
    from netweaver_agent.core import window as probe_window
    timeout = 200.0
    edge = timeout + probe_window.OPEN_RESERVE_S * 1000.0
    assert opts.problems(_conf(probe_timeout_ms=timeout,
                               max_window_ms=edge))
    ok = edge + 5.0
    assert not opts.problems(_conf(probe_timeout_ms=timeout,
                                   max_window_ms=ok))
    budget_ns = int((ok - edge) * 1e6)
    sched = sources.schedule(1, 'icmp', ['198.18.0.10'], 1, 1_000_000,
                             0, budget_ns=budget_ns)
    assert len(sched.plan.probes) == 1


def test_accept_new_without_known_hosts_file_is_refused():
    with pytest.raises(opts.OptionsError) as err:
        opts.validate(_conf(ssh_accept_new_host_key=True,
                            ssh_known_hosts_file=''))
    msg = str(err.value)
    assert '[netweaver] ssh_accept_new_host_key' in msg
    assert '[netweaver] ssh_known_hosts_file' in msg
    assert opts.problems(_conf(ssh_accept_new_host_key=True)) == []
    assert opts.problems(_conf(ssh_known_hosts_file='')) == []


def test_every_problem_is_named_at_once():
    found = opts.problems(_conf(probe_interval_ms='nan',
                                probe_timeout_ms=9990.0,
                                ssh_accept_new_host_key=True,
                                ssh_known_hosts_file=''))
    assert len(found) == 3


def test_the_pollsters_refuse_to_load_before_probing_anything(caplog):
    """Loading a meter validates first: the meter is not loaded, an ERROR
    names the options (Ceilometer itself logs a failed setup only at
    DEBUG), and no inspector (no source, no privsep daemon) is made."""
    from unittest import mock
    from ceilometer.polling import plugin_base
    conf = _conf(max_window_ms=100.0, probe_timeout_ms=90.0)
    with mock.patch.object(pollsters.INSPECTOR, 'get') as prober:
        with caplog.at_level('ERROR'):
            with pytest.raises(plugin_base.ExtensionLoadError,
                               match='max_window_ms'):
                pollsters.VifLatencyPollster(conf)
        prober.assert_not_called()
        errors = [r.getMessage() for r in caplog.records
                  if r.levelname == 'ERROR']
        assert any('network.vif.latency not loaded' in m and
                   '[netweaver] probe_timeout_ms' in m for m in errors), \
            errors
        conf.clear_override('max_window_ms', group='netweaver')
        pollsters.VifLatencyPollster(conf)
        prober.assert_called_once()


# --- the window itself refuses NaN/inf ---------------------------------------

@pytest.mark.parametrize('field', ['interval_ms', 'per_vnic_interval_ms',
                                   'timeout_ms', 'max_window_ms'])
@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_window_settings_refuse_non_finite(field, bad):
    from netweaver_agent.core import window as probe_window
    with pytest.raises(ValueError, match=f'{field} .* finite'):
        probe_window.WindowSettings(**{field: bad})


@pytest.mark.parametrize('bad', [float('nan'), float('inf'),
                                 float('-inf')])
def test_run_window_refuses_a_non_finite_deadline(bad):
    from netweaver_agent.core import sources
    from netweaver_agent.core import window as probe_window

    class NeverSends(sources.ProbeSource):
        def prepare(self, plan):
            raise AssertionError('prepared with a non-finite deadline')

        send = prepare

    path = vifpath.VifPath(vif='tap0', address='198.18.0.10',
                           interfaces=('eth1', 'tap0'))
    with pytest.raises(ValueError, match='deadline_s .* finite'):
        probe_window.run_window([path], NeverSends(), deadline_s=bad)


# --- the command's float flags ----------------------------------------------

def test_finite_float_flag_type():
    import argparse
    assert opts.finite_float('2.5') == 2.5
    for bad in ('nan', 'NaN', 'inf', '-inf', 'Infinity', 'x'):
        with pytest.raises(argparse.ArgumentTypeError, match=repr(bad)):
            opts.finite_float(bad)


@pytest.mark.parametrize('argv', [
    ['measure', '--hv', 'h', '-s', 's', '-d', '198.18.0.10', '--vif', 't',
     '--interval-ms', 'nan'],
    ['measure', '--hv', 'h', '-s', 's', '-d', '198.18.0.10', '--vif', 't',
     '--command-timeout', 'inf'],
    ['analyze', 'a.pcap', 'b.pcap', '--timeout-ms', 'nan'],
    ['lab', '--timeout-ms', 'nan'],
])
def test_the_command_refuses_non_finite_flags(argv):
    """The real `netweaver` command line: argparse exits 2 naming the flag,
    before anything runs."""
    proc = subprocess.run([sys.executable, '-m', 'netweaver_agent.cli.main',
                           *argv], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    flag = next(a for a in argv if a.startswith('--') and
                argv[argv.index(a) + 1] in ('nan', 'inf'))
    assert f'argument {flag}' in proc.stderr
    assert 'is not a finite number' in proc.stderr
