"""Where a vNIC's probes go: host netdev, address, and path from the pif.

From a libvirt domain (its XML, as Ceilometer's inspector reads it) to
the :class:`vifpath.VifPath` the rest of the agent passes around:

* **host netdev** of a vNIC: a *vif resolver* (``[netweaver]
  vif_resolver``): ``libvirt`` takes the interface's target dev, ``xen``
  builds ``vif<domid>.<n>``; others plug in through the stevedore
  namespace ``netweaver_agent.vif_resolvers``.
* **path from the pif** (:func:`find_path`): on a Linux bridge, the one
  port of the vif's master that is not itself a vif, read from sysfs
  (``/sys/class/net/<vif>/master``) — or from a rtnetlink link dump
  inside a capture namespace, whose sysfs this process cannot see.  On Open
  vSwitch, from the switch's database (:mod:`netweaver_agent.agent.ovsdb`, one
  snapshot per cycle): a tap that is an OVS interface (native firewall,
  OVN) or a tap on a Linux bridge whose veth (``qvb…``) pairs with an
  OVS interface (``qvo…``, the iptables hybrid plug); from its bridge,
  through patch ports, to the physical bridge's uplink, or to the
  netdev holding a tunnel's ``local_ip`` (the uplink of its bridge when
  that is an OVS internal port).  ``[netweaver] pif`` still wins.  When
  the pif cannot be told, the vNIC is not measured and the error says
  why; never a guessed path.
* **target address**: one of the port's fixed IPs as Nova and Neutron
  recorded them: the filterref ``IP`` parameter (nova's nwfilter), else
  the fixed IPv4 address of the matching port in the nova 1.1 metadata
  (``<nova:ports>``).  A filterref address that is not one of that
  port's fixed IPs, or a value that is no address, makes the vNIC not
  measurable.  The host's neighbour table never supplies an address: a
  tenant's guest answers ARP for whatever address it likes.
* vNIC types with no host netdev (vhost-user, SR-IOV hostdev, vDPA,
  macvtap passthrough) are :class:`NotMeasurable`.
"""

import dataclasses
import functools
import ipaddress
import json
import os
import socket
# bandit B405: see parse_domain
from xml.etree import ElementTree  # nosec B405

from oslo_log import log
import stevedore

from netweaver_agent.agent import ovsdb
from netweaver_agent.agent import rtnl
from netweaver_agent.core import netns
from netweaver_agent.core import vifpath

LOG = log.getLogger(__name__)

RESOLVER_NAMESPACE = 'netweaver_agent.vif_resolvers'
NOVA_NS = ('http://openstack.org/xmlns/libvirt/nova/1.1',
           'http://openstack.org/xmlns/libvirt/nova/1.0')
SYSFS_NET = '/sys/class/net'
# Name prefixes of instance vifs ([netweaver] vif_prefixes's default):
# KVM/QEMU taps (nova's tap<port>, libvirt's vnetN, macvtapN) and Xen
# backends (vif<domid>.<n>).  A bridge port so named is never the pif.
VIF_PREFIXES = ('tap', 'vif', 'vnet', 'macvtap')
# libvirt interface types whose traffic never crosses a host netdev.
NO_NETDEV_TYPES = {
    'vhostuser': 'vhost-user (the switch hands packets to the guest '
                 'through shared memory)',
    'hostdev': 'SR-IOV hostdev (a VF passed through to the guest)',
    'vdpa': 'vDPA (a hardware datapath in the guest)',
}


class TopologyError(Exception):
    """A vNIC cannot be measured this cycle; the message names it."""


class NotMeasurable(TopologyError):
    """A vNIC type whose packets never cross a host netdev."""


@dataclasses.dataclass(frozen=True, slots=True)
class DomainInterface:
    """One ``<interface>`` of a libvirt domain, as written in its XML."""

    index: int
    type: str
    mac: str | None = None
    target: str | None = None
    bridge: str | None = None
    source_mode: str | None = None
    fref: str | None = None
    filter_ip: str | None = None
    interface_id: str | None = None

    @property
    def unmeasurable_reason(self):
        """Why this vNIC has no host netdev, or None if it has one."""
        if self.type in NO_NETDEV_TYPES:
            return NO_NETDEV_TYPES[self.type]
        if self.type == 'direct' and self.source_mode == 'passthrough':
            return ('macvtap passthrough (the guest owns the physical '
                    'device)')
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class NovaPort:
    """A port of the nova metadata: its uuid and fixed IPv4 addresses."""

    uuid: str
    addresses: tuple = ()


@dataclasses.dataclass(frozen=True, slots=True)
class DomainInfo:
    """What the pollsters need from one libvirt domain."""

    name: str
    uuid: str
    domain_type: str
    domid: int | None
    interfaces: tuple
    ports: tuple = ()

    def interface(self, target=None, mac=None):
        """The interface with this target dev (else this MAC), or None."""
        for iface in self.interfaces:
            if target is not None and iface.target == target:
                return iface
        for iface in self.interfaces:
            if mac is not None and iface.mac and \
                    iface.mac.lower() == mac.lower():
                return iface
        return None


