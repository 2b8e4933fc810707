"""Run the real Ceilometer polling agent against the namespace lab.

``netweaver lab --agent`` (and ``tests/functional/test_agent.py``) use
this module: it writes a libvirt ``test:///`` node describing the lab's
guests (:mod:`netweaver_agent.lab.virt`), a ``ceilometer.conf`` and a
``polling.yaml``, starts the unmodified ``ceilometer-polling
--polling-namespaces compute`` inside the lab's hypervisor namespace
(so sysfs, the pif and the taps are the hypervisor's), with the
Prometheus exporter on the namespace's loopback, scrapes ``/metrics``
through a socket opened in that namespace, and stops the agent.
"""

import configparser
import dataclasses
import os
import shutil
import sys
import tempfile
import time

from oslo_log import log

from netweaver_agent.agent import pollsters
from netweaver_agent.core import netns
from netweaver_agent.core import window as probe_window
from netweaver_agent.lab import proc
from netweaver_agent.lab import switch
from netweaver_agent.lab import virt

LOG = log.getLogger(__name__)

PROMETHEUS_PORT = 9101
LATENCY_METERS = pollsters.meter_names()
AGENT_STOP_S = 10.0
SCRAPE_TIMEOUT_S = 5.0


class AgentError(RuntimeError):
    """The polling agent could not be started, scraped or stopped."""


@dataclasses.dataclass(frozen=True, slots=True)
class AgentFiles:
    """The files of one agent run, in ``workdir``."""

    workdir: str
    config: str
    polling: str
    node: str
    log: str
    libvirt_uri: str
    port: int


@dataclasses.dataclass(frozen=True, slots=True)
class Series:
    """One Prometheus sample line: metric name, labels, value."""

    name: str
    labels: tuple     # ((key, value), ...)
    value: float

    def label(self, key, default=None):
        return dict(self.labels).get(key, default)


def guest_domains(lab):
    """The lab's guests as :class:`virt.GuestDomain`.

    Every guest but guest 1 has a filterref with its ``IP`` parameter;
    guest 1 has none, so its address comes from the nova metadata and its
    resource id is Ceilometer's ``<instance>-<uuid>-<tap>`` form: the lab
    exercises both.
    """
    return [lab.guest_domain(g, filterref=(g.index != 1))
            for g in lab.guests]


def write_files(lab, workdir, interval_s=5, meters=LATENCY_METERS,
                probe=None, threads=1, port=PROMETHEUS_PORT, debug=True,
                extra_domains=(), extra=None):
    """Write node XML, ceilometer.conf and polling.yaml; :class:`AgentFiles`.

    :param probe: extra ``[netweaver]`` options (name → value)
    :param threads: ``[polling] threads_to_process_pollsters``
    :param extra_domains: more :class:`virt.GuestDomain` for the node,
        beyond the lab's guests (e.g. an SR-IOV one)
    :param extra: more options, ``{section: {name: value}}`` (e.g.
        ``{'DEFAULT': {'rootwrap_config': path}}``), set last
    """
    if not 1 <= interval_s <= 3600:
        raise ValueError(f"polling interval {interval_s!r} s must be "
                         "within 1..3600")
    os.makedirs(workdir, exist_ok=True)
    node = os.path.join(workdir, 'node.xml')
    uri = virt.write_node(node, [*guest_domains(lab), *extra_domains])
    polling = os.path.join(workdir, 'polling.yaml')
    with open(polling, 'w', encoding='utf-8') as f:
        f.write('---\nsources:\n  - name: netweaver_lab\n'
                f'    interval: {int(interval_s)}\n    meters:\n')
        f.writelines(f'      - "{m}"\n' for m in meters)
    log_path = os.path.join(workdir, 'agent.log')
    conf = configparser.ConfigParser(interpolation=None)
    conf['DEFAULT'] = {
        'transport_url': 'fake:/',
        'host': f'{lab.spec.prefix}hv',
        'hypervisor_inspector': 'libvirt',
        'libvirt_uri': uri,
        'debug': 'true' if debug else 'false',
        'log_file': log_path,
        'use_stderr': 'false',
    }
    conf['compute'] = {'instance_discovery_method': 'libvirt_metadata'}
    conf['polling'] = {
        'cfg_file': polling,
        'enable_notifications': 'false',
        'enable_prometheus_exporter': 'true',
        'prometheus_listen_addresses': f'127.0.0.1:{port}',
        'threads_to_process_pollsters': str(threads),
        'pollsters_definitions_dirs': os.path.join(workdir, 'pollsters.d'),
    }
    options = {'probe_source': f'netns:{lab.spec.src_netns}'}
    # On an Open vSwitch layout, its private database: the topology comes
    # from the switch, as on a compute host.
    if lab.layout.ovsdb_connection:
        options['ovsdb_connection'] = lab.layout.ovsdb_connection
    options.update({k: str(v) for k, v in (probe or {}).items()})
    conf['netweaver'] = options
    for section, values in (extra or {}).items():
        if section not in conf:
            conf[section] = {}
        conf[section].update({k: str(v) for k, v in values.items()})
    config = os.path.join(workdir, 'ceilometer.conf')
    with open(config, 'w', encoding='utf-8') as f:
        conf.write(f)
    return AgentFiles(workdir=workdir, config=config, polling=polling,
                      node=node, log=log_path, libvirt_uri=uri, port=port)


