"""The captures' readers sleep until the kernel has something for them.

A real ``AF_PACKET`` capture in a namespace of its own: with no traffic
its reader thread stays asleep in one ``select()`` (no timer wake-ups),
``close()`` wakes it at once through the capture's pipe, and nothing of
the capture (socket, ring, pipe, thread) outlives the window.
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
def quiet_netns():
    require_root()
    name = unique_prefix('wk') + 'ns'
    netns.run(['ip', 'netns', 'add', name])
    try:
        netns.run(['ip', 'link', 'set', 'lo', 'up'], netns=name)
        yield name
    finally:
        netns.run(['ip', 'netns', 'delete', name], check=False)


def _fds():
    return set(os.listdir('/proc/self/fd'))


def _thread_cpu_wakeups(tid):
    """Voluntary context switches of thread ``tid`` of this process."""
    with open(f'/proc/self/task/{tid}/status', encoding='ascii') as f:
        for line in f:
            if line.startswith('voluntary_ctxt_switches:'):
                return int(line.split()[1])
    raise AssertionError('no voluntary_ctxt_switches')


# The probe capture's reader and the passive capture's: both read a ring
# in a thread that must sleep until the kernel has something.
CAPTURES = {
    'probe': lambda ns: capture.LiveCapture(1234, 'icmp', netns_name=ns,
                                            expected_packets=100),
    'passive': lambda ns: passivecapture.PassiveCapture(64, netns_name=ns),
}


@pytest.mark.parametrize('kind', sorted(CAPTURES))
def test_an_idle_reader_sleeps_and_close_wakes_it(quiet_netns, kind):
    before = _fds()
    cap = CAPTURES[kind](quiet_netns)
    cap.open()
    try:
        assert getattr(cap, 'reader', 'ring') == 'ring'
        tid = cap._thread.native_id
        start = _thread_cpu_wakeups(tid)
        # An idle stretch a tenth of the reader's longest sleep: no
        # wake-up at all (it used to wake every 20 ms).
        time.sleep(capture.READER_IDLE_S / 10)
        assert _thread_cpu_wakeups(tid) - start <= 1
    finally:
        t0 = time.monotonic()
        cap.close()
        closed_in = time.monotonic() - t0
    assert not cap._thread.is_alive()
    # Woken by close(), not by its select() running out (the last ring
    # block's hand-over may still be waited for).
    assert closed_in < capture.READER_IDLE_S / 4
    assert _fds() == before
    assert cap.stats.packets == 0 and cap.stats.drops == 0


def test_settle_returns_once_quiet_without_polling(quiet_netns):
    cap = capture.LiveCapture(1234, 'icmp', netns_name=quiet_netns,
                              expected_packets=100)
    with cap:
        t0 = time.monotonic()
        cap.settle(0.2)
        took = time.monotonic() - t0
    # Not before the quiet time is over, and not one more quiet time on.
    assert 0.2 <= took < 0.4
