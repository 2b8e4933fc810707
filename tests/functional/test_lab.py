"""The namespace lab, measured against the truth it injects.

Real namespaces, veth pairs, a Linux bridge, iptables rules and the
NFQUEUE delayer process; probes from the lab's source namespace,
captured in its hypervisor namespace.  Needs root.
"""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time

import pytest

from netweaver_agent.core import netns
from netweaver_agent.core import window as probe_window
from netweaver_agent.lab import build as lab_mod
from netweaver_agent.lab import proc as labproc
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import state as labstate
from netweaver_agent.lab import switch as labswitch
from tests.functional import conftest
from tests.functional.conftest import assert_gone
from tests.functional.conftest import CLI
from tests.functional.conftest import lab_namespaces
from tests.functional.conftest import REPO
from tests.functional.conftest import run_cli
# Generous bounds: these check accuracy against injected truth, on a
# shared, loaded machine; they are not speed benchmarks.
BASELINE_P50_US = 200.0
CLOCK_TOLERANCE_NS = 2000


def window(the_lab, **settings):
    return probe_window.run_window(the_lab.paths(), the_lab.layout.source(),
                                   probe_window.WindowSettings(**settings),
                                   capture_netns=the_lab.spec.hv_netns)


def wait_until(predicate, timeout_s, what):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f'timed out after {timeout_s} s waiting for {what}')


@pytest.mark.parametrize('protocol', ['icmp', 'udp', 'tcp'])
def test_no_delay_every_probe_matched(lab_factory, protocol):
    the_lab = lab_factory(guests=2)
    result = window(the_lab, protocol=protocol, count=20)
    assert result.capture.drops == 0
    assert set(result.reports) == {g.vif for g in the_lab.guests}
    for g in the_lab.guests:
        rep = result.reports[g.vif]
        assert rep.sent == 20
        assert rep.unseen_at_pif == 0
        assert rep.ingress.count == 20, rep
        assert rep.ingress.lost == 0
        assert rep.ingress.p50_us < BASELINE_P50_US, rep.ingress
        if protocol == 'udp':
            # Port unreachable answers are rate-limited by the guest.
            assert rep.egress.count >= 1
        else:
            assert rep.egress.count == 20, rep.egress
            assert rep.egress.lost == 0


def test_delay_measured_against_each_hold(lab_factory):
    delay_ms, count = 2.0, 30
    the_lab = lab_factory(guests=2, delays=(
        labspec.DelayInjection(guest=1, delay_ms=delay_ms,
                               backend='nfqueue'),))
    assert [d.backend for d in the_lab.delays] == ['nfqueue']
    result = window(the_lab, protocol='icmp', count=count,
                    per_vnic_interval_ms=5.0)
    fast, slow = the_lab.guests
    assert result.reports[slow.vif].ingress.count == count
    assert result.reports[fast.vif].ingress.p50_us < BASELINE_P50_US

    # Same clock (CLOCK_REALTIME): each hold sits inside pif → tap.
    held = conftest.held_probes(the_lab, result, slow, delay_ms,
                                CLOCK_TOLERANCE_NS)
    assert len(held) == count
    overheads = []
    for seq, (t_pif, t_vif, rec) in held.items():
        measured = t_vif - t_pif
        assert measured >= rec.hold_ns - CLOCK_TOLERANCE_NS, (seq, rec)
        overheads.append(measured - rec.hold_ns)
    assert (statistics.median(overheads) / 1000 <=
            conftest.hold_overhead_bound_us(delay_ms))
    # Nothing else was held: the other guest's probes pass untouched.
    assert not the_lab.delay_records(0)


