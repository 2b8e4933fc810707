"""Every option of netweaver-agent, and ``list_opts()`` for the generator.

All options live in the ``[netweaver]`` group of the Ceilometer polling
agent's configuration file.  ``oslo-config-generator`` finds them through
the ``oslo.config.opts`` entry point ``netweaver_agent``; the pollsters
register them with :func:`register_opts` when the agent loads them.
"""

import itertools
import math

from oslo_config import cfg

from netweaver_agent.agent import daemonlimits
from netweaver_agent.agent import topology
from netweaver_agent.core import probe
from netweaver_agent.core import window as probe_window

GROUP = 'netweaver'

OPTS = [
    cfg.StrOpt('probe_source',
               default='local',
               help="Where probes are sent from. 'local': this host's own "
                    "stack (valid only where routing takes them out and "
                    "back in through the pif); 'netns:NAME': a network "
                    "namespace attached to the physical network; "
                    "'ssh://user@host[:port]': a remote host on the "
                    "physical network, over SSH (see the ssh_* options). "
                    "Ingress latency is only real when probes enter the "
                    "host through the pif."),
    cfg.ListOpt('probe_networks',
                default=[],
                help='Networks (CIDR, IPv4 or IPv6, comma-separated) that '
                     'probes may be sent to, e.g. the provider networks '
                     "of this host's instances. A vNIC whose address lies "
                     'outside them is not measured (logged with the '
                     "reason). With probe_source 'local' nothing is sent "
                     'until they are set: the host\'s own stack would '
                     'send tenant addresses by its default route. Whatever '
                     'the setting, probes never go to loopback, '
                     'link-local (169.254.169.254 included), multicast, '
                     'broadcast, unspecified or reserved addresses.'),
    cfg.StrOpt('probe_protocol',
               default='icmp',
               choices=[('icmp', 'ICMP echo requests; the guest answers '
                                 'echo replies'),
                        ('udp', 'UDP datagrams to probe_port; a closed '
                                'port answers ICMP port unreachable'),
                        ('tcp', 'TCP SYN to probe_port; the guest answers '
                                'SYN-ACK or RST')],
               help='Protocol of the probes. Choose one that the '
                    "instances' security groups let in."),
    cfg.PortOpt('probe_port', min=1,
                help='Destination port of UDP and TCP probes. Unset: 33434 '
                     'for UDP (traceroute\'s, usually closed: the guest '
                     'answers port unreachable), 9 for TCP (discard).'),
    cfg.StrOpt('tcp_source_ports',
               default='{}-{}'.format(probe.DEFAULT_TCP_SOURCE_PORTS[0],
                                      probe.DEFAULT_TCP_SOURCE_PORTS[-1]),
               regex=r'^\s*\d{1,5}\s*-\s*\d{1,5}\s*$',
               help='Source ports of TCP probes, as FIRST-LAST (both '
                    'included). Every TCP probe has a connection (5-tuple) '
                    'of its own: each instance address walks this range, '
                    'across polling cycles, so a port comes back for the '
                    "same address only after the whole range and stateful "
                    'firewalls on the way (conntrack, OVN ACLs, security '
                    'groups) never see a SYN repeated on one connection. '
                    'With probe_protocol = tcp the agent refuses to start '
                    'when probe_count probes per cycle would reuse a port '
                    'within 120 s (conntrack\'s SYN_SENT timeout), i.e. '
                    'when probe_count x ceil(120 / polling interval) '
                    'exceeds the size of this range; the polling interval '
                    "is read from polling.yaml ([polling] cfg_file) for "
                    'these meters.'),
    cfg.IntOpt('probe_count',
               default=20, min=1, max=10000,
               help='Probes sent to each vNIC in one polling cycle.'),
    cfg.FloatOpt('probe_interval_ms',
                 default=1.0, min=0.01, max=1000.0,
                 help='Spacing between two consecutive probes of a window '
                      '(all vNICs interleaved), in milliseconds: the '
                      "host's probe rate limit (1000 / probe_interval_ms "
                      'probes per second). The sender wakes up once for '
                      'the probes due within 2 ms and sends them together '
                      '(each to a different vNIC, never closer to its '
                      "vNIC's previous probe than planned): the rate holds "
                      'over any 2 ms.'),
    cfg.FloatOpt('per_vnic_interval_ms',
                 default=0.0, min=0.0, max=60000.0,
                 help='Minimum spacing between two probes to the same '
                      "vNIC, in milliseconds: one vNIC's probe rate limit. "
                      'Probes are then spread evenly over the window (the '
                      'window stretches to honour it). 0: only '
                      'probe_interval_ms applies.'),
    cfg.FloatOpt('probe_timeout_ms',
                 default=probe_window.DEFAULT_TIMEOUT_MS, min=1.0,
                 max=10000.0,
                 help='A probe not seen on the vif (or a reply not seen '
                      'on the pif) this long after it was seen on the '
                      'other side is counted lost, in milliseconds.'),
    cfg.FloatOpt('max_window_ms',
                 default=10000.0, min=10.0, max=300000.0,
                 help='Upper bound of one probe window (all vNICs of the '
                      'host), listing the vNICs included, in milliseconds; '
                      'must exceed '
                      'probe_timeout_ms. When probe_count probes per vNIC '
                      'do not fit at the rate limits, the window sends as '
                      'many whole rounds as fit (every vNIC the same '
                      'number), logs what it skipped and reports what it '
                      'measured. Keep it well below the polling interval.'),
    cfg.IntOpt('probe_size',
               default=64, min=64, max=1500,
               help='Total IP length of a probe, in bytes.'),
    cfg.StrOpt('pif',
               help='Host netdev where probes enter the host (e.g. eth1, '
                    'bond0). Unset: found per vNIC. On a Linux bridge, '
                    "from sysfs: the one port of the vif's bridge that is "
                    'not itself a vif (see vif_prefixes). On Open vSwitch '
                    '(hybrid plug, native firewall, OVN), from its '
                    'database (see ovsdb_connection): the uplink of the '
                    'physical bridge patched to the vif\'s bridge, or the '
                    "netdev holding a tunnel's local_ip. Set, it wins; a "
                    'warning is logged when Open vSwitch says otherwise.'),
    cfg.ListOpt('vif_prefixes',
                default=list(topology.VIF_PREFIXES),
                help='Name prefixes of instance vifs. Bridge ports with '
                     'these prefixes are never taken as the pif.'),
    cfg.StrOpt('vif_resolver',
               default='libvirt',
               help="How a vNIC of the libvirt inspector maps to its host "
                    "netdev: 'libvirt' (the interface's target dev), 'xen' "
                    "(vif<domid>.<n>), or the name of another extension "
                    "in the 'netweaver_agent.vif_resolvers' entry point "
                    "namespace."),
    cfg.PortOpt('vxlan_port',
                help='UDP port of the VXLAN overlay that the pif carries, '
                     'usually 4789 (IANA; Linux vxlan devices default to '
                     "8472). Set it only where the instances' network is "
                     'a VXLAN overlay over the pif that the topology does '
                     'not find, so that probes arriving inside VXLAN packets '
                     'are captured on the pif and matched by their inner '
                     'frame; samples then carry the VNI. Unset or 0: the '
                     "port found with the vNIC's path (a Linux bridge's "
                     'vxlan-<VNI> device, whose underlay netdev is then the '
                     'pif; an Open vSwitch VXLAN tunnel port), else no VXLAN '
                     '(probes reach the pif unencapsulated or VLAN-tagged, '
                     'which needs no option).'),
    cfg.PortOpt('geneve_port',
                help='UDP port of the Geneve overlay that the pif carries, '
                     'usually 6081 (IANA). Set it where the pif carries '
                     'Geneve (e.g. OVN tenant networks between chassis), so '
                     'that probes arriving inside Geneve packets are '
                     'captured on the pif and matched by their inner '
                     'frame; samples then carry the VNI. Where the OVSDB '
                     'topology finds a Geneve tunnel port it fills this in '
                     'for that window by itself. Unset or 0: no Geneve.'),
    cfg.StrOpt('ovsdb_connection',
               default='unix:/run/openvswitch/db.sock',
               help="Open vSwitch's database, read (never written) to find "
                    'the path of vNICs on Open vSwitch: unix:PATH or '
                    'tcp:HOST:PORT (Neutron\'s OVS agent listens on '
                    'tcp:127.0.0.1:6640). Read once per polling cycle, '
                    'only when some vif is not on a Linux bridge with a '
                    'plain pif; where the unix socket does not exist the '
                    'host is taken to have no Open vSwitch. The agent\'s '
                    'user needs read access to the socket, no capability. '
                    'When it cannot be read, vNICs on Open vSwitch are not '
                    'measured that cycle (logged with the reason). With '
                    'capture_netns, a tcp: connection is opened inside that '
                    'namespace. Empty: no Open vSwitch lookup (Linux bridge '
                    'only).'),
    cfg.StrOpt('capture_netns',
               help='Network namespace holding the host interfaces (pif '
                    'and vifs) where probes are captured. Lab use only: '
                    'on a real compute host leave it unset. Needs '
                    'CAP_SYS_ADMIN to enter.'),
    cfg.BoolOpt('privsep',
                default=True,
                help='Open the capture socket and the raw socket that sends '
                     '"local" probes in an oslo.privsep daemon '
                     '(privsep-helper) that keeps only CAP_NET_RAW, so the '
                     'polling agent itself runs unprivileged. With '
                     'capture_netns or a netns: probe source (the lab) the '
                     'daemon also keeps CAP_SYS_ADMIN and CAP_NET_ADMIN. '
                     "It is started with the agent's root helper (sudo "
                     'ceilometer-rootwrap ... privsep-helper), or directly '
                     'when the agent runs as root. False: the agent opens '
                     'the sockets itself and needs CAP_NET_RAW.'),
    cfg.StrOpt('privsep_helper_command',
               help='Command that starts the privsep daemon; oslo.privsep '
                    'appends --privsep_context and --privsep_sock_path. '
                    'With the sudoers file etc/sudoers.d/netweaver-agent '
                    '(sudo >= 1.9.10), which admits exactly one command '
                    "line: 'sudo -n /usr/bin/privsep-helper --config-file "
                    "/etc/ceilometer/ceilometer.conf' (see "
                    'docs/deploying.md). Unset: the polling agent\'s root '
                    'helper (sudo ceilometer-rootwrap ...) followed by '
                    'privsep-helper (an agent running as root starts it '
                    'without one).'),
    cfg.IntOpt('max_capture_mb',
               default=512, min=1, max=65536,
               help='Largest capture file fetched from a remote host over '
                    'SFTP, in MiB: a larger one is refused, and a copy '
                    'stops there whatever size the host announced. '
                    'Each remote command may print at most 1 MiB (the '
                    'commands of ours print a line or a table) and both '
                    'end within ssh_command_timeout_s in all. A capture of '
                    'N probes is at most about (2N + 64) x 272 bytes.'),
    cfg.StrOpt('mode',
               default='probe',
               choices=[('probe', 'synthetic probes from probe_source '
                                  '(the only mode that publishes loss)'),
                        ('passive', "no probe: the instances' own "
                                    'traffic, sampled pif <-> tap for '
                                    'passive_window_ms each cycle'),
                        ('both', 'probes, and a passive window after '
                                 'them; one sample per meter and vNIC: '
                                 'the probes\' where they reached the '
                                 "vNIC, else the passive one "
                                 '(probe_protocol says which)')],
               help='What measures the in-host latency. passive needs no '
                    'probe source (tenant overlay networks no host outside '
                    'can reach) and measures only vNICs carrying traffic '
                    'in the window: idle is no sample, and a packet seen '
                    'on the pif and never on the tap is counted in '
                    'passive_unmatched, never as loss. See '
                    'docs/deploying.md.'),
    cfg.FloatOpt('passive_window_ms',
                 default=1000.0, min=1.0, max=300000.0,
                 help='How long each cycle watches the instances\' own '
                      'traffic in passive (and both) mode, in ms. '
                      'max_window_ms bounds the cycle\'s windows together: '
                      'in both mode the probe window ends early enough for '
                      'this passive window to follow it, and a passive '
                      'window is cut short at the cycle\'s deadline.'),
    cfg.IntOpt('passive_sample',
               default=64, min=1, max=65536,
               help='Passive mode keeps 1 flow in passive_sample (a power '
                    'of two), chosen in the kernel by a hash of its ports '
                    '(or addresses) that is the same on the pif and on '
                    'every tap, so a kept flow is seen on both. 1 keeps '
                    'every packet.'),
    cfg.IntOpt('passive_max_packets',
               default=100000, min=1, max=1000000,
               help='Most sampled packets one passive window keeps (the '
                    'rest are counted and left out); with the headers-only '
                    'snapshot each takes about 200 bytes of ring.'),
]


