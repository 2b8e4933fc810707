"""The seed's job, over SSH: probe one instance from a source VM, capture on
its hypervisor's pif and vif, fetch both pcaps, analyse them.

1. resolve the instance's vif on the hypervisor (XenServer ``xe``, then
   libvirt ``virsh``), unless it is given;
2. start ``tcpdump`` on the pif and on the vif (nanosecond timestamps,
   filtered to the traffic between the probe source address and the
   destination, bounded by a packet count and ``timeout``), and wait until
   both are listening;
3. send from the source host: our tagged probes
   (:class:`probesource.SSHSource`)
   or the operator's ``source_command`` (e.g. the seed's hping3);
4. stop both captures, fetch the pcaps over SFTP (the remote temporary
   directory is removed also on failure);
5. analyse them with the same code as ``netweaver analyze``
   (:func:`offline.analyze_pcaps`): our probes by their tags, foreign
   traffic such as hping3's by fingerprint.
"""

import dataclasses
import ipaddress
import math
import os
import re
import shlex
import time

from oslo_log import log

from netweaver_agent.agent import ovsdb
from netweaver_agent.agent import topology
from netweaver_agent.cli import offline
from netweaver_agent.core import destinations
from netweaver_agent.core import probe
from netweaver_agent.core import sources
from netweaver_agent.core import window
from netweaver_agent.ssh import probesource
from netweaver_agent.ssh import session as ssh

LOG = log.getLogger(__name__)

# The seed's source command, for reference (and the --source-command help).
SEED_SOURCE_COMMAND = 'hping3 -c {count} -S -L 0 -Q --fast {destination}'
PLACEHOLDERS = ('count', 'destination', 'source_ip')
_PLACEHOLDER_RE = re.compile(r'\{([^{}]*)\}')
_IFNAME_RE = re.compile(r'^[A-Za-z0-9_.:@-]{1,15}$')
# Extra packets each capture may hold beyond one probe and one answer each.
CAPTURE_MARGIN = 64
CAPTURE_BUFFER_KIB = 4096
SNAPLEN = 256
# What the operator's source command (e.g. hping3, a line per packet) may
# print (read and dropped: a host cannot make us buffer more).
SOURCE_OUTPUT_BYTES = 16 << 20


class SeedJobError(RuntimeError):
    """The seed's job could not be done; the message says where."""


@dataclasses.dataclass(frozen=True, slots=True)
class SeedJob:
    """What to measure, and how.  Times in seconds unless named ``_ms``."""

    hypervisor: str
    source: str
    destination: str
    instance: str | None = None
    vif: str | None = None
    interface: str | None = None     # None: found on the hypervisor
    vif_number: int = 0
    count: int = 100
    protocol: str = 'icmp'
    interval_ms: float = 1.0
    source_command: str | None = None
    username: str = 'root'
    hypervisor_port: int = 22
    source_port: int = 22
    libvirt_uri: str | None = None
    capture_timeout_s: float = 60.0
    settle_s: float = 0.5

    def __post_init__(self):
        try:
            ipaddress.ip_address(self.destination)
        except ValueError as exc:
            raise ValueError(
                f"destination {self.destination!r} is not an IPv4 or IPv6 "
                "address") from exc
        for name in ('interval_ms', 'capture_timeout_s', 'settle_s'):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"{name} {value!r} is not a finite number")
        # Probes (ours or the source command's) go only where any source's
        # may: destinations.RefusedDestination names the reason.
        destinations.check(self.destination)
        if (self.instance is None) == (self.vif is None):
            raise ValueError("give exactly one of an instance name or a vif")
        for name in ('interface', 'vif'):
            value = getattr(self, name)
            if value is not None and not _IFNAME_RE.match(value):
                raise ValueError(f"{name} {value!r} is not an interface name")
        if not 1 <= self.count <= 1_000_000:
            raise ValueError(f"count {self.count!r} must be 1..1000000")
        if self.vif_number < 0:
            raise ValueError(f"vif number {self.vif_number!r} is negative")
        if self.protocol not in probe.PROTOCOLS:
            raise ValueError(f"unknown probe protocol {self.protocol!r}")
        if self.source_command is not None:
            source_argv(self.source_command, self.count, self.destination,
                        '198.18.0.1')   # fail early on a bad template
        if self.capture_timeout_s <= 0 or self.settle_s < 0:
            raise ValueError("capture timeout must be > 0, settle >= 0")


@dataclasses.dataclass(frozen=True, slots=True)
class SeedResult:
    """What one run of the seed's job measured."""

    job: SeedJob
    pif: str
    vif: str
    source_ip: str
    session: int | None
    send: sources.SendResult | None
    pif_pcap: str
    vif_pcap: str
    analysis: offline.Analysis


