"""The real privsep daemons, observed from outside: when they start and
what the kernel says they hold.

* Loading the meters (as ``ceilometer-polling`` does) starts the daemon
  in the background: it runs before any window asks for it, so the first
  cycle does not pay for it.
* Each context's daemon (started by this root process, ``python -m
  oslo_privsep.daemon``, with the capability drop sudo's helper gets) has
  exactly the capabilities the deployment guide's table names, read from
  ``/proc/<pid>/status``, nothing inheritable or ambient, and its
  bounding set allows what it holds.
"""

import os
import re
import time

from oslo_privsep import capabilities as caps
import pytest

from netweaver_agent.agent import pollsters
from netweaver_agent.agent import privileged
from tests.functional import conftest
from tests.functional import inprocess
from tests.functional import privsep

GUIDE = os.path.join(conftest.REPO, 'docs', 'deploying.md')
START_WAIT_S = 60.0


def documented_capabilities():
    """``{context pypath: {capability number}}`` from the guide's table."""
    with open(GUIDE, encoding='utf-8') as f:
        rows = re.findall(r'^\| `(netweaver_agent\.privileged\.\w+)` \| '
                          r'([A-Z_, ]+) \|', f.read(), re.M)
    return {path: {getattr(caps, name.strip())
                   for name in names.split(',')} for path, names in rows}


def proc_caps(pid):
    """``{'CapEff': {numbers}, ...}`` of a process, from the kernel."""
    return {key: {c for c in range(64) if int(words[0], 16) >> c & 1}
            for key, words in privsep.status(pid).items()
            if key.startswith('Cap')}


def cmdline(pid):
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
        return f.read().split(b'\0')


@pytest.fixture
def no_daemon():
    conftest.require_root()
    privileged.stop()
    pollsters.INSPECTOR.reset()
    yield
    pollsters.INSPECTOR.reset()
    privileged.stop()


def test_the_guide_names_both_contexts():
    found = documented_capabilities()
    assert set(found) == {privileged.capture_pctxt.pypath,
                          privileged.netns_pctxt.pypath}, found


def test_loading_the_meters_starts_the_daemon_before_any_window(
        no_daemon, monkeypatch):
    ctx = privileged.capture_pctxt
    assert ctx.channel is None
    asked = []
    real_call = privileged.call

    def recording_call(context, op, *args):
        asked.append(op)
        return real_call(context, op, *args)

    monkeypatch.setattr(privileged, 'call', recording_call)
    conf = inprocess.configure('test:///default',
                               probe_networks=['198.18.0.0/15'])
    pollsters.VifLatencyPollster(conf)
    deadline = time.monotonic() + START_WAIT_S
    while ctx.channel is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ctx.channel is not None, (
        f'no privsep daemon {START_WAIT_S:g} s after the meters loaded '
        f'(asked: {asked})')
    # Nothing but the warm-up's own status call reached it: no window.
    assert set(asked) == {'status'}, asked
    pid = privileged.status(ctx).pid
    argv = cmdline(pid)
    assert b'oslo_privsep.daemon' in argv and ctx.pypath.encode() in argv
    assert proc_caps(pid)['CapEff'] == documented_capabilities()[ctx.pypath]


@pytest.mark.parametrize('ctx', [privileged.capture_pctxt,
                                 privileged.netns_pctxt],
                         ids=lambda c: c.pypath.rsplit('.', 1)[1])
def test_each_daemon_holds_exactly_what_the_guide_names(no_daemon, ctx):
    promised = documented_capabilities()[ctx.pypath]
    pid = privileged.status(ctx).pid
    assert pid != os.getpid()
    assert ctx.pypath.encode() in cmdline(pid)
    held = proc_caps(pid)
    assert held['CapEff'] == promised, (ctx.pypath, held)
    assert held['CapPrm'] == promised, (ctx.pypath, held)
    assert held['CapInh'] == set() and held['CapAmb'] == set(), held
    assert promised <= held['CapBnd'], held