def _attr(elem, path, name):
    found = elem.find(path)
    return found.get(name) if found is not None else None


def parse_domain(xml, domid=None):
    """A :class:`DomainInfo` from a domain's XML description."""
    try:
        # bandit B314: libvirtd's own domain XML; expat >= 2.4.1 bounds entity
        # expansion and ElementTree fetches no external entity
        tree = ElementTree.fromstring(xml)  # nosec B314
    except ElementTree.ParseError as exc:
        raise TopologyError(f"unreadable domain XML: {exc}") from exc
    interfaces = []
    for index, iface in enumerate(tree.findall('devices/interface')):
        ip = None
        for param in iface.findall('filterref/parameter'):
            if (param.get('name') or '').lower() == 'ip':
                ip = param.get('value')
                break
        interfaces.append(DomainInterface(
            index=index, type=iface.get('type') or '',
            mac=_attr(iface, 'mac', 'address'),
            target=_attr(iface, 'target', 'dev'),
            bridge=_attr(iface, 'source', 'bridge'),
            source_mode=_attr(iface, 'source', 'mode'),
            fref=_attr(iface, 'filterref', 'filter'),
            filter_ip=ip,
            interface_id=_attr(iface, 'virtualport/parameters',
                               'interfaceid')))
    return DomainInfo(name=tree.findtext('name') or '',
                      uuid=tree.findtext('uuid') or '',
                      domain_type=tree.get('type') or '',
                      domid=domid, interfaces=tuple(interfaces),
                      ports=tuple(_nova_ports(tree)))


def _nova_ports(tree):
    for ns in NOVA_NS:
        instance = tree.find(f'metadata/{{{ns}}}instance')
        if instance is None:
            continue
        for port in instance.findall(f'{{{ns}}}ports/{{{ns}}}port'):
            addresses = tuple(
                ip.get('address') for ip in port.findall(f'{{{ns}}}ip')
                if ip.get('type', 'fixed') == 'fixed'
                and ip.get('ipVersion', '4') == '4' and ip.get('address'))
            yield NovaPort(uuid=port.get('uuid') or '', addresses=addresses)
        return


# --- vif resolvers --------------------------------------------------------

class VifResolver:
    """Maps a domain interface to the host netdev its packets cross."""

    name = 'abstract'

    def netdev(self, domain, iface):
        raise NotImplementedError


class LibvirtResolver(VifResolver):
    """The interface's ``<target dev=…>`` (KVM/QEMU tap, macvtap)."""

    name = 'libvirt'

    def netdev(self, domain, iface):
        if not iface.target:
            raise TopologyError(
                f"vNIC {iface.mac} of domain {domain.name} has no target "
                "dev in its libvirt XML")
        return iface.target


class XenResolver(VifResolver):
    """Xen's backend netdev ``vif<domid>.<n>``, n the interface's index."""

    name = 'xen'

    def netdev(self, domain, iface):
        if domain.domid is None or domain.domid < 0:
            raise TopologyError(
                f"domain {domain.name} has no Xen domain id: is it running?")
        return f'vif{domain.domid}.{iface.index}'


BUILTIN_RESOLVERS = {'libvirt': LibvirtResolver, 'xen': XenResolver}


def load_resolver(name):
    """The resolver ``name``: built in, or a stevedore extension."""
    if name in BUILTIN_RESOLVERS:
        return BUILTIN_RESOLVERS[name]()
    try:
        mgr = stevedore.DriverManager(RESOLVER_NAMESPACE, name,
                                      invoke_on_load=True)
    except (stevedore.exception.NoMatches,
            stevedore.exception.MultipleMatches) as exc:
        raise TopologyError(
            f"no vif resolver {name!r} in {RESOLVER_NAMESPACE}: {exc}"
        ) from exc
    return mgr.driver


@dataclasses.dataclass(frozen=True, slots=True)
class VxlanPort:
    """A Linux VXLAN netdev (a Linux bridge's overlay port): the underlay
    device it was created on (``dev``), its local address and UDP port."""

    name: str
    link: str | None = None
    local: str | None = None
    port: int = 4789


def read_vxlan(dev, netns_name=None):
    """The :class:`VxlanPort` of ``dev``, or None if it is no VXLAN."""
    proc = netns.run(['ip', '-d', '-j', 'link', 'show', 'dev', dev],
                     netns=netns_name, check=False)
    try:
        info = (json.loads(proc.stdout or '[]') or [{}])[0].get(
            'linkinfo') or {}
    except (ValueError, AttributeError, IndexError):
        return None
    if info.get('info_kind') != 'vxlan':
        return None
    data = info.get('info_data') or {}
    port = data.get('port')
    return VxlanPort(name=dev, link=data.get('link'),
                     local=data.get('local') or data.get('local6'),
                     port=port if isinstance(port, int) and port else 4789)


