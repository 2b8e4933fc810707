"""TCP probes through a stateful firewall: one connection per probe.

In the Linux-bridge lab the hypervisor's bridge passes netfilter
(``bridge-nf-call-iptables``) and its FORWARD chain is a stateful firewall
as a security group is: conntrack ``INVALID`` is dropped.  Two counters
watch the probes' SYNs: those conntrack files under a connection it had
already confirmed (``--ctstatus CONFIRMED``: a retransmission as far as
the firewall knows), and all of them.  tcpdump records the pif.

* Answered probes (the guest's closed port answers RST): several windows,
  every probe measured both ways, every SYN from a source port of its own
  (read from tcpdump's pcap), exactly the ports the windows' keys hold; no
  SYN taken for a retransmission, nothing dropped as INVALID.
* Unanswered probes (the guest drops them, as a filtering guest or a slow
  one does for 120 s): each probe is a SYN_SENT connection of its own in
  the kernel's conntrack table; the old behaviour, one 5-tuple for every
  probe (a cursor over one port), makes every SYN but the first a
  retransmission of one connection.
* OVN: through the ACLs' userspace conntrack of ovs-vswitchd 3.1 (which
  one 5-tuple for every probe crashed: both chassis' daemons died in the
  first window when tried), each probe is a conntrack connection of its
  own and ovs-vswitchd stays alive.
* The real ``ceilometer-polling``: its windows walk ``[netweaver]
  tcp_source_ports`` across cycles; it refuses to load the meters, with an
  ERROR naming the options, when the range is too small for the polling
  interval read from polling.yaml.
* The other senders: the privsep daemon (the plan handed over with each
  probe's port), the ``ssh://`` source (a real sshd) and ``netweaver
  measure --protocol tcp`` send from the plan's ports too.

Needs root; fails (never skips) without a lab.
"""

import collections
import json
import os
import re
import subprocess
import time

import dpkt
import pytest

from netweaver_agent.agent import privileged
from netweaver_agent.core import netns
from netweaver_agent.core import probe
from netweaver_agent.core import sources
from netweaver_agent.core import vifpath
from netweaver_agent.core import window
from netweaver_agent.lab import agent as labagent
from netweaver_agent.lab import proc as labproc
from netweaver_agent.ssh import probesource
from tests.functional import conftest
from tests.functional import privsep
from tests.functional import sshlab
from tests.functional import tcpdump

COUNT = 20
WINDOWS = 3
RETRANSMITTED = ['-p', 'tcp', '--tcp-flags', 'SYN,ACK,RST', 'SYN',
                 '-m', 'conntrack', '--ctstatus', 'CONFIRMED']
SYNS = ['-p', 'tcp', '--tcp-flags', 'SYN,ACK,RST', 'SYN']
INVALID = ['-m', 'conntrack', '--ctstate', 'INVALID', '-j', 'DROP']


def run(ns, *argv):
    return subprocess.run(netns.netns_argv(ns, list(argv)),
                          capture_output=True, text=True, check=True).stdout


class Firewall:
    """The stateful FORWARD chain of the lab's hypervisor, and counters."""

    RULES = {'retransmitted': RETRANSMITTED, 'syns': SYNS,
             'invalid': INVALID}

    def __init__(self, hv):
        self.hv = hv
        run(hv, 'sysctl', '-q', '-w', 'net.bridge.bridge-nf-call-iptables=1')
        for name, rule in self.RULES.items():
            run(hv, 'iptables', '-I', 'FORWARD', '1', '-m', 'comment',
                '--comment', f'nw-{name}', *rule)

    def counters(self):
        """``{name: packets}`` of our rules, read and zeroed."""
        out = {}
        listing = run(self.hv, 'iptables', '-L', 'FORWARD', '-v', '-x',
                      '-n', '-Z')
        for line in listing.splitlines():
            for name in self.RULES:
                if f'/* nw-{name} */' in line:
                    out[name] = int(line.split()[0])
        assert set(out) == set(self.RULES), listing
        return out

    def syn_sent(self, dst):
        """Source ports of the SYN_SENT connections to ``dst`` that the
        kernel's conntrack table holds."""
        ports = []
        table = run(self.hv, 'cat', '/proc/net/nf_conntrack')
        for line in table.splitlines():
            fields = line.split()
            if 'tcp' in fields and 'SYN_SENT' in fields and \
                    f'dst={dst}' in fields:
                ports.append(int(next(f for f in fields
                                      if f.startswith('sport='))[6:]))
        return ports


