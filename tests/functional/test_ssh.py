"""The seed's job and the ssh:// probe source against real OpenSSH servers.

Needs root.  The module builds one :class:`lab.Lab` (unique prefix) with
a management network (``<p>mgmt``, from which the client connects) and a
2 ms delay on the probes to guest 0.  Real ``/usr/sbin/sshd`` processes
run in the source and hypervisor namespaces with host keys, a client key
and a known_hosts file generated here; they are killed and the lab is
removed on teardown, also on failure.  The hypervisor's instances are a
libvirt ``test:///`` node (:mod:`labvirt`) written next to the keys: the
real ``virsh`` (libvirt-clients) resolves ``--instance`` names there.
"""

import contextlib
import json
import os
import select
import socket
import subprocess
import time
import uuid
from xml.etree import ElementTree

import dpkt
import pytest

from netweaver_agent.cli import seedjob
from netweaver_agent.core import netns
from netweaver_agent.core import pacing
from netweaver_agent.core import sources
from netweaver_agent.core import vifpath
from netweaver_agent.core import window
from netweaver_agent.lab import virt
from netweaver_agent.ssh import probesource
from netweaver_agent.ssh import session
from tests.functional import conftest
from tests.functional import sshlab


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    yield from sshlab.built(tmp_path_factory)


# -- ssh/session.py against a real sshd ------------------------------------

def test_run_fetch_tempdir_and_errors(lab, tmp_path):
    with lab.host() as hv:
        assert hv.run(['ip', '-o', 'link', 'show', lab.pif]).exit_status == 0
        with pytest.raises(session.RemoteCommandError) as err:
            hv.run(['sh', '-c', 'echo boom >&2; exit 3'])
        assert 'exit status 3' in str(err.value)
        assert 'boom' in str(err.value)
        assert lab.hv_mgmt in str(err.value)
        with pytest.raises(session.RemoteCommandError) as err:
            hv.run(['sleep', '3'], timeout_s=0.5)
        assert 'did not end within 0.5 s' in str(err.value)
        # SFTP fetch, and the remote directory goes also on failure.
        with pytest.raises(RuntimeError, match='inside'):
            with hv.tempdir() as tmp:
                hv.run(['sh', '-c', 'printf data > "$1"', 'sh',
                        f'{tmp}/f'])
                hv.fetch(f'{tmp}/f', str(tmp_path / 'f'))
                raise RuntimeError('failure inside the tempdir')
        assert (tmp_path / 'f').read_bytes() == b'data'
        gone = hv.run(['test', '-e', tmp], check=False)
        assert gone.exit_status == 1, f'{tmp} left on the hypervisor'
        with pytest.raises(session.RemoteError, match='/nonexistent/pcap'):
            hv.fetch('/nonexistent/pcap', str(tmp_path / 'g'))


def test_wrong_host_key_refused(lab, tmp_path):
    other = tmp_path / 'other_key'
    sshlab.run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-f',
                str(other)])
    kind, blob = (tmp_path / 'other_key.pub').read_text().split()[:2]
    bad = tmp_path / 'known_hosts'
    bad.write_text(f'[{lab.hv_mgmt}]:{sshlab.PORT} {kind} {blob}\n')
    host = lab.host(known_hosts_file=str(bad), accept_new_host_key=True)
    with pytest.raises(session.HostKeyError) as err:
        host.connect()
    msg = str(err.value)
    assert lab.hv_mgmt in msg and 'differs' in msg and str(bad) in msg
    # Nothing was recorded over the known key.
    assert bad.read_text() == f'[{lab.hv_mgmt}]:{sshlab.PORT} {kind} {blob}\n'


def test_unknown_host_refused_unless_accepted(lab, tmp_path):
    empty = tmp_path / 'known_hosts'
    empty.write_text('')
    with pytest.raises(session.HostKeyError) as err:
        lab.host(known_hosts_file=str(empty)).connect()
    assert 'is not in known_hosts' in str(err.value)
    assert lab.hv_mgmt in str(err.value)
    with lab.host(known_hosts_file=str(empty),
                  accept_new_host_key=True) as hv:
        hv.run(['true'])
    assert f'[{lab.hv_mgmt}]:{sshlab.PORT} ssh-ed25519 ' in empty.read_text()
    with lab.host(known_hosts_file=str(empty)) as hv:   # now known
        hv.run(['true'])