# ``iptables`` words of the probes a lab mark counts, by family and
# protocol (None: any probe protocol): requests only, never the source
# kernel's own answers (e.g. its RST to a guest's SYN/ACK).
_MARK_MATCHES = {
    4: {'icmp': (('-p', 'icmp', '--icmp-type', 'echo-request'),),
        'udp': (('-p', 'udp'),),
        'tcp': (('-p', 'tcp', '--tcp-flags', 'SYN,ACK,RST', 'SYN'),)},
    6: {'icmp': (('-p', 'ipv6-icmp', '--icmpv6-type', 'echo-request'),),
        'udp': (('-p', 'udp'),),
        'tcp': (('-p', 'tcp', '--tcp-flags', 'SYN,ACK,RST', 'SYN'),)},
}


def mark_rules(mark):
    """``(tool, [rule argv, ...])``: iptables (or ip6tables) rules that
    give every ``mark.every``-th probe to ``mark.dst_ip`` the TTL (hop
    limit) ``mark.ttl`` as the source namespace's kernel sends it.

    One chain per mark holds one ``nth`` counter, so probes of every
    protocol the mark counts share it, as :class:`labmark.MarkTable` does.
    """
    family = 6 if ':' in mark.dst_ip else 4
    tool = 'ip6tables' if family == 6 else 'iptables'
    chain = f'NW-MARK-{mark.ttl}'
    target = (['-j', 'HL', '--hl-set', str(mark.ttl)] if family == 6 else
              ['-j', 'TTL', '--ttl-set', str(mark.ttl)])
    nth = (['-m', 'statistic', '--mode', 'nth', '--every', str(mark.every),
            '--packet', str(mark.every - 1)] if mark.every > 1 else [])
    rules = [['-t', 'mangle', '-N', chain],
             ['-t', 'mangle', '-A', chain, *nth, *target]]
    protocols = ([mark.protocol] if mark.protocol
                 else list(_MARK_MATCHES[family]))
    for protocol in protocols:
        for match in _MARK_MATCHES[family][protocol]:
            rules.append(['-t', 'mangle', '-A', 'OUTPUT', '-d', mark.dst_ip,
                          *match, '-j', chain])
    return tool, rules


