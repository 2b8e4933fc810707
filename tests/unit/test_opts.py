"""The [netweaver] options: bounds, units, help, the generated sample."""

import filecmp
import os
import subprocess
import sys

from oslo_config import cfg
from oslo_config import types
import pytest
import stevedore

from netweaver_agent import opts
from netweaver_agent import remote

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
    assert {o.name for o in remote.OPTS} <= set(names)


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
METERS = ('network.vif.latency', 'network.vif.latency.p50',
          'network.vif.latency.p99', 'network.vif.latency.max',
          'network.vif.outgoing.latency', 'network.vif.probe.loss')


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