# --- links: which netdev is enslaved to which -----------------------------

class _PerBridge:
    """What every vif of one bridge asks about the bridge, worked out
    once per links snapshot (one polling cycle): asked per vif, a bridge
    of V vifs costs V² peer lookups."""

    def _per_bridge(self, key, compute):
        cache = self.__dict__.setdefault('_bridge_memo', {})
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def bridge_veths(self, master):
        """``((port, peer), …)``: the ports of ``master`` that are veths
        whose peer is on no Linux bridge (on none, or on Open vSwitch's
        kernel datapath)."""
        def compute():
            found = []
            for port in self.ports(master):
                peer = self.peer(port)
                if peer and self.master(peer) in (
                        None, _KERNEL_DATAPATH_MASTER):
                    found.append((port, peer))
            return tuple(found)
        return self._per_bridge(('veths', master), compute)

    def pif_candidates(self, master, prefixes):
        """The ports of ``master`` whose names start with none of
        ``prefixes`` (vif name prefixes)."""
        return self._per_bridge(('pif', master, prefixes), lambda: tuple(
            p for p in self.ports(master) if not p.startswith(prefixes)))

    def vxlan(self, dev):
        """:class:`VxlanPort` of ``dev``, or None if it is no VXLAN: read
        once per snapshot (every vif of a bridge asks of its uplink)."""
        return self._per_bridge(('vxlan', dev), lambda: self._vxlan(dev))


class SysfsLinks(_PerBridge):
    """Netdevs and their masters, read from sysfs (``/sys/class/net``).

    A master's ports are read once per instance (one polling cycle's
    snapshot): listing them is a walk over every netdev of the host.
    Veth peers come from a rtnetlink link dump (sysfs ``iflink`` cannot
    tell a peer in another namespace), read once, only when asked.
    """

    def __init__(self, root=SYSFS_NET):
        self.root = root
        self._ports = {}
        self._ip = None

    def exists(self, dev):
        return os.path.exists(os.path.join(self.root, dev))

    def master(self, dev):
        path = os.path.join(self.root, dev, 'master')
        try:
            return os.path.basename(os.readlink(path))
        except OSError:
            return None

    def names(self):
        try:
            return sorted(os.listdir(self.root))
        except OSError:
            return []

    def ports(self, master):
        if master not in self._ports:
            self._ports[master] = [d for d in self.names()
                                   if self.master(d) == master]
        return list(self._ports[master])

    def peer(self, dev):
        """The veth peer of ``dev`` in this namespace, or None."""
        if self._ip is None:
            self._ip = IpLinks()
        return self._ip.peer(dev)

    def _vxlan(self, dev):
        """:class:`VxlanPort` of ``dev`` (sysfs ``DEVTYPE=vxlan``), or
        None."""
        return _sysfs_vxlan(self.root, dev)


def _sysfs_vxlan(root, dev):
    """:class:`VxlanPort` of ``dev`` if its sysfs ``uevent`` (under
    ``root``) says ``DEVTYPE=vxlan`` (then ``ip -d`` is asked), else None."""
    try:
        with open(os.path.join(root, dev, 'uevent'),
                  encoding='ascii', errors='replace') as f:
            if 'DEVTYPE=vxlan' not in f.read().split():
                return None
    except OSError:
        return None
    return read_vxlan(dev)


class IpLinks(_PerBridge):
    """The same, for a namespace: its links as one rtnetlink dump tells
    them (:mod:`netweaver_agent.agent.rtnl`, what ``ip -j link show``
    prints, without the child process), or from ``ip -j link show``
    output (``text``: another host's, a recording)."""

    def __init__(self, netns_name=None, text=None, where=None):
        where = where or rtnl.where_of(netns_name)
        self.netns_name = netns_name
        if text is None:
            rows = _dumped_links(netns_name)
        else:
            rows = _ip_json_links(text, where)
        self._master = {name: master for name, master, _ in rows}
        # A veth whose peer is in this namespace names it in "link" (one
        # in another namespace has "link_netnsid" and only an index); VLAN
        # and macvlan devices name their parent there too, which does not
        # name them back.
        link_of = {name: link for name, _, link in rows}
        self._peer = {dev: other for dev, other in link_of.items()
                      if other and link_of.get(other) == dev}

    def exists(self, dev):
        return dev in self._master

    def master(self, dev):
        return self._master.get(dev)

    def names(self):
        return sorted(self._master)

    def ports(self, master):
        return [d for d, m in sorted(self._master.items()) if m == master]

    def peer(self, dev):
        """The veth peer of ``dev`` in this namespace, or None."""
        return self._peer.get(dev)

    def _vxlan(self, dev):
        """:class:`VxlanPort` of ``dev``, or None if it is no VXLAN."""
        if dev not in self._master:
            return None
        return read_vxlan(dev, self.netns_name)


