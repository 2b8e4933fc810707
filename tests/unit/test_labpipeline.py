"""labpipeline's pure parts: settings, and the lab copies of the operator
files (only the archive policy's granularities and the rules' ``for``
change; everything else is shipped as is)."""

import types

import pytest
import yaml

from netweaver_agent.lab import pipeline
from netweaver_agent.lab import spec as labspec


def _pipeline(tmp_path, **settings):
    lab = types.SimpleNamespace(
        spec=labspec.LabSpec(prefix='nwunit-', mgmt=True))
    pipe = pipeline.Pipeline(
        lab, pipeline.PipelineSettings(**settings))
    pipe.workdir = str(tmp_path)
    return pipe


def _load(path):
    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f)


def test_resources_copy_changes_only_the_latency_policy(tmp_path):
    pipe = _pipeline(tmp_path, fine_granularity_s=2, granularity_s=6)
    shipped = _load(pipeline.RESOURCES_FILE)
    copy = _load(pipe.resources_file())
    assert copy['resources'] == shipped['resources']
    for mine, theirs in zip(copy['archive_policies'],
                            shipped['archive_policies']):
        if theirs['name'] == pipeline.LATENCY_POLICY:
            assert [d['granularity'] for d in mine['definition']] == [2, 6]
            assert mine['aggregation_methods'] == \
                theirs['aggregation_methods']
        else:
            assert mine == theirs


def test_rules_copy_changes_only_for(tmp_path):
    pipe = _pipeline(tmp_path, alert_for_s=7)
    shipped = _load(pipeline.RULES_FILE)
    copy = _load(pipe.rules_file())
    rules = [r for g in copy['groups'] for r in g['rules']]
    theirs = [r for g in shipped['groups'] for r in g['rules']]
    assert len(rules) == len(theirs) > 0
    for mine, orig in zip(rules, theirs):
        assert mine['for'] == '7s'
        assert {k: v for k, v in mine.items() if k != 'for'} == \
            {k: v for k, v in orig.items() if k != 'for'}


def test_agent_extra_sends_samples_only_with_gnocchi(tmp_path):
    pipe = _pipeline(tmp_path)
    mgmt = pipe.lab.spec.mgmt_addresses()
    full = pipe.agent_extra()
    assert full['DEFAULT']['transport_url'].startswith(
        f'rabbit://guest:guest@{mgmt.mgmt}:')
    assert full['polling']['enable_notifications'] == 'true'
    assert f'{mgmt.hv}:' in full['polling']['prometheus_listen_addresses']
    alone = _pipeline(tmp_path, gnocchi=False, aodh=False).agent_extra()
    assert 'DEFAULT' not in alone
    assert 'enable_notifications' not in alone['polling']


@pytest.mark.parametrize('kwargs, word', [
    ({'gnocchi': False}, 'aodh needs gnocchi'),
    ({'granularity_s': 0}, 'granularity_s 0'),
    ({'alert_for_s': 4000}, 'alert_for_s 4000'),
    ({'fine_granularity_s': 2, 'granularity_s': 5}, 'multiple'),
])
def test_bad_settings_are_named(kwargs, word):
    with pytest.raises(ValueError, match=word):
        pipeline.PipelineSettings(**kwargs)


def test_a_lab_without_mgmt_is_refused():
    lab = types.SimpleNamespace(spec=types.SimpleNamespace(mgmt=False))
    with pytest.raises(pipeline.PipelineError, match='mgmt=True'):
        pipeline.Pipeline(lab)


def test_gnocchi_timestamps():
    assert pipeline._epoch('2026-12-01T10:24:49+00:00') == 1796120689.0
