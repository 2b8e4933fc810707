"""The telemetry pipeline of the lab: RabbitMQ, Gnocchi, Aodh, Prometheus.

``netweaver lab --pipeline`` and ``tests/functional/test_pipeline.py``
use this module (what the services then hold is read by
:mod:`netweaver_agent.lab.downstream`).  In the lab's management
namespace (``<prefix>mgmt``, 198.19.0.0/24) it starts, each as a process
of its own that it stops by pid:

* epmd and RabbitMQ (Debian ``rabbitmq-server``, a private node: its own
  HOME, mnesia and log directories, listeners on the namespace's loopback
  and its management address only);
* PostgreSQL (a private cluster in the work directory, unix socket only,
  run as the ``postgres`` user);
* Gnocchi (``.venv-gnocchi``: ``gnocchi-upgrade``, uwsgi serving the API
  with basic auth, ``gnocchi-metricd``), then ``ceilometer-upgrade`` and
  Ceilometer's notification agent with the Gnocchi publisher and this
  project's resource definitions
  (``etc/netweaver-agent/gnocchi_resources.yaml``, its ``netweaver-latency``
  archive policy shortened to the lab's granularities);
* Prometheus (Debian) scraping the polling agent's exporter, with the
  project's alert rules (``etc/prometheus/netweaver-alerts.yml``, their
  ``for`` shortened to seconds);
* Aodh (``.venv-aodh``: ``aodh-dbsync``, its API without auth, the
  evaluator), alarms made from ``etc/aodh/*.json``.

The polling agent itself runs in the hypervisor namespace (see
:mod:`netweaver_agent.lab.agent`); :meth:`Pipeline.agent_extra` gives the
options that send its samples to this RabbitMQ and open its exporter to
this Prometheus.  Nothing here talks to Keystone: Gnocchi uses basic
auth (gnocchiclient's ``gnocchi-basic`` plugin for Ceilometer and Aodh),
Aodh ``noauth``.  Every process is stopped and the work directory
removed on exit, also on error or Ctrl-C.
"""

import base64
import configparser
import copy
import dataclasses
import http.client
import json
import os
import pwd
import shutil
import socket
# bandit B404: argument lists only, never a shell
import subprocess  # nosec B404
import sys
import tempfile
import time
import urllib.parse

from oslo_log import log
import yaml

from netweaver_agent.core import netns
from netweaver_agent.lab import proc

LOG = log.getLogger(__name__)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
RESOURCES_FILE = os.path.join(REPO, 'etc', 'netweaver-agent',
                              'gnocchi_resources.yaml')
RULES_FILE = os.path.join(REPO, 'etc', 'prometheus', 'netweaver-alerts.yml')
ALARMS_DIR = os.path.join(REPO, 'etc', 'aodh')
LATENCY_POLICY = 'netweaver-latency'

RABBIT_PORT = 5672
GNOCCHI_PORT = 8041
AODH_PORT = 8042
PROMETHEUS_PORT = 9090
EXPORTER_PORT = 9101
GNOCCHI_USER = 'admin'
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 10.0


class PipelineError(RuntimeError):
    """A pipeline service could not be installed, started or queried."""


@dataclasses.dataclass(frozen=True, slots=True)
class PipelineSettings:
    """What to start and how fast it turns.

    :param fine_granularity_s: the lab archive policy's finest granularity
        (one sample per bucket when it is below the polling interval)
    :param granularity_s: its second granularity, the one alarms use
    :param evaluation_interval_s: Aodh's ``evaluation_interval``
    :param alert_for_s: the ``for`` of every alert rule in the lab
    """

    gnocchi: bool = True
    aodh: bool = True
    prometheus: bool = True
    fine_granularity_s: int = 1
    granularity_s: int = 5
    evaluation_interval_s: int = 5
    alert_for_s: int = 3
    scrape_interval_s: int = 1

    def __post_init__(self):
        if self.aodh and not self.gnocchi:
            raise ValueError('Aodh alarms read Gnocchi: aodh needs gnocchi')
        for name in ('fine_granularity_s', 'granularity_s',
                     'evaluation_interval_s', 'alert_for_s',
                     'scrape_interval_s'):
            value = getattr(self, name)
            if not 1 <= value <= 3600:
                raise ValueError(f"{name} {value!r} must be within 1..3600")
        if self.granularity_s % self.fine_granularity_s:
            raise ValueError(
                f"granularity_s {self.granularity_s} must be a multiple of "
                f"fine_granularity_s {self.fine_granularity_s}")