class HostLinks(IpLinks):
    """The links of the agent's own namespace, as a compute node's agent
    reads them each cycle: names, masters and veth peers from one
    rtnetlink dump (:class:`IpLinks`), not a sysfs walk with a
    ``readlink`` per netdev (and a ``stat`` per vif); a VXLAN port told
    by its sysfs ``uevent`` (``root``, which shows this namespace), so
    ``ip -d`` runs only for one."""

    def __init__(self, root=SYSFS_NET):
        super().__init__()
        self.root = root

    def _vxlan(self, dev):
        if dev not in self._master:
            return None
        return _sysfs_vxlan(self.root, dev)


class LiveNetdevs:
    """Whether a netdev of this namespace exists *now*, asked per name
    (``if_nametoindex``: no dump, no sysfs walk): what the agent asks
    after a window of the few netdevs its paths cross."""

    @staticmethod
    def exists(dev):
        try:
            socket.if_nametoindex(dev)
        except (OSError, ValueError):
            return False
        return True


def _dumped_links(netns_name):
    """``[(name, master, link)]`` of the namespace's rtnetlink dump;
    ``link`` None when it is in another namespace."""
    try:
        links = rtnl.dump_links(netns_name)
    except rtnl.RtnlError as exc:
        raise TopologyError(str(exc)) from exc
    name_of = {link.index: link.name for link in links}
    return [(link.name, name_of.get(link.master),
             None if link.link_netnsid is not None
             else name_of.get(link.link)) for link in links]


def _ip_json_links(text, where):
    """``[(name, master, link)]`` from ``ip -j link show`` output;
    ``link`` None when it is in another namespace."""
    try:
        rows = [(link['ifname'], link.get('master'),
                 None if 'link_netnsid' in link else link.get('link'))
                for link in json.loads(text or '[]') if 'ifname' in link]
    except (ValueError, TypeError, AttributeError) as exc:
        raise TopologyError(
            f"unreadable 'ip -j link show' output in {where}: "
            f"{exc}") from exc
    for row in rows:
        if not isinstance(row[0], str) or not all(
                v is None or isinstance(v, str) for v in row[1:]):
            raise TopologyError(
                f"unreadable 'ip -j link show' output in {where}: link "
                f"{row[0]!r} has a name, master or link that is no string")
    return rows


def find_pif(vif, links, vif_prefixes=VIF_PREFIXES, configured=None):
    """The netdev where probes for ``vif`` enter the host."""
    if configured:
        if not links.exists(configured):
            raise TopologyError(
                f"configured pif {configured!r} does not exist on this host")
        return configured
    bridge = links.master(vif)
    if not bridge:
        raise TopologyError(
            f"vif {vif!r} has no master (bridge) to find its pif from; "
            "set [netweaver] pif")
    return bridge_pif(vif, bridge, links, vif_prefixes)


# --- paths through Open vSwitch --------------------------------------------

# Interface types that are a kernel netdev where a packet socket sees
# frames ('' is 'system').
_NETDEV_TYPES = ('', 'system')
# Neutron's OVS agent records the port's network type in its other_config.
_TUNNEL_NETWORKS = ('vxlan', 'geneve', 'gre', 'stt')
_PROVIDER_NETWORKS = ('flat', 'vlan')
_KERNEL_DATAPATH_MASTER = 'ovs-system'
_warned = set()


def parse_addresses(text, where='this host'):
    """``{address: netdev}`` from ``ip -j addr show`` output."""
    try:
        links = json.loads(text or '[]')
        out = {}
        for link in links:
            for addr in link.get('addr_info') or ():
                if addr.get('local') and link.get('ifname'):
                    out.setdefault(addr['local'], link['ifname'])
        return out
    except (ValueError, TypeError, AttributeError) as exc:
        raise TopologyError(
            f"unreadable 'ip -j addr show' output in {where}: {exc}"
        ) from exc


def read_addresses(netns_name=None):
    """``{address: netdev}`` of the host (or of namespace ``netns_name``)."""
    proc = netns.run(['ip', '-j', 'addr', 'show'], netns=netns_name)
    return parse_addresses(proc.stdout,
                           f'namespace {netns_name}' if netns_name
                           else 'this host')


