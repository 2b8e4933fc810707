"""The SSH lab of the functional tests: real OpenSSH servers in a lab.

:class:`SSHLab` builds one :class:`lab.Lab` (unique prefix) with a
management network (``<p>mgmt``, from which the client connects) and a
2 ms delay on the probes to guest 0.  Real ``/usr/sbin/sshd`` processes
run in the source and hypervisor namespaces with host keys, a client key
and a known_hosts file generated here; :func:`built` yields one for a
module-scoped fixture and destroys it (sshd killed, lab removed), also on
failure.  The hypervisor's instances are a libvirt ``test:///`` node
(:mod:`labvirt`) written next to the keys.  Used by test_ssh,
test_ssh_limits and test_tcp_ports.
"""

import argparse
import ipaddress
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from netweaver_agent.cli import measure as cmd_measure
from netweaver_agent.core import netns
from netweaver_agent.lab import agent
from netweaver_agent.lab import build as lab_mod
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import switch as labswitch
from netweaver_agent.lab import virt
from netweaver_agent.ssh import session
from tests.functional import conftest

SSHD = '/usr/sbin/sshd'
PORT = 2222
DELAY_MS = 2.0


def run(argv, **kw):
    """A command (argument list) as :func:`netns.run` runs it."""
    return netns.run(argv, **kw)


def virsh():
    """The real ``virsh``'s path; the test fails without it."""
    path = shutil.which('virsh')
    if not path:
        pytest.fail('test_ssh needs the real virsh (libvirt-clients): '
                    'run tools/bootstrap.sh')
    return path


def fail_unless_possible():
    """Fail (never skip) unless root with sshd, ssh-keygen, tcpdump,
    iptables and virsh."""
    if os.geteuid() != 0:
        pytest.fail('test_ssh needs root (namespaces, raw sockets, sshd)')
    for tool in (SSHD, '/usr/bin/ssh-keygen', shutil.which('tcpdump'),
                 shutil.which('iptables')):
        if not tool or not os.path.exists(tool):
            pytest.fail(f'test_ssh needs {tool or "tcpdump/iptables"}: '
                        'run tools/bootstrap.sh')
    virsh()


