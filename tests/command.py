"""The ``netweaver`` command as a user runs it (a subprocess), for tests."""

import subprocess
import sys


def netweaver(*argv, **kwargs):
    """Run ``netweaver ARGV...`` (this interpreter, 60 s at most) and
    return the finished process, output as text."""
    return subprocess.run([sys.executable, '-m', 'netweaver_agent.cli.main',
                           *map(str, argv)], capture_output=True, text=True,
                          timeout=60, **kwargs)


def one_line(proc):
    """The single stderr line of a failed command."""
    assert proc.returncode == 1, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and 'Traceback' not in proc.stderr, proc.stderr
    return lines[0]