@pytest.fixture
def cursor():
    """The process's port cursor: ``set(range)``; the default afterwards."""
    def set_range(ports):
        sources._cursor = None
        return sources.tcp_port_cursor(ports)
    yield set_range
    set_range(probe.DEFAULT_TCP_SOURCE_PORTS)


def windows(the_lab, n, count=COUNT):
    settings = window.WindowSettings(protocol='tcp', count=count,
                                     interval_ms=1.0, timeout_ms=150)
    return [window.run_window(the_lab.paths(), the_lab.layout.source(),
                              settings, capture_netns=the_lab.spec.hv_netns)
            for _ in range(n)]


def key_ports(result, vif):
    """The source ports of the probes a window's capture saw on ``vif``."""
    names = result.batch.ifnames
    return {probe.tcp_ident_port(k >> 1)
            for k, i in zip(result.batch.keys, result.batch.ifindex)
            if not k & 1 and names[i] == vif}


def pcap_syns(path, dst):
    """``[source port]`` of the SYNs to ``dst`` in a pcap, in order."""
    out = []
    with open(path, 'rb') as f:
        for _ts, buf in dpkt.pcap.Reader(f):
            ip = dpkt.ethernet.Ethernet(buf).data
            if (isinstance(ip, dpkt.ip.IP) and
                    isinstance(ip.data, dpkt.tcp.TCP) and
                    ip.dst == bytes(map(int, dst.split('.'))) and
                    ip.data.flags & dpkt.tcp.TH_SYN and
                    not ip.data.flags & dpkt.tcp.TH_ACK):
                out.append(ip.data.sport)
    return out


def test_every_probe_is_a_connection_of_its_own(lab_factory, cursor,
                                                tmp_path):
    cursor(probe.DEFAULT_TCP_SOURCE_PORTS)
    the_lab = lab_factory(guests=1)
    guest = the_lab.guests[0]
    firewall = Firewall(the_lab.spec.hv_netns)
    with tcpdump.recording([tcpdump.Tcpdump(
            the_lab.spec.hv_netns, the_lab.spec.pif,
            os.path.join(tmp_path, 'pif.pcap'),
            ['tcp', 'and', 'host', guest.address],
            limit=2 * WINDOWS * COUNT + 50)]) as (dump,):
        results = windows(the_lab, WINDOWS)
        time.sleep(0.2)
    for result in results:
        rep = result.reports[guest.vif]
        assert rep.sent == COUNT
        assert (rep.ingress.count, rep.egress.count,
                rep.turnaround.count) == (COUNT, COUNT, COUNT), rep
    counted = firewall.counters()
    assert counted['syns'] == WINDOWS * COUNT
    assert counted['retransmitted'] == 0
    assert counted['invalid'] == 0
    # tcpdump saw every SYN come in, each from a port no other used, and
    # those are the ports the windows matched.
    seen = pcap_syns(dump.path, guest.address)
    assert len(seen) == WINDOWS * COUNT
    assert len(set(seen)) == len(seen), collections.Counter(seen)
    assert set(seen) == set().union(*(key_ports(r, guest.vif)
                                      for r in results))
    assert set(seen) <= set(probe.DEFAULT_TCP_SOURCE_PORTS)


def test_unanswered_probes_are_never_retransmissions(lab_factory, cursor):
    the_lab = lab_factory(guests=1)
    guest = the_lab.guests[0]
    firewall = Firewall(the_lab.spec.hv_netns)
    # The guest drops the probes: each connection stays SYN_SENT (120 s).
    run(guest.netns, 'iptables', '-A', 'INPUT', '-p', 'tcp', '--dport',
        str(probe.DEFAULT_TCP_PORT), '-j', 'DROP')

    cursor(range(41000, 42000))
    for result in windows(the_lab, 2):
        rep = result.reports[guest.vif]
        assert (rep.ingress.count, rep.turnaround.count) == (COUNT, 0)
    counted = firewall.counters()
    assert (counted['syns'], counted['retransmitted']) == (2 * COUNT, 0)
    held = firewall.syn_sent(guest.address)
    assert len(held) == len(set(held)) == 2 * COUNT
    assert set(held) <= set(range(41000, 42000))

    # The old behaviour: every probe on one 5-tuple.
    old_port = 43000
    cursor(range(old_port, old_port + 1))
    for result in windows(the_lab, 2):
        assert result.reports[guest.vif].ingress.count == COUNT
    counted = firewall.counters()
    assert counted['syns'] == 2 * COUNT
    assert counted['retransmitted'] == 2 * COUNT - 1
    assert firewall.syn_sent(guest.address).count(old_port) == 1


