"""tcpdump as an independent instrument: its pcaps agree with our capture.

In one probe window of the namespace lab, tcpdump records the pif and the
guest's tap (``--time-stamp-precision=nano``) while ``window.run_window``
captures live.  The per-probe latency (tap − pif) read from the two pcaps
by :mod:`netweaver_agent.core.pcapfile` must agree with the live capture's
within 1 µs for at least 99 % of the probes, and ``analyze_pcaps`` must
find the same probes.  Needs root; fails (never skips) without a lab.
"""

import contextlib
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time

import pytest

from netweaver_agent.cli import offline
from netweaver_agent.core import netns
from netweaver_agent.core import pcapfile
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from netweaver_agent.core import window
from tests.functional import conftest

COUNT = 300
TOLERANCE_NS = 1000
AGREEING = 0.99
TCPDUMP_LIMIT_S = 60
FILTERS = {'icmp': ['icmp'], 'udp': ['udp', 'or', 'icmp'], 'tcp': ['tcp']}


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


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix='nw-tcpdump-')
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pcap_times(pif_path, vif_path, pif, vif, session):
    """``{seq: (t_pif, t_vif)}`` from the two pcaps (as the live helper)."""
    batch = sightings.SightingBatch(session)
    for path, name in ((pif_path, pif), (vif_path, vif)):
        read = pcapfile.read_pcap(path, ifname=name, session=session)
        assert not read.truncated, path
        batch.extend(read.batch)
    return conftest.probe_times(batch, pif, vif)


@pytest.mark.parametrize('protocol', ['icmp', 'udp', 'tcp'])
def test_pcaps_agree_with_live_capture(lab_factory, workdir, protocol):
    the_lab = lab_factory(guests=1)
    guest = the_lab.guests[0]
    pif, vif = the_lab.spec.pif, guest.vif
    bpf = FILTERS[protocol] + ['and', 'host', guest.address]
    with recording(Tcpdump(the_lab.spec.hv_netns, iface,
                           os.path.join(workdir, f'{iface}.pcap'),
                           bpf, limit=2 * COUNT + 50)
                   for iface in (pif, vif)) as dumps:
        result = window.run_window(
            the_lab.paths(), the_lab.layout.source(),
            window.WindowSettings(protocol=protocol, count=COUNT,
                                  interval_ms=0.5, timeout_ms=200),
            capture_netns=the_lab.spec.hv_netns)
        time.sleep(0.2)

    live = conftest.probe_times(result.batch, pif, vif)
    assert len(live) >= AGREEING * COUNT, result.reports[vif]
    # TCP keys carry no session (the ISN is a keyed hash).
    session = probe.TCP_SESSION if protocol == 'tcp' else result.session
    files = pcap_times(dumps[0].path, dumps[1].path, pif, vif, session)
    diffs = []
    for seq, (t_pif, t_vif) in live.items():
        if seq in files:
            f_pif, f_vif = files[seq]
            diffs.append(abs((f_vif - f_pif) - (t_vif - t_pif)))
    agreeing = sum(1 for d in diffs if d <= TOLERANCE_NS)
    missing = sorted(live.keys() - files.keys())
    assert agreeing >= AGREEING * len(live), (
        f'{agreeing} of {len(live)} probes agree within {TOLERANCE_NS} ns '
        f'({len(diffs)} found in the pcaps, missing {missing[:20]}); worst '
        f'{max(diffs, default=0)} ns; tcpdump said: '
        + ' | '.join(d.stderr.decode(errors='replace') for d in dumps))

    # The command's analysis of the same files finds the same probes.
    found = offline.analyze_pcaps(dumps[0].path, dumps[1].path,
                                  session=session, pif_name=pif,
                                  vif_name=vif)
    live_rep = result.reports[vif]
    assert found.session == session
    assert found.report.ingress.count >= AGREEING * live_rep.ingress.count
    assert found.report.ingress.p50_us == pytest.approx(
        live_rep.ingress.p50_us, abs=TOLERANCE_NS / 1000)