@dataclasses.dataclass(frozen=True, slots=True)
class Measure:
    """One Gnocchi measure: bucket start (epoch s), granularity, value."""

    timestamp: float
    granularity: float
    value: float


def venv_bin(name, tool):
    """Path of ``tool`` in the git-ignored venv ``.venv-<name>``."""
    path = os.path.join(REPO, f'.venv-{name}', 'bin', tool)
    if not os.access(path, os.X_OK):
        raise PipelineError(
            f"{path} is missing: run tools/pipeline-bootstrap.sh (it builds "
            f".venv-{name})")
    return path


def _ceilometer_bin(tool):
    here = os.path.join(os.path.dirname(sys.executable), tool)
    if os.access(here, os.X_OK):
        return here
    found = shutil.which(tool)
    if not found:
        raise PipelineError(f"{tool} is not installed (Ceilometer)")
    return found


def _system_bin(path):
    if not os.access(path, os.X_OK):
        raise PipelineError(f"{path} is missing: run "
                            "tools/pipeline-bootstrap.sh")
    return path


def _pg_bin(tool):
    base = '/usr/lib/postgresql'
    versions = sorted((d for d in os.listdir(base) if d.isdigit()),
                      key=int, reverse=True) if os.path.isdir(base) else []
    for v in versions:
        path = os.path.join(base, v, 'bin', tool)
        if os.access(path, os.X_OK):
            return path
    raise PipelineError(f"PostgreSQL's {tool} is missing: run "
                        "tools/pipeline-bootstrap.sh")


def _write_ini(path, sections):
    conf = configparser.ConfigParser(interpolation=None)
    for section, values in sections.items():
        conf[section] = {k: str(v) for k, v in values.items()}
    with open(path, 'w', encoding='utf-8') as f:
        conf.write(f)
    return path


class Daemon:
    """One service process in a namespace, started and stopped by pid.

    It runs in a session (and process group) of its own; :meth:`stop`
    sends SIGTERM to that group, then SIGKILL after
    :data:`STOP_TIMEOUT_S`, so the workers it forks end with it.
    """

    def __init__(self, name, argv, netns_name, log_path, env=None,
                 user=None, cwd=None):
        self.name = name
        self.argv = list(argv)
        self.netns_name = netns_name
        self.log_path = log_path
        self.env = env
        self.user = user
        self.cwd = cwd
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self):
        argv = self.argv
        if self.user:
            argv = ['setpriv', f'--reuid={self.user}',
                    f'--regid={self.user}', '--init-groups', *argv]
        argv = netns.netns_argv(self.netns_name, argv)
        LOG.debug('Starting %s: %s', self.name, ' '.join(argv))
        self.proc = proc.start(argv, self.log_path, env=self.env,
                               cwd=self.cwd)
        return self

    def alive(self):
        return proc.alive(self.proc)

    def stop(self):
        if self.proc is None:
            return
        proc.stop(self.proc, self.name, STOP_TIMEOUT_S, PipelineError)
        self.proc = None

    def tail(self, lines=15):
        try:
            with open(self.log_path, encoding='utf-8',
                      errors='replace') as f:
                return f.read().splitlines()[-lines:]
        except OSError:
            return []


