"""Probe plans and source specifications."""

import pytest

from netweaver_agent.core import sources
from netweaver_agent.ssh import probesource


def test_plan_interleaves_targets_evenly():
    sched = sources.schedule(
        7, 'icmp', ['198.18.0.10', '198.18.0.11'], 3, 1_000_000)
    plan, owner = sched.plan, sched.owner
    targets = ['198.18.0.10', '198.18.0.11']
    assert [p.dst_ip for p in plan.probes] == targets * 3
    assert [p.seq for p in plan.probes] == list(range(6))
    assert [p.offset_ns for p in plan.probes] == [i * 1_000_000
                                                  for i in range(6)]
    assert owner == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0, 5: 1}
    assert plan.targets() == ['198.18.0.10', '198.18.0.11']
    assert plan.duration_ns == 5_000_000


def test_per_target_spacing_stretches_the_window():
    plan = sources.schedule(
        7, 'icmp', ['198.18.0.10', '198.18.0.11'], 2, 1_000_000,
        per_target_interval_ns=10_000_000).plan
    same = [p.offset_ns for p in plan.probes if p.dst_ip == '198.18.0.10']
    assert same[1] - same[0] >= 10_000_000


def test_negative_count_is_refused():
    with pytest.raises(ValueError, match='-1'):
        sources.schedule(1, 'icmp', ['198.18.0.10'], -1, 1)


@pytest.mark.parametrize('spec, name', [
    ('local', 'local'), ('', 'local'), ('netns:lab-src', 'netns:lab-src')])
def test_parse_source(spec, name):
    assert probesource.parse_source(spec).name == name


@pytest.mark.parametrize('spec', ['udp://x', 'netns:../etc', 'netns:',
                                  'ssh://'])
def test_parse_source_names_bad_input(spec):
    with pytest.raises(Exception, match='(?i)source|namespace|host'):
        probesource.parse_source(spec)