class SwitchView:
    """What OVS-aware resolution reads, each at most once per cycle.

    :param snapshot: a callable returning an :class:`ovsdb.OvsSnapshot`
        (raising :class:`ovsdb.OvsdbError`); None: OVS lookup disabled
    :param addresses: a callable returning ``{address: netdev}`` (see
        :func:`read_addresses`)
    :param where: what the error messages call the switch
    """

    def __init__(self, snapshot=None, addresses=None, where=None):
        self._snapshot_fn = snapshot
        self._addresses_fn = addresses or read_addresses
        self.where = where
        self._snapshot = None
        self._error = None
        self._addresses = None
        self._uplinks = {}
        self._absent = False
        self.reads = 0

    @property
    def enabled(self):
        return self._snapshot_fn is not None

    def snapshot(self):
        """The cycle's snapshot; TopologyError (the same one each time)
        when the switch's database cannot be read."""
        if self._snapshot_fn is None:
            raise TopologyError(
                "the Open vSwitch lookup is disabled ([netweaver] "
                "ovsdb_connection is empty)")
        if self._snapshot is None and self._error is None:
            self.reads += 1
            try:
                self._snapshot = self._snapshot_fn()
            except (ovsdb.OvsdbError, ValueError, OSError,
                    netns.NetnsError) as exc:
                self._error = TopologyError(
                    f"cannot read Open vSwitch's database: {exc}")
                self._absent = isinstance(exc, ovsdb.OvsdbAbsent)
        if self._error is not None:
            raise self._error
        return self._snapshot

    def absent(self):
        """Whether this host has no Open vSwitch at all (its unix socket
        does not exist): then a tap on a Linux bridge is plain Linux
        bridge, whatever its bridge's ports."""
        try:
            self.snapshot()
        except TopologyError:
            return self._absent
        return False

    def uplinks(self, bridge, compute):
        """``compute()`` once per bridge and snapshot (memo)."""
        if bridge not in self._uplinks:
            self._uplinks[bridge] = compute()
        return self._uplinks[bridge]

    def owner(self, address):
        """The netdev holding ``address``, or None."""
        if self._addresses is None:
            self._addresses = self._addresses_fn()
        return self._addresses.get(address)


@dataclasses.dataclass(frozen=True, slots=True)
class SwitchPath:
    """What :func:`find_path` found: seen interfaces, via, encapsulation."""

    interfaces: tuple
    via: tuple = ()
    encap: tuple = ()


@dataclasses.dataclass(frozen=True, slots=True)
class _Uplink:
    """One way from a pif to the vNIC's bridge (or why it is unusable)."""

    kind: str                 # 'provider' or 'tunnel'
    pif: str | None
    via: tuple = ()           # devices from the pif to the vNIC's bridge
    encap: vifpath.Encapsulation | None = None
    what: str = ''
    error: str | None = None


def _physical_ports(snap, bridge):
    """Interfaces of ``bridge`` that are uplinks: ``[(iface, port)]``."""
    out = []
    for port, ifaces in snap.members(bridge):
        if port.name == bridge.name:
            continue
        for iface in ifaces:
            if iface.type in ('internal', 'patch') or iface.is_tunnel:
                continue
            if iface.iface_id or iface.attached_mac:
                continue        # an instance's port, not an uplink
            out.append((iface, port))
    return out


def _bridges_reached(snap, start):
    """``[(bridge, chain)]``: every bridge patched to ``start``, with the
    devices from it to ``start`` in ingress order (its own name first)."""
    chains = {start.name: (start.name,)}
    order = [start]
    queue = [start]
    while queue:
        bridge = queue.pop(0)
        for _, ifaces in snap.members(bridge):
            for iface in ifaces:
                peer = iface.peer
                if not peer:
                    continue
                other = snap.bridge_of(peer)
                if other is None or other.name in chains:
                    continue
                chains[other.name] = ((other.name, peer, iface.name)
                                      + chains[bridge.name])
                order.append(other)
                queue.append(other)
    return [(b, chains[b.name]) for b in order]


def _uplinks_of(snap, bridge, chain, switch):
    """Every :class:`_Uplink` of one reached bridge."""
    out = []
    for iface, _ in _physical_ports(snap, bridge):
        error = None
        if iface.type not in _NETDEV_TYPES:
            error = (f"uplink {iface.name!r} of {bridge.name} is an OVS "
                     f"{iface.type!r} port with no kernel netdev to "
                     "capture on")
        out.append(_Uplink('provider', iface.name, chain,
                           what=f'{iface.name} (uplink of {bridge.name})',
                           error=error))
    tunnels = {}
    for _, ifaces in snap.members(bridge):
        for iface in ifaces:
            if iface.is_tunnel:
                tunnels.setdefault((iface.type, iface.dst_port,
                                    iface.local_ip), []).append(iface)
    for (kind, port, local_ip), ifaces in sorted(
            tunnels.items(), key=lambda kv: str(kv[0])):
        names = tuple(sorted(i.name for i in ifaces))
        out.append(_tunnel_uplink(snap, bridge, chain, switch, kind, port,
                                  local_ip, names))
    return out