def mark_in_kernel(lab):
    """Apply the lab layout's probe marks in the source namespace's kernel.

    On ovs-native and OVN, loss (and OVN's delay) is injected by a switch
    rule on probes the lab's own source marks (:mod:`labmark`).  The
    agent's ``netns:`` probe source is the product's, which marks nothing:
    the same marks are set by netfilter (mangle ``OUTPUT``, which the
    source's raw sockets pass) instead.  Returns the marks applied.  Use
    it once the lab's own windows are done, or both would mark.
    """
    # Only a layout whose truth is marked probes (OVN) has a mark table.
    table = getattr(lab.layout, 'marks', None)
    marks = table.marks() if table is not None else ()
    for mark in marks:
        tool, rules = mark_rules(mark)
        for rule in rules:
            switch.iptables(lab.spec.src_netns, rule, tool=tool)
    return marks


def polling_command():
    """Path of ``ceilometer-polling`` next to this Python, else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), 'ceilometer-polling')
    if os.access(here, os.X_OK):
        return here
    found = shutil.which('ceilometer-polling')
    if not found:
        raise AgentError("ceilometer-polling is not installed (pip install "
                         "'netweaver-agent[ceilometer]')")
    return found


def parse_metrics(text):
    """:class:`Series` of a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith('#'):
            continue
        if '{' in line:
            name, rest = line.split('{', 1)
            body, _, value = rest.rpartition('}')
            labels = _parse_labels(body)
        else:
            name, _, value = line.partition(' ')
            labels = ()
        try:
            number = float(value.split()[0])
        except (ValueError, IndexError):
            continue
        out.append(Series(name=name, labels=labels, value=number))
    return out


def _parse_labels(body):
    labels = []
    i = 0
    while i < len(body):
        eq = body.index('=', i)
        key = body[i:eq].strip().lstrip(',').strip()
        j = eq + 2          # after ="
        value = []
        while body[j] != '"':
            if body[j] == '\\':
                j += 1
                value.append({'n': '\n'}.get(body[j], body[j]))
            else:
                value.append(body[j])
            j += 1
        labels.append((key, ''.join(value)))
        i = j + 1
    return tuple(labels)


class PollingAgent:
    """A ``ceilometer-polling`` process in a network namespace.

    Use as a context manager; the process group is ended on exit,
    SIGTERM first, SIGKILL after :data:`AGENT_STOP_S`.

    :param wrapper: argv prefix for the agent inside the namespace (e.g.
        ``setpriv`` to drop a capability)
    """

    def __init__(self, files, netns_name, wrapper=()):
        self.files = files
        self.netns_name = netns_name
        self.wrapper = tuple(wrapper)
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        argv = netns.netns_argv(self.netns_name, [
            *self.wrapper, polling_command(), '--polling-namespaces',
            'compute',
            '--config-file', self.files.config])
        LOG.info('Starting %s', ' '.join(argv))
        self.proc = proc.start(
            argv, os.path.join(self.files.workdir, 'agent.out'),
            log_mode='wb')

    def alive(self):
        return proc.alive(self.proc)

    def stop(self):
        if self.proc is None:
            return
        # Workers cotyledon forked share the group: they end too.
        proc.stop(self.proc, 'ceilometer-polling', AGENT_STOP_S,
                  AgentError)
        self.proc = None

    def scrape(self, timeout_s=SCRAPE_TIMEOUT_S):
        """The exporter's ``/metrics`` text, or None if not listening."""
        import socket
        try:
            sock = netns.socket_in_netns(self.netns_name, socket.AF_INET,
                                         socket.SOCK_STREAM)
        except OSError as exc:
            raise AgentError(f"cannot open a socket in namespace "
                             f"{self.netns_name}: {exc}") from exc
        with sock:
            sock.settimeout(timeout_s)
            try:
                sock.connect(('127.0.0.1', self.files.port))
            except OSError:
                return None
            sock.sendall(b'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n')
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        raw = b''.join(chunks).decode('utf-8', 'replace')
        head, _, body = raw.partition('\r\n\r\n')
        if not head.startswith('HTTP/') or ' 200 ' not in head.split(
                '\r\n', 1)[0]:
            raise AgentError(f"/metrics answered {head.splitlines()[:1]}")
        return body

    def series(self, name=None):
        """Parsed series of one scrape (only ``name`` if given)."""
        text = self.scrape()
        if text is None:
            return []
        return [s for s in parse_metrics(text)
                if name is None or s.name == name]

    def wait_for(self, predicate, timeout_s, poll_s=0.5):
        """Scrape until ``predicate(series)`` is truthy; return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                raise AgentError(
                    f"ceilometer-polling exited with status "
                    f"{self.proc.returncode if self.proc else None}; "
                    f"see {self.files.log}")
            result = predicate(self.series())
            if result:
                return result
            if time.monotonic() >= deadline:
                raise AgentError(
                    f"no expected metrics from ceilometer-polling within "
                    f"{timeout_s:.0f} s; see {self.files.log}")
            time.sleep(poll_s)

    def log_text(self):
        try:
            with open(self.files.log, encoding='utf-8',
                      errors='replace') as f:
                return f.read()
        except OSError:
            return ''


def latency_ready(names):
    """A predicate: every guest tap has a ``network.vif.latency`` series."""
    def ready(series):
        found = [s for s in series
                 if s.name == 'ceilometer_network_vif_latency']
        got = {s.label('resource') for s in found}
        return found if names <= got else None
    return ready


def resource_ids(lab):
    """Ceilometer's vNIC resource id of each lab guest, by tap."""
    out = {}
    for g in guest_domains(lab):
        out[g.vif] = (g.filter_name if g.filterref else
                      f'{g.domain_name}-{g.uuid}-{g.vif}')
    return out


