"""Fixtures for functional tests: real namespaces, veth, bridge, iptables.

These tests need root.  When the lab cannot be built they fail with the
reason (never skip): a skipped real test hides a broken product.
"""

import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from netweaver_agent.core import netns
from netweaver_agent.core import sightings
from netweaver_agent.lab import build as lab_mod
from netweaver_agent.lab import proc as labproc
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import state as labstate
from netweaver_agent.lab import switch as labswitch

CLI = [sys.executable, '-m', 'netweaver_agent.cli.main']
REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

_counter = itertools.count()


def unique_prefix(tag='t'):
    """A namespace prefix no other test run uses at the same time."""
    return f'nw{tag}{os.getpid()}{secrets.token_hex(2)}{next(_counter)}-'


def require_root():
    if os.geteuid() != 0:
        pytest.fail('functional tests build network namespaces and need '
                    f'root; running as uid {os.geteuid()}')


@pytest.fixture
def workdir():
    """A directory of its own for a test's files (pcaps), removed after."""
    path = tempfile.mkdtemp(prefix='nw-tcpdump-')
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lab_factory():
    """``make(**LabSpec fields) -> built Lab``; every lab is torn down.

    ``prefix`` defaults to a unique one.  Extra keyword ``lab_class``
    builds a subclass of :class:`lab.Lab`.
    """
    require_root()
    labs = []

    def make(lab_class=lab_mod.Lab, **fields):
        fields.setdefault('prefix', unique_prefix())
        the_lab = lab_class(labspec.LabSpec(**fields))
        labs.append(the_lab)
        try:
            return the_lab.build()
        except labswitch.LabError as exc:
            pytest.fail(f'the namespace lab could not be built: {exc}')

    yield make
    errors = []
    for the_lab in reversed(labs):
        try:
            the_lab.teardown()
        except labswitch.LabError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail('lab teardown left things behind: ' + '; '.join(errors))