# The ssh:// probe source's (netweaver_agent.ssh.session.SSHOptions, made
# by ssh_options(); max_capture_mb above is netweaver measure's too).
SSH_OPTS = [
    cfg.StrOpt('ssh_key_file',
               help='Private key file for SSH to a remote probe source or '
                    'hypervisor (key authentication only). Unset: the SSH '
                    'agent and the default keys of the user.'),
    cfg.StrOpt('ssh_known_hosts_file',
               default='~/.ssh/known_hosts',
               help='known_hosts file against which remote host keys are '
                    'checked.'),
    cfg.BoolOpt('ssh_accept_new_host_key', default=False,
                help='Accept the key of a host absent from the known_hosts '
                     'file and record it there. Off: unknown hosts are '
                     'refused. A key that differs from the recorded one is '
                     'always refused.'),
    cfg.FloatOpt('ssh_connect_timeout_s', default=10.0, min=0.1, max=300.0,
                 help='Timeout for the TCP connect, the SSH banner and '
                      'authentication, in seconds.'),
    cfg.FloatOpt('ssh_command_timeout_s', default=60.0, min=0.1,
                 max=3600.0,
                 help='Timeout for one remote command or one file transfer '
                      'as a whole (not per read), in seconds. Past it the '
                      'SSH session is closed.'),
]