def source_argv(template, count, destination, source_ip):
    """``template`` split with shlex, placeholders filled per argument.

    Only ``{count}``, ``{destination}`` and ``{source_ip}`` are known; the
    result is an argument list, never given to a shell.
    """
    values = {'count': str(count), 'destination': destination,
              'source_ip': source_ip}

    def fill(match):
        name = match.group(1)
        if name not in values:
            raise ValueError(
                f"unknown placeholder {{{name}}} in source command "
                f"{template!r}; known: "
                f"{', '.join('{%s}' % p for p in PLACEHOLDERS)}")
        return values[name]

    try:
        argv = shlex.split(template)
    except ValueError as exc:
        raise ValueError(
            f"source command {template!r} cannot be split: {exc}") from exc
    if not argv:
        raise ValueError("source command is empty")
    return [_PLACEHOLDER_RE.sub(fill, arg) for arg in argv]


def parse_domiflist(text, vif_number, instance):
    """The ``vif_number``-th interface of ``virsh domiflist`` output."""
    rows = []
    for line in text.splitlines():
        cols = line.split()
        if not cols or cols[0] == 'Interface' or set(line.strip()) == {'-'}:
            continue
        rows.append(cols[0])
    if vif_number >= len(rows):
        raise SeedJobError(
            f"instance {instance!r} has {len(rows)} interfaces in virsh "
            f"domiflist; vif number {vif_number} is not one of them")
    name = rows[vif_number]
    if name == '-' or not _IFNAME_RE.match(name):
        raise SeedJobError(
            f"interface {vif_number} of instance {instance!r} has no host "
            f"device in virsh domiflist ({name!r})")
    return name


def _why(result):
    if result.exit_status == 127:
        return 'not installed (exit status 127)'
    err = result.stderr.decode('utf-8', 'replace').strip()
    return f'exit status {result.exit_status}: {err or "(no stderr)"}'


def resolve_vif(host, instance, vif_number=0, libvirt_uri=None):
    """The host netdev of ``instance``'s ``vif_number``-th vNIC.

    XenServer first (``xe vm-list`` → ``vif<domid>.<n>``), then libvirt
    (``virsh domiflist``).  The instance name is one argument of each
    command, whatever it contains.
    """
    tried = []
    xe = host.run(['xe', 'vm-list', f'name-label={instance}',
                   'params=dom-id', '--minimal'], check=False)
    if xe.exit_status == 0:
        text = xe.text.strip()
        domid = ssh.parse_uint(text)
        if not text:
            tried.append(f'xe: no VM named {instance!r}')
        elif domid is None:
            shown = text if len(text) <= 40 else f'{text[:40]}... ' \
                f'({len(text)} characters)'
            raise SeedJobError(
                f"xe on {host.name}: VM {instance!r} has dom-id {shown!r} "
                "(not running, or more than one VM of that name)")
        else:
            return f'vif{domid}.{vif_number}'
    else:
        tried.append(f'xe: {_why(xe)}')
    argv = ['virsh']
    if libvirt_uri:
        argv += ['-c', libvirt_uri]
    argv += ['domiflist', '--domain', instance]
    virsh = host.run(argv, check=False)
    if virsh.exit_status == 0:
        return parse_domiflist(virsh.text, vif_number, instance)
    tried.append(f'virsh: {_why(virsh)}')
    raise SeedJobError(
        f"cannot find the vif of instance {instance!r} on {host.name}: "
        f"{'; '.join(tried)}. Give the host device with --vif")


def _vsctl_snapshot(host):
    """An :class:`ovsdb.OvsSnapshot` from ``ovs-vsctl`` on ``host``."""
    outputs = {}
    for table in ovsdb.COLUMNS:
        result = host.run(ovsdb.vsctl_argv(table), check=False)
        err = result.stderr.decode('utf-8', 'replace')
        if result.exit_status == 127 or 'No such file or directory' in err:
            # Not installed, or no database socket: no Open vSwitch there.
            raise ovsdb.OvsdbAbsent(f"ovs-vsctl on {host.name}: "
                                    f"{_why(result)}")
        if result.exit_status != 0:
            raise ovsdb.OvsdbError(f"ovs-vsctl on {host.name}: "
                                   f"{_why(result)}")
        outputs[table] = result.text
    return ovsdb.snapshot_from_vsctl(outputs,
                                     source=f'ovs-vsctl on {host.name}')


