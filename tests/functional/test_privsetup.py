"""The privilege set-up of docs/deploying.md, installed and run for real.

Real ``sudo`` (the machine's, with its own ``/etc/sudoers``), real
``ceilometer-rootwrap`` and ``privsep-helper`` (the virtualenv's, from
Ceilometer and oslo.privsep as installed), the real ``ceilometer-polling``
as the unprivileged user the shipped sudoers file names (``ceilometer``,
created for the test if the machine has none).  What is installed is
read from the documents, never restated here:

* the sudo path: ``etc/sudoers.d/netweaver-agent`` as
  ``/etc/sudoers.d/netweaver-agent`` with only its one placeholder, the
  ``privsep-helper`` path, replaced by the virtualenv's; the agent's
  ``privsep_helper_command`` as docs/deploying.md sets it (same
  replacement); the agent's configuration at the ``--config-file`` that
  command carries (``/etc/ceilometer/ceilometer.conf``);
* the rootwrap path: Ceilometer's shipped ``rootwrap.conf`` and
  ``rootwrap.d/`` in a temporary root-owned directory (``filters_path``
  pointing there, the virtualenv's ``bin/`` added to ``exec_dirs``),
  Ceilometer's sudoers line for ``ceilometer-rootwrap``, and nothing of
  ours: no filter file.

Through each the agent starts its daemon and latency is published; the
daemon holds exactly CAP_NET_RAW.  Through the sudo line, sudo itself
refuses every widened command line (and nothing those name is created or
run), and the other groupings of the admitted words, which sudo's
space-joined match lets through, are refused by ``privsep-helper``
before it connects anywhere.  A ``netns:`` source needs the lab's
context, which sudo refuses: the pollsters disable themselves.  Through
rootwrap, any ``privsep-helper`` command line runs, as the docs say.

Every file installed under /etc is removed at the end (a file that was
there before is put back), also on failure; runs of this module on one
machine take turns (a lock file).
"""

import contextlib
import dataclasses
import fcntl
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from netweaver_agent.agent import privileged
from netweaver_agent.lab import agent as labagent
from tests import privsetup
from tests.functional import privsep

BIN = os.path.dirname(os.path.abspath(sys.executable))
VENV_HELPER = os.path.join(BIN, 'privsep-helper')
CEILOMETER_ETC = os.path.join(sys.prefix, 'etc', 'ceilometer')
LOCK = '/run/netweaver-privsetup.lock'
SUDO_WAIT_S = 60
AGENT_WAIT_S = 60.0
PROBE = {'probe_count': 10, 'probe_timeout_ms': 100.0,
         'max_window_ms': 2000.0}


# --- installing files under /etc, and putting things back ----------------

