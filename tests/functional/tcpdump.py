"""tcpdump as an independent instrument, for the functional tests.

:class:`Tcpdump` records one interface of a namespace (``-w``, nanosecond
timestamps), bounded in packets and time; :func:`recording` keeps several
listening for the span of a ``with`` and stops (or kills) them all;
:func:`pcap_times` reads the probe times of a pif and a vif pcap.
"""

import contextlib
import os
import select
import signal
import subprocess
import time

import pytest

from netweaver_agent.core import netns
from netweaver_agent.core import pcapfile
from netweaver_agent.core import sightings
from tests.functional import conftest

TCPDUMP_LIMIT_S = 60


class Tcpdump:
    """``tcpdump -w`` on one interface of a namespace, bounded by ``-c``
    and ``timeout``; :meth:`stop` ends it, :meth:`kill` if all else fails.
    """

    def __init__(self, netns_name, iface, path, bpf, limit):
        self.iface = iface
        self.path = path
        # --immediate-mode: else packets still in the ring's current block
        # are lost at SIGINT.  Immediate mode gives each packet a ring slot
        # sized for the snapshot length: 262144 by default, so a 2 MiB
        # ring holds 8 packets and bursts are dropped; hence -s and -B.
        argv = ['timeout', '-s', 'INT', str(TCPDUMP_LIMIT_S), 'tcpdump',
                '-i', iface, '-nn', '-U', '--immediate-mode', '-s', '512',
                '-B', '4096', '-Z', 'root',
                '--time-stamp-precision=nano', '-c', str(limit), '-w', path,
                *bpf]
        self.proc = subprocess.Popen(netns.netns_argv(netns_name, argv),
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.stderr = b''

    def wait_listening(self, timeout_s=15):
        """Until tcpdump says it listens (its socket is open)."""
        end = time.monotonic() + timeout_s
        fd = self.proc.stderr.fileno()
        while b'listening on' not in self.stderr:
            left = end - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                self.kill()
                pytest.fail(f'tcpdump on {self.iface} did not start: '
                            f'{self.stderr.decode(errors="replace")}')
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                self.stderr += chunk
                if not chunk:
                    time.sleep(0.01)

    def stop(self):
        """SIGINT (tcpdump flushes and exits); its exit status."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f'tcpdump on {self.iface} ignored SIGINT')
        self.stderr += self.proc.stderr.read()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc.stderr.close()


@contextlib.contextmanager
def recording(dumps):
    """The :class:`Tcpdump` s of the iterable ``dumps`` (made one by one
    here, so one that fails leaves none running) listening for the span
    of a ``with``, which gets them as a list.  At its end each is stopped
    and its exit checked (0, or 124 from ``timeout``); if it fails, each
    is killed."""
    started = []
    try:
        for dump in dumps:
            started.append(dump)
        for dump in started:
            dump.wait_listening()
        yield started
        for dump in started:
            assert dump.stop() in (0, 124), dump.stderr
    finally:
        for dump in started:
            dump.kill()


def pcap_times(pif_path, vif_path, pif, vif, session):
    """``{seq: (t_pif, t_vif)}`` from the two pcaps (as the live helper)."""
    batch = sightings.SightingBatch(session)
    for path, name in ((pif_path, pif), (vif_path, vif)):
        read = pcapfile.read_pcap(path, ifname=name, session=session)
        assert not read.truncated, path
        batch.extend(read.batch)
    return conftest.probe_times(batch, pif, vif)
