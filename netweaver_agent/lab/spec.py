"""What a lab is: its spec, the truth to inject, and every name it uses.

A :class:`LabSpec` is pure data, checked when made: namespace names
(``<prefix>src``, ``<prefix>hv``, ``<prefix>g<i>``, ``<prefix>mgmt``),
addresses (198.18.0.0/15 only; 2001:2::/48 for IPv6), MACs and the
Neutron/Nova-like uuids and device names derive from its prefix, so the
same spec always names the same lab.  Guest ``i`` is host ``10 + i`` of
the lab network: 198.18.0.0/24 holds 245 guests; more need a larger
network (``network=None``, the default, picks the smallest
198.18.0.0/N that holds them: :func:`network_for`), up to what the
switch takes (:func:`max_guests`: 1,022 on the Linux bridge).
:class:`DelayInjection` and :class:`LossInjection` are the truth a lab
injects (see :mod:`netweaver_agent.lab.build`); :data:`SWITCHES` names
the switch layouts, imported lazily by :func:`layout_class`.
"""

import dataclasses
import hashlib
import importlib
import ipaddress
import re
import uuid

from netweaver_agent.core import probe
from netweaver_agent.lab import delayer

LAB_NET = ipaddress.ip_network('198.18.0.0/15')
# RFC 5180's IPv6 benchmarking range: never routed outside a lab.
LAB_NET6 = ipaddress.ip_network('2001:2::/48')
VXLAN_DEV_PREFIX = 'vxlan-'
IFNAMSIZ = 15
FIRST_GUEST_HOST = 10
# The lab network of up to 245 guests; larger ones grow from its start.
DEFAULT_NETWORK = ipaddress.ip_network('198.18.0.0/24')
# Guests per lab by switch.  A Linux bridge takes at most 1,023 ports
# (the kernel's BR_MAX_PORTS 1024, port 0 reserved), one of which is the
# pif (or vxlan-<VNI>).  The Open vSwitch and OVN layouts (userspace
# datapath, two or three ports and a qbr bridge per guest on ovs-hybrid)
# were never built with more than 250.
MAX_GUESTS = {'linuxbridge': 1022}
DEFAULT_MAX_GUESTS = 250
_PREFIX_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$')
_LAB_UUID_NS = uuid.UUID('5d0f3c52-1f5e-4d8e-9f3a-6e6574776561')
DELAY_BACKENDS = ('auto', 'netem', 'nfqueue')
NETWORK_TYPES = ('flat', 'vlan', 'vxlan', 'geneve')
DEFAULT_VLAN_ID = 100
DEFAULT_VNI = 4242
# ``--switch`` name -> 'module:Class' of its switch.SwitchLayout,
# imported when a lab (or spec) of that switch is made.
SWITCHES = {
    'linuxbridge': 'netweaver_agent.lab.linuxbridge:LinuxBridgeLayout',
    'ovs-hybrid': 'netweaver_agent.lab.ovs:OvsHybridLayout',
    'ovs-native': 'netweaver_agent.lab.ovs:OvsNativeLayout',
    'ovn': 'netweaver_agent.lab.ovn:OvnLayout',
}


def layout_class(switch):
    """The :class:`netweaver_agent.lab.switch.SwitchLayout` subclass of
    ``switch``."""
    if switch not in SWITCHES:
        raise ValueError(f"unknown lab switch {switch!r}; expected one of "
                         f"{', '.join(SWITCHES)}")
    module, _, cls = SWITCHES[switch].partition(':')
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"lab switch {switch!r} is not available "
                         f"({SWITCHES[switch]}): {exc}") from exc


def max_guests(switch):
    """The most guests a lab on ``switch`` may have."""
    return MAX_GUESTS.get(switch, DEFAULT_MAX_GUESTS)


def guest_capacity(network):
    """How many guests an IPv4 lab network holds (guest ``i`` is host
    ``10 + i``; the broadcast address stays free)."""
    return max(network.num_addresses - FIRST_GUEST_HOST - 1, 0)


def network_for(guests):
    """The lab network (text) of ``guests`` guests: 198.18.0.0/24, or the
    smallest 198.18.0.0/N that holds them (/22 for 1,000)."""
    net = DEFAULT_NETWORK
    while guest_capacity(net) < guests and net.prefixlen > 17:
        net = net.supernet()
    return str(net)


def _check_ifname(name, what):
    if not name or len(name) > IFNAMSIZ or '/' in name or ' ' in name:
        raise ValueError(f"{what} name {name!r} is not a valid interface "
                         f"name (1..{IFNAMSIZ} characters, no '/' or space)")


def _check_protocol(protocol):
    if protocol is not None and protocol not in probe.PROTOCOLS:
        raise ValueError(f"unknown probe protocol {protocol!r}; expected "
                         f"one of {', '.join(probe.PROTOCOLS)} or None")


