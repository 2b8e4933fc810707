"""benchmarks/bench_cycle.py picks docs/scale.md's settings for the size.

The page recommends settings for a 1,000-vNIC host and states those of
its smaller runs; the benchmark must run each size with them unless told
otherwise (no lab is built here).
"""

import importlib.util
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def bench():
    path = os.path.join(REPO, 'benchmarks', 'bench_cycle.py')
    spec = importlib.util.spec_from_file_location('bench_cycle', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def scale_doc():
    with open(os.path.join(REPO, 'docs', 'scale.md'), encoding='utf-8') as f:
        return f.read()


def _recommended(doc):
    """``{option: value}`` the page recommends for 1,000 vNICs."""
    start = doc.index('**1,000 vNICs')
    para = doc[start:doc.index('\n\n', start)]
    return {k: float(v) for k, v in re.findall(
        r'`(probe_\w+|max_window_ms)\s*=\s*([\d.]+)', para)}


def test_a_thousand_vnics_get_the_recommended_settings(bench, scale_doc):
    rec = _recommended(scale_doc)
    assert {'probe_count', 'probe_interval_ms', 'probe_timeout_ms',
            'max_window_ms'} <= set(rec)
    args = bench.parse_args(['--guests', '1000',
                             '--count', str(int(rec['probe_count']))])
    assert args.interval_ms == rec['probe_interval_ms']
    assert args.timeout_ms == rec['probe_timeout_ms']
    assert args.max_window_ms == rec['max_window_ms']
    assert args.sequential is False
    assert bench.CPU_TARGETS[(1000, args.count)] == 2.0


def test_the_smaller_runs_keep_the_pages_settings(bench, scale_doc):
    line = re.search(r'Settings: `probe_interval_ms` ([\d.]+).*?'
                     r'`max_window_ms` (\d+)', scale_doc, re.S)
    for guests in (64, 240):
        args = bench.parse_args(['--guests', str(guests)])
        assert args.interval_ms == float(line.group(1))
        assert args.max_window_ms == float(line.group(2))
        assert args.sequential is True


def test_explicit_settings_win(bench):
    args = bench.parse_args(['--guests', '1000', '--interval-ms', '1',
                             '--max-window-ms', '9000', '--sequential'])
    assert (args.interval_ms, args.max_window_ms, args.sequential) == \
        (1.0, 9000.0, True)
    args = bench.parse_args(['--guests', '64', '--no-sequential'])
    assert args.sequential is False