def test_unreachable_host_fails_within_timeout(lab):
    host = lab.host(addr=lab.nobody, connect_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(session.RemoteConnectError) as err:
        host.connect()
    elapsed = time.monotonic() - started
    assert lab.nobody in str(err.value)
    assert 'timed out after 1.0 s' in str(err.value)
    # Not a speed check: the configured timeout, not a default one, fired.
    assert elapsed < 10, elapsed


def test_unreachable_host_in_measure_names_it(lab, capsys):
    g = lab.guests[1]
    argv = lab.measure_argv('-d', g.address, '--vif', g.vif)
    argv[argv.index(lab.hv_mgmt)] = lab.nobody_too
    argv[argv.index('--connect-timeout') + 1] = '1'
    status, out, err = sshlab.cli(argv, capsys)
    assert status == 1
    assert lab.nobody_too in err and 'timed out' in err


@contextlib.contextmanager
def _no_leftovers():
    """Assert the job leaves no remote temporary directory behind."""
    def listing():
        return {n for n in os.listdir('/tmp') if n.startswith('netweaver.')}
    before = listing()
    yield
    assert listing() - before == set()


# -- the seed's job ---------------------------------------------------------
def test_measure_end_to_end_equals_analyze_and_sees_the_delay(
        lab, tmp_path):
    g = lab.guests[0]     # its probes are held sshlab.DELAY_MS on the bridge
    pcaps = tmp_path / 'pcaps'
    with _no_leftovers():
        proc = sshlab.netweaver(lab.measure_argv(
            '--vif', g.vif, '-d', g.address, '--count', '40',
            '--interval-ms', '5', '--json', '--output-dir', str(pcaps)))
    got = json.loads(proc.stdout)
    assert (got['vif'], got['pif'], got['mode']) == (g.vif, lab.pif, 'probe')
    # Verified with the window's own secret (its probes' tags).
    assert got['authenticated'] is True
    assert got['source_ip'] == lab.lab.spec.src_address
    assert got['sent'] == 40
    rep = got['reports'][g.vif]
    assert rep['ingress']['count'] == 40 and rep['ingress']['lost'] == 0
    assert rep['egress']['count'] == 40
    # The lab's truth: the delayer held each of these probes once.
    held = [r for r in lab.lab.delay_records(0)
            if r.session == got['session'] and not r.reply]
    assert sorted(r.seq for r in held) == list(range(40))
    assert rep['ingress']['mean_us'] >= sshlab.DELAY_MS * 1000
    assert rep['ingress']['min_us'] * 1000 >= min(r.hold_ns for r in held)
    # The same pcaps through `netweaver analyze` give the same report.
    proc = sshlab.netweaver(
        ['analyze', str(pcaps / 'pif.pcap'), str(pcaps / 'vif.pcap'),
         '--pif-name', lab.pif, '--vif-name', g.vif, '--protocol', 'icmp',
         '--session', str(got['session']), '--json'])
    alone = json.loads(proc.stdout)
    assert alone['report'] == rep
    assert alone['summary'] == got['summary']


def test_measure_with_the_seeds_hping3(lab, capsys):
    g = lab.guests[1]
    with _no_leftovers():
        status, out, err = sshlab.cli(lab.measure_argv(
            '--vif', g.vif, '-d', g.address, '--count', '20',
            '--source-command',
            'hping3 -c {count} -S -L 0 -Q -i u5000 {destination}'), capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert f'{g.vif}  (pif {lab.pif}, fingerprint, 20 sent' in out
    ingress = next(ln for ln in lines if ln.strip().startswith('ingress'))
    assert ingress.split()[1:3] == ['20', '0']       # count, lost
    summary = lines[-1]
    assert summary.startswith("{'average': ") and "'stdev': " in summary


# -- resolving --instance with the real virsh -------------------------------

def _domiflist(uri, domain):
    """What the real ``virsh domiflist`` prints (local, no SSH)."""
    return netns.run([sshlab.virsh(), '-c', uri, 'domiflist', '--domain',
                      domain]).stdout


def test_parse_domiflist_reads_the_real_virsh_output(tmp_path):
    def guest(index, **kw):
        return virt.GuestDomain(
            index=index, name=f'g{index}', uuid=str(uuid.uuid4()),
            vif=f'nwh8tap{index}', mac=f'fa:16:3e:00:00:{index + 16:02x}',
            address=f'198.18.0.{index + 10}', **kw)

    bridged = guest(0, bridge='nwh8br0')
    plain = guest(1)                    # type='ethernet', Source '-'
    two, second = guest(2, bridge='nwh8br0'), guest(3)
    empty = guest(4)
    node = ElementTree.Element('node')
    for g in (bridged, plain, two, empty):
        node.append(virt.domain_element(g))
    devices = node[2].find('devices')     # two vNICs: nwh8tap2, nwh8tap3
    devices.append(virt.domain_element(second).find('devices/interface'))
    devices = node[3].find('devices')     # no vNIC at all
    devices.remove(devices.find('interface'))
    path = tmp_path / 'node.xml'
    path.write_text(ElementTree.tostring(node, encoding='unicode'))
    uri = virt.uri(str(path))

    text = _domiflist(uri, bridged.domain_name)
    # The real format: a header, a rule of dashes, one row per vNIC.
    lines = text.splitlines()
    assert lines[0].split() == ['Interface', 'Type', 'Source', 'Model',
                                'MAC']
    assert set(lines[1]) == {'-'}
    assert seedjob.parse_domiflist(text, 0, bridged.domain_name) == \
        'nwh8tap0'
    with pytest.raises(seedjob.SeedJobError, match=r'has 1 interfaces .* '
                       r'vif number 1 is not one of them'):
        seedjob.parse_domiflist(text, 1, bridged.domain_name)
    assert seedjob.parse_domiflist(_domiflist(uri, plain.domain_name), 0,
                                   plain.domain_name) == 'nwh8tap1'
    text = _domiflist(uri, two.domain_name)
    assert [seedjob.parse_domiflist(text, n, two.domain_name)
            for n in (0, 1)] == ['nwh8tap2', 'nwh8tap3']
    with pytest.raises(seedjob.SeedJobError, match='has 2 interfaces'):
        seedjob.parse_domiflist(text, 2, two.domain_name)
    with pytest.raises(seedjob.SeedJobError) as err:
        seedjob.parse_domiflist(_domiflist(uri, empty.domain_name), 0,
                                empty.domain_name)
    assert f"instance {empty.domain_name!r} has 0 interfaces" in \
        str(err.value)


def test_measure_resolves_the_instance_with_the_real_virsh(lab):
    g = lab.guests[0]     # its probes are held sshlab.DELAY_MS on the bridge
    with _no_leftovers():
        proc = sshlab.netweaver(lab.measure_argv(
            '--instance', g.name, '--libvirt-uri', lab.libvirt_uri,
            '-d', g.address, '--count', '20', '--interval-ms', '5',
            '--json'))
    got = json.loads(proc.stdout)
    assert (got['vif'], got['pif'], got['mode']) == (g.vif, lab.pif, 'probe')
    assert got['sent'] == 20
    rep = got['reports'][g.vif]
    assert rep['ingress']['count'] == 20 and rep['ingress']['lost'] == 0
    assert rep['egress']['count'] == 20
    # The lab's truth: the delayer held each of these probes once.
    held = [r for r in lab.lab.delay_records(0)
            if r.session == got['session'] and not r.reply]
    assert sorted(r.seq for r in held) == list(range(20))
    assert rep['ingress']['mean_us'] >= sshlab.DELAY_MS * 1000
    assert rep['ingress']['min_us'] * 1000 >= min(r.hold_ns for r in held)


def test_instance_vif_number_beyond_its_vnics_is_clear(lab, capsys):
    g = lab.guests[1]
    with _no_leftovers():
        status, out, err = sshlab.cli(lab.measure_argv(
            '-n', g.name, '--libvirt-uri', lab.libvirt_uri,
            '--vif-number', '1', '-d', g.address, '--count', '5'), capsys)
    assert status == 1
    assert (f"instance {g.name!r} has 1 interfaces in virsh domiflist; "
            "vif number 1 is not one of them") in err


def test_instance_name_runs_nothing(lab, capsys):
    absent = lab.hostile.replace('x;', 'y;', 1)   # no such domain
    with lab.host() as hv:
        marker = os.path.join(hv.run(['pwd']).text.strip(), lab.marker)
        try:
            # Control: the same text given to a shell does create the
            # marker, so its absence below means something.
            hv.run(['sh', '-c', f'echo name-label={lab.hostile}'])
            assert os.path.exists(marker)
            os.unlink(marker)
            # No xe, no such libvirt domain: a clear error, nothing run.
            status, out, err = sshlab.cli(lab.measure_argv(
                '-n', absent, '--libvirt-uri', lab.libvirt_uri,
                '-d', lab.guests[1].address, '--count', '5'), capsys)
            assert status == 1
            assert f"cannot find the vif of instance {absent!r}" in err
            assert 'xe: not installed' in err
            assert 'virsh: exit status 1: error: failed to get domain' in err
            assert not os.path.exists(marker)
            # The real virsh finds the domain of exactly that name
            # (spaces, ';', $(), backquotes and all): one argument.
            status, out, err = sshlab.cli(lab.measure_argv(
                '-n', lab.hostile, '--libvirt-uri', lab.libvirt_uri,
                '-d', lab.guests[1].address, '--count', '5', '--json',
                '--interval-ms', '5'), capsys)
            assert not os.path.exists(marker)
            assert status == 0, err
            assert json.loads(out)['vif'] == lab.guests[1].vif
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(marker)


def test_ssh_source_in_run_window_like_netns_source(lab):
    g = lab.guests[1]
    paths = [vifpath.VifPath(vif=g.vif, address=g.address,
                             interfaces=(lab.pif, lab.guests[1].vif))]
    settings = window.WindowSettings(count=30, interval_ms=1.0)
    ssh_source = probesource.parse_source(
        f'ssh://root@{lab.src_mgmt}:{sshlab.PORT}', options=lab.options(),
        netns_name=lab.mgmt)
    local_source = probesource.parse_source(f'netns:{lab.src}')
    try:
        by_ssh = window.run_window(paths, ssh_source, settings,
                                   capture_netns=lab.hv)
        by_netns = window.run_window(paths, local_source, settings,
                                     capture_netns=lab.hv)
    finally:
        ssh_source.close()
        local_source.close()
    assert by_ssh.send == sources.SendResult(sent=30)
    a, b = by_ssh.reports[g.vif], by_netns.reports[g.vif]
    # Both entered the host through its pif, as the same probes do, and
    # the secret of each window verified every one of them.
    assert (a.vif, a.pif, a.protocol, a.authenticated, a.rejected) == \
        (b.vif, b.pif, b.protocol, b.authenticated, b.rejected) == \
        (g.vif, lab.pif, 'icmp', True, 0)
    for rep in (a, b):
        assert rep.pif == lab.pif and rep.sent == 30
        assert rep.ingress.count == 30 and rep.ingress.lost == 0
        assert rep.egress.count == 30 and rep.unseen_at_pif == 0
        assert 0 < rep.ingress.mean_us < 2000   # no delay on this guest


@contextlib.contextmanager
def _tcpdump(ns, interface, path, count, bpf):
    """A tcpdump in ``ns`` writing ``path`` with nanosecond timestamps,
    listening when entered, stopped (and reaped) on exit."""
    proc = subprocess.Popen(
        ['ip', 'netns', 'exec', ns, 'tcpdump', '-n', '-i', interface,
         '-Q', 'in', '-w', path, '--time-stamp-precision=nano',
         '--immediate-mode', '-c', str(count), bpf],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    try:
        seen = b''
        deadline = time.monotonic() + 10
        while b'listening on' not in seen:
            ready, _, _ = select.select([proc.stderr], [], [], 0.2)
            if ready:
                seen += os.read(proc.stderr.fileno(), 4096)
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f'tcpdump on {interface} in {ns}: {seen!r}')
        yield proc
    finally:
        conftest.stop_processes([proc])
        proc.stderr.close()


def _arrivals(path):
    """``[(t_ns, destination)]`` of the IPv4 packets of a pcap."""
    out = []
    with open(path, 'rb') as f:
        for ts, frame in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(frame).data
            out.append((int(ts * 10**9),
                        socket.inet_ntoa(ip.dst)))
    return out


def test_ssh_source_paces_on_the_wire(lab, tmp_path):
    """The remote sender keeps the plan's rates where it matters: as the
    hypervisor's pif receives the probes (kernel timestamps, tcpdump),
    two probes to one vNIC are never closer than per_vnic_interval, and
    the window takes as long as the plan says.  A sender that sends the
    records as they come (no pacing) puts them all within a millisecond
    or two."""
    per_vnic_ns, interval_ns, count = 20_000_000, 1_000_000, 10
    targets = [g.address for g in lab.guests]
    sched = sources.schedule(window.new_session(), 'icmp', targets, count,
                             interval_ns, per_vnic_ns,
                             secret=window.new_secret())
    plan = sched.plan
    pcap = str(tmp_path / 'pif.pcap')
    src = probesource.SSHSource(lab.src_mgmt, sshlab.PORT, 'root',
                                lab.options(), netns_name=lab.mgmt)
    bpf = (f'icmp[icmptype] = icmp-echo and src host '
           f'{lab.lab.spec.src_address}')
    try:
        src.prepare(plan)
        with _tcpdump(lab.hv, lab.pif, pcap, len(plan.probes), bpf) as dump:
            sent = src.send(plan, time.monotonic() + 30)
            dump.wait(10)
    finally:
        src.close()
    assert sent == sources.SendResult(sent=len(plan.probes))
    seen = _arrivals(pcap)
    assert sorted(d for _, d in seen) == sorted(p.dst_ip for p in plan.probes)
    # Arrival times differ from departure times by the path's jitter.
    tolerance_ns = 2_000_000
    for dst in targets:
        times = [t for t, d in seen if d == dst]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(gaps) == count - 1
        assert min(gaps) >= per_vnic_ns - tolerance_ns, (dst, gaps)
    # The host's rate: the probes spread over the plan's duration (a
    # probe may leave a quantum early, never more).
    spread = seen[-1][0] - seen[0][0]
    quantum_ns = int(pacing.SEND_QUANTUM_S * 1e9)
    assert spread >= plan.duration_ns - quantum_ns - tolerance_ns, spread


def test_ssh_source_bad_sender_host_is_clear(lab):
    src = probesource.SSHSource(lab.nobody, sshlab.PORT, 'root', lab.options(
        connect_timeout_s=1.0), netns_name=lab.mgmt)
    plan = sources.schedule(1, 'icmp', [lab.guests[1].address], 3,
                            1000000).plan
    with pytest.raises(sources.SourceError) as err:
        src.send(plan, time.monotonic() + 5)
    assert lab.nobody in str(err.value)


def test_missing_vif_fails_clearly_and_cleans_up(lab, capsys):
    g = lab.guests[1]
    with _no_leftovers():
        status, out, err = sshlab.cli(lab.measure_argv(
            '--vif', 'nosuchvif0', '-d', g.address, '--count', '5'), capsys)
    assert status == 1
    assert 'tcpdump' in err and 'nosuchvif0' in err and lab.hv_mgmt in err
    # The pif's capture, which had started, was stopped too.
    with lab.host() as hv:
        left = hv.run(['pgrep', '-a', '-f', r'tcpdump .* -w /tmp/netweaver\.'],
                      check=False)
    assert left.exit_status == 1, left.text