class _NetnsHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket is made inside a namespace."""

    def __init__(self, netns_name, host, port, timeout):
        super().__init__(host, port, timeout=timeout)
        self._netns_name = netns_name

    def connect(self):
        self.sock = netns.socket_in_netns(self._netns_name, socket.AF_INET,
                                          socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect((self.host, self.port))


class Pipeline:
    """The services of :mod:`labpipeline` for one built lab (with mgmt).

    Use as a context manager: :meth:`start` on entry, :meth:`stop` (every
    daemon by pid, then the work directory) on exit.

    :param progress: called with one line per step (e.g. ``print``)
    :param logs_to: a directory that receives a copy of every service's
        log (and configuration) when the pipeline stops

    Its files live in a directory of its own (``/tmp/<prefix>pipeline-*``,
    mode 0711 so that PostgreSQL, run as ``postgres``, reaches its part),
    removed by :meth:`stop`.
    """

    def __init__(self, lab, settings=None, progress=None, logs_to=None):
        if not lab.spec.mgmt:
            raise PipelineError('the pipeline runs in the lab\'s management '
                                'namespace: build the lab with mgmt=True')
        self.lab = lab
        self.workdir = None
        self.logs_to = logs_to
        self.settings = settings or PipelineSettings()
        self.progress = progress or (lambda line: None)
        self.daemons = []
        self.addresses = lab.spec.mgmt_addresses()
        self.ns = lab.spec.mgmt_netns
        self.timings = {}

    # -- life cycle -------------------------------------------------------

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        self.workdir = tempfile.mkdtemp(
            prefix=f'{self.lab.spec.prefix}pipeline-')
        # PostgreSQL runs as postgres: it must traverse (not list) this
        # directory to reach its own.  bandit B103: search only, no read
        os.chmod(self.workdir, 0o711)  # nosec B103
        s = self.settings
        if s.gnocchi:
            self._step('rabbitmq', self._start_rabbitmq)
            self._step('postgresql', self._start_postgresql)
            self._step('gnocchi', self._start_gnocchi)
            self._step('notification agent', self._start_notification)
        if s.prometheus:
            self._step('prometheus', self._start_prometheus)
        if s.aodh:
            self._step('aodh', self._start_aodh)

    def stop(self):
        errors = []
        for daemon in reversed(self.daemons):
            try:
                daemon.stop()
            except PipelineError as exc:
                errors.append(str(exc))
        self.daemons = []
        if self.workdir:
            if self.logs_to:
                self._copy_logs()
            shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            raise PipelineError('; '.join(errors))

    def _copy_logs(self):
        for root, _dirs, names in os.walk(self.workdir):
            for name in names:
                if not name.endswith(('.log', '.conf', '.yaml', '.yml')):
                    continue
                src = os.path.join(root, name)
                dst = os.path.join(self.logs_to,
                                   os.path.relpath(src, self.workdir))
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    shutil.copyfile(src, dst)
                except OSError:
                    pass

    def _step(self, name, func):
        self.progress(f'pipeline: starting {name}...')
        t0 = time.monotonic()
        detail = func()
        self.timings[name] = time.monotonic() - t0
        self.progress(f'pipeline: {name} up in {self.timings[name]:.1f} s'
                      + (f' ({detail})' if detail else ''))

    def _path(self, *parts):
        path = os.path.join(self.workdir, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path

    def _daemon(self, name, argv, env=None, user=None, netns_name=None,
                cwd=None):
        d = Daemon(name, argv, netns_name or self.ns,
                   self._path('logs', f'{name}.log'), env=env, user=user,
                   cwd=cwd)
        self.daemons.append(d)
        d.start()
        return d

    def _run(self, name, argv, env=None, user=None, timeout=120):
        if user:
            argv = ['setpriv', f'--reuid={user}', f'--regid={user}',
                    '--init-groups', *argv]
        try:
            netns.run(argv, netns=self.ns, timeout=timeout, env=env,
                      cwd=self.workdir)
        except netns.CommandError as exc:
            raise PipelineError(f"{name}: {exc}") from exc
        except subprocess.TimeoutExpired as exc:
            raise PipelineError(f"{name} took more than {timeout} s") \
                from exc

    def _wait(self, daemon, ready, what, timeout_s=START_TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        while True:
            if not daemon.alive():
                raise PipelineError(
                    f"{daemon.name} exited (status "
                    f"{daemon.proc.returncode if daemon.proc else None}) "
                    f"before {what}; {daemon.log_path}:\n  "
                    + '\n  '.join(daemon.tail()))
            if ready():
                return
            if time.monotonic() >= deadline:
                raise PipelineError(
                    f"{daemon.name} (pid {daemon.pid}): no {what} within "
                    f"{timeout_s:.0f} s; {daemon.log_path}:\n  "
                    + '\n  '.join(daemon.tail()))
            time.sleep(0.25)

    def _port_open(self, port, host='127.0.0.1'):
        sock = netns.socket_in_netns(self.ns, socket.AF_INET,
                                     socket.SOCK_STREAM)
        with sock:
            sock.settimeout(1.0)
            try:
                sock.connect((host, port))
            except OSError:
                return False
            return True

    # -- RabbitMQ ---------------------------------------------------------

    def _start_rabbitmq(self):
        rdir = self._path('rabbitmq', 'x')
        rdir = os.path.dirname(rdir)
        conf = os.path.join(rdir, 'rabbitmq.conf')
        with open(conf, 'w', encoding='utf-8') as f:
            f.write(f'listeners.tcp.1 = 127.0.0.1:{RABBIT_PORT}\n'
                    f'listeners.tcp.2 = {self.addresses.mgmt}:'
                    f'{RABBIT_PORT}\n'
                    'loopback_users = none\n'
                    'log.console = false\n')
        plugins = os.path.join(rdir, 'enabled_plugins')
        with open(plugins, 'w', encoding='utf-8') as f:
            f.write('[].\n')
        env = {'PATH': os.environ.get('PATH', '/usr/sbin:/usr/bin:/bin'),
               'HOME': rdir, 'LANG': 'C.UTF-8',
               'RABBITMQ_NODENAME': 'netweaver@localhost',
               'RABBITMQ_MNESIA_BASE': os.path.join(rdir, 'mnesia'),
               'RABBITMQ_LOG_BASE': os.path.join(rdir, 'log'),
               'RABBITMQ_CONFIG_FILE': conf,
               'RABBITMQ_ENABLED_PLUGINS_FILE': plugins,
               'RABBITMQ_PID_FILE': os.path.join(rdir, 'rabbit.pid'),
               'RABBITMQ_CONF_ENV_FILE': os.path.join(rdir, 'env.conf'),
               'RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS':
                   '-kernel inet_dist_use_interface {127,0,0,1}',
               'ERL_EPMD_ADDRESS': '127.0.0.1'}
        with open(env['RABBITMQ_CONF_ENV_FILE'], 'w', encoding='utf-8'):
            pass
        # Our own epmd, in the foreground: Erlang would otherwise start a
        # daemonised one that no pid of ours covers.
        epmd = self._daemon('epmd', [_system_bin('/usr/bin/epmd'),
                                     '-address', '127.0.0.1'], env=env)
        self._wait(epmd, lambda: self._port_open(4369), 'epmd on port 4369')
        rabbit = self._daemon(
            'rabbitmq', [_system_bin('/usr/lib/rabbitmq/bin/'
                                     'rabbitmq-server')], env=env, cwd=rdir)
        self._wait(rabbit, lambda: self._port_open(RABBIT_PORT),
                   f'AMQP listener on port {RABBIT_PORT}')
        return (f'pid {rabbit.pid}, epmd pid {epmd.pid}, '
                f'amqp://{self.addresses.mgmt}:{RABBIT_PORT}')

    @property
    def transport_url(self):
        """The polling agent's ``transport_url`` (from the hypervisor)."""
        return (f'rabbit://guest:guest@{self.addresses.mgmt}:{RABBIT_PORT}/')

    # -- PostgreSQL -------------------------------------------------------

    def _start_postgresql(self):
        user = pwd.getpwnam('postgres')
        pdir = os.path.dirname(self._path('postgresql', 'x'))
        sock = os.path.join(pdir, 'sock')
        os.makedirs(sock, exist_ok=True)
        for path in (pdir, sock):
            os.chown(path, user.pw_uid, user.pw_gid)
        data = os.path.join(pdir, 'data')
        self._run('initdb', [_pg_bin('initdb'), '-D', data, '-U', 'postgres',
                             '-A', 'trust', '--no-sync', '--locale=C',
                             '-E', 'UTF8'], user='postgres')
        pg = self._daemon('postgresql', [
            _pg_bin('postgres'), '-D', data, '-k', sock,
            '-c', 'listen_addresses=', '-c', 'fsync=off',
            '-c', 'synchronous_commit=off', '-c', 'full_page_writes=off'],
            user='postgres')
        self.pg_socket = sock
        self._wait(pg, lambda: os.path.exists(
            os.path.join(sock, '.s.PGSQL.5432')), 'unix socket')
        for db in ('gnocchi', 'aodh'):
            deadline = time.monotonic() + 30
            while True:
                try:
                    self._run('createdb', [_pg_bin('createdb'), '-h', sock,
                                           '-U', 'postgres', db],
                              user='postgres')
                    break
                except PipelineError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        return f'pid {pg.pid}, socket {sock}'

    def _db_url(self, driver, db):
        return f'{driver}://postgres@/{db}?host={self.pg_socket}'

    # -- Gnocchi and the notification agent ---------------------------------

    def _gnocchi_conf(self):
        gdir = os.path.dirname(self._path('gnocchi', 'x'))
        return _write_ini(os.path.join(gdir, 'gnocchi.conf'), {
            'DEFAULT': {'debug': 'false', 'use_stderr': 'true'},
            'api': {'auth_mode': 'basic'},
            'indexer': {'url': self._db_url('postgresql', 'gnocchi')},
            'storage': {'driver': 'file',
                        'file_basepath': os.path.join(gdir, 'data')},
            'metricd': {'workers': '1', 'metric_processing_delay': '1',
                        'metric_reporting_delay': '-1',
                        'metric_cleanup_delay': '30'},
        })

    def _start_gnocchi(self):
        conf = self._gnocchi_conf()
        self._run('gnocchi-upgrade', [venv_bin('gnocchi', 'gnocchi-upgrade'),
                                      '--config-file', conf])
        api = self._daemon('gnocchi-api', [
            _system_bin('/usr/bin/uwsgi-core'), '--plugins', 'http,python3',
            '--http',
            f'127.0.0.1:{GNOCCHI_PORT}', '--http-keepalive',
            '--so-keepalive', '--add-header', 'Connection: Keep-Alive',
            '--wsgi', 'gnocchi.rest.wsgi', '--chdir', '/',
            '-H', os.path.dirname(os.path.dirname(
                venv_bin('gnocchi', 'gnocchi-upgrade'))),
            '--master', '--die-on-term', '--enable-threads',
            '--processes', '1', '--threads', '4', '--lazy-apps',
            '--pyargv', f'--config-file {conf}'])
        metricd = self._daemon('gnocchi-metricd', [
            venv_bin('gnocchi', 'gnocchi-metricd'), '--config-file', conf])
        self._wait(api, lambda: self._http_ok(GNOCCHI_PORT, '/v1/status'),
                   'Gnocchi API answer')
        self._wait(metricd, lambda: True, 'metricd')
        return f'api pid {api.pid}, metricd pid {metricd.pid}'

    def resources_file(self):
        """The lab copy of the project's resource definitions.

        Only the ``netweaver-latency`` archive policy changes: its
        granularities become the lab's (seconds, not minutes).
        """
        with open(RESOURCES_FILE, encoding='utf-8') as f:
            data = yaml.safe_load(f)
        s = self.settings
        for policy in data['archive_policies']:
            if policy['name'] == LATENCY_POLICY:
                policy['definition'] = [
                    {'granularity': s.fine_granularity_s, 'timespan': 3600},
                    {'granularity': s.granularity_s, 'timespan': 3600}]
                break
        else:
            raise PipelineError(f"{RESOURCES_FILE} has no {LATENCY_POLICY} "
                                "archive policy")
        path = self._path('notification', 'gnocchi_resources.yaml')
        with open(path, 'w', encoding='utf-8') as f:
            yaml.safe_dump(data, f, sort_keys=False)
        return path

    def _credentials(self):
        return {'auth_type': 'gnocchi-basic', 'user': GNOCCHI_USER,
                'endpoint': f'http://127.0.0.1:{GNOCCHI_PORT}',
                'interface': 'public'}

    def _start_notification(self):
        ndir = os.path.dirname(self._path('notification', 'x'))
        resources = self.resources_file()
        query = urllib.parse.urlencode({
            'enable_filter_project': 'false',
            'resources_definition_file': resources})
        pipeline = os.path.join(ndir, 'pipeline.yaml')
        with open(pipeline, 'w', encoding='utf-8') as f:
            yaml.safe_dump({
                'sources': [{'name': 'netweaver_meters',
                             'meters': ['network.vif.*'],
                             'sinks': ['netweaver_sink']}],
                'sinks': [{'name': 'netweaver_sink',
                           'publishers': [f'gnocchi://?{query}']}]}, f)
        self.notification_log = os.path.join(ndir, 'notification.log')
        conf = _write_ini(os.path.join(ndir, 'ceilometer.conf'), {
            'DEFAULT': {'transport_url':
                        f'rabbit://guest:guest@127.0.0.1:{RABBIT_PORT}/',
                        'debug': 'true', 'use_stderr': 'false',
                        'log_file': self.notification_log,
                        'pipeline_cfg_file': pipeline},
            'notification': {'pipelines': 'meter', 'workers': '1'},
            'service_credentials': self._credentials(),
        })
        self._run('ceilometer-upgrade', [
            _ceilometer_bin('ceilometer-upgrade'), '--config-file', conf])
        agent = self._daemon('notification-agent', [
            _ceilometer_bin('ceilometer-agent-notification'),
            '--config-file', conf])
        self._wait(agent, lambda: self._log_has(
            self.notification_log, 'Loading manager endpoints'),
            'its sample pipeline')
        return f'pid {agent.pid}'

    @staticmethod
    def _log_has(path, text):
        try:
            with open(path, encoding='utf-8', errors='replace') as f:
                return text in f.read()
        except OSError:
            return False

    # -- Prometheus -------------------------------------------------------

    def rules_file(self):
        """The lab copy of the alert rules, each ``for`` shortened."""
        with open(RULES_FILE, encoding='utf-8') as f:
            data = yaml.safe_load(f)
        for group in data['groups']:
            group['interval'] = f'{self.settings.scrape_interval_s}s'
            for rule in group['rules']:
                if 'for' in rule:
                    rule['for'] = f'{self.settings.alert_for_s}s'
        path = self._path('prometheus', 'netweaver-alerts.yml')
        with open(path, 'w', encoding='utf-8') as f:
            yaml.safe_dump(data, f, sort_keys=False)
        return path

    def _start_prometheus(self):
        pdir = os.path.dirname(self._path('prometheus', 'x'))
        interval = f'{self.settings.scrape_interval_s}s'
        conf = os.path.join(pdir, 'prometheus.yml')
        with open(conf, 'w', encoding='utf-8') as f:
            yaml.safe_dump({
                'global': {'scrape_interval': interval,
                           'evaluation_interval': interval},
                'rule_files': [self.rules_file()],
                'scrape_configs': [{
                    'job_name': 'ceilometer',
                    'static_configs': [{'targets': [
                        f'{self.addresses.hv}:{EXPORTER_PORT}']}]}]}, f)
        self._run('promtool', [_system_bin('/usr/bin/promtool'),
                               'check', 'config', conf])
        prom = self._daemon('prometheus', [
            _system_bin('/usr/bin/prometheus'), f'--config.file={conf}',
            f'--storage.tsdb.path={os.path.join(pdir, "data")}',
            f'--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}',
            '--storage.tsdb.retention.time=1h'])
        self._wait(prom, lambda: self._http_ok(PROMETHEUS_PORT, '/-/ready'),
                   'Prometheus ready')
        return f'pid {prom.pid}, scraping {self.addresses.hv}:{EXPORTER_PORT}'

    # -- Aodh -------------------------------------------------------------

    def _start_aodh(self):
        adir = os.path.dirname(self._path('aodh', 'x'))
        conf = _write_ini(os.path.join(adir, 'aodh.conf'), {
            'DEFAULT': {'transport_url':
                        f'rabbit://guest:guest@127.0.0.1:{RABBIT_PORT}/',
                        'evaluation_interval':
                            str(self.settings.evaluation_interval_s),
                        'debug': 'false', 'use_stderr': 'true'},
            'api': {'auth_mode': 'noauth'},
            'database': {'connection': self._db_url('postgresql',
                                                    'aodh')},
            'service_credentials': self._credentials(),
        })
        self._run('aodh-dbsync', [venv_bin('aodh', 'aodh-dbsync'),
                                  '--config-file', conf])
        api = self._daemon('aodh-api', [
            venv_bin('aodh', 'aodh-api'), '--port', str(AODH_PORT),
            '--host', '127.0.0.1', '--', '--config-file', conf])
        evaluator = self._daemon('aodh-evaluator', [
            venv_bin('aodh', 'aodh-evaluator'), '--config-file', conf])
        self._wait(api, lambda: self._port_open(AODH_PORT), 'Aodh API')
        self._wait(evaluator, lambda: True, 'evaluator')
        return f'api pid {api.pid}, evaluator pid {evaluator.pid}'

    # -- the polling agent's side -------------------------------------------

    def agent_extra(self):
        """``extra=`` for :func:`labagent.write_files`.

        Samples go to this RabbitMQ (with Gnocchi); the exporter listens
        on the hypervisor's loopback (for the test's scrapes) and on its
        management address (for Prometheus).
        """
        extra = {'polling': {
            'prometheus_listen_addresses':
                f'127.0.0.1:{EXPORTER_PORT},'
                f'{self.addresses.hv}:{EXPORTER_PORT}'}}
        if self.settings.gnocchi:
            extra['DEFAULT'] = {'transport_url': self.transport_url}
            extra['polling']['enable_notifications'] = 'true'
        return extra

    # -- HTTP clients -------------------------------------------------------

    def _http(self, port, method, path, body=None, headers=None,
              timeout=HTTP_TIMEOUT_S):
        conn = _NetnsHTTPConnection(self.ns, '127.0.0.1', port, timeout)
        try:
            data = None
            headers = dict(headers or {})
            if body is not None:
                data = json.dumps(body).encode()
                headers['Content-Type'] = 'application/json'
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = raw.decode('utf-8', 'replace')
        return resp.status, payload

    def _http_ok(self, port, path):
        try:
            status, _ = self._http(port, 'GET', path, timeout=2.0,
                                   headers=self._gnocchi_auth())
        except OSError:
            return False
        return status == 200

    @staticmethod
    def _gnocchi_auth():
        token = base64.b64encode(f'{GNOCCHI_USER}:'.encode()).decode()
        return {'Authorization': f'Basic {token}'}

    def _call(self, port, method, path, body=None, headers=None,
              expect=(200,)):
        status, payload = self._http(port, method, path, body, headers)
        if status not in expect:
            raise PipelineError(f"{method} {path} on port {port} answered "
                                f"{status}: {payload}")
        return payload

    def gnocchi(self, method, path, body=None, expect=(200,)):
        """One Gnocchi API call (basic auth); the decoded JSON."""
        return self._call(GNOCCHI_PORT, method, path, body,
                          self._gnocchi_auth(), expect)

    def gnocchi_resource(self, resource_id,
                         resource_type='instance_network_interface'):
        """The Gnocchi resource of Ceilometer's resource id, or None."""
        status, payload = self._http(
            GNOCCHI_PORT, 'GET',
            f'/v1/resource/{resource_type}/'
            f'{urllib.parse.quote(resource_id, safe="")}',
            headers=self._gnocchi_auth())
        if status == 404:
            return None
        if status != 200:
            raise PipelineError(f"Gnocchi resource {resource_id}: {status} "
                                f"{payload}")
        return payload

    def gnocchi_measures(self, metric_id, granularity=None,
                         aggregation='mean'):
        """:class:`Measure` list of a metric (refreshed first)."""
        q = {'aggregation': aggregation, 'refresh': 'true'}
        if granularity:
            q['granularity'] = str(granularity)
        rows = self.gnocchi('GET', f'/v1/metric/{metric_id}/measures?'
                            + urllib.parse.urlencode(q))
        out = []
        for ts, gran, value in rows:
            out.append(Measure(timestamp=_epoch(ts), granularity=gran,
                               value=value))
        return out

    def prometheus(self, path, **params):
        """One Prometheus HTTP API call; its ``data``."""
        payload = self._call(PROMETHEUS_PORT, 'GET',
                             f'{path}?{urllib.parse.urlencode(params)}')
        if payload.get('status') != 'success':
            raise PipelineError(f"Prometheus {path} {params}: {payload}")
        return payload['data']

    def query(self, expr, at=None):
        """An instant PromQL query: ``[(labels dict, value), ...]``."""
        params = {'query': expr}
        if at is not None:
            params['time'] = f'{at:.3f}'
        data = self.prometheus('/api/v1/query', **params)
        if data['resultType'] != 'vector':
            raise PipelineError(f"{expr}: {data['resultType']} result")
        return [(r['metric'], float(r['value'][1])) for r in data['result']]

    def alerts(self):
        """Prometheus's active alerts (``/api/v1/alerts``)."""
        return self.prometheus('/api/v1/alerts')['alerts']

    def _aodh_headers(self):
        return {'X-User-Id': 'netweaver-lab', 'X-Project-Id': 'netweaver-lab',
                'X-Roles': 'admin'}

    def aodh(self, method, path, body=None, expect=(200, 201)):
        """One Aodh API call (noauth); the decoded JSON."""
        return self._call(AODH_PORT, method, path, body,
                          self._aodh_headers(), expect)

    def create_alarm(self, example, resource_id, name):
        """An alarm from ``etc/aodh/<example>.json`` on one resource.

        The example's granularity becomes the lab's and it evaluates one
        period; its threshold, metric and comparison stay as shipped.
        """
        with open(os.path.join(ALARMS_DIR, f'{example}.json'),
                  encoding='utf-8') as f:
            body = json.load(f)
        body = copy.deepcopy(body)
        body['name'] = name
        rule = body['gnocchi_resources_threshold_rule']
        rule['resource_id'] = resource_id
        rule['granularity'] = self.settings.granularity_s
        rule['evaluation_periods'] = 1
        return self.aodh('POST', '/v2/alarms', body)

    def alarm_state(self, alarm_id):
        return self.aodh('GET', f'/v2/alarms/{alarm_id}/state')


def _epoch(text):
    """Epoch seconds of a Gnocchi ISO 8601 timestamp."""
    import datetime
    return datetime.datetime.fromisoformat(text).timestamp()
