"""Security checks that CI runs with the unit tests.

* bandit over ``netweaver_agent/`` finds nothing (each ``# nosec`` names
  its check and says why on the line above);
* no shell anywhere: no ``shell=True``, ``os.system``, ``os.popen``,
  ``subprocess.getoutput``; subprocesses get argument lists;
* privileged work is the privsep daemon's: its contexts keep exactly the
  capabilities the deployment guide names, and it refuses what it is not
  for.
"""

import ast
import os
import re
import subprocess
import sys

import pytest

from netweaver_agent.agent import privileged

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'netweaver_agent')


def _sources():
    for root, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                yield os.path.join(root, name)


def test_bandit_finds_nothing():
    proc = subprocess.run(
        [sys.executable, '-m', 'bandit', '-q', '-r', PACKAGE, '-f', 'txt'],
        capture_output=True, text=True, timeout=300)
    if 'No module named bandit' in proc.stderr:
        pytest.fail('bandit is not installed: pip install -r '
                    'test-requirements.txt')
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_nosec_names_its_check_and_a_reason():
    for path in _sources():
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
        for number, line in enumerate(lines):
            if '# nosec' not in line:
                continue
            code = line.split('# nosec', 1)[1].strip()
            assert code.startswith('B'), f'{path}:{number + 1}: {line}'
            reason = lines[number - 1].strip() if number else ''
            assert reason.startswith('#') and code in ' '.join(
                lines[max(0, number - 3):number]), \
                f'{path}:{number + 1}: no reason above {line!r}'


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = (func.attr if isinstance(func, ast.Attribute)
                    else getattr(func, 'id', ''))
            owner = (getattr(func.value, 'id', '')
                     if isinstance(func, ast.Attribute) else '')
            yield node, owner, name


def test_no_shell_anywhere():
    for path in _sources():
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read(), path)
        for node, owner, name in _calls(tree):
            where = f'{path}:{node.lineno}'
            assert (owner, name) not in {
                ('os', 'system'), ('os', 'popen'),
                ('subprocess', 'getoutput'),
                ('subprocess', 'getstatusoutput')}, where
            for kw in node.keywords:
                if kw.arg == 'shell':
                    assert isinstance(kw.value, ast.Constant) and \
                        kw.value.value is False, f'{where}: shell=...'
            if owner == 'subprocess' and node.args:
                first = node.args[0]
                assert not isinstance(first, (ast.Constant, ast.JoinedStr,
                                              ast.BinOp)), \
                    f'{where}: a command line string'


def test_privsep_contexts_keep_only_what_the_guide_names():
    # What the running daemons hold is read from /proc in
    # tests/functional/test_privsep_daemon.py; here, what each context
    # asks oslo.privsep for against the guide's table.
    with open(os.path.join(os.path.dirname(PACKAGE), 'docs',
                           'deploying.md'), encoding='utf-8') as f:
        rows = dict(re.findall(r'^\| `(netweaver_agent\.privileged\.\w+)` '
                               r'\| ([A-Z_, ]+) \|', f.read(), re.M))
    # (Not ctx.conf.capabilities: test fixtures override it.)
    contexts = {privileged.capture_pctxt: privileged.CAPTURE_CAPS,
                privileged.netns_pctxt: privileged.NETNS_CAPS}
    assert set(rows) == {c.pypath for c in contexts}
    for ctx, kept in contexts.items():
        names = {privileged.caps.CAPS_BYVALUE[c] for c in kept}
        assert names == {n.strip() for n in rows[ctx.pypath].split(',')}
    # Production (no namespace) gets the CAP_NET_RAW one, the lab's
    # namespaces the other.
    assert privileged.context_for() is privileged.capture_pctxt
    assert privileged.context_for(capture_netns='hv') is \
        privileged.netns_pctxt
    assert privileged.context_for(source_netns='src') is \
        privileged.netns_pctxt


def test_the_daemon_refuses_what_it_is_not_for():
    # The daemon's side, called directly (no daemon): bad arguments are
    # refused before any socket is opened.
    with pytest.raises(ValueError, match='unknown privileged operation'):
        privileged._dispatch('exec', ('/bin/sh',))
    with pytest.raises(ValueError, match='probe session'):
        privileged._dispatch('open_capture', (0, 'icmp', None, None))
    with pytest.raises(ValueError, match='unknown probe protocol'):
        privileged._dispatch('open_capture', (7, 'raw', None, None))
    with pytest.raises(ValueError, match='interface names'):
        privileged._dispatch('open_capture', (7, 'icmp', None, ['x' * 16]))
    with pytest.raises(ValueError):
        privileged._dispatch('prepare_probes', (
            None, 7, 'icmp', 64, None, [(0, 'not-an-address', 0)]))
    with pytest.raises(ValueError, match='probe offset'):
        privileged._dispatch('prepare_probes', (
            None, 7, 'icmp', 64, None,
            [(0, '198.18.0.10', 5), (1, '198.18.0.10', 1)],
            ['198.18.0.0/15']))
    with pytest.raises(ValueError, match='no open capture'):
        privileged._dispatch('close_capture', (12345,))
    with pytest.raises(ValueError, match='no prepared probes'):
        privileged._dispatch('send_probes', (12345, 0.0))


def test_the_bounding_set_is_read_from_proc_status(tmp_path):
    status = tmp_path / 'status'
    status.write_text('Name:\tx\nCapBnd:\t0000000000002000\n')
    assert privileged.bounding_set(str(status)) == {
        privileged.caps.CAP_NET_RAW}