class SSHLab:
    """A :class:`lab.Lab` with a management network, keys and sshd's."""

    def __init__(self, workdir):
        self.prefix = f'nwh4{os.getpid()}{secrets.token_hex(2)}-'
        self.workdir = workdir
        self.lab = lab_mod.Lab(labspec.LabSpec(
            prefix=self.prefix, guests=2, mgmt=True,
            delays=(labspec.DelayInjection(guest=0, delay_ms=DELAY_MS,
                                           protocol='icmp'),)))
        self.procs = []
        self.key = os.path.join(workdir, 'client_key')
        self.known_hosts = os.path.join(workdir, 'known_hosts')
        self.host_key = os.path.join(workdir, 'host_key')
        # A file an injected shell command would create in the remote
        # user's working directory (libvirt names cannot hold a '/').
        self.marker = f'nwpwned{os.getpid()}{secrets.token_hex(3)}'
        # A libvirt domain of that name is on the node: resolving it
        # proves the name reached virsh as one intact argument.
        self.hostile = (f'x;  touch {self.marker}; '
                        f'echo $(touch {self.marker}) `touch {self.marker}` ')

    # -- building ---------------------------------------------------------
    def build(self):
        try:
            self.lab.build()
        except labswitch.LabError as exc:
            pytest.fail(f'the namespace lab could not be built: {exc}')
        self.src, self.hv = self.lab.spec.src_netns, self.lab.spec.hv_netns
        self.mgmt, self.pif = self.lab.spec.mgmt_netns, self.lab.spec.pif
        self.guests = self.lab.guests
        addrs = self.lab.spec.mgmt_addresses()
        self.src_mgmt, self.hv_mgmt = addrs.src, addrs.hv
        # Unused addresses on the management network.  Each test that
        # connects to one has its own: a neighbour entry still resolving
        # for an earlier test fails later connects with "No route to host"
        # (EHOSTUNREACH) instead of their own timeout.
        self.nobody = str(ipaddress.ip_address(addrs.mgmt) + 98)
        self.nobody_too = str(ipaddress.ip_address(addrs.mgmt) + 97)
        self._keys()
        self._libvirt_node()
        os.makedirs('/run/sshd', mode=0o755, exist_ok=True)  # privsep dir
        self.start_sshd(self.src, self.src_mgmt, PORT)
        self.start_sshd(self.hv, self.hv_mgmt, PORT)

    def _keys(self):
        for path in (self.key, self.host_key):
            run(['ssh-keygen', '-q', '-t', 'ed25519', '-N', '', '-C',
                 'netweaver-test', '-f', path])
        shutil.copy(self.key + '.pub', os.path.join(self.workdir,
                                                    'authorized_keys'))
        with open(self.host_key + '.pub') as f:
            kind, blob = f.read().split()[:2]
        with open(self.known_hosts, 'w') as f:
            for addr in (self.src_mgmt, self.hv_mgmt):
                f.write(f'[{addr}]:{PORT} {kind} {blob}\n')

    def _libvirt_node(self):
        # The lab's guests as the agent tests describe them (nova domain
        # names instance-0000000N, the lab's taps on its bridge), and
        # guest 1's tap once more under the hostile name.  No filterref
        # there: libvirt formats the filter name unquoted.
        hostile = virt.GuestDomain.from_guest(
            self.guests[1], domain=self.hostile, uuid=str(uuid.uuid4()),
            bridge=self.lab.layout.bridge, filterref=False)
        self.libvirt_uri = virt.write_node(
            os.path.join(self.workdir, 'node.xml'),
            [*agent.guest_domains(self.lab), hostile])

    def start_sshd(self, ns, addr, port):
        conf = os.path.join(self.workdir, f'sshd_{ns}_{port}.conf')
        lines = [f'Port {port}', f'ListenAddress {addr}',
                 f'HostKey {self.host_key}',
                 f'AuthorizedKeysFile {self.workdir}/authorized_keys',
                 f'PidFile {self.workdir}/sshd_{ns}_{port}.pid',
                 'UsePAM no', 'StrictModes no',
                 'PermitRootLogin prohibit-password',
                 'PasswordAuthentication no',
                 'KbdInteractiveAuthentication no',
                 'Subsystem sftp internal-sftp', 'MaxSessions 32']
        start_sshd(ns, conf, lines,
                   os.path.join(self.workdir, f'sshd_{ns}_{port}.log'),
                   self.procs, f'{ns} on {addr}:{port}')

    # -- tearing down -----------------------------------------------------
    def destroy(self):
        conftest.stop_processes(reversed(self.procs))
        self.lab.teardown()

    # -- using ------------------------------------------------------------
    def options(self, **kw):
        args = dict(key_file=self.key, known_hosts_file=self.known_hosts,
                    connect_timeout_s=5.0, command_timeout_s=30.0)
        args.update(kw)
        return session.SSHOptions(**args)

    def host(self, addr=None, port=PORT, **kw):
        return session.RemoteHost(addr or self.hv_mgmt, port, 'root',
                                  self.options(**kw),
                                  netns_name=self.mgmt)

    def measure_argv(self, *extra):
        return ['measure', '--hv', self.hv_mgmt, '-s', self.src_mgmt,
                '--hypervisor-port', str(PORT),
                '--source-port', str(PORT), '-i', self.pif, '-k', self.key,
                '--known-hosts', self.known_hosts, '--ssh-netns', self.mgmt,
                '--connect-timeout', '5', *extra]


def start_sshd(ns, conf, lines, log_path, procs, where):
    """The real sshd in namespace ``ns`` with the configuration ``lines``
    (written to ``conf``), its log in ``log_path`` (never a pipe left
    unread), appended to ``procs`` (for :func:`conftest.stop_processes`);
    returns once it listens, else the test fails naming ``where``."""
    with open(conf, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')
    with open(log_path, 'wb') as log_file:
        proc = subprocess.Popen(
            ['ip', 'netns', 'exec', ns, SSHD, '-D', '-e', '-f', conf],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=log_file)
    procs.append(proc)
    deadline = time.monotonic() + 10
    while True:
        with open(log_path, 'rb') as f:
            text = f.read().decode(errors='replace')
        if 'Server listening' in text:
            return proc
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail(f'sshd in {where} did not start: {text}')
        time.sleep(0.05)


def built(tmp_path_factory, lab_class=SSHLab, name='ssh'):
    """For a module-scoped fixture: a ``lab_class`` built in a fresh
    directory ``name``, yielded, then destroyed."""
    fail_unless_possible()
    workdir = str(tmp_path_factory.mktemp(name))
    os.chmod(workdir, 0o755)
    ssh_lab = lab_class(workdir)
    try:
        ssh_lab.build()
        yield ssh_lab
    finally:
        ssh_lab.destroy()


def netweaver(argv):
    """The ``netweaver`` command in a process of its own; must succeed."""
    proc = subprocess.run([sys.executable, '-m', 'netweaver_agent.cli.main',
                           *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (argv, proc.stderr)
    return proc


def cli(argv, capsys):
    """``netweaver measure ...`` in this process, through its parser."""
    parser = argparse.ArgumentParser(prog='netweaver')
    cmd_measure.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    status = args.run(args)
    out, err = capsys.readouterr()
    return status, out, err