def test_loss_every_tenth_probe(lab_factory):
    the_lab = lab_factory(guests=2, losses=(
        labspec.LossInjection(guest=0, every=10, protocol='icmp'),))
    lossy, clean = the_lab.guests
    for _ in range(2):  # the nth counter carries over windows exactly
        result = window(the_lab, protocol='icmp', count=50)
        rep = result.reports[lossy.vif]
        assert rep.ingress.lost == 5, rep.ingress
        assert rep.ingress.count == 45
        assert rep.ingress.loss_pct == pytest.approx(10.0)
        assert result.reports[clean.vif].ingress.lost == 0
        assert result.reports[clean.vif].ingress.loss_pct == 0.0
        # The 10th, 20th... probe to the guest is the one dropped.
        conftest.assert_every_nth_lost(result, the_lab, lossy, clean,
                                       every=10, probes=100)


def test_mgmt_network_reaches_source_and_hypervisor(lab_factory):
    the_lab = lab_factory(guests=1, mgmt=True)
    addrs = the_lab.spec.mgmt_addresses()
    for ns, address in ((the_lab.spec.hv_netns, addrs.hv),
                        (the_lab.spec.src_netns, addrs.src)):
        server = netns.socket_in_netns(ns, socket.AF_INET,
                                       socket.SOCK_STREAM)
        client = netns.socket_in_netns(the_lab.spec.mgmt_netns, socket.AF_INET,
                                       socket.SOCK_STREAM)
        with server, client:
            server.bind((address, 0))
            server.listen(1)
            server.settimeout(5)
            client.settimeout(5)
            client.connect((address, server.getsockname()[1]))
            conn, peer = server.accept()
            conn.close()
            assert peer[0] == addrs.mgmt


def _sysctl(ns, key):
    return netns.run(['sysctl', '-n', key], netns=ns).stdout.strip()


def test_namespaces_are_quiet(lab_factory):
    """The lab's sysctls hold in every namespace (read back by sysctl,
    not by the lab's own writer): no IPv6 without ``ipv6``, no forwarding,
    no reverse-path filter on the source and guests; with ``ipv6``, no
    router advertisements, autoconfiguration or DAD on the guests."""
    plain = lab_factory(guests=2)
    spec = plain.spec
    for ns in spec.namespaces():
        assert _sysctl(ns, 'net.ipv6.conf.all.disable_ipv6') == '1', ns
        assert _sysctl(ns, 'net.ipv4.ip_forward') == '0', ns
    for ns in [spec.src_netns] + [g.netns for g in plain.guests]:
        assert _sysctl(ns, 'net.ipv4.conf.all.rp_filter') == '0', ns
    six = lab_factory(guests=2, ipv6=True)
    for g in six.guests:
        assert _sysctl(g.netns, 'net.ipv6.conf.eth0.disable_ipv6') == '0'
        for key in ('accept_ra', 'autoconf', 'dad_transmits'):
            assert _sysctl(g.netns, f'net.ipv6.conf.eth0.{key}') == '0', key


def test_guests_past_the_first_24(lab_factory):
    """More guests than a /24 holds: the lab network grows, and the
    guests beyond 198.18.0.255 answer and are measured like the first."""
    the_lab = lab_factory(guests=300)
    assert the_lab.spec.prefixlen < 24
    picked = {0, 245, 246, 299}
    paths = [p for g, p in zip(the_lab.guests, the_lab.paths())
             if g.index in picked]
    assert {p.address for p in paths} >= {'198.18.0.255', '198.18.1.0'}
    result = probe_window.run_window(
        paths, the_lab.layout.source(),
        probe_window.WindowSettings(count=5),
        capture_netns=the_lab.spec.hv_netns)
    assert result.capture.drops == 0
    for p in paths:
        rep = result.reports[p.vif]
        assert (rep.ingress.count, rep.egress.count) == (5, 5), (p, rep)