@pytest.fixture
def system_lock():
    """One run of these tests at a time on this machine."""
    with open(LOCK, 'w', encoding='ascii') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def installed(path, content, mode, gid=0):
    """``content`` at ``path`` (root-owned), replaced atomically; on exit
    removed, and whatever was there before put back."""
    made = []
    parent = os.path.dirname(path)
    while not os.path.isdir(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    for d in reversed(made):
        os.mkdir(d, 0o755)
    # A dot in the name: sudo's @includedir skips both of these.
    backup = f'{path}.nwbackup{os.getpid()}'
    tmp = f'{path}.nwnew{os.getpid()}'
    had = os.path.lexists(path)
    try:
        with open(tmp, 'w', encoding='utf-8') as f:
            f.write(content)
        os.chown(tmp, 0, gid)
        os.chmod(tmp, mode)
        if had:
            os.link(path, backup)
        os.rename(tmp, path)
        yield path
    finally:
        for p in (tmp, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        if had:
            os.rename(backup, path)
        for d in made:
            with contextlib.suppress(OSError):
                os.rmdir(d)


def visudo_check(path=None):
    argv = ['visudo', '-c'] + (['-f', path] if path else [])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@contextlib.contextmanager
def installed_sudoers(name, content):
    """A sudoers.d file, checked alone before and with the rest after."""
    with tempfile.NamedTemporaryFile('w', suffix='.sudoers') as f:
        f.write(content)
        f.flush()
        visudo_check(f.name)
    with installed(os.path.join('/etc/sudoers.d', name), content,
                   0o440) as path:
        visudo_check()
        yield path


@pytest.fixture
def agent_user(system_lock):
    """The user the shipped sudoers file allows (created if missing)."""
    name = privsetup.agent_user(privsetup.read(privsetup.SUDOERS))
    created = False
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(['useradd', '--system', '--user-group',
                        '--no-create-home', '--home-dir', '/nonexistent',
                        '--shell', '/usr/sbin/nologin', name],
                       check=True, capture_output=True, timeout=30)
        created = True
    entry = pwd.getpwnam(name)
    try:
        yield entry
    finally:
        if created:
            _kill_user_processes(entry.pw_uid)
            subprocess.run(['userdel', name], check=False,
                           capture_output=True, timeout=30)


def _cmdlines():
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                argv = f.read().split(b'\0')[:-1]
            st = os.stat(f'/proc/{pid}')
        except OSError:
            continue
        yield int(pid), st.st_uid, [a.decode(errors='replace')
                                    for a in argv]


def _kill(pids):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _kill_user_processes(uid):
    _kill([pid for pid, owner, _argv in _cmdlines() if owner == uid])


def _kill_naming(marker):
    """End every process whose command line names ``marker``."""
    _kill([pid for pid, _uid, argv in _cmdlines()
           if any(marker in a for a in argv)])


# --- running as the agent's user ----------------------------------------

def as_user(user, argv):
    """``argv`` as ``user``, no capability, no supplementary group."""
    return ['setpriv', f'--reuid={user.pw_uid}', f'--regid={user.pw_gid}',
            '--clear-groups', '--inh-caps=-all', '--', *argv]


def run_as(user, argv):
    """Run ``argv`` as ``user``; its stderr in a file, not a pipe (a
    daemon the helper forks keeps it open)."""
    with tempfile.TemporaryFile('w+', encoding='utf-8',
                                errors='replace') as err:
        proc = subprocess.run(as_user(user, argv), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=err,
                              timeout=SUDO_WAIT_S, cwd='/')
        err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode,
                                           None, err.read())


class Listener:
    """The agent's end of a privsep socket: did a daemon connect?"""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def connected(self):
        """Peer uids of the connections made so far (each then closed)."""
        uids = []
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return uids
            with conn:
                cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       12)
                uids.append(int.from_bytes(cred[4:8], sys.byteorder))

    def close(self):
        self.sock.close()
        _kill_naming(self.path)


@pytest.fixture
def scratch():
    """A root-owned directory others may read but not write, and
    listeners in it; every daemon naming them is ended."""
    made = []
    listeners = []

    def make_dir(prefix='nwprivsetup'):
        d = tempfile.mkdtemp(prefix=prefix, dir='/tmp')
        os.chmod(d, 0o755)
        made.append(d)
        return d

    def listen(path):
        listener = Listener(path)
        listeners.append(listener)
        return listener

    yield make_dir, listen
    for listener in listeners:
        listener.close()
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def oslo_privsep_argv(context, helper_command, sock_path):
    """The command line oslo.privsep runs for ``context``."""
    privileged.configure(helper_command)
    try:
        return context.helper_command(sock_path)
    finally:
        privileged.configure(None)


def sudo_refused(proc):
    return proc.returncode == 1 and proc.stderr.startswith('sudo: ')


# --- the documented sudo set-up -------------------------------------------

def documented_sudo_setup():
    """(sudoers text, helper command), the placeholder replaced."""
    command = privsetup.documented_helper_command()
    placeholder = privsetup.helper_path(command)
    text = privsetup.read(privsetup.SUDOERS)
    assert placeholder != VENV_HELPER
    return (text.replace(placeholder, VENV_HELPER),
            command.replace(placeholder, VENV_HELPER))


@pytest.fixture
def sudo_setup(agent_user):
    """The shipped sudoers file installed; yields the helper command."""
    text, command = documented_sudo_setup()
    name = os.path.basename(privsetup.SUDOERS)
    with installed_sudoers(name, text):
        yield command