def run(lab, args, out=None, interval_s=5, timeout_s=60.0):
    """``netweaver lab --agent``: one agent run on a built lab.

    Writes the ``ceilometer_network_vif_latency`` series to ``out`` (the
    command's stdout).  Returns an exit status.
    """
    out = out or sys.stdout
    if lab.spec.network_type == 'vlan':
        # The lab tags VLAN probes itself (framesource); the agent's
        # netns: source sends through the source's stack, untagged.
        sys.stderr.write(
            'netweaver lab --agent: --network-type vlan: the agent\'s probe '
            f'source (netns:{lab.spec.src_netns}) sends untagged packets and '
            "this kernel has no 802.1Q device to tag them, so they would "
            'never reach a guest; use --network-type flat or vxlan\n')
        return 2
    delay = max((d.injection.delay_ms for d in lab.delays), default=0.0)
    timeout_ms = (args.timeout_ms or
                  probe_window.timeout_for_delay_ms(delay))
    probe = {'probe_protocol': args.protocol,
             'probe_count': min(args.count, 200),
             'probe_interval_ms': args.interval_ms,
             'probe_timeout_ms': timeout_ms,
             'per_vnic_interval_ms': 4 * delay if delay else 0.0,
             'max_window_ms': 1000.0 * (interval_s - 1)}
    workdir = tempfile.mkdtemp(prefix=f'{lab.spec.prefix}agent-')
    try:
        files = write_files(lab, workdir, interval_s=interval_s, probe=probe)
        mark_in_kernel(lab)
        expected = resource_ids(lab)
        with PollingAgent(files, lab.spec.hv_netns) as agent:
            try:
                series = agent.wait_for(
                    latency_ready(set(expected.values())), timeout_s)
            except AgentError as exc:
                out.write(f'netweaver lab --agent: {exc}\n')
                tail = agent.log_text().splitlines()[-20:]
                out.write(''.join(f'  {line}\n' for line in tail))
                return 1
        by_id = {v: k for k, v in expected.items()}
        out.write(f'ceilometer-polling in {lab.spec.hv_netns}, probes from '
                  f'{lab.spec.src_netns}; /metrics on '
                  f'127.0.0.1:{files.port}\n')
        for s in sorted(series, key=lambda s: s.label('resource')):
            labels = ','.join(f'{k}="{v}"' for k, v in s.labels)
            out.write(f'{s.name}{{{labels}}} {s.value:g}\n')
            out.write(f'  # {by_id.get(s.label("resource"))}: '
                      f'{s.value:.1f} us ingress mean\n')
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