def _tunnel_uplink(snap, bridge, chain, switch, kind, port, local_ip,
                   names):
    label = f"{kind} port {names[0]}" + (
        f" (and {len(names) - 1} more)" if len(names) > 1 else '')
    encap = vifpath.Encapsulation(kind, port) if port else None
    if kind not in ovsdb.UDP_TUNNELS or port is None:
        return _Uplink('tunnel', None, what=label, error=(
            f"{label} on {bridge.name}: only VXLAN and Geneve "
            "encapsulation is decoded"))
    if not local_ip:
        # OVN's tunnels carry no local_ip unless asked to; the chassis's
        # encapsulation address is in the Open_vSwitch row.
        encap_ips = snap.external_ids.get('ovn-encap-ip', '').split(',')
        local_ip = encap_ips[0].strip() if len(encap_ips) == 1 else ''
    if not local_ip:
        return _Uplink('tunnel', None, what=label, error=(
            f"{label} on {bridge.name} has no options:local_ip (and no "
            "single ovn-encap-ip): which netdev carries it is unknown"))
    owner = switch.owner(local_ip)
    what = f'{label} (local_ip {local_ip} on {owner})'
    via = names + chain
    if owner is None:
        return _Uplink('tunnel', None, what=label, error=(
            f"no netdev holds local_ip {local_ip} of {label}"))
    underlay = snap.bridge_of(owner)
    iface = snap.interface(owner)
    if underlay is None or iface is None:
        return _Uplink('tunnel', owner, via, encap, what)
    if iface.type != 'internal':
        return _Uplink('tunnel', owner, via, encap, what)
    uplinks = [i.name for i, _ in _physical_ports(snap, underlay)]
    if len(uplinks) != 1:
        return _Uplink('tunnel', None, what=what, error=(
            f"local_ip {local_ip} of {label} is on {owner}, an internal "
            f"port of {underlay.name}, which has "
            f"{'no' if not uplinks else len(uplinks)} uplinks "
            f"{uplinks!r}"))
    return _Uplink('tunnel', uplinks[0], (underlay.name,) + via, encap,
                   f'{uplinks[0]} (uplink of {underlay.name}, holding '
                   f'local_ip {local_ip} of {label})')


def _uplinks(snap, entry, switch):
    """Every :class:`_Uplink` from OVS interface ``entry``'s bridge."""
    start = snap.bridge_of(entry)

    def compute():
        out = []
        for bridge, chain in _bridges_reached(snap, start):
            out.extend(_uplinks_of(snap, bridge, chain, switch))
        return out
    return list(switch.uplinks(start.name, compute))


def _merge_via(vias):
    """One device tuple from several ways in: each device once, in the
    order first met."""
    out = []
    for via in vias:
        for dev in via:
            if dev not in out:
                out.append(dev)
    return tuple(out)


def _choose(vif, snap, entry, switch, configured):
    """``(pif, via from the pif to the vNIC's bridge, encap)``."""
    uplinks = _uplinks(snap, entry, switch)
    port = snap.port_of(entry)
    network_type = port.network_type if port is not None else None
    if network_type == 'local':
        raise NotMeasurable(
            f"vif {vif!r} is on a Neutron 'local' network: its packets "
            "never cross a pif")
    if network_type in _TUNNEL_NETWORKS:
        uplinks = [u for u in uplinks if u.kind == 'tunnel']
    elif network_type in _PROVIDER_NETWORKS:
        uplinks = [u for u in uplinks if u.kind == 'provider']
    bridge = snap.bridge_of(entry).name
    if configured:
        return _configured(vif, bridge, uplinks, configured)
    broken = [u for u in uplinks if u.error]
    if broken:
        raise TopologyError(
            f"vif {vif!r} (OVS {entry} on {bridge}): cannot tell its pif: "
            f"{'; '.join(u.error for u in broken)}; set [netweaver] pif")
    pifs = sorted({u.pif for u in uplinks})
    if len(pifs) != 1:
        what = '; '.join(u.what for u in uplinks) or 'none'
        raise TopologyError(
            f"vif {vif!r} (OVS {entry} on {bridge}) reaches "
            f"{'no' if not pifs else len(pifs)} pifs through the switch "
            f"({what}): which one carries its probes is not known; set "
            "[netweaver] pif")
    chosen = [u for u in uplinks if u.pif == pifs[0]]
    return (pifs[0], _merge_via(u.via for u in chosen),
            tuple(dict.fromkeys(u.encap for u in chosen if u.encap)))


def _configured(vif, bridge, uplinks, configured):
    """The configured pif, checked against what the switch says."""
    found = sorted({u.pif for u in uplinks if not u.error})
    chosen = [u for u in uplinks if u.pif == configured]
    if found and not chosen:
        key = (vif, configured, tuple(found))
        if key not in _warned:
            _warned.add(key)
            LOG.warning('vif %(vif)s: [netweaver] pif is %(pif)s, but '
                        'Open vSwitch connects %(bridge)s to %(found)s; '
                        'measuring from %(pif)s as configured',
                        {'vif': vif, 'pif': configured, 'bridge': bridge,
                         'found': ', '.join(found)})
    if chosen:
        return (configured, _merge_via(u.via for u in chosen),
                tuple(dict.fromkeys(u.encap for u in chosen if u.encap)))
    # Not one of the switch's ways in: the devices in between are not
    # known, any UDP tunnel of the switch may carry the probes.
    return (configured, (),
            tuple(dict.fromkeys(u.encap for u in uplinks if u.encap)))