def test_sudo_line_admits_exactly_the_agents_command_line(
        agent_user, sudo_setup, scratch):
    """Run as the agent's user: sudo refuses each widened command line
    (markers prove nothing ran as root, listeners that nothing connected),
    the helper refuses each regrouping sudo lets through, and the command
    line oslo.privsep builds starts a root daemon that connects."""
    make_dir, listen = scratch
    command = sudo_setup
    conf = privsetup.config_file(command)
    # The socket's directory as oslo.privsep makes it (mkdtemp, 0700).
    real = tempfile.mkdtemp(dir='/tmp')
    made_dirs = [real]
    try:
        good_sock = listen(os.path.join(real, 'privsep.sock'))
        evil = make_dir()
        evil_sock = listen(os.path.join(evil, 'privsep.sock'))
        markers = {k: os.path.join(evil, k) for k in (
            'log-config-append', 'log-file', 'config-log', 'pythonpath')}
        with open(os.path.join(evil, 'evil.ini'), 'w',
                  encoding='ascii') as f:
            f.write('[loggers]\nkeys=root\n[handlers]\nkeys=h\n'
                    '[formatters]\nkeys=\n[logger_root]\nhandlers=h\n'
                    '[handler_h]\nclass=FileHandler\n'
                    f"args=('{markers['log-config-append']}',)\n")
        with open(os.path.join(evil, 'evil.conf'), 'w',
                  encoding='ascii') as f:
            f.write(f"[DEFAULT]\nlog_file = {markers['config-log']}\n"
                    '[netweaver_privsep]\ncapabilities = 12,13,21\n')
        with open(os.path.join(evil, 'sitecustomize.py'), 'w',
                  encoding='ascii') as f:
            f.write(f"open({markers['pythonpath']!r}, 'w').close()\n")

        with installed(conf, '[DEFAULT]\n', 0o640, gid=agent_user.pw_gid):
            good = oslo_privsep_argv(privileged.capture_pctxt, command,
                                     good_sock.path)
            lab = oslo_privsep_argv(privileged.netns_pctxt, command,
                                    good_sock.path)
            at = good.index(VENV_HELPER)
            widened = {
                'extra --log-config-append': good + [
                    '--log-config-append', os.path.join(evil, 'evil.ini')],
                'extra --log-file': good + [
                    '--log-file', markers['log-file']],
                'the lab context (CAP_SYS_ADMIN)': lab,
                'another socket path': good[:-1] + [evil_sock.path],
                'another config file': [
                    os.path.join(evil, 'evil.conf') if a == conf else a
                    for a in good],
                'a second config file': good + [
                    '--config-file', os.path.join(evil, 'evil.conf')],
                'PYTHONPATH': good[:at] + [f'PYTHONPATH={evil}'] +
                good[at:],
                'another program': good[:at] + [sys.executable] + good[at:],
            }
            refusals = {what: run_as(agent_user, argv)
                        for what, argv in widened.items()}
            regrouped = _regroupings(good[at + 1:])
            ran = [run_as(agent_user, good[:at + 1] + args)
                   for args in regrouped]
            connected_before = good_sock.connected() + evil_sock.connected()
            admitted = run_as(agent_user, good)
            uids_after_admitted = good_sock.connected()

        not_refused = {what: (p.returncode, p.stderr[-300:])
                       for what, p in refusals.items()
                       if not sudo_refused(p)}
        assert not not_refused, not_refused
        assert connected_before == []
        assert [m for m in markers.values() if os.path.exists(m)] == []
        # sudo admits the same words grouped otherwise; the helper ran
        # (no sudo refusal) and refused them before connecting.
        assert len(ran) == 2 ** (len(good) - at - 2) - 1
        for args, proc in zip(regrouped, ran):
            assert not sudo_refused(proc), (args, proc.stderr[-300:])
            assert proc.returncode != 0, args
        # The command line oslo.privsep builds: admitted, root connected.
        assert admitted.returncode == 0, admitted.stderr[-500:]
        assert uids_after_admitted == [0]
    finally:
        for d in made_dirs:
            _kill_naming(d)
            shutil.rmtree(d, ignore_errors=True)


def _regroupings(args):
    """Every other split of ``args``' space-joined words into arguments."""
    out = []
    n = len(args)
    for cuts in itertools.product((True, False), repeat=n - 1):
        if all(cuts):
            continue
        grouped, word = [], [args[0]]
        for cut, arg in zip(cuts, args[1:]):
            if cut:
                grouped.append(' '.join(word))
                word = [arg]
            else:
                word.append(arg)
        grouped.append(' '.join(word))
        out.append(grouped)
    return out


# --- the real agent through each -----------------------------------------

@dataclasses.dataclass(frozen=True)
class AgentRun:
    """What one agent run published and which daemon it started."""

    latency: dict         # resource id -> µs
    daemon_argv: list     # privsep-helper and its arguments
    daemon_status: dict
    agent_status: list