def run_cli(*args, timeout=120):
    """``netweaver *args`` from the repository; the completed process."""
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def stop_processes(procs):
    """SIGTERM each of ``procs`` still running, in order; SIGKILL one
    that has not ended 5 s later."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def lab_namespaces(prefix):
    return sorted(n for n in os.listdir(netns.NETNS_RUN_DIR)
                  if n.startswith(prefix))


def assert_gone(prefix, pids=()):
    """Nothing of the lab ``prefix`` is left: namespaces, state, ``pids``."""
    assert lab_namespaces(prefix) == [], f'namespaces of {prefix} left'
    assert not os.path.exists(labstate.state_dir(prefix))
    for pid in pids:
        assert not labproc.pid_alive(pid), f'lab process {pid} still runs'


def assert_every_nth_lost(result, the_lab, lossy, clean, every, probes):
    """Of a window's ``probes`` (all received on the pif), the ones that
    never reached ``lossy``'s tap are its ``every``-th, ``2 * every``-th...
    in the order they reached the pif (``clean``'s probes set aside)."""
    at_pif = pif_times(result.batch, the_lab.spec.pif)
    assert len(at_pif) == probes
    elsewhere = probe_times(result.batch, the_lab.spec.pif, clean.vif)
    reached = probe_times(result.batch, the_lab.spec.pif, lossy.vif)
    sent = sorted((t, seq) for seq, t in at_pif.items()
                  if seq not in elsewhere)
    lost = [seq for _, seq in sent if seq not in reached]
    assert lost == [seq for _, seq in sent[every - 1::every]]


class NetnsScript:
    """``python -m <module> <spec_path>`` in namespace ``netns_name`` for
    the span of a ``with``; always stopped.

    The script prints a line with ``"running"`` once it runs, and its
    result as its last line, in JSON (:attr:`result`), when it ends on
    its own within ``timeout_s`` of the ``with``'s end.

    :param what: what the failures call the script
    """

    def __init__(self, netns_name, module, spec_path, timeout_s, what):
        self.argv = netns.netns_argv(netns_name, [
            sys.executable, '-m', module, spec_path])
        self.timeout_s = timeout_s
        self.what = what
        self.proc = None
        self.result = None

    def __enter__(self):
        self.proc = subprocess.Popen(self.argv, cwd=REPO, text=True,
                                     stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        line = self.proc.stdout.readline()
        if '"running"' not in line:
            self.proc.kill()
            _, err = self.proc.communicate()
            pytest.fail(f'the {self.what} did not start: {line} '
                        f'{err[-2000:]}')
        return self

    def __exit__(self, *exc):
        try:
            out, err = self.proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        if self.proc.returncode == 0 and out.strip():
            self.result = json.loads(out.strip().splitlines()[-1])
        elif exc[0] is None:
            pytest.fail(f'the {self.what} failed ({self.proc.returncode}): '
                        f'{err[-2000:]}')
        return False


def hold_overhead_bound_us(delay_ms):
    """The bound on the median of what the lab's held packets take beyond
    their hold (measured - hold), in us: half the hold.

    That overhead is the lab's, not the product's: the round trip to the
    lab's Python delayer (NFQUEUE, SCHED_FIFO; 26-146 us on this host, two
    CI runs on a slow host 200 and 227 us) or OpenFlow controller (to it
    and back through the switch, timer wake-ups: 180-540 us), plus the
    switch.  Half the hold still fails a hold counted twice; a hold not
    made at all fails :func:`held_probes` and :func:`passive_holds_met`.
    """
    return delay_ms * 1000 / 2


def held_probes(the_lab, result, guest, delay_ms, tolerance_ns):
    """Every probe of ``result``'s window to ``guest`` (a
    :class:`lab.LabGuest`) seen on the pif and its tap was held exactly
    once by the lab's delayer, each hold at least
    ``delay_ms`` and inside the probe's pif -> tap (same clock, within
    ``tolerance_ns``).  ``{seq: (t_pif_ns, t_vif_ns, record)}``."""
    holds = {r.seq: r for r in the_lab.delay_records(guest.index)
             if r.session == result.session and not r.reply}
    seen = probe_times(result.batch, the_lab.spec.pif, guest.vif)
    assert sorted(holds) == sorted(seen), 'every probe held exactly once'
    out = {}
    for seq, (t_pif, t_vif) in seen.items():
        rec = holds[seq]
        assert rec.hold_ns >= delay_ms * 1e6, rec
        assert t_pif <= rec.received_ns + tolerance_ns, (seq, rec)
        assert rec.released_ns <= t_vif + tolerance_ns, (seq, rec)
        out[seq] = (t_pif, t_vif, rec)
    return out


def passive_holds_met(the_lab, sightings, spec, guest, delay_ms,
                      tolerance_ns):
    """Every ingress packet of ``spec``'s vNIC matched in ``sightings``
    against the lab's passive delayer's hold of the packet with its key
    (guest index ``guest``): held exactly once, at least ``delay_ms``,
    inside the packet's pif -> tap, measured no less than the hold (same
    clock, within ``tolerance_ns``).  The per-packet overheads (measured
    - hold) in ns."""
    from netweaver_agent.core import passive
    pairs = passive.ingress_pairs(sightings, spec)
    holds = {}
    for h in the_lab.passive_holds(guest):
        if h.header is not None and h.header.ident is not None:
            holds.setdefault((h.header.flow, h.header.ident), []).append(h)
    assert pairs, 'nothing matched for the delayed guest'
    overheads = []
    for key, (t_pif, t_tap) in pairs.items():
        held = holds.get(key, [])
        # Each matched packet was held once (the delayer saw it once).
        assert len(held) == 1, (key, held)
        rec = held[0]
        assert rec.hold_ns >= delay_ms * 1e6, rec
        assert t_pif <= rec.received_ns + tolerance_ns, (key, rec)
        assert rec.released_ns <= t_tap + tolerance_ns, (key, rec)
        overhead = t_tap - t_pif - rec.hold_ns
        assert overhead >= -tolerance_ns, (key, rec)
        overheads.append(overhead)
    return overheads


def wait_log(agent, predicate, what, timeout_s):
    """Until ``predicate(log text)`` of the running
    :class:`labagent.PollingAgent` ``agent``; fails naming ``what`` if it
    does not come within ``timeout_s`` or the agent ends first."""
    deadline = time.monotonic() + timeout_s
    while not predicate(agent.log_text()):
        if time.monotonic() > deadline or not agent.alive():
            pytest.fail(f'ceilometer-polling: no {what} within '
                        f'{timeout_s:.0f} s (alive: {agent.alive()}); '
                        f'see {agent.files.log}')
        time.sleep(0.5)


def meters_refused(agent, interval_s, timeout_s):
    """The running ``agent`` refused to load our meters: its ERROR lines
    saying so (at least one) and its log, read two polling intervals
    after the first; it published no latency."""
    wait_log(agent, lambda log: 'not loaded' in log, 'refusal', timeout_s)
    time.sleep(2 * interval_s)
    log = agent.log_text()
    assert not agent.series('ceilometer_network_vif_latency')
    errors = [line for line in log.splitlines()
              if 'ERROR' in line and 'not loaded' in line]
    assert errors, log[-2000:]
    return errors, log


def pif_times(batch, pif):
    """``{seq: t_ns}``: when each probe was first received on the pif."""
    out = {}
    names = batch.ifnames
    for key, index, t_ns, direction in zip(batch.keys, batch.ifindex,
                                           batch.t_ns, batch.direction):
        if (not key & 1 and names[index] == pif
                and direction != sightings.DIR_OUT):
            seq = key >> 1
            out[seq] = min(t_ns, out.get(seq, t_ns))
    return out


def probe_times(batch, pif, vif):
    """``{seq: (t_pif_ns, t_vif_ns)}`` for probes seen on both.

    ``t_pif`` is the first time the probe was *received* on the pif,
    ``t_vif`` the first time it was seen on the vif, both CLOCK_REALTIME
    kernel timestamps from the window's :class:`sightings.SightingBatch`.
    """
    at_pif, at_vif = {}, {}
    names = batch.ifnames
    for key, index, t_ns, direction in zip(batch.keys, batch.ifindex,
                                           batch.t_ns, batch.direction):
        if key & 1:
            continue
        seq, name = key >> 1, names[index]
        if name == pif and direction != sightings.DIR_OUT:
            at_pif[seq] = min(t_ns, at_pif.get(seq, t_ns))
        elif name == vif:
            at_vif[seq] = min(t_ns, at_vif.get(seq, t_ns))
    return {seq: (at_pif[seq], at_vif[seq])
            for seq in at_pif.keys() & at_vif.keys()}
