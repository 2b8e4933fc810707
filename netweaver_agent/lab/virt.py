"""A libvirt ``test:///`` node describing the lab's guests.

libvirt's *test* driver reads a ``<node>`` of ``<domain type='test'>``
from a file and serves it as running domains: Ceilometer's real
``libvirt_metadata`` discovery and ``LibvirtInspector`` then see the lab's
guests as instances, with the lab's tap names, MACs, filterref ``IP``
parameters and nova 1.1 metadata (name, owner, flavor with its id so no
Nova API is called, root image, ports with fixed addresses).

Guest descriptions are anything with ``index``, ``name``, ``uuid``,
``vif``, ``mac`` and ``address`` attributes (e.g. ``spec.LabGuest``).

The interface is what Nova's libvirt driver writes for the layout:
``<interface type='bridge'>`` with the Linux bridge (``brq…``, or the
hybrid plug's ``qbr…``) as source, or, with ``interfaceid`` (the tap
directly on Open vSwitch: native firewall, OVN), source bridge
``br-int`` and ``<virtualport type='openvswitch'>`` carrying the Neutron
port id.
"""

import dataclasses
import hashlib
import os
import uuid as uuidlib
# bandit B405: builds the lab's XML, parses none
from xml.etree import ElementTree  # nosec B405

NOVA_NS = 'http://openstack.org/xmlns/libvirt/nova/1.1'
DEFAULT_USER_ID = '5b9c6a1f2d6e4c0e9d1e3a7b8c9d0e1f'
DEFAULT_PROJECT_ID = '8f0d2c4b6a8e4f10b2d4c6e8f0a2b4c6'
DEFAULT_FLAVOR_ID = '6a1c0f4e-5b8d-4c2a-9e7f-1d3b5a7c9e0f'
DEFAULT_IMAGE_ID = 'a2c4e6f8-1b3d-4f5a-8c7e-9d0b2f4a6c8e'

ElementTree.register_namespace('nova', NOVA_NS)


@dataclasses.dataclass(frozen=True, slots=True)
class GuestDomain:
    """What the node XML says about one guest."""

    index: int
    name: str
    uuid: str
    vif: str           # host netdev, the <target dev=...>
    mac: str
    address: str
    bridge: str | None = None
    # Open vSwitch port: the Neutron port id in <virtualport>.
    interfaceid: str | None = None
    filterref: bool = True
    port_uuid: str | None = None
    domain: str | None = None
    # 'hostdev' describes an SR-IOV VF instead of a tap (not measurable).
    interface_type: str = 'bridge'
    user_id: str = DEFAULT_USER_ID
    project_id: str = DEFAULT_PROJECT_ID

    @property
    def domain_name(self):
        """The libvirt domain name (default: nova's, from the index)."""
        return self.domain or f'instance-{self.index + 1:08x}'

    @property
    def port_id(self):
        """The neutron-like port uuid of the guest's one vNIC.

        ``port_uuid`` if given, else a stable one derived from uuid and MAC.
        """
        if self.port_uuid:
            return self.port_uuid
        digest = hashlib.sha256(f'{self.uuid}/{self.mac}'.encode()).digest()
        return str(uuidlib.UUID(bytes=digest[:16], version=4))

    @property
    def filter_name(self):
        """The nwfilter name nova would give (Ceilometer's resource id)."""
        return f"nova-instance-{self.domain_name}-{self.mac.replace(':', '')}"

    @classmethod
    def from_guest(cls, guest, **overrides):
        """From a ``spec.LabGuest`` (or alike).

        Its ``name`` is the libvirt domain name; the nova display name
        becomes ``lab-guest-<index>``; ``port_id``, if any, is the port.
        """
        fields = {f: getattr(guest, f)
                  for f in ('index', 'uuid', 'vif', 'mac', 'address')}
        fields.update(name=f'lab-guest-{guest.index}', domain=guest.name,
                      port_uuid=getattr(guest, 'port_id', None))
        fields.update(overrides)
        return cls(**fields)


def _sub(parent, tag, text=None, **attrs):
    elem = ElementTree.SubElement(parent, tag, {k.rstrip('_'): str(v)
                                                for k, v in attrs.items()})
    if text is not None:
        elem.text = str(text)
    return elem


def _nova(tag):
    return f'{{{NOVA_NS}}}{tag}'


def domain_element(guest):
    """The ``<domain type='test'>`` element of one :class:`GuestDomain`."""
    dom = ElementTree.Element('domain', {'type': 'test'})
    _sub(dom, 'name', guest.domain_name)
    _sub(dom, 'uuid', guest.uuid)
    meta = _sub(_sub(dom, 'metadata'), _nova('instance'))
    _sub(meta, _nova('package'), version='27.0.0')
    _sub(meta, _nova('name'), guest.name)
    _sub(meta, _nova('creationTime'), '2026-11-23 12:00:00')
    flavor = _sub(meta, _nova('flavor'), name='lab.tiny',
                  id=DEFAULT_FLAVOR_ID)
    for tag, value in (('memory', 128), ('disk', 1), ('swap', 0),
                       ('ephemeral', 0), ('vcpus', 1)):
        _sub(flavor, _nova(tag), value)
    owner = _sub(meta, _nova('owner'))
    _sub(owner, _nova('user'), 'lab-user', uuid=guest.user_id)
    _sub(owner, _nova('project'), 'lab-project', uuid=guest.project_id)
    _sub(meta, _nova('root'), type_='image', uuid=DEFAULT_IMAGE_ID)
    port = _sub(_sub(meta, _nova('ports')), _nova('port'),
                uuid=guest.port_id)
    _sub(port, _nova('ip'), type_='fixed', address=guest.address,
         ipVersion=4)
    _sub(dom, 'memory', 131072, unit='KiB')
    _sub(dom, 'vcpu', 1)
    _sub(_sub(dom, 'os'), 'type', 'hvm', arch='x86_64')
    devices = _sub(dom, 'devices')
    if guest.interface_type == 'hostdev':
        iface = _sub(devices, 'interface', type_='hostdev', managed='yes')
        _sub(iface, 'mac', address=guest.mac)
        _sub(_sub(iface, 'source'), 'address', type_='pci',
             domain='0x0000', bus='0x03', slot='0x10',
             function=f'0x{guest.index % 8:x}')
        return dom
    iface = _sub(devices, 'interface',
                 type_='bridge' if guest.bridge else 'ethernet')
    _sub(iface, 'mac', address=guest.mac)
    if guest.bridge:
        _sub(iface, 'source', bridge=guest.bridge)
    if guest.interfaceid:
        vport = _sub(iface, 'virtualport', type_='openvswitch')
        _sub(vport, 'parameters', interfaceid=guest.interfaceid)
    _sub(iface, 'target', dev=guest.vif)
    _sub(iface, 'model', type_='virtio')
    if guest.filterref:
        fref = _sub(iface, 'filterref', filter=guest.filter_name)
        _sub(fref, 'parameter', name='IP', value=guest.address)
    return dom


def node_xml(guests):
    """The ``<node>`` XML text for a sequence of :class:`GuestDomain`."""
    node = ElementTree.Element('node')
    for guest in guests:
        node.append(domain_element(guest))
    ElementTree.indent(node)
    return ElementTree.tostring(node, encoding='unicode')


def write_node(path, guests):
    """Write the node XML to ``path``; returns the ``test:///`` URI."""
    path = os.path.abspath(path)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(node_xml(guests))
    return uri(path)


def uri(path):
    """The libvirt URI of a test-driver node file."""
    return 'test://' + os.path.abspath(path)