@dataclasses.dataclass(frozen=True, slots=True)
class DelayInjection:
    """Hold every probe bound to guest ``guest`` for ``delay_ms``.

    ``protocol`` restricts it to one probe protocol (None: all IPv4 to the
    guest); ``backend`` is ``auto`` (netem if the kernel has it, else
    nfqueue), ``netem`` or ``nfqueue``.  ``record``: what the delayer
    (NFQUEUE, or ovs-native's OpenFlow controller) records of each
    packet, ``'probe'`` (its probe identity) or ``'passive'`` (its passive
    key, for the guest's own traffic).
    """

    guest: int
    delay_ms: float
    protocol: str | None = None
    backend: str = 'auto'
    record: str = 'probe'

    def __post_init__(self):
        if not 0 < self.delay_ms <= 10000:
            raise ValueError(f"injected delay {self.delay_ms!r} ms is not "
                             "within (0, 10000]")
        if self.backend not in DELAY_BACKENDS:
            raise ValueError(f"unknown delay backend {self.backend!r}; "
                             f"expected one of {', '.join(DELAY_BACKENDS)}")
        _check_protocol(self.protocol)
        if self.record not in delayer.KEYS:
            raise ValueError(f"delay record {self.record!r}: expected one "
                             f"of {', '.join(delayer.KEYS)}")


@dataclasses.dataclass(frozen=True, slots=True)
class LossInjection:
    """Drop every ``every``-th probe bound to guest ``guest``.

    The 1st to (N-1)th pass, the Nth is dropped, and so on: a window of
    ``k * every`` probes loses exactly ``k`` of them.
    """

    guest: int
    every: int
    protocol: str | None = None

    def __post_init__(self):
        if not 2 <= self.every <= 1_000_000:
            raise ValueError(f"loss every {self.every!r} probes is not "
                             "within 2..1000000")
        _check_protocol(self.protocol)

    @property
    def loss_pct(self):
        return 100.0 / self.every


