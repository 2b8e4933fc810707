"""The polling agent runs unprivileged; the privsep daemon holds CAP_NET_RAW.

Production sources need nothing but CAP_NET_RAW in the daemon: the real
``ceilometer-polling`` runs as ``nobody`` with no capability at all
(``setpriv``) in the lab's hypervisor namespace, probes from ``local``
(routed out through the management network and back in through the pif,
as the design's ``local`` source assumes), and its privsep daemon keeps
exactly CAP_NET_RAW.  No sudo is installed here: the agent's helper
command is a small client of a broker this test runs as root, which
checks the request and starts ``privsep-helper`` (``python -m
oslo_privsep.daemon``) as sudo would.  ``netns:`` sources and
``capture_netns`` need CAP_SYS_ADMIN for ``setns``: the CAP_NET_RAW
daemon refuses them, the lab's context does them.  VLAN ids and VNIs
of the daemon's capture reach the agent.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

import pytest

from netweaver_agent.agent import privileged
from netweaver_agent.core import netns
from netweaver_agent.core import probe
from netweaver_agent.core import window
from netweaver_agent.lab import agent as labagent
from netweaver_agent.lab import switch as labswitch
from tests.functional import privsep

NOBODY = 65534
CAP_NET_RAW_MASK = 1 << 13
SOCK_RE = re.compile(r'^/tmp/tmp[A-Za-z0-9_]+/privsep\.sock$')
FAKE_SUDO = '''\
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps(sys.argv[2:]).encode() + b"\\n")
sys.exit(int(s.makefile().readline() or 1))
'''


class Broker:
    """Plays sudo for the unprivileged agent: one allowed command."""

    def __init__(self, workdir, netns_name):
        self.path = os.path.join(workdir, 'broker.sock')
        self.netns_name = netns_name
        self.requests = []
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(self.path)
        os.chmod(self.path, 0o777)
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                argv = json.loads(conn.makefile().readline())
                self.requests.append(argv)
                ok = (len(argv) == 4 and argv[0] == '--privsep_context'
                      and argv[1] == privileged.capture_pctxt.pypath
                      and argv[2] == '--privsep_sock_path'
                      and SOCK_RE.match(argv[3]))
                status = 1
                if ok:
                    # Not through pipes: the forked daemon keeps stderr
                    # open, and only the helper's own exit is awaited.
                    status = subprocess.run(netns.netns_argv(
                        self.netns_name, [sys.executable, '-W', 'ignore',
                                          '-m', 'oslo_privsep.daemon',
                                          *argv]),
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL, timeout=60).returncode
                conn.sendall(f'{status}\n'.encode())

    def close(self):
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def _plain_python():
    """A Python that ``nobody`` may run (the venv's may sit under /root)."""
    for path in ('/usr/bin/python3', sys.executable):
        if os.path.exists(path):
            return path
    return sys.executable


def test_unprivileged_agent_and_a_cap_net_raw_daemon(lab_factory):
    the_lab = lab_factory(guests=2, mgmt=True)
    privsep.route_local_through_the_pif(the_lab)
    workdir = tempfile.mkdtemp(prefix='nwprivsep')
    broker = agent = None
    try:
        os.chmod(workdir, 0o755)
        helper = os.path.join(workdir, 'fake_sudo.py')
        with open(helper, 'w', encoding='utf-8') as f:
            f.write(FAKE_SUDO)
        broker = Broker(workdir, the_lab.spec.hv_netns)
        agent_dir = os.path.join(workdir, 'agent')
        files = labagent.write_files(
            the_lab, agent_dir, interval_s=3,
            probe={'probe_source': 'local',
                   # 'local' sends only to the operator's networks.
                   'probe_networks': the_lab.spec.network,
                   'probe_count': 10,
                   'probe_timeout_ms': 100.0, 'max_window_ms': 2000.0,
                   'privsep_helper_command':
                       f'{_plain_python()} {helper} {broker.path}'})
        for root, dirs, names in os.walk(agent_dir):
            for name in [*dirs, *names, '.']:
                os.chown(os.path.join(root, name), NOBODY, NOBODY)
        agent = labagent.PollingAgent(files, the_lab.spec.hv_netns, wrapper=(
            'setpriv', f'--reuid={NOBODY}', f'--regid={NOBODY}',
            '--clear-groups', '--inh-caps=-all', '--'))
        agent.start()
        ids = labagent.resource_ids(the_lab)
        try:
            series = agent.wait_for(
                labagent.latency_ready(set(ids.values())), 45.0)
        except labagent.AgentError as exc:
            lines = [line for line in agent.log_text().splitlines()
                     if 'privsep' in line or 'netweaver_agent' in line]
            pytest.fail(f'{exc}: ' + '\n'.join(lines[-20:]))
        latency = {s.label('resource'): s.value for s in series
                   if s.name == 'ceilometer_network_vif_latency'}
        assert set(latency) == set(ids.values()), latency
        assert all(0 < v < 5000 for v in latency.values()), latency
        agents = privsep.processes(the_lab.spec.hv_netns, 'ceilometer-polling')
        daemons = privsep.processes(the_lab.spec.hv_netns,
                                    'oslo_privsep.daemon')
        assert agents and len(daemons) == 1, (agents, daemons)
        for pid in agents:
            st = privsep.status(pid)
            assert st['Uid'][0] == str(NOBODY), st['Uid']
            assert int(st['CapEff'][0], 16) == 0, st['CapEff']
            assert int(st['CapPrm'][0], 16) == 0, st['CapPrm']
        st = privsep.status(daemons[0])
        assert int(st['CapEff'][0], 16) == CAP_NET_RAW_MASK, st['CapEff']
        assert int(st['CapPrm'][0], 16) == CAP_NET_RAW_MASK, st['CapPrm']
        assert [r[1] for r in broker.requests] == [
            privileged.capture_pctxt.pypath]
        log = agent.log_text()
        assert 'Traceback' not in log
        assert 'CAP_NET_RAW/CAP_NET_RAW/none' in log
    finally:
        if agent is not None:
            agent.stop()
        if broker is not None:
            broker.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_netns_sources_need_cap_sys_admin(lab_factory):
    the_lab = lab_factory(guests=1)
    settings = window.WindowSettings(count=5, timeout_ms=100.0,
                                     max_window_ms=1000.0)
    try:
        prod = privileged.capture_pctxt
        assert privileged.status(prod).effective == (
            privileged.caps.CAP_NET_RAW,)
        source = privileged.PrivsepLocalSource(the_lab.spec.src_netns,
                                               context=prod)
        with pytest.raises(privileged.PrivilegeError,
                           match='needs CAP_SYS_ADMIN'):
            window.run_window(the_lab.paths(), source, settings,
                              capture_netns=the_lab.spec.hv_netns,
                              capture_class=privileged.capture_class(prod))
        lab_ctx = privileged.netns_pctxt
        source = privileged.PrivsepLocalSource(the_lab.spec.src_netns,
                                               context=lab_ctx)
        result = window.run_window(
            the_lab.paths(), source, settings,
            capture_netns=the_lab.spec.hv_netns,
            capture_class=privileged.capture_class(lab_ctx))
        (report,) = result.reports.values()
        assert report.ingress.count == 5, report
    finally:
        privileged.stop()


VNI = 4242


def _pif_encaps(batch, pif):
    names = batch.ifnames
    return [batch.encap.get((k, i)) for k, i in zip(batch.keys,
                                                    batch.ifindex)
            if names[i] == pif]


def test_vxlan_vni_comes_back_from_the_daemon(lab_factory):
    """Probes cross the pif inside VXLAN: the daemon's capture (opened
    with the VXLAN port) keys them by the inner frame and the VNI reaches
    the agent's reports."""
    the_lab = lab_factory(guests=2, vxlan_vni=VNI)
    ctx = privileged.netns_pctxt
    settings = window.WindowSettings(
        count=10, timeout_ms=100.0, max_window_ms=2000.0,
        vxlan_port=labswitch.VXLAN_PORT)
    source = privileged.PrivsepLocalSource(the_lab.spec.src_netns, context=ctx)
    result = privsep.daemon_window(the_lab, source, settings, ctx)
    on_pif = _pif_encaps(result.batch, the_lab.spec.pif)
    # Probes and replies of both guests, every one with its VNI.
    assert len(on_pif) == 2 * 2 * 10, on_pif
    assert set(on_pif) == {probe.Encap(vni=VNI)}
    for g in the_lab.guests:
        rep = result.reports[g.vif]
        assert rep.vni == VNI and rep.vlan == (), rep
        assert rep.ingress.count == 10 and rep.egress.count == 10, rep


def test_vlan_ids_come_back_from_the_daemon(lab_factory):
    """QinQ-tagged probe frames on the pif: the daemon's capture reads the
    outer tag from PACKET_AUXDATA, the inner from the frame; both ids
    reach the agent."""
    the_lab = lab_factory(guests=1)
    ctx = privileged.netns_pctxt
    settings = window.WindowSettings(count=10, timeout_ms=100.0,
                                     max_window_ms=2000.0)
    source = the_lab.vlan_source((200, 100))
    result = privsep.daemon_window(the_lab, source, settings, ctx)
    on_pif = _pif_encaps(result.batch, the_lab.spec.pif)
    assert len(on_pif) == 10, on_pif
    assert set(on_pif) == {probe.Encap(vlan=(200, 100))}
    (rep,) = result.reports.values()
    assert rep.vlan == (200, 100) and rep.vni is None, rep
    assert rep.ingress.count == 10, rep