def all_opts():
    """Every option of the ``[netweaver]`` group."""
    return list(itertools.chain(OPTS, SSH_OPTS))


def ssh_options(conf):
    """The :class:`netweaver_agent.ssh.session.SSHOptions` of ``conf``'s
    ``[netweaver]`` group (options registered)."""
    from netweaver_agent.ssh import session
    g = conf[GROUP]
    return session.SSHOptions(key_file=g.ssh_key_file,
                              known_hosts_file=g.ssh_known_hosts_file,
                              accept_new_host_key=g.ssh_accept_new_host_key,
                              connect_timeout_s=g.ssh_connect_timeout_s,
                              command_timeout_s=g.ssh_command_timeout_s,
                              max_capture_mb=g.max_capture_mb)


def register_opts(conf):
    """Register the ``[netweaver]`` options on ``conf`` (idempotent)."""
    conf.register_opts(all_opts(), group=GROUP)


class OptionsError(ValueError):
    """``[netweaver]`` options that can never work; names each option."""


def _name(option):
    return f'[{GROUP}] {option}'


def _non_finite(group):
    """Every float option must be a finite number (oslo.config takes
    'nan', which no bound refuses)."""
    out = []
    for opt in all_opts():
        if isinstance(opt.type, cfg.types.Float):
            value = group[opt.dest]
            if value is not None and not math.isfinite(value):
                out.append(f"{_name(opt.name)} = {value!r} is not a finite "
                           "number")
    return out