def discover_path(host, vif):
    """The :class:`topology.SwitchPath` of ``vif`` on ``host``, pif first.

    The agent's rules (:func:`topology.find_path`) on what ``ip -j link``,
    ``ip -j addr`` and, for a vif on Open vSwitch, ``ovs-vsctl --format
    json list`` print there: a Linux bridge's one non-vif port, or the
    switch's uplink or tunnel underlay.  Argument lists only.
    """
    links = topology.IpLinks(
        text=host.run(['ip', '-j', 'link', 'show']).text, where=host.name)
    view = topology.SwitchView(
        lambda: _vsctl_snapshot(host),
        lambda: topology.parse_addresses(
            host.run(['ip', '-j', 'addr', 'show']).text, host.name),
        where=f'ovs-vsctl on {host.name}')
    try:
        found = topology.find_path(vif, links, view)
    except topology.TopologyError as exc:
        raise SeedJobError(
            f"cannot find the pif of {vif} on {host.name}: {exc} (give it "
            "with --interface)") from exc
    LOG.info('%(vif)s on %(hv)s: path %(path)s, crossing unseen %(via)s',
             {'vif': vif, 'hv': host.name, 'path': ' > '.join(
                 found.interfaces),
              'via': ', '.join(d for hop in found.via for d in hop) or '-'})
    return found


def capture_filter(source_ip, destination):
    """tcpdump filter: traffic between the two (validated) addresses, both
    IPv4 or both IPv6."""
    s, d = ipaddress.ip_address(source_ip), ipaddress.ip_address(destination)
    if s.version != d.version:
        raise ValueError(f"source {s} and destination {d} are not of one "
                         "IP version")
    return (f'(src host {s} and dst host {d}) or '
            f'(src host {d} and dst host {s})')


def tunnel_filter(source_ip, destination, encap=()):
    """tcpdump filter for the pif: :func:`capture_filter`, or the same
    addresses inside the VXLAN/Geneve tunnels of ``encap`` (a sequence of
    :class:`vifpath.Encapsulation`) to their UDP port.

    The inner frame is found at fixed offsets over an IPv4 underlay
    without IP options (Geneve: past its options, ``Opt Len`` × 4 bytes);
    an IPv6 destination gets the plain filter only.
    """
    plain = capture_filter(source_ip, destination)
    s, d = ipaddress.ip_address(source_ip), ipaddress.ip_address(destination)
    if not encap or s.version != 4:
        return plain
    parts = [f'({plain})']
    for tunnel in encap:
        if tunnel.kind not in ('vxlan', 'geneve') or not tunnel.port:
            continue
        # Outer Ethernet 14 + IPv4 20 + UDP 8 + tunnel header 8 = 50.
        inner = ('50' if tunnel.kind == 'vxlan'
                 else '(50 + (ether[42] & 0x3f) * 4)')
        sx, dx = f'0x{int(s):08x}', f'0x{int(d):08x}'

        def at(off, size=4):
            return f'ether[{inner} + {off}:{size}]'
        parts.append(
            f'(ether[12:2] = 0x0800 and ip[0] = 0x45 and udp dst port '
            f'{int(tunnel.port)} and {at(12, 2)} = 0x0800 and (({at(26)} = '
            f'{sx} and {at(30)} = {dx}) or ({at(26)} = {dx} and '
            f'{at(30)} = {sx})))')
    return ' or '.join(parts)


def capture_argv(interface, path, count, timeout_s, bpf):
    """One bounded tcpdump: ns timestamps, stays root, count and time.

    ``--immediate-mode`` writes each packet as it comes: without it a
    tcpdump stopped right after a short window wrote 0 of 40 packets.
    With it, a larger buffer (``-B``, KiB) keeps the kernel from dropping
    bursts.
    """
    return ['timeout', '-s', 'INT', str(max(1, int(timeout_s + 0.999))),
            'tcpdump', '-n', '-i', interface, '-w', path,
            '--time-stamp-precision=nano', '--immediate-mode',
            '-B', str(CAPTURE_BUFFER_KIB), '-Z', 'root',
            '-s', str(SNAPLEN), '-c', str(count), bpf]


