"""The privsep daemon's built-in maxima are the ones the deployment guide
promises operators (docs/deploying.md, "Capabilities: the privsep
daemon"): a limit changed in the code and not in the guide, or the other
way round, fails here."""

import os
import re

from netweaver_agent.agent import daemonlimits
from netweaver_agent.agent import privileged

GUIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'docs', 'deploying.md')


def _number(text):
    return int(text.replace(',', ''))


def _guide_text():
    with open(GUIDE, encoding='utf-8') as f:
        text = f.read()
    start = text.index('## Capabilities: the privsep daemon')
    return ' '.join(text[start:text.index('\n## ', start + 1)].split())


def test_the_daemon_keeps_the_maxima_the_guide_names():
    text = _guide_text()
    m = re.search(r'option raises: ([\d,]+) probes/s and (\d+) MB/s .*? '
                  r'([\d,]+) probes per window, (\d+) MiB of prepared probes '
                  r'\(counted as size \+ (\d+) bytes each\), (\d+) handles of '
                  r'which (\d+) open captures, (\d+) threads', text)
    assert m, 'the guide no longer lists the daemon maxima'
    (per_s, mb_per_s, per_window, mib, overhead, handles, captures,
     threads) = (_number(g) for g in m.groups())
    lim = daemonlimits.LIMITS
    assert lim.probes_per_s == per_s
    assert lim.bytes_per_s == mb_per_s * 10**6
    assert lim.probes_per_window == per_window
    assert lim.prepared_bytes == mib * 2**20
    assert daemonlimits.PROBE_OVERHEAD_B == overhead
    assert (lim.handles, lim.captures, lim.threads) == (
        handles, captures, threads)


def test_left_behind_handles_close_when_the_guide_says():
    m = re.search(r'closes whatever a vanished client left open after '
                  r'(\d+) s', _guide_text())
    assert m and privileged.MAX_HOLD_S == _number(m.group(1))