# -- the privsep daemon, the SSH sender and netweaver measure ----------------

def test_the_privsep_daemon_sends_the_plans_ports(lab_factory, cursor):
    cursor(probe.DEFAULT_TCP_SOURCE_PORTS)
    the_lab = lab_factory(guests=2)
    ctx = privileged.netns_pctxt
    settings = window.WindowSettings(protocol='tcp', count=COUNT,
                                     timeout_ms=100.0, max_window_ms=3000.0)
    ports = collections.defaultdict(list)
    for _ in range(2):
        source = privileged.PrivsepLocalSource(the_lab.spec.src_netns,
                                               context=ctx)
        result = privsep.daemon_window(the_lab, source, settings, ctx)
        for g in the_lab.guests:
            rep = result.reports[g.vif]
            assert (rep.sent, rep.ingress.count, rep.egress.count) == \
                (COUNT, COUNT, COUNT), rep
            ports[g.address] += key_ports(result, g.vif)
    for got in ports.values():
        assert len(got) == len(set(got)) == 2 * COUNT


@pytest.fixture(scope='module')
def ssh_lab(tmp_path_factory):
    """The SSH lab (sshlab): sshd in the source and hypervisor namespaces."""
    yield from sshlab.built(tmp_path_factory)


def test_the_ssh_source_sends_each_probe_from_its_own_port(ssh_lab, cursor):
    cursor(probe.DEFAULT_TCP_SOURCE_PORTS)
    g = ssh_lab.guests[1]
    paths = [vifpath.VifPath(vif=g.vif, address=g.address,
                             interfaces=(ssh_lab.pif, g.vif))]
    source = probesource.parse_source(
        f'ssh://root@{ssh_lab.src_mgmt}:{sshlab.PORT}',
        options=ssh_lab.options(), netns_name=ssh_lab.mgmt)
    settings = window.WindowSettings(protocol='tcp', count=COUNT,
                                     interval_ms=1.0)
    try:
        results = [window.run_window(paths, source, settings,
                                     capture_netns=ssh_lab.hv)
                   for _ in range(2)]
    finally:
        source.close()
    ports = []
    for result in results:
        rep = result.reports[g.vif]
        assert (rep.sent, rep.ingress.count, rep.egress.count) == \
            (COUNT, COUNT, COUNT), rep
        ports += key_ports(result, g.vif)
    assert len(ports) == len(set(ports)) == 2 * COUNT


def test_measure_sends_tcp_from_its_own_ports(ssh_lab, tmp_path):
    g = ssh_lab.guests[1]
    pcaps = tmp_path / 'pcaps'
    proc = sshlab.netweaver(ssh_lab.measure_argv(
        '--vif', g.vif, '-d', g.address, '--protocol', 'tcp', '--count',
        str(COUNT), '--interval-ms', '2', '--json', '--output-dir',
        str(pcaps)))
    got = json.loads(proc.stdout)
    rep = got['reports'][g.vif]
    assert (got['sent'], got['mode']) == (COUNT, 'probe')
    assert rep['ingress']['count'] == COUNT and rep['ingress']['lost'] == 0
    assert rep['egress']['count'] == COUNT
    seen = pcap_syns(str(pcaps / 'pif.pcap'), g.address)
    assert len(seen) == len(set(seen)) == COUNT
    assert set(seen) <= set(probe.DEFAULT_TCP_SOURCE_PORTS)


# -- the real ceilometer-polling

AGENT_RANGE = range(47000, 48000)
AGENT_INTERVAL_S = 3
AGENT_WAIT_S = 90.0
AGENT_PROBE = {'probe_protocol': 'tcp', 'probe_interval_ms': 1.0,
               'probe_timeout_ms': 100.0, 'max_window_ms': 2000.0,
               'tcp_source_ports': f'{AGENT_RANGE[0]}-{AGENT_RANGE[-1]}'}
WINDOW_RE = re.compile(r'Probe window \d+: \d+ probes to')