def _hybrid_entry(vif, master, links, switch):
    """``(qvb, qvo)`` if ``master`` is the hybrid plug's qbr, else None.

    A port of the vif's Linux bridge that is a veth whose peer is an OVS
    interface (by the kernel's link, not by name).
    """
    # A peer on another Linux bridge is Linux bridge all the way.  Worked
    # out once per bridge and cycle (links.bridge_veths), not per vif.
    veths = [(p, peer) for p, peer in links.bridge_veths(master) if p != vif]
    if not veths:
        return None
    if switch.absent() and not any(
            links.master(peer) == _KERNEL_DATAPATH_MASTER
            for _, peer in veths):
        # No Open vSwitch on this host: a veth to the host's own stack.
        return None
    snap = switch.snapshot()
    on_ovs = [(p, peer) for p, peer in veths if snap.interface(peer)]
    if len(on_ovs) > 1:
        raise TopologyError(
            f"bridge {master!r} of vif {vif!r} has {len(on_ovs)} veths to "
            f"Open vSwitch {on_ovs!r}: which one its probes cross is not "
            "known")
    return on_ovs[0] if on_ovs else None


def bridge_pif(vif, bridge, links, vif_prefixes=VIF_PREFIXES):
    """The one port of ``vif``'s Linux bridge ``bridge`` that is no vif
    (:func:`find_pif` once the vif's master is known)."""
    ports = [p for p in links.pif_candidates(bridge, tuple(vif_prefixes))
             if p != vif]
    if len(ports) != 1:
        raise TopologyError(
            f"bridge {bridge!r} of vif {vif!r} has "
            f"{'no' if not ports else len(ports)} candidate pif "
            f"{ports!r}; set [netweaver] pif")
    return ports[0]


def _linux_vxlan(vif, bridge, port, links, switch, configured):
    """The path of a tap on a Linux bridge whose uplink ``port`` (None:
    none told) is a VXLAN port (Neutron's linuxbridge agent:
    ``vxlan-<VNI>``): probes enter through the underlay netdev (the
    VXLAN's ``dev``, else the one holding its local address), are
    decapsulated by the VXLAN port and bridged: ``(underlay, vxlan,
    vif)``.  None when the uplink is no VXLAN (or a configured pif is not
    its underlay)."""
    if port is None:
        return None
    found = links.vxlan(port)
    if found is None:
        return None
    under = found.link or (switch.owner(found.local) if found.local
                           else None)
    if configured and configured != under:
        return None
    if not under or not links.exists(under):
        raise TopologyError(
            f"vif {vif!r}: bridge {bridge!r} reaches the network through "
            f"VXLAN port {port!r}, whose underlay netdev cannot be told "
            f"(dev {found.link!r}, local {found.local!r}); set "
            "[netweaver] pif to it")
    return SwitchPath((under, port, vif), ((), (bridge,)),
                      (vifpath.Encapsulation('vxlan', found.port),))


def find_path(vif, links, switch=None, vif_prefixes=VIF_PREFIXES,
              configured=None):
    """The :class:`SwitchPath` of ``vif``, pif first.

    * Linux bridge: ``(pif, vif)`` via the bridge (:func:`find_pif`);
      with a VXLAN uplink, ``(underlay, vxlan-<VNI>, vif)``.
    * OVS hybrid plug (a tap on ``qbr…`` whose ``qvb…`` veth pairs with an
      OVS interface ``qvo…``): ``(pif, qvo, qvb, vif)``.
    * OVS native / OVN (the tap is an OVS interface): ``(pif, vif)``.

    :param switch: a :class:`SwitchView` (None: Linux bridge only)
    :param configured: ``[netweaver] pif``, which wins
    """
    switch = switch or SwitchView()
    if configured and not links.exists(configured):
        raise TopologyError(
            f"configured pif {configured!r} does not exist on this host")
    master = links.master(vif)
    if master and master != _KERNEL_DATAPATH_MASTER:
        try:
            hybrid = (_hybrid_entry(vif, master, links, switch)
                      if switch.enabled else None)
        except TopologyError:
            if not configured:
                raise
            # Which devices lie in between is not known.
            return SwitchPath((configured, vif))
        if hybrid is None:
            # The bridge's uplink, told once (its master already read).
            try:
                port, unknown = bridge_pif(vif, master, links,
                                           vif_prefixes), None
            except TopologyError as exc:
                port, unknown = None, exc
            overlay = _linux_vxlan(vif, master, port, links, switch,
                                   configured)
            if overlay is not None:
                return overlay
            if unknown is not None and not configured:
                raise unknown
            # A configured pif (its existence checked above) wins.
            return SwitchPath((configured or port, vif), ((master,),))
        qvb, qvo = hybrid
        tail, tail_via = (qvo, qvb, vif), ((), (master,))
        entry = qvo
    else:
        entry = vif
        tail, tail_via = (vif,), ()
        try:
            snap = switch.snapshot()
        except TopologyError as exc:
            if configured:
                return SwitchPath((configured, vif))
            raise TopologyError(
                f"vif {vif!r} has no Linux bridge master and {exc}; set "
                "[netweaver] pif") from exc
        if snap.interface(vif) is None:
            if configured:
                return SwitchPath((configured, vif))
            raise TopologyError(
                f"vif {vif!r} has no master (bridge) and is not an "
                f"interface of Open vSwitch ({snap.source}); set "
                "[netweaver] pif")
    snap = switch.snapshot()
    pif, via, encap = _choose(vif, snap, entry, switch, configured)
    if not links.exists(pif):
        raise TopologyError(
            f"pif {pif!r} of vif {vif!r}, found in Open vSwitch, does not "
            "exist on this host (another namespace?)")
    return SwitchPath((pif, *tail), (via, *tail_via), encap)