def _window_fits(group):
    """An agent window must leave room for a probe: opening the capture
    (probe_window.OPEN_RESERVE_S) and the last probe's timeout come out of
    max_window_ms."""
    timeout, window = group.probe_timeout_ms, group.max_window_ms
    if not (math.isfinite(timeout) and math.isfinite(window)):
        return []
    reserve_ms = probe_window.OPEN_RESERVE_S * 1000.0
    if window > timeout + reserve_ms:
        return []
    return [f"{_name('max_window_ms')} = {window:g} must exceed "
            f"{_name('probe_timeout_ms')} = {timeout:g} plus "
            f"{reserve_ms:g} ms to open the capture: no probe could ever be "
            "sent (raise max_window_ms or lower probe_timeout_ms)"]


def _ssh_known_hosts(group):
    """accept-new records keys in the known_hosts file: without one, every
    connection would trust any key, so it is refused."""
    if group.ssh_accept_new_host_key and not group.ssh_known_hosts_file:
        return [f"{_name('ssh_accept_new_host_key')} = True needs "
                f"{_name('ssh_known_hosts_file')} (it is empty): without "
                "a file to record keys in, any host key would be accepted "
                "on every connection"]
    return []


def _probe_networks(group):
    """Every probe_networks entry must be a network in CIDR notation."""
    from netweaver_agent.core import destinations
    try:
        destinations.parse_networks(group.probe_networks)
    except ValueError as exc:
        return [f"{_name('probe_networks')}: {exc}"]
    return []


def _daemon_limits(group):
    """With privsep, 'local' and 'netns:' probes are built and sent by the
    daemon: no window may plan more, or faster, than its built-in limits
    (daemonlimits.DaemonLimits) take."""
    spec = group.probe_source or 'local'
    if not group.privsep or not (spec == 'local' or
                                 spec.startswith('netns:')):
        return []
    return daemonlimits.settings_problems(
        group.probe_interval_ms, group.probe_size, group.max_window_ms,
        group.probe_timeout_ms)


def _passive_sample(group):
    """The kernel samples flows by masking a hash: a power of two."""
    sample = group.passive_sample
    if sample & (sample - 1):
        return [f"{_name('passive_sample')} = {sample} is not a power of "
                "two (1, 2, 4, ... 65536)"]
    return []


# Checks of option values and combinations that can never work, run when
# the pollsters load: each takes the [netweaver] group, returns messages.
CHECKS = [_non_finite, _window_fits, _ssh_known_hosts, _probe_networks,
          _daemon_limits, _passive_sample]


def problems(conf):
    """Messages for every option (combination) of ``conf`` that can never
    work; empty when all is well."""
    group = conf[GROUP]
    out = []
    for check in CHECKS:
        out.extend(check(group))
    return out


def validate(conf):
    """Raise :class:`OptionsError` naming every option that can never work.

    Called when the pollsters load, so a bad configuration stops the
    agent at start-up with the reason rather than failing every cycle.
    """
    found = problems(conf)
    if found:
        raise OptionsError('invalid [netweaver] configuration: ' +
                           '; '.join(found))


def finite_float(text):
    """``float(text)`` for a command-line flag (argparse ``type=``), but
    never NaN or infinite (``float`` takes 'nan' and 'inf')."""
    import argparse
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") \
            from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def list_opts():
    """The options, as ``oslo-config-generator`` wants them."""
    return [(GROUP, all_opts())]
