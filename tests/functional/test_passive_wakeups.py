"""The passive capture's reader sleeps until the kernel has something.

As the probe capture's (test_ring_wakeups.py): a real ``AF_PACKET``
passive capture in a namespace of its own, no traffic: its reader thread
stays asleep in one ``select()``, ``close()`` wakes it at once through
its pipe, and nothing of it (socket, ring, pipe, thread) outlives the
window.
"""

import os
import time

import pytest

from netweaver_agent.core import capture
from netweaver_agent.core import netns
from netweaver_agent.core import passivecapture
from tests.functional.conftest import require_root
from tests.functional.conftest import unique_prefix


@pytest.fixture
def idle_netns():
    require_root()
    name = unique_prefix('pw') + 'ns'
    netns.run(['ip', 'netns', 'add', name])
    try:
        netns.run(['ip', 'link', 'set', 'lo', 'up'], netns=name)
        yield name
    finally:
        netns.run(['ip', 'netns', 'delete', name], check=False)


def _voluntary_switches(tid):
    with open(f'/proc/self/task/{tid}/status', encoding='ascii') as f:
        for line in f:
            if line.startswith('voluntary_ctxt_switches:'):
                return int(line.split()[1])
    raise AssertionError('no voluntary_ctxt_switches')


def test_an_idle_passive_reader_sleeps_and_close_wakes_it(idle_netns):
    before = set(os.listdir('/proc/self/fd'))
    cap = passivecapture.PassiveCapture(64, netns_name=idle_netns)
    cap.open()
    try:
        tid = cap._thread.native_id
        start = _voluntary_switches(tid)
        # A tenth of the reader's longest sleep: no wake-up at all (it
        # used to wake every 20 ms).
        time.sleep(capture.READER_IDLE_S / 10)
        assert _voluntary_switches(tid) - start <= 1
    finally:
        t0 = time.monotonic()
        cap.close()
        closed_in = time.monotonic() - t0
    assert not cap._thread.is_alive()
    assert closed_in < capture.READER_IDLE_S / 4
    assert set(os.listdir('/proc/self/fd')) == before
    assert cap.stats.packets == 0 and cap.stats.kept == 0