# --- target address -------------------------------------------------------

def _port_of(domain, iface):
    for port in domain.ports:
        if iface.interface_id and port.uuid == iface.interface_id:
            return port
        if iface.target and port.uuid and \
                iface.target == 'tap' + port.uuid[:11]:
            return port
    if len(domain.ports) == 1 and len(domain.interfaces) == 1:
        return domain.ports[0]
    return None


def _checked(address, what, iface, domain):
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise TopologyError(
            f"vNIC {iface.target or iface.mac} of domain {domain.name}: "
            f"its {what} {address!r} is not an IP address") from None


# Domains (interfaces) whose address is kept: each vNIC's domain is parsed
# again only when its XML changed (the inspector keeps the DomainInfo), so
# the same pair comes back every cycle; a changed XML is a new key.
ADDRESS_MEMO = 4096


@functools.lru_cache(maxsize=ADDRESS_MEMO)
def target_address(domain, iface):
    """``(address, how)`` to probe ``iface`` at; see the module doc.
    Kept per ``(domain, iface)`` (both frozen: equal ones give the same
    answer), errors excepted.

    :raises TopologyError: no address recorded for the port, or one that
        contradicts the port's fixed IPs or is no address
    """
    port = _port_of(domain, iface)
    fixed = port.addresses if port is not None else ()
    if iface.filter_ip:
        address = _checked(iface.filter_ip, 'filterref IP', iface, domain)
        if fixed and address not in {_checked(a, 'fixed IP', iface, domain)
                                     for a in fixed}:
            raise TopologyError(
                f"vNIC {iface.target or iface.mac} of domain {domain.name}: "
                f"filterref IP {address} is not one of port {port.uuid}'s "
                f"fixed IPs {list(fixed)}")
        return address, 'filterref'
    if fixed:
        return _checked(fixed[0], 'fixed IP', iface, domain), \
            'nova-metadata'
    raise TopologyError(
        f"no address recorded for vNIC {iface.target or iface.mac} of "
        f"domain {domain.name}: no filterref IP parameter and no fixed IP "
        "of its port in the nova metadata (the neighbour table is never "
        "used: a guest answers for any address)")


def resolve(domain, iface, resolver, links, vif_prefixes=VIF_PREFIXES,
            pif=None, switch=None):
    """The :class:`vifpath.VifPath` of one domain interface.

    :param switch: a :class:`SwitchView` for taps on Open vSwitch (None:
        Linux bridge only)
    """
    reason = iface.unmeasurable_reason
    if reason:
        raise NotMeasurable(
            f"vNIC {iface.mac} of domain {domain.name} is {reason}: its "
            "packets never cross a host netdev, so in-host latency is not "
            "measurable")
    vif = resolver.netdev(domain, iface)
    if not links.exists(vif):
        raise TopologyError(
            f"vif {vif!r} of domain {domain.name} does not exist on this "
            "host (gone, or another network namespace)")
    found = find_path(vif, links, switch, vif_prefixes, configured=pif)
    address, how = target_address(domain, iface)
    LOG.debug('vNIC %(vif)s of %(domain)s: path %(path)s (via %(via)s), '
              'address %(addr)s from %(how)s',
              {'vif': vif, 'domain': domain.name,
               'path': found.interfaces, 'via': found.via, 'addr': address,
               'how': how})
    return vifpath.VifPath(vif=vif, address=address,
                           interfaces=found.interfaces, mac=iface.mac,
                           via=found.via, encap=found.encap)
