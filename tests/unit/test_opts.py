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