def test_the_real_agent_walks_the_configured_range(lab_factory, tmp_path):
    the_lab = lab_factory(guests=1)
    guest = the_lab.guests[0]
    files = labagent.write_files(
        the_lab, str(tmp_path / 'agent'), interval_s=AGENT_INTERVAL_S,
        probe=dict(AGENT_PROBE, probe_count=COUNT))
    with tcpdump.recording([tcpdump.Tcpdump(
            the_lab.spec.hv_netns, the_lab.spec.pif,
            os.path.join(tmp_path, 'pif.pcap'),
            ['tcp', 'and', 'dst', 'host', guest.address],
            limit=20 * COUNT)]) as (dump,):
        with labagent.PollingAgent(files, the_lab.spec.hv_netns) as agent:
            rid = labagent.resource_ids(the_lab)[guest.vif]
            agent.wait_for(labagent.latency_ready({rid}), AGENT_WAIT_S)
            conftest.wait_log(
                agent, lambda log: len(WINDOW_RE.findall(log)) >= 3,
                'three probe windows', AGENT_WAIT_S)
            log = agent.log_text()
        time.sleep(0.2)
    assert 'Traceback' not in log and 'not loaded' not in log
    seen = pcap_syns(dump.path, guest.address)
    # Three cycles or more, each probe from a port of its own, all from
    # the configured range (no wrap: 1000 ports, 20 per cycle).
    assert len(seen) >= 3 * COUNT
    assert len(set(seen)) == len(seen), collections.Counter(seen)
    assert set(seen) <= set(AGENT_RANGE)


def test_the_real_agent_refuses_a_range_too_small(lab_factory, tmp_path):
    the_lab = lab_factory(guests=1)
    # 30 probes every 3 s: 40 windows, 1200 ports within 120 s > 1000.
    files = labagent.write_files(
        the_lab, str(tmp_path / 'agent'), interval_s=AGENT_INTERVAL_S,
        probe=dict(AGENT_PROBE, probe_count=30))
    with labagent.PollingAgent(files, the_lab.spec.hv_netns) as agent:
        errors, log = conftest.meters_refused(agent, AGENT_INTERVAL_S,
                                              AGENT_WAIT_S)
    for word in ('probe_protocol = tcp', 'probe_count = 30',
                 f'tcp_source_ports = {AGENT_PROBE["tcp_source_ports"]}',
                 f'polling interval {AGENT_INTERVAL_S} s', files.polling,
                 'needs 1200 ports', 'holds 1000'):
        assert word in errors[0], (word, errors[0])
    assert not WINDOW_RE.search(log)


# -- OVN: ovs-vswitchd's userspace conntrack behind the ACLs

CT_RE = re.compile(r'^tcp,orig=\(src=[^,]+,dst=([^,]+),sport=(\d+),')


def test_ovn_acl_conntrack_holds_one_connection_per_probe(lab_factory,
                                                          cursor):
    cursor(probe.DEFAULT_TCP_SOURCE_PORTS)
    the_lab = lab_factory(switch='ovn', guests=2)
    paths = the_lab.paths()
    settings = window.WindowSettings(
        protocol='tcp', count=COUNT,
        geneve_port=paths[0].encap_port('geneve'))
    ports = collections.defaultdict(list)
    for _ in range(WINDOWS):
        result = window.run_window(paths, the_lab.layout.source(), settings,
                                   capture_netns=the_lab.spec.hv_netns)
        for g in the_lab.guests:
            rep = result.reports[g.vif]
            assert (rep.ingress.count, rep.egress.count) == (COUNT, COUNT)
            ports[g.address] += key_ports(result, g.vif)
    chassis = (the_lab.layout.hv, the_lab.layout.src)
    for c in chassis:
        assert labproc.pid_alive(c.ovs.pids()['ovs-vswitchd']), \
            f'ovs-vswitchd of chassis {c.name} died'
    tracked = collections.defaultdict(set)
    for line in the_lab.layout.hv.ovs.appctl(
            'dpctl/dump-conntrack').splitlines():
        found = CT_RE.match(line)
        if found:
            tracked[found.group(1)].add(int(found.group(2)))
    for dst, got in ports.items():
        assert len(got) == len(set(got)) == WINDOWS * COUNT
        # Each probe is a conntrack connection of its own.
        assert set(got) <= tracked[dst], sorted(set(got) - tracked[dst])