def test_the_largest_linux_bridge_lab(lab_factory):
    """As many guests as the spec allows on a Linux bridge: every tap is
    a port of the bridge (the kernel takes no more than it allows), and
    the last guest answers."""
    most = labspec.max_guests('linuxbridge')
    the_lab = lab_factory(guests=most)
    ports = netns.run(['ip', '-br', 'link', 'show', 'master',
                       the_lab.layout.bridge],
                      netns=the_lab.spec.hv_netns).stdout.split('\n')
    names = {line.split('@')[0].split()[0] for line in ports if line}
    assert names == {the_lab.spec.pif} | {g.vif for g in the_lab.guests}
    last = the_lab.paths()[-1]
    result = probe_window.run_window(
        [last], the_lab.layout.source(), probe_window.WindowSettings(count=3),
        capture_netns=the_lab.spec.hv_netns)
    assert result.reports[last.vif].ingress.count == 3
    assert result.reports[last.vif].egress.count == 3
    # One more port than the spec allows is refused by the kernel.
    extra = netns.run(['ip', 'link', 'add', 'nwx-extra', 'type', 'veth',
                       'peer', 'name', 'nwx-extra-p'],
                      netns=the_lab.spec.hv_netns)
    assert extra.returncode == 0
    refused = netns.run(['ip', 'link', 'set', 'nwx-extra', 'master',
                         the_lab.layout.bridge],
                        netns=the_lab.spec.hv_netns, check=False)
    assert refused.returncode != 0, 'the bridge took one more port'


def test_failed_build_leaves_nothing():
    conftest.require_root()

    class Broken(lab_mod.Lab):
        def inject_delay(self, delay):
            # The last build step: the delayer runs, then the build fails.
            super().inject_delay(delay)
            self.started = [d.pid for d in self.delays]
            raise RuntimeError('injected failure at the last build step')

    prefix = conftest.unique_prefix('f')
    broken = Broken(labspec.LabSpec(prefix=prefix, guests=2, delays=(
        labspec.DelayInjection(guest=0, delay_ms=1.0, backend='nfqueue'),)))
    try:
        with pytest.raises(labswitch.LabError, match='injected failure'):
            broken.build()
        assert broken.started and all(broken.started)
        assert_gone(prefix, broken.started)
    finally:
        labstate.teardown_kept(prefix)


def test_failed_guest_leaves_nothing():
    conftest.require_root()

    class Broken(lab_mod.Lab):
        def _build_guest(self, guest):
            if guest.index == 1:
                raise labswitch.LabError(f'guest {guest.name} refused')
            super()._build_guest(guest)

    prefix = conftest.unique_prefix('f')
    try:
        with pytest.raises(labswitch.LabError, match='refused'):
            Broken(labspec.LabSpec(prefix=prefix, guests=3)).build()
        assert_gone(prefix)
    finally:
        labstate.teardown_kept(prefix)


def test_build_replaces_a_stale_lab(lab_factory):
    prefix = conftest.unique_prefix('s')
    delay = (labspec.DelayInjection(guest=0, delay_ms=1.0,
                                    backend='nfqueue'),)
    stale = lab_mod.Lab(labspec.LabSpec(prefix=prefix, guests=1,
                                        delays=delay, persistent=True))
    try:
        stale.build()
        old_pid = stale.delays[0].pid
        assert prefix in labstate.kept_prefixes()
        # Not torn down: a second lab with the same prefix replaces it.
        the_lab = lab_factory(prefix=prefix, guests=2, delays=delay)
        assert not labproc.pid_alive(old_pid)
        # Built by this live process for itself: not a kept lab.
        assert prefix not in labstate.kept_prefixes()
        result = window(the_lab, count=10, per_vnic_interval_ms=5.0)
        assert all(r.ingress.count == 10 for r in result.reports.values())
    finally:
        labstate.teardown_kept(prefix)