@dataclasses.dataclass(frozen=True, slots=True)
class LabSpec:
    """What to build.  Namespaces are named ``<prefix>src`` and so on."""

    prefix: str
    guests: int = 2
    pif: str = 'eth1'
    # None: network_for(guests), 198.18.0.0/24 up to 245 guests.
    network: str | None = None
    delays: tuple = ()
    losses: tuple = ()
    mgmt: bool = False
    mgmt_network: str = '198.19.0.0/24'
    # Keep the lab's processes alive after the building process ends
    # (``netweaver lab --keep``); else they end with it.
    persistent: bool = False
    ipv6: bool = False
    network6: str = '2001:2::/64'
    vxlan_vni: int | None = None
    underlay: str = '198.18.254.0/24'
    # What sits between the pif and the taps: a key of SWITCHES.
    switch: str = 'linuxbridge'
    # flat, vlan, vxlan or geneve (None: vxlan with vxlan_vni, else the
    # switch's default: its first network type, flat but for ovn).
    network_type: str | None = None
    # The VLAN id (vlan) or VNI (vxlan, geneve); None: vxlan_vni or a
    # default.  ``vxlan_vni`` is set to it for vxlan.
    segmentation_id: int | None = None

    def __post_init__(self):
        if not _PREFIX_RE.match(self.prefix or ''):
            raise ValueError(
                f"lab prefix {self.prefix!r} must be 1..40 characters of "
                "letters, digits, '_', '.', '-', starting with a letter or "
                "digit")
        _check_ifname(self.pif, 'pif')
        self._check_guests()
        if self.ipv6:
            net6 = self._net(self.network6, 'lab IPv6 network', LAB_NET6, 120)
            if net6.num_addresses - FIRST_GUEST_HOST - 1 < self.guests:
                raise ValueError(f"lab network {net6} is too small for "
                                 f"{self.guests} guests")
        self._check_network_type()
        if self.tunnelled and self.mgmt:
            under = self._net(self.underlay, 'underlay network')
            mnet = self._net(self.mgmt_network, 'management network')
            if under.overlaps(mnet):
                raise ValueError(f"underlay network {under} overlaps the "
                                 f"management network {mnet}")
        object.__setattr__(self, 'delays', tuple(self.delays))
        object.__setattr__(self, 'losses', tuple(self.losses))
        seen = set()
        for inj in self.delays + self.losses:
            if not isinstance(inj, (DelayInjection, LossInjection)):
                raise TypeError(f"lab injection {inj!r} is neither a "
                                "DelayInjection nor a LossInjection")
            if not 0 <= inj.guest < self.guests:
                raise ValueError(f"injection {inj!r} names guest "
                                 f"{inj.guest}; the lab has guests "
                                 f"0..{self.guests - 1}")
            if isinstance(inj, DelayInjection):
                if inj.guest in seen:
                    raise ValueError(f"guest {inj.guest} has two delays")
                seen.add(inj.guest)

    def _check_guests(self):
        """Check ``guests`` against the switch and the lab network (made
        from it when None)."""
        if not isinstance(self.guests, int) or isinstance(self.guests, bool):
            raise ValueError(f"lab guests {self.guests!r} is not a number")
        cap = max_guests(self.switch)
        if not 1 <= self.guests <= cap:
            raise ValueError(
                f"lab guests {self.guests!r} must be within 1..{cap} on "
                f"lab switch {self.switch!r}")
        if self.network is None:
            object.__setattr__(self, 'network', network_for(self.guests))
        net = self._net(self.network, 'lab network')
        # The underlay and management networks stay free whether this
        # lab uses them or not: a larger lab network must not grow into
        # them (198.18.254.0/24 and 198.19.0.0/24 by default).
        for text, what in ((self.underlay, 'underlay network'),
                           (self.mgmt_network, 'management network')):
            other = self._net(text, what)
            if other.overlaps(net):
                raise ValueError(
                    f"lab network {net} overlaps the {what} {other}; "
                    f"choose a lab network that leaves it free (e.g. "
                    f"{network_for(self.guests)} for {self.guests} "
                    "guests)")
        if guest_capacity(net) < self.guests:
            raise ValueError(
                f"lab guests {self.guests!r} do not fit lab network {net} "
                f"(it holds {guest_capacity(net)}: guest i is host "
                f"{FIRST_GUEST_HOST} + i); use a larger network, e.g. "
                f"{network_for(self.guests)}, or leave network unset")

    def _check_network_type(self):
        ntype = self.network_type
        if ntype is None:
            # vxlan with vxlan_vni, else the layout's first (its default).
            ntype = ('vxlan' if self.vxlan_vni is not None
                     else layout_class(self.switch).network_types[0])
        if ntype not in NETWORK_TYPES:
            raise ValueError(f"unknown lab network type {ntype!r}; expected "
                             f"one of {', '.join(NETWORK_TYPES)}")
        if self.vxlan_vni is not None:
            if ntype != 'vxlan':
                raise ValueError(f"vxlan_vni {self.vxlan_vni!r} given for a "
                                 f"{ntype} network")
            if self.segmentation_id not in (None, self.vxlan_vni):
                raise ValueError(f"vxlan_vni {self.vxlan_vni!r} and "
                                 f"segmentation_id {self.segmentation_id!r} "
                                 "differ")
        seg = self.segmentation_id
        if seg is None and self.vxlan_vni is not None:
            seg = self.vxlan_vni
        if ntype == 'flat':
            if seg is not None:
                raise ValueError(f"segmentation id {seg!r} given for a flat "
                                 "network")
        elif ntype == 'vlan':
            seg = DEFAULT_VLAN_ID if seg is None else seg
            if not 1 <= seg <= 4094:
                raise ValueError(f"VLAN id {seg!r} is not within 1..4094")
        else:
            seg = DEFAULT_VNI if seg is None else seg
            if not 1 <= seg <= 0xffffff:
                raise ValueError(f"{ntype.upper()} VNI {seg!r} is not within "
                                 "1..16777215")
        layout = layout_class(self.switch)
        if ntype not in layout.network_types:
            raise ValueError(
                f"lab switch {self.switch!r} builds no {ntype} network "
                f"(it builds {', '.join(layout.network_types)})")
        object.__setattr__(self, 'network_type', ntype)
        object.__setattr__(self, 'segmentation_id', seg)
        if ntype == 'vxlan':
            object.__setattr__(self, 'vxlan_vni', seg)

    @property
    def tunnelled(self):
        """Whether the guests' network is an overlay over the underlay."""
        return self.network_type in ('vxlan', 'geneve')

    @staticmethod
    def _net(text, what, within=LAB_NET, longest=28):
        """``text`` as a network inside ``within`` (the lab's IPv4 or
        IPv6 range), a /``longest`` or larger."""
        try:
            net = ipaddress.ip_network(text)
        except ValueError as exc:
            raise ValueError(f"{what} {text!r}: {exc}") from exc
        if (net.version != within.version or not net.subnet_of(within)
                or net.prefixlen > longest):
            raise ValueError(f"{what} {net} must be a /{longest} or larger "
                             f"inside {within}")
        return net

    # -- names ---------------------------------------------------------------

    def _uuid(self, what):
        return uuid.uuid5(_LAB_UUID_NS, f'{self.prefix}/{what}')

    @property
    def src_netns(self):
        return f'{self.prefix}src'

    @property
    def hv_netns(self):
        return f'{self.prefix}hv'

    @property
    def mgmt_netns(self):
        return f'{self.prefix}mgmt' if self.mgmt else None

    def guest_netns(self, index):
        return f'{self.prefix}g{index}'

    @property
    def network_id(self):
        """The Neutron-like network uuid of the lab's provider network."""
        return str(self._uuid('network'))

    @property
    def bridge(self):
        """``brq`` + 11 characters of the network id (linuxbridge agent)."""
        return 'brq' + self.network_id[:11]

    @property
    def prefixlen(self):
        return ipaddress.ip_network(self.network).prefixlen

    @property
    def src_address(self):
        return str(ipaddress.ip_network(self.network)[1])

    @property
    def src_mac(self):
        return _mac('02:00:c6', self.prefix, 'src')

    @property
    def src_address6(self):
        return str(ipaddress.IPv6Network(self.network6)[1]) \
            if self.ipv6 else None

    @property
    def prefixlen6(self):
        return ipaddress.IPv6Network(self.network6).prefixlen

    @property
    def vxlan_dev(self):
        """The Linux bridge's VXLAN port (Neutron's linuxbridge name)."""
        if self.network_type != 'vxlan':
            return None
        return f'{VXLAN_DEV_PREFIX}{self.vxlan_vni}'

    def underlay_addresses(self):
        """``(source, hypervisor, prefixlen)`` on the underlay, or None."""
        if not self.tunnelled:
            return None
        net = ipaddress.ip_network(self.underlay)
        return str(net[1]), str(net[2]), net.prefixlen

    @property
    def src_underlay_mac(self):
        return _mac('02:00:c6', self.prefix, 'src-underlay')

    @property
    def pif_mac(self):
        return _mac('02:00:c6', self.prefix, 'pif')

    def guest(self, index):
        """The :class:`LabGuest` number ``index``."""
        if not 0 <= index < self.guests:
            raise IndexError(
                f"lab has no guest {index} (0..{self.guests - 1})")
        port = str(self._uuid(f'port{index}'))
        mac = _mac('fa:16:3e', self.prefix, 'guests', last=index)
        return LabGuest(
            index=index, name=f'instance-{index + 1:08x}',
            uuid=str(self._uuid(f'guest{index}')),
            netns=self.guest_netns(index),
            vif='tap' + port[:11], port_id=port, mac=mac,
            vif_mac='fe' + mac[2:],
            address=str(ipaddress.ip_network(self.network)[
                FIRST_GUEST_HOST + index]),
            prefixlen=self.prefixlen,
            address6=str(ipaddress.IPv6Network(self.network6)[
                FIRST_GUEST_HOST + index]) if self.ipv6 else None)

    def mgmt_addresses(self):
        """:class:`MgmtAddresses` of the management network, or None."""
        if not self.mgmt:
            return None
        net = ipaddress.ip_network(self.mgmt_network)
        return MgmtAddresses(mgmt=str(net[1]), src=str(net[2]),
                             hv=str(net[3]), prefixlen=net.prefixlen)

    def namespaces(self):
        """Every namespace name the lab makes, in building order."""
        names = [self.src_netns, self.hv_netns]
        names += [self.guest_netns(i) for i in range(self.guests)]
        if self.mgmt:
            names.append(self.mgmt_netns)
        return names