@contextlib.contextmanager
def running_agent(the_lab, user, conf_path, probe, extra=None):
    """The real ceilometer-polling as ``user`` (no capability) in the
    lab's hypervisor, its configuration installed at ``conf_path``; on
    exit the agent, its daemons and its files are gone."""
    workdir = tempfile.mkdtemp(prefix='nwprivsetup')
    agent = None
    try:
        os.chmod(workdir, 0o755)
        agent_dir = os.path.join(workdir, 'agent')
        files = labagent.write_files(the_lab, agent_dir, interval_s=3,
                                     probe={**PROBE, **probe}, extra=extra)
        for root, dirs, names in os.walk(agent_dir):
            for name in [*dirs, *names, '.']:
                os.chown(os.path.join(root, name), user.pw_uid,
                         user.pw_gid)
        with installed(conf_path, privsetup.read(files.config), 0o640,
                       gid=user.pw_gid):
            files = dataclasses.replace(files, config=conf_path)
            agent = labagent.PollingAgent(
                files, the_lab.spec.hv_netns, wrapper=as_user(user, []))
            agent.start()
            yield agent
    finally:
        if agent is not None:
            agent.stop()
        for pid in privsep.processes(the_lab.spec.hv_netns,
                                     '--privsep_context'):
            _kill([pid])
        shutil.rmtree(workdir, ignore_errors=True)


def _log_lines(agent):
    return [line for line in agent.log_text().splitlines()
            if 'privsep' in line or 'netweaver_agent' in line
            or 'sudo' in line or 'rootwrap' in line]


def run_agent(the_lab, user, conf_path, probe, extra=None):
    """:class:`AgentRun` of the agent probing ``local`` through the pif."""
    privsep.route_local_through_the_pif(the_lab)
    # 'local' sends only to probe_networks.
    probe = {**probe, 'probe_source': 'local',
             'probe_networks': the_lab.spec.network}
    with running_agent(the_lab, user, conf_path, probe, extra) as agent:
        ids = labagent.resource_ids(the_lab)
        try:
            series = agent.wait_for(
                labagent.latency_ready(set(ids.values())), AGENT_WAIT_S)
        except labagent.AgentError as exc:
            pytest.fail(f'{exc}: ' + '\n'.join(_log_lines(agent)[-20:]))
        daemons = privsep.processes(the_lab.spec.hv_netns,
                                    '--privsep_context')
        agents = privsep.processes(the_lab.spec.hv_netns,
                                   'ceilometer-polling')
        assert len(daemons) == 1, daemons
        with open(f'/proc/{daemons[0]}/cmdline', 'rb') as f:
            argv = [a.decode() for a in f.read().split(b'\0')[:-1]]
        log = agent.log_text()
        assert 'Traceback' not in log, log[-3000:]
        return AgentRun(
            latency={s.label('resource'): s.value for s in series
                     if s.name == 'ceilometer_network_vif_latency'},
            daemon_argv=argv[argv.index(VENV_HELPER):],
            daemon_status=privsep.status(daemons[0]),
            agent_status=[privsep.status(p) for p in agents])


def check_run(run, the_lab, user):
    ids = labagent.resource_ids(the_lab)
    assert set(run.latency) == set(ids.values()), run.latency
    assert all(0 < v < 5000 for v in run.latency.values()), run.latency
    assert run.agent_status
    for st in run.agent_status:
        assert st['Uid'][0] == str(user.pw_uid), st['Uid']
        assert int(st['CapEff'][0], 16) == 0, st['CapEff']
        assert int(st['CapPrm'][0], 16) == 0, st['CapPrm']
    only_net_raw = 1 << privileged.caps.CAP_NET_RAW
    st = run.daemon_status
    assert st['Uid'][0] == '0', st['Uid']
    assert int(st['CapEff'][0], 16) == only_net_raw, st['CapEff']
    assert int(st['CapPrm'][0], 16) == only_net_raw, st['CapPrm']


def test_agent_starts_its_daemon_through_the_sudo_line(
        lab_factory, agent_user, sudo_setup):
    command = sudo_setup
    the_lab = lab_factory(guests=2, mgmt=True)
    run = run_agent(the_lab, agent_user, privsetup.config_file(command),
                    {'privsep_helper_command': command})
    check_run(run, the_lab, agent_user)
    # Started with exactly the command line sudo admits.
    expected = oslo_privsep_argv(privileged.capture_pctxt, command,
                                 run.daemon_argv[-1])
    assert run.daemon_argv == expected[expected.index(VENV_HELPER):]