def test_delayer_ends_with_the_process_that_built_the_lab():
    conftest.require_root()
    prefix = conftest.unique_prefix('o')
    script = textwrap.dedent(f'''
        import sys, time
        from netweaver_agent.lab import build, spec
        the_spec = spec.LabSpec(prefix={prefix!r}, guests=1, delays=(
            spec.DelayInjection(guest=0, delay_ms=1.0, backend='nfqueue'),))
        the_lab = build.Lab(the_spec).build()
        print(the_lab.delays[0].pid, flush=True)
        time.sleep(60)
    ''')
    proc = subprocess.Popen([sys.executable, '-c', script], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        assert labproc.pid_alive(pid)
        proc.kill()
        proc.wait(10)
        wait_until(lambda: not labproc.pid_alive(pid), 10,
                   f'delayer {pid} to end after its parent was killed')
        assert lab_namespaces(prefix), 'the killed builder left its lab'
        assert prefix in labstate.kept_prefixes(), 'an orphan is kept'
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        labstate.teardown_kept(prefix)
    assert_gone(prefix)


def test_cli_json_end_to_end():
    conftest.require_root()
    prefix = conftest.unique_prefix('c')
    try:
        proc = run_cli('lab', '--json', '--count', '20', '--prefix', prefix)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out['prefix'] == prefix
        assert [g['index'] for g in out['guests']] == [0, 1]
        fast, slow = out['guests']
        assert fast['injected']['delay_ms'] is None
        assert fast['report']['ingress']['count'] == 20
        assert fast['report']['ingress']['p50_us'] < BASELINE_P50_US
        assert slow['injected']['delay_ms'] == 2.0
        assert slow['injected']['delay_backend'] == 'nfqueue'
        assert slow['injected']['holds']['count'] == 20
        ingress = slow['report']['ingress']
        assert ingress['count'] == 20
        assert ingress['min_us'] >= slow['injected']['holds']['min_us'] - 2
        assert_gone(prefix)
    finally:
        labstate.teardown_kept(prefix)


def test_cli_loss_and_table():
    conftest.require_root()
    prefix = conftest.unique_prefix('c')
    try:
        proc = run_cli('lab', '--count', '20', '--delay-ms', '0',
                       '--loss-every', '10', '--loss-guest', '1',
                       '--protocol', 'tcp', '--prefix', prefix)
        assert proc.returncode == 0, proc.stderr
        assert 'drop every 10th probe (expect 2 lost)' in proc.stdout
        assert '2 lost (10.0%)' in proc.stdout
        assert_gone(prefix)
    finally:
        labstate.teardown_kept(prefix)


def test_cli_keep_then_down():
    conftest.require_root()
    prefix = conftest.unique_prefix('k')
    try:
        proc = run_cli('lab', '--keep', '--count', '5', '--prefix', prefix)
        assert proc.returncode == 0, proc.stderr
        assert len(lab_namespaces(prefix)) == 4
        assert prefix in run_cli('lab', 'list').stdout.split()
        with open(os.path.join(labstate.state_dir(prefix),
                               labstate.STATE_FILE)) as f:
            pids = [p['pid'] for p in json.load(f)['pids']]
        assert pids and all(labproc.pid_alive(p) for p in pids), \
            'a kept lab keeps its delayer'
        down = run_cli('lab', 'down', '--prefix', prefix)
        assert down.returncode == 0, down.stderr
        assert f'removed lab {prefix}' in down.stdout
        assert_gone(prefix, pids)
    finally:
        labstate.teardown_kept(prefix)


def test_cli_sigterm_removes_the_lab():
    conftest.require_root()
    prefix = conftest.unique_prefix('t')
    proc = subprocess.Popen(
        [*CLI, 'lab', '--count', '3000', '--interval-ms', '2',
         '--prefix', prefix], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        state = os.path.join(labstate.state_dir(prefix), labstate.STATE_FILE)

        def delayer_running():
            try:
                with open(state) as f:
                    return bool(json.load(f)['delays'])
            except (OSError, ValueError, KeyError):
                return False

        wait_until(delayer_running, 30, f'lab {prefix} to be built')
        with open(state) as f:
            pids = [p['pid'] for p in json.load(f)['pids']]
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        assert_gone(prefix, pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        labstate.teardown_kept(prefix)
