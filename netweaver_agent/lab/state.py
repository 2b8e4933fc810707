"""Kept labs: the state file of a built lab, and removing a lab for good.

A lab records what it made (namespaces, the pids of the processes it
started, its guests and injections) in ``/run/netweaver-lab/<prefix>/``
``state.json`` while it is up, so :func:`teardown_kept` (``netweaver lab
down``) or the next build with the same prefix removes it even after the
process that built it is gone.  :func:`remove` ends the lab's processes
(never this process or its ancestors) and any other process left in its
namespaces, deletes the namespaces and checks that nothing is left.
"""

import json
import os
import re
import shutil
import signal
import time

from oslo_log import log

from netweaver_agent.core import netns
from netweaver_agent.lab import proc
from netweaver_agent.lab import switch

LOG = log.getLogger(__name__)

STATE_ROOT = '/run/netweaver-lab'
STATE_FILE = 'state.json'
KILL_GRACE_S = 3.0


def state_dir(prefix):
    """The directory of lab ``prefix``'s state file."""
    return os.path.join(STATE_ROOT, prefix)


def write_json(path, data):
    """Replace ``path`` with ``data`` in JSON, atomically."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def read_state(prefix):
    """The recorded state of lab ``prefix`` (None: no state file)."""
    path = os.path.join(state_dir(prefix), STATE_FILE)
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise switch.LabError(
            f"cannot read lab state {path!r}: {exc}") from exc


def kept_prefixes():
    """Prefixes of kept labs: built persistent, or whose builder is gone.

    Labs that a live process built for itself (a test, a ``netweaver lab``
    run) are not listed: they are that process's to remove.
    """
    try:
        entries = sorted(os.listdir(STATE_ROOT))
    except FileNotFoundError:
        return []
    kept = []
    for prefix in entries:
        try:
            state = read_state(prefix)
        except switch.LabError as exc:
            LOG.warning('%s', exc)
            continue
        if state is None:
            continue
        owner = state.get('owner_pid')
        if state.get('persistent') or not owner or not proc.pid_alive(owner):
            kept.append(prefix)
    return kept


def teardown_kept(prefix=None):
    """Remove the lab ``prefix``, or (None) every kept lab.

    Returns the prefixes of labs found and removed.  A prefix with no
    state file is still cleared of the namespaces a lab with that prefix
    would have made.
    """
    prefixes = [prefix] if prefix else kept_prefixes()
    done = []
    for p in prefixes:
        state = read_state(p)
        found = state is not None or bool(stale_names(p, ()))
        state = state or {}
        remove(p, state.get('namespaces', ()), state.get('pids', ()))
        if found:
            done.append(p)
    return done


def _existing_netns():
    try:
        return set(os.listdir(netns.NETNS_RUN_DIR))
    except FileNotFoundError:
        return set()


def stale_names(prefix, names):
    """Namespaces a lab with ``prefix`` may have left (or ``names``),
    present now."""
    pattern = re.compile(re.escape(prefix) + r'(src|hv|mgmt|g\d+)$')
    return sorted({n for n in _existing_netns()
                   if pattern.match(n) or n in names})


def _cmdline(pid):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().split(b'\0')
    except OSError:
        return []


def _kill(pids, what):
    """SIGTERM ``pids``, then SIGKILL those still there after a grace."""
    pids = [p for p in pids if p not in _protected_pids()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + KILL_GRACE_S
    left = list(pids)
    while left and time.monotonic() < end:
        for pid in left:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        left = [p for p in left if proc.pid_alive(p)]
        if left:
            time.sleep(0.02)
    for pid in left:
        LOG.warning('Lab %(what)s process %(pid)d ignored SIGTERM; killing',
                    {'what': what, 'pid': pid})
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _protected_pids():
    """This process and its ancestors: never killed by a teardown."""
    pids = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f'/proc/{pid}/stat', encoding='ascii') as f:
                pid = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _netns_pids(name):
    out = netns.run(['ip', 'netns', 'pids', name], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def remove(prefix, namespaces, pids):
    """Kill the lab's processes and delete its namespaces; check."""
    errors = []
    own = []
    for entry in pids:
        pid, marker = entry['pid'], entry.get('marker', '')
        if proc.pid_alive(pid) and marker.encode() in _cmdline(pid):
            own.append(pid)
    _kill(own, 'delayer')
    names = stale_names(prefix, set(namespaces))
    strays = sorted({pid for n in names for pid in _netns_pids(n)})
    if strays:
        LOG.warning('Lab %(prefix)s: ending processes left in its '
                    'namespaces: %(pids)s', {'prefix': prefix,
                                             'pids': strays})
        _kill(strays, 'stray')
    for name in names:
        done = netns.run(['ip', 'netns', 'delete', name], check=False)
        if done.returncode != 0 and netns.exists(name):
            errors.append(f"namespace {name}: {done.stderr.strip()}")
    shutil.rmtree(state_dir(prefix), ignore_errors=True)
    left = stale_names(prefix, set(namespaces))
    if left:
        errors.append(f"namespaces still present: {', '.join(left)}")
    if errors:
        raise switch.LabError(f"lab {prefix!r} was not removed entirely: "
                              + '; '.join(errors))