class Runner:
    """Runs a :class:`SeedJob` with the given SSH options.

    :param netns_name: open SSH connections from this namespace (lab)
    """

    def __init__(self, job, options=None, netns_name=None):
        self.job = job
        self.options = options or ssh.SSHOptions()
        self.netns_name = netns_name

    def _host(self, host, port):
        return ssh.RemoteHost(host, port, self.job.username, self.options,
                              netns_name=self.netns_name)

    def run(self, workdir):
        """Measure; leave ``pif.pcap`` and ``vif.pcap`` in ``workdir``."""
        job = self.job
        hv = self._host(job.hypervisor, job.hypervisor_port)
        if job.source_command is None:
            src_source = probesource.SSHSource(
                job.source, job.source_port, job.username, self.options,
                netns_name=self.netns_name)
            src = src_source.remote
        else:
            src_source = None
            src = self._host(job.source, job.source_port)
        try:
            vif = job.vif or resolve_vif(hv, job.instance, job.vif_number,
                                         job.libvirt_uri)
            found = None if job.interface else discover_path(hv, vif)
            pif = job.interface or found.pif
            encap = found.encap if found is not None else ()
            source_ip = src.route_source(job.destination)
            LOG.info('Measuring %(dst)s from %(src)s (%(sip)s): captures on '
                     '%(pif)s and %(vif)s of %(hv)s',
                     {'dst': job.destination, 'src': src.name,
                      'sip': source_ip, 'pif': pif, 'vif': vif,
                      'hv': hv.name})
            pif_pcap = os.path.join(workdir, 'pif.pcap')
            vif_pcap = os.path.join(workdir, 'vif.pcap')
            plan, sent = self._capture_and_send(
                hv, src, src_source, pif, vif, source_ip, pif_pcap,
                vif_pcap, encap)
        finally:
            hv.close()
            if src_source is not None:
                src_source.close()
            src.close()
        session = plan.session if plan is not None else None
        result = offline.analyze_pcaps(
            pif_pcap, vif_pcap, destination=job.destination, session=session,
            key=plan.secret if plan is not None else None, plan=plan,
            protocol=job.protocol if session is not None else None,
            mode='probe' if session is not None else 'auto',
            pif_name=pif, vif_name=vif)
        return SeedResult(job=job, pif=pif, vif=vif,
                          source_ip=source_ip, session=session, send=sent,
                          pif_pcap=pif_pcap, vif_pcap=vif_pcap,
                          analysis=result)

    def _capture_and_send(self, hv, src, src_source, pif, vif, source_ip,
                          pif_pcap, vif_pcap, encap=()):
        job = self.job
        bpf = capture_filter(source_ip, job.destination)
        pif_bpf = tunnel_filter(source_ip, job.destination, encap)
        limit = 2 * job.count + CAPTURE_MARGIN
        plan = self._plan(src_source)
        with hv.tempdir() as tmp:
            procs = []
            try:
                for iface, name, flt in ((pif, 'pif', pif_bpf),
                                         (vif, 'vif', bpf)):
                    # Outlives the sender's deadline by the settle time
                    # and a margin; stopped earlier by SIGINT.
                    procs.append(hv.start(capture_argv(
                        iface, f'{tmp}/{name}.pcap', limit,
                        job.capture_timeout_s + job.settle_s + 10, flt)))
                for proc in procs:
                    proc.wait_for_stderr(b'listening on',
                                         self.options.command_timeout_s)
                sent = self._send(src, src_source, plan, source_ip)
                time.sleep(job.settle_s)
                for proc in procs:
                    proc.signal('INT')
                for proc in procs:
                    proc.wait(self.options.command_timeout_s, ok=(0, 124))
                procs = []
                hv.fetch(f'{tmp}/pif.pcap', pif_pcap)
                hv.fetch(f'{tmp}/vif.pcap', vif_pcap)
            finally:
                for proc in procs:   # left running by a failure above
                    try:
                        proc.signal('TERM')
                        proc.wait(self.options.connect_timeout_s,
                                  ok=range(256))
                    except ssh.RemoteError as exc:
                        LOG.warning('Could not stop %(cmd)s: %(err)s',
                                    {'cmd': shlex.join(proc.argv),
                                     'err': exc})
                    proc.close()
        return plan, sent

    def _plan(self, src_source):
        """Our probes' plan, built on the way in (None: source command)."""
        if src_source is None:
            return None
        # The window's secret tags the probes; the analysis verifies with
        # it (tenants may send look-alikes).
        plan = sources.schedule(
            window.new_session(), self.job.protocol,
            [self.job.destination], self.job.count,
            int(self.job.interval_ms * 1e6), secret=window.new_secret()).plan
        src_source.prepare(plan)
        return plan

    def _send(self, src, src_source, plan, source_ip):
        job = self.job
        if plan is None:
            argv = source_argv(job.source_command, job.count,
                               job.destination, source_ip)
            src.run(argv, timeout_s=job.capture_timeout_s,
                    max_output=SOURCE_OUTPUT_BYTES)
            return None
        deadline = time.monotonic() + job.capture_timeout_s
        sent = src_source.send(plan, deadline)
        if sent.failed:
            LOG.warning('%(n)d probes failed to send from %(src)s: %(err)s',
                        {'n': sent.failed, 'src': src.name,
                         'err': '; '.join(sent.errors)})
        return sent


def run(job, workdir, options=None, netns_name=None):
    """Run ``job``; the pcaps stay in ``workdir``.  See :class:`Runner`."""
    return Runner(job, options, netns_name).run(workdir)