def _mac(oui, prefix, what, last=None):
    """``oui`` and three bytes of the prefix's digest; with ``last`` (a
    guest index, < 65536) its low byte last and its high byte added to
    the middle one, so guests 0..255 keep their MACs and no two of a lab
    share one."""
    digest = hashlib.sha256(f'{prefix}/{what}'.encode()).digest()
    if last is None:
        tail = [digest[0], digest[1], digest[2]]
    else:
        tail = [digest[0], (digest[1] + (last >> 8)) & 0xff, last & 0xff]
    return oui + ''.join(f':{b:02x}' for b in tail)


@dataclasses.dataclass(frozen=True, slots=True)
class LabGuest:
    """One guest: what nova and libvirt would know about it."""

    index: int
    name: str          # libvirt domain name, ``instance-0000000N``
    uuid: str          # instance uuid
    netns: str
    vif: str           # host netdev (``tap`` + 11 chars of the port id)
    port_id: str       # Neutron-like port uuid
    mac: str           # the guest's MAC (``fa:16:3e:...``)
    vif_mac: str       # the vif's MAC (``fe:16:3e:...``, as libvirt sets)
    address: str
    prefixlen: int = 24
    address6: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class MgmtAddresses:
    """Addresses on the management network of a lab built with mgmt."""

    mgmt: str
    src: str
    hv: str
    prefixlen: int = 24
