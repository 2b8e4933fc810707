"""Where a vNIC's probes go: host netdev, address, and path from the pif.

From a libvirt domain (its XML, as Ceilometer's inspector reads it) to
the :class:`VifPath` the rest of the agent passes around:

* **host netdev** of a vNIC: a *vif resolver* (``[netweaver]
  vif_resolver``): ``libvirt`` takes the interface's target dev, ``xen``
  builds ``vif<domid>.<n>``; others plug in through the stevedore
  namespace ``netweaver_agent.vif_resolvers``.
* **pif**: ``[netweaver] pif`` if set, else the one port of the vif's
  master (bridge) that is not itself a vif, read from sysfs
  (``/sys/class/net/<vif>/master``) — or from ``ip -j link`` inside a
  capture namespace, whose sysfs this process cannot see.
* **target address**, in this order: the filterref ``IP`` parameter
  (nova's nwfilter), the fixed IPv4 address of the matching port in the
  nova 1.1 metadata (``<nova:ports>``), the host's neighbour table by MAC.
* vNIC types with no host netdev (vhost-user, SR-IOV hostdev, vDPA,
  macvtap passthrough) are :class:`NotMeasurable`.
"""

import dataclasses
import json
import os
# bandit B405: see parse_domain
from xml.etree import ElementTree  # nosec B405

from oslo_log import log
import stevedore

from netweaver_agent import latency
from netweaver_agent import netns

LOG = log.getLogger(__name__)

RESOLVER_NAMESPACE = 'netweaver_agent.vif_resolvers'
NOVA_NS = ('http://openstack.org/xmlns/libvirt/nova/1.1',
           'http://openstack.org/xmlns/libvirt/nova/1.0')
SYSFS_NET = '/sys/class/net'
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
class VifPath:
    """One vNIC to measure.

    ``interfaces`` are host netdev names in the order a probe crosses
    them: the pif first, the vif (tap) last, bridge ports in between.
    """

    vnic: str
    address: str
    interfaces: tuple
    mac: str | None = None

    def __post_init__(self):
        if len(self.interfaces) < 2:
            raise ValueError(
                f"path of vNIC {self.vnic!r} needs a pif and a vif, got "
                f"{self.interfaces!r}")
        if self.interfaces[-1] != self.vnic:
            raise ValueError(
                f"path of vNIC {self.vnic!r} must end at it, got "
                f"{self.interfaces!r}")

    @property
    def pif(self):
        return self.interfaces[0]

    def spec(self):
        """The :class:`latency.PathSpec` the matcher needs."""
        return latency.PathSpec(vnic=self.vnic, interfaces=self.interfaces)


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
    except Exception as exc:
        raise TopologyError(
            f"no vif resolver {name!r} in {RESOLVER_NAMESPACE}: {exc}"
        ) from exc
    return mgr.driver


# --- links: which netdev is enslaved to which -----------------------------

class SysfsLinks:
    """Netdevs and their masters, read from sysfs (``/sys/class/net``).

    A master's ports are read once per instance (one polling cycle's
    snapshot): listing them is a walk over every netdev of the host.
    """

    def __init__(self, root=SYSFS_NET):
        self.root = root
        self._ports = {}

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


class IpLinks:
    """The same, from ``ip -j link show`` run inside a namespace."""

    def __init__(self, netns_name=None):
        proc = netns.run(['ip', '-j', 'link', 'show'], netns=netns_name)
        try:
            links = json.loads(proc.stdout or '[]')
        except ValueError as exc:
            raise TopologyError(
                f"unreadable 'ip -j link show' output in namespace "
                f"{netns_name}: {exc}") from exc
        self._master = {link['ifname']: link.get('master')
                        for link in links if 'ifname' in link}

    def exists(self, dev):
        return dev in self._master

    def master(self, dev):
        return self._master.get(dev)

    def names(self):
        return sorted(self._master)

    def ports(self, master):
        return [d for d, m in sorted(self._master.items()) if m == master]


def find_pif(vif, links, vif_prefixes=('tap', 'vif', 'vnet', 'macvtap'),
             configured=None):
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
    prefixes = tuple(vif_prefixes)
    ports = [p for p in links.ports(bridge)
             if p != vif and not p.startswith(prefixes)]
    if len(ports) != 1:
        raise TopologyError(
            f"bridge {bridge!r} of vif {vif!r} has "
            f"{'no' if not ports else len(ports)} candidate pif "
            f"{ports!r}; set [netweaver] pif")
    return ports[0]


# --- target address -------------------------------------------------------

def read_neighbours(netns_name=None):
    """``{mac: IPv4 address}`` of the host's neighbour table."""
    proc = netns.run(['ip', '-j', '-4', 'neigh', 'show'], netns=netns_name,
                     check=False)
    try:
        entries = json.loads(proc.stdout or '[]')
    except ValueError:
        return {}
    out = {}
    for entry in entries:
        mac = entry.get('lladdr')
        states = set(entry.get('state') or ())
        if mac and entry.get('dst') and not states & {'FAILED',
                                                      'INCOMPLETE'}:
            out.setdefault(mac.lower(), entry['dst'])
    return out


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


def target_address(domain, iface, neighbours=None):
    """``(address, how)`` to probe ``iface`` at; see the module doc.

    :param neighbours: a callable returning ``{mac: ip}``, called only
        when the first two sources have no address
    """
    if iface.filter_ip:
        return iface.filter_ip, 'filterref'
    port = _port_of(domain, iface)
    if port is not None and port.addresses:
        return port.addresses[0], 'nova-metadata'
    if neighbours is not None and iface.mac:
        found = neighbours().get(iface.mac.lower())
        if found:
            return found, 'neighbours'
    raise TopologyError(
        f"no IPv4 address for vNIC {iface.target or iface.mac} of domain "
        f"{domain.name}: no filterref IP parameter, no fixed address in "
        "the nova metadata ports, no neighbour entry for its MAC")


def resolve(domain, iface, resolver, links, vif_prefixes=('tap', 'vif'),
            pif=None, neighbours=None):
    """The :class:`VifPath` of one domain interface."""
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
    pif_name = find_pif(vif, links, vif_prefixes, configured=pif)
    address, how = target_address(domain, iface, neighbours)
    LOG.debug('vNIC %(vif)s of %(domain)s: pif %(pif)s, address %(addr)s '
              'from %(how)s', {'vif': vif, 'domain': domain.name,
                               'pif': pif_name, 'addr': address,
                               'how': how})
    return VifPath(vnic=vif, address=address, interfaces=(pif_name, vif),
                   mac=iface.mac)
