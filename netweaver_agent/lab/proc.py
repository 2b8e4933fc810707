"""A lab process in a session of its own: started with its output in a
log, ended by its process group (so the workers it forks end with it).

The lab's long-running services (:mod:`netweaver_agent.lab.pipeline`'s
daemons, :mod:`netweaver_agent.lab.agent`'s ``ceilometer-polling``) are
started and stopped this way.
"""

import os
import signal
# bandit B404: argument lists only, never a shell
import subprocess  # nosec B404

from oslo_log import log

LOG = log.getLogger(__name__)


def start(argv, log_path, log_mode='ab', **popen_kwargs):
    """Start ``argv`` (a fixed argument list) in a new session, stdin
    from /dev/null, stdout and stderr into ``log_path``; the
    :class:`subprocess.Popen`."""
    with open(log_path, log_mode) as out:
        # bandit B603: callers pass fixed argument lists of lab processes
        return subprocess.Popen(  # nosec B603
            argv, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
            **popen_kwargs)


def alive(proc):
    """Whether ``proc`` (or None) is still running."""
    return proc is not None and proc.poll() is None


def pid_alive(pid):
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f'/proc/{pid}/stat', encoding='ascii') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return False


def stop(proc, name, timeout_s, error):
    """End ``proc``'s process group: SIGTERM, then after ``timeout_s``
    SIGKILL (always, for the workers it forked); raise ``error`` naming
    ``name`` if it outlives that too."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            LOG.warning('%s (pid %d) did not stop on SIGTERM; killing it',
                        name, proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise error(f"{name} (pid {proc.pid}) survived SIGKILL")