def test_netns_sources_need_what_the_sudo_line_refuses(
        lab_factory, agent_user, sudo_setup):
    """A ``netns:`` source needs the lab's context (CAP_SYS_ADMIN): sudo
    refuses to start it, and the pollsters say so and disable themselves."""
    command = sudo_setup
    the_lab = lab_factory(guests=1)
    lab_ctx = privileged.netns_pctxt.pypath
    with running_agent(the_lab, agent_user, privsetup.config_file(command),
                       {'probe_source': f'netns:{the_lab.spec.src_netns}',
                        'privsep_helper_command': command}) as agent:
        deadline = time.monotonic() + AGENT_WAIT_S
        while not any('pollsters disabled' in line and lab_ctx in line
                      for line in _log_lines(agent)):
            assert agent.alive() and time.monotonic() < deadline, \
                _log_lines(agent)[-20:]
            time.sleep(0.5)
        assert privsep.processes(the_lab.spec.hv_netns,
                                 '--privsep_context') == []
        assert agent.series('ceilometer_network_vif_latency') == []
        # sudo itself refused it (oslo.privsep logs the helper's stderr).
        assert any('privsep log: sudo: ' in line
                   for line in _log_lines(agent)), _log_lines(agent)[-20:]


@pytest.fixture
def rootwrap_setup(agent_user, scratch):
    """Ceilometer's rootwrap as shipped, in a temporary directory, and
    Ceilometer's sudoers line for it; yields the rootwrap.conf path."""
    make_dir, _listen = scratch
    shipped = os.path.join(CEILOMETER_ETC, 'rootwrap.conf')
    if not os.path.exists(shipped):
        pytest.fail(f'Ceilometer\'s rootwrap.conf is not at {shipped}: '
                    'pip install ceilometer')
    where = make_dir('nwrootwrap')
    shutil.copytree(os.path.join(CEILOMETER_ETC, 'rootwrap.d'),
                    os.path.join(where, 'rootwrap.d'))
    conf = os.path.join(where, 'rootwrap.conf')
    text = privsetup.read(shipped)
    text, n_filters = re.subn(r'(?m)^filters_path=.*$',
                              f'filters_path={where}/rootwrap.d', text)
    text, n_exec = re.subn(r'(?m)^(exec_dirs=.*)$', rf'\1,{BIN}', text)
    assert n_filters == 1 and n_exec == 1, text
    with open(conf, 'w', encoding='utf-8') as f:
        f.write(text)
    rootwrap = os.path.join(BIN, 'ceilometer-rootwrap')
    name = agent_user.pw_name
    # Ceilometer's sudoers line (Debian's ceilometer-common ships it
    # with /usr/bin); sudo finds the virtualenv's ceilometer-rootwrap.
    sudoers = (f'Defaults:{name} secure_path="{BIN}:/usr/sbin:/usr/bin:'
               '/sbin:/bin"\n'
               f'{name} ALL = (root) NOPASSWD: {rootwrap} {conf} *\n')
    with installed_sudoers('ceilometer_sudoers', sudoers):
        yield conf


def test_agent_starts_its_daemon_through_ceilometer_rootwrap(
        lab_factory, agent_user, rootwrap_setup):
    the_lab = lab_factory(guests=2, mgmt=True)
    conf_path = privsetup.config_file(privsetup.documented_helper_command())
    run = run_agent(the_lab, agent_user, conf_path, {},
                    extra={'DEFAULT': {'rootwrap_config': rootwrap_setup}})
    check_run(run, the_lab, agent_user)
    # ceilometer-polling keeps its configuration in a ConfigOpts of its
    # own; oslo.privsep reads the global one and appends no --config-file.
    assert run.daemon_argv == [
        VENV_HELPER, '--privsep_context', privileged.capture_pctxt.pypath,
        '--privsep_sock_path', run.daemon_argv[-1]]


def test_rootwrap_admits_any_privsep_helper_command_line(
        agent_user, rootwrap_setup, scratch):
    """As the docs say: another context, any socket, any option."""
    make_dir, listen = scratch
    evil = make_dir()
    sock = listen(os.path.join(evil, 'privsep.sock'))
    log_file = os.path.join(evil, 'root.log')
    proc = run_as(agent_user, [
        'sudo', '-n', 'ceilometer-rootwrap', rootwrap_setup,
        'privsep-helper', '--privsep_context',
        privileged.netns_pctxt.pypath, '--privsep_sock_path', sock.path,
        '--log-file', log_file])
    assert proc.returncode == 0, proc.stderr[-500:]
    assert sock.connected() == [0]
    assert os.stat(log_file).st_uid == 0
