"""The network-namespace lab: a compute host in miniature, with known truth.

Namespaces (all named ``<prefix>...``):

* ``<prefix>src``: the probe source on the physical network, ``eth0``
  198.18.0.1/24;
* ``<prefix>hv``: the compute host: the pif (a veth whose peer is the
  source's ``eth0``), a Linux bridge named as Neutron's linuxbridge agent
  names them (``brq`` + network id), and one nova-like ``tap<port id>``
  per guest;
* ``<prefix>g<i>``: guest ``i``, ``eth0`` 198.18.0.(10+i)/24 with an
  ``fa:16:3e`` MAC (the tap carries the same MAC with ``fe``, as libvirt
  does).  The guest kernel answers ICMP echo, UDP to a closed port (ICMP
  port unreachable, rate-limited as the kernel does by default) and TCP
  SYN (RST);
* ``<prefix>mgmt`` (``mgmt=True``): a management network 198.19.0.0/24,
  bridged to ``mgmt0`` in the source (.2) and the hypervisor (.3); the
  management namespace itself is .1.

Options:

* ``ipv6=True``: the source and the guests also get IPv6 addresses in
  ``network6`` (inside the benchmarking range 2001:2::/48, RFC 5180:
  never routed anywhere), source ``::1``, guest ``i`` ``::(10+i)`` (hex),
  static neighbours, no DAD, router solicitations or autoconfiguration;
  :meth:`Lab.paths` ``(ipv6=True)`` gives the guests' IPv6 addresses.
  Injected delay and loss apply to both families.  Without it IPv6 is
  off in every namespace.
* ``vxlan_vni=N``: the guests' network is a VXLAN overlay over the pif,
  as Neutron's linuxbridge agent builds it: the pif is no bridge port but
  the underlay (``underlay``, hypervisor .2, source .1), and
  ``vxlan-<N>`` (UDP port 4789 over the pif) is the bridge's port.  The
  source's ``vx0`` encapsulates; its ``eth0`` is the underlay.  Paths
  are pif → ``vxlan-<N>`` → tap.
* :meth:`Lab.vlan_source`: a probe source writing whole 802.1Q-tagged
  frames on the source's ``eth0`` (the kernel here has no 802.1Q module,
  so no VLAN device can tag them).  The bridge is VLAN-unaware: the
  guests do not answer tagged probes; the pif and tap sightings are
  what such a window measures.

Neighbour entries and bridge forwarding entries are static, so no ARP
and no flooding disturb a window.

``switch`` chooses what sits between the pif and the taps, a
:class:`labswitch.SwitchLayout` found by name in :data:`SWITCHES` and
imported lazily: ``linuxbridge`` (the default, described here and in
:mod:`netweaver_agent.lab.linuxbridge`), ``ovs-hybrid`` and ``ovs-native``
(:mod:`netweaver_agent.lab.ovs`), ``ovn``.  ``network_type`` is ``flat``,
``vlan``, ``vxlan`` or ``geneve`` as the layout allows, with
``segmentation_id`` its VLAN id or VNI (``vxlan_vni=N`` is the same as
``network_type='vxlan', segmentation_id=N``).  The layout builds the
hypervisor's switch and the source's side of the physical network, gives
the paths and the probe source, and injects the truth it can
(:meth:`Lab.truth`).

On the Linux bridge, truth is injected after the pif, for probes bound to one
guest (``-m physdev --physdev-out <tap> -d <address>``):

* delay: ``tc netem`` on the tap where the kernel has it; else an
  NFQUEUE rule and a :mod:`netweaver_agent.lab.delayer` process in the
  hypervisor's namespace, which records each hold (see
  :meth:`Lab.delay_records`);
* loss: ``-m statistic --mode nth --every N --packet N-1 -j DROP``: the
  Nth, 2Nth... probe to that guest is dropped (``--packet 0`` would drop
  the 1st, N+1th...).

Only addresses in 198.18.0.0/15 are used.  :meth:`Lab.build` first
removes a lab left with the same prefix; :meth:`Lab.teardown` removes
everything, tolerates partial builds and ends the processes the lab
started (and any other process left inside its namespaces).  A kept lab
is described by a state file under ``/run/netweaver-lab/<prefix>/`` so
:func:`teardown_kept` (``netweaver lab down``) removes it later.
"""

import dataclasses
import hashlib
import importlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
# bandit B404: argument lists only (netns.run style), never a shell
import subprocess  # nosec B404
import sys
import time
import uuid

from oslo_log import log

from netweaver_agent.core import netns
from netweaver_agent.core import probe
from netweaver_agent.lab import delayer
from netweaver_agent.lab import switch as labswitch

LOG = log.getLogger(__name__)

LAB_NET = ipaddress.ip_network('198.18.0.0/15')
# RFC 5180's IPv6 benchmarking range: never routed outside a lab.
LAB_NET6 = ipaddress.ip_network('2001:2::/48')
VXLAN_PORT = labswitch.VXLAN_PORT
GENEVE_PORT = labswitch.GENEVE_PORT
VXLAN_DEV_PREFIX = 'vxlan-'
STATE_ROOT = '/run/netweaver-lab'
STATE_FILE = 'state.json'
IFNAMSIZ = 15
FIRST_GUEST_HOST = 10
DELAYER_READY_TIMEOUT_S = 20.0
KILL_GRACE_S = 3.0
_PREFIX_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$')
_LAB_UUID_NS = uuid.UUID('5d0f3c52-1f5e-4d8e-9f3a-6e6574776561')
DELAY_BACKENDS = ('auto', 'netem', 'nfqueue')
NETWORK_TYPES = ('flat', 'vlan', 'vxlan', 'geneve')
DEFAULT_VLAN_ID = 100
DEFAULT_VNI = 4242
# ``--switch`` name -> 'module:Class' of its labswitch.SwitchLayout,
# imported when a lab (or spec) of that switch is made.
SWITCHES = {
    'linuxbridge': 'netweaver_agent.lab.linuxbridge:LinuxBridgeLayout',
    'ovs-hybrid': 'netweaver_agent.lab.ovs:OvsHybridLayout',
    'ovs-native': 'netweaver_agent.lab.ovs:OvsNativeLayout',
    'ovn': 'netweaver_agent.lab.ovn:OvnLayout',
}

LabError = labswitch.LabError
ActiveDelay = labswitch.ActiveDelay


def layout_class(switch):
    """The :class:`labswitch.SwitchLayout` subclass of ``switch``."""
    if switch not in SWITCHES:
        raise ValueError(f"unknown lab switch {switch!r}; expected one of "
                         f"{', '.join(SWITCHES)}")
    module, _, cls = SWITCHES[switch].partition(':')
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"lab switch {switch!r} is not available "
                         f"({SWITCHES[switch]}): {exc}") from exc


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
    nfqueue), ``netem`` or ``nfqueue``.  ``record``: what the NFQUEUE
    delayer records of each packet, ``'probe'`` (its probe identity) or
    ``'passive'`` (its passive key, for the guest's own traffic).
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
    network: str = '198.18.0.0/24'
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
        net = self._net(self.network, 'lab network')
        most = net.num_addresses - FIRST_GUEST_HOST - 1
        if not 1 <= self.guests <= min(most, 250):
            raise ValueError(f"lab guests {self.guests!r} must be within "
                             f"1..{min(most, 250)} for network {net}")
        if self.mgmt:
            mnet = self._net(self.mgmt_network, 'management network')
            if mnet.overlaps(net):
                raise ValueError(f"management network {mnet} overlaps the "
                                 f"lab network {net}")
        if self.ipv6:
            net6 = self._net6(self.network6)
            if net6.num_addresses - FIRST_GUEST_HOST - 1 < self.guests:
                raise ValueError(f"lab network {net6} is too small for "
                                 f"{self.guests} guests")
        self._check_network_type()
        if self.tunnelled:
            under = self._net(self.underlay, 'underlay network')
            others = [net] + ([self._net(self.mgmt_network, '')]
                              if self.mgmt else [])
            if any(under.overlaps(o) for o in others):
                raise ValueError(f"underlay network {under} overlaps the "
                                 "lab or management network")
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
    def _net(text, what):
        try:
            net = ipaddress.ip_network(text)
        except ValueError as exc:
            raise ValueError(f"{what} {text!r}: {exc}") from exc
        if not net.subnet_of(LAB_NET) or net.prefixlen > 28:
            raise ValueError(f"{what} {net} must be a /28 or larger inside "
                             f"{LAB_NET}")
        return net

    @staticmethod
    def _net6(text):
        try:
            net = ipaddress.IPv6Network(text)
        except ValueError as exc:
            raise ValueError(f"lab IPv6 network {text!r}: {exc}") from exc
        if not net.subnet_of(LAB_NET6) or net.prefixlen > 120:
            raise ValueError(f"lab IPv6 network {net} must be a /120 or "
                             f"larger inside {LAB_NET6} (RFC 5180)")
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
            tap='tap' + port[:11], port_id=port, mac=mac,
            tap_mac='fe' + mac[2:],
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
    digest = hashlib.sha256(f'{prefix}/{what}'.encode()).digest()
    tail = [digest[0], digest[1], digest[2] if last is None else last & 0xff]
    return oui + ''.join(f':{b:02x}' for b in tail)


@dataclasses.dataclass(frozen=True, slots=True)
class LabGuest:
    """One guest: what nova and libvirt would know about it."""

    index: int
    name: str          # libvirt domain name, ``instance-0000000N``
    uuid: str          # instance uuid
    netns: str
    tap: str           # host netdev (``tap`` + 11 chars of the port id)
    port_id: str       # Neutron-like port uuid
    mac: str           # the guest's MAC (``fa:16:3e:...``)
    tap_mac: str       # the tap's MAC (``fe:16:3e:...``, as libvirt sets)
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


# -- kept labs --------------------------------------------------------------

def state_dir(prefix):
    return os.path.join(STATE_ROOT, prefix)


def _write_json(path, data):
    tmp = f'{path}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _read_state(prefix):
    path = os.path.join(state_dir(prefix), STATE_FILE)
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read lab state {path!r}: {exc}") from exc


def kept_prefixes():
    """Prefixes of kept labs: built persistent, or whose builder is gone.

    Labs that a live process built for itself (a test, a ``netweaver lab``
    run) are not listed: they are that process's to remove.
    """
    try:
        entries = sorted(os.listdir(STATE_ROOT))
    except FileNotFoundError:
        return []
    kept = []
    for prefix in entries:
        try:
            state = _read_state(prefix)
        except LabError as exc:
            LOG.warning('%s', exc)
            continue
        if state is None:
            continue
        owner = state.get('owner_pid')
        if state.get('persistent') or not owner or not _alive(owner):
            kept.append(prefix)
    return kept


def teardown_kept(prefix=None):
    """Remove the lab ``prefix``, or (None) every kept lab.

    Returns the prefixes of labs found and removed.  A prefix with no
    state file is still cleared of the namespaces a lab with that prefix
    would have made.
    """
    prefixes = [prefix] if prefix else kept_prefixes()
    done = []
    for p in prefixes:
        state = _read_state(p)
        found = state is not None or bool(_stale_names(p, ()))
        state = state or {}
        _remove(p, state.get('namespaces', ()), state.get('pids', ()))
        if found:
            done.append(p)
    return done


# -- commands ---------------------------------------------------------------

_ip_batch = labswitch.ip_batch
_sysctl = labswitch.sysctl


def _existing_netns():
    try:
        return set(os.listdir(netns.NETNS_RUN_DIR))
    except FileNotFoundError:
        return set()


def _stale_names(prefix, names):
    """Namespaces a lab with ``prefix`` may have left, present now."""
    pattern = re.compile(re.escape(prefix) + r'(src|hv|mgmt|g\d+)$')
    return sorted({n for n in _existing_netns()
                   if pattern.match(n) or n in names})


# Whether a pid is a live (not zombie) process: the layouts' check.
_alive = labswitch._alive


def _cmdline(pid):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().split(b'\0')
    except OSError:
        return []


def _kill(pids, what):
    """SIGTERM ``pids``, then SIGKILL those still there after a grace."""
    pids = [p for p in pids if p not in _protected_pids()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + KILL_GRACE_S
    left = list(pids)
    while left and time.monotonic() < end:
        for pid in left:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        left = [p for p in left if _alive(p)]
        if left:
            time.sleep(0.02)
    for pid in left:
        LOG.warning('Lab %(what)s process %(pid)d ignored SIGTERM; killing',
                    {'what': what, 'pid': pid})
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _protected_pids():
    """This process and its ancestors: never killed by a teardown."""
    pids = set()
    pid = os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            with open(f'/proc/{pid}/stat', encoding='ascii') as f:
                pid = int(f.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _netns_pids(name):
    proc = netns.run(['ip', 'netns', 'pids', name], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _remove(prefix, namespaces, pids):
    """Kill the lab's processes and delete its namespaces; check."""
    errors = []
    own = []
    for entry in pids:
        pid, marker = entry['pid'], entry.get('marker', '')
        if _alive(pid) and marker.encode() in _cmdline(pid):
            own.append(pid)
    _kill(own, 'delayer')
    names = _stale_names(prefix, set(namespaces))
    strays = sorted({pid for n in names for pid in _netns_pids(n)})
    if strays:
        LOG.warning('Lab %(prefix)s: ending processes left in its '
                    'namespaces: %(pids)s', {'prefix': prefix,
                                             'pids': strays})
        _kill(strays, 'stray')
    for name in names:
        proc = netns.run(['ip', 'netns', 'delete', name], check=False)
        if proc.returncode != 0 and netns.exists(name):
            errors.append(f"namespace {name}: {proc.stderr.strip()}")
    shutil.rmtree(state_dir(prefix), ignore_errors=True)
    left = _stale_names(prefix, set(namespaces))
    if left:
        errors.append(f"namespaces still present: {', '.join(left)}")
    if errors:
        raise LabError(f"lab {prefix!r} was not removed entirely: "
                       + '; '.join(errors))


# -- the lab ----------------------------------------------------------------

class Lab:
    """A built (or to be built) namespace lab; see the module docstring.

    Use as a context manager, or call :meth:`build` and :meth:`teardown`.
    What sits between the pif and the taps is the spec's ``switch``: a
    :class:`labswitch.SwitchLayout` (``layout``) builds it, and gives the
    paths, the probe source and the injected truth.
    """

    def __init__(self, spec):
        self.spec = spec
        self.guests = tuple(spec.guest(i) for i in range(spec.guests))
        self.layout = layout_class(spec.switch)(self)
        self._delays = []
        self._losses = []
        self._procs = []
        self._built = False

    # -- names ---------------------------------------------------------------

    @property
    def prefix(self):
        return self.spec.prefix

    @property
    def src_netns(self):
        return self.spec.src_netns

    @property
    def hv_netns(self):
        return self.spec.hv_netns

    @property
    def mgmt_netns(self):
        return self.spec.mgmt_netns

    @property
    def pif(self):
        return self.spec.pif

    @property
    def bridge(self):
        """The bridge the taps hang off (``brq…``, ``br-int``...)."""
        return self.layout.bridge

    @property
    def src_address(self):
        return self.spec.src_address

    @property
    def mgmt_addresses(self):
        return self.spec.mgmt_addresses()

    @property
    def state_dir(self):
        return state_dir(self.prefix)

    @property
    def delays(self):
        """:class:`ActiveDelay` of every delay in place."""
        return tuple(self._delays)

    @property
    def losses(self):
        """:class:`LossInjection` of every loss in place."""
        return tuple(self._losses)

    def paths(self, ipv6=False):
        """One :class:`vifpath.VifPath` per guest, the layout's seen hops:
        pif → tap on a flat Linux bridge (pif → ``vxlan-<VNI>`` → tap with
        VXLAN); ``ipv6``: to the guests' IPv6 addresses."""
        if ipv6 and not self.spec.ipv6:
            raise LabError(f"lab {self.prefix!r} was built without IPv6")
        return self.layout.paths(ipv6=ipv6)

    def unseen(self, guest):
        """:class:`labswitch.HopDevices` per hop of ``guest``'s path: the
        devices crossed where no packet socket sees the probe."""
        return self.layout.unseen(guest)

    def truth(self):
        """One line: which injected truth the lab's layout has."""
        return self.layout.truth()

    def source(self):
        """The probe source of the layout: the source namespace's own
        stack (tagged frames on a VLAN network)."""
        return self.layout.source()

    def vlan_source(self, vlan=(100,), priority=0):
        """A source sending 802.1Q-tagged probe frames (VLAN ids ``vlan``,
        outermost first) out of the source's ``eth0``; see the module."""
        from netweaver_agent.lab import framesource
        if self.spec.tunnelled:
            raise LabError(f"lab {self.prefix!r}: tagged frames on the "
                           f"{self.spec.network_type} underlay would reach "
                           "no bridge")
        macs = {}
        for g in self.guests:
            macs[g.address] = g.mac
            if g.address6:
                macs[g.address6] = g.mac
        return framesource.FrameSource(
            netns_name=self.src_netns, ifname='eth0',
            src_mac=self.spec.src_mac, macs=macs, vlan=tuple(vlan),
            priority=priority)

    def guest_domain(self, guest, **overrides):
        """``guest`` as a :class:`virt.GuestDomain` whose interface is
        what Nova writes for this layout (bridge, virtualport)."""
        from netweaver_agent.lab import virt
        bridge, interfaceid = self.layout.interface_xml(guest)
        fields = {'bridge': bridge, 'interfaceid': interfaceid}
        fields.update(overrides)
        return virt.GuestDomain.from_guest(guest, **fields)

    # -- building ------------------------------------------------------------

    def __enter__(self):
        return self.build()

    def __exit__(self, *exc):
        self.teardown()
        return False

    def build(self):
        """Build the lab (removing a previous one with this prefix)."""
        if self._built:
            raise LabError(f"lab {self.prefix!r} is already built")
        if os.geteuid() != 0:
            raise LabError("building the namespace lab needs root "
                           "(namespaces, veth, bridge, iptables)")
        stale = _stale_names(self.prefix, set(self.spec.namespaces()))
        if stale or os.path.exists(self.state_dir):
            LOG.info('Lab %(prefix)s: removing a previous lab (%(ns)s)',
                     {'prefix': self.prefix, 'ns': ', '.join(stale)})
            teardown_kept(self.prefix)
        self._built = True
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            self._save_state()
            self._build_namespaces()
            self._build_hypervisor()
            self._build_source()
            for guest in self.guests:
                self._build_guest(guest)
            if self.spec.mgmt:
                self._build_mgmt()
            for loss in self.spec.losses:
                self.inject_loss(loss)
            for delay in self.spec.delays:
                self.inject_delay(delay)
            self._finish()
        except BaseException as exc:
            LOG.error('Lab %(prefix)s: build failed, removing it: %(exc)s',
                      {'prefix': self.prefix, 'exc': exc})
            try:
                self.teardown()
            except LabError as err:
                LOG.error('%s', err)
            if isinstance(exc, (LabError, KeyboardInterrupt, SystemExit)):
                raise
            raise LabError(f"lab {self.prefix!r} could not be built: "
                           f"{exc}") from exc
        LOG.info('Lab %(prefix)s built: %(n)d guests behind %(pif)s '
                 '(%(switch)s, %(ntype)s)',
                 {'prefix': self.prefix, 'n': len(self.guests),
                  'pif': self.pif, 'switch': self.spec.switch,
                  'ntype': self.spec.network_type})
        return self

    def _finish(self):
        """Last build step: record the complete state."""
        self._save_state()

    def _build_namespaces(self):
        _ip_batch(None, [f'netns add {n}' for n in self.spec.namespaces()])
        quiet = [('net.ipv6.conf.all.disable_ipv6', 1),
                 ('net.ipv6.conf.default.disable_ipv6', 1),
                 ('net.ipv4.ip_forward', 0)]
        host = quiet + [('net.ipv4.conf.all.rp_filter', 0),
                        ('net.ipv4.conf.default.rp_filter', 0)]
        if self.spec.ipv6:
            # Before the interfaces arrive: they take the defaults.
            host = host + [
                (f'net.ipv6.conf.{c}.{k}', v) for c in ('all', 'default')
                for k, v in (('disable_ipv6', 0), ('accept_ra', 0),
                             ('autoconf', 0), ('router_solicitations', 0),
                             ('dad_transmits', 0))]
        _sysctl(self.src_netns, host)
        for g in self.guests:
            _sysctl(g.netns, host)
        _sysctl(self.hv_netns, quiet)
        if self.spec.mgmt:
            _sysctl(self.mgmt_netns, quiet)

    def _build_hypervisor(self):
        self.layout.build_hypervisor()
        self._save_state()

    def _build_source(self):
        self.layout.build_source()

    def _build_guest(self, guest):
        lines = [
            'link set lo up',
            f'addr add {guest.address}/{guest.prefixlen} dev eth0',
            'link set eth0 up',
            f'neigh replace {self.src_address} lladdr {self.spec.src_mac} '
            'dev eth0 nud permanent']
        if self.spec.ipv6:
            lines += [
                f'addr add {guest.address6}/{self.spec.prefixlen6} dev eth0 '
                'nodad',
                f'neigh replace {self.spec.src_address6} lladdr '
                f'{self.spec.src_mac} dev eth0 nud permanent']
        _ip_batch(guest.netns, lines)

    def _build_mgmt(self):
        m, a = self.mgmt_netns, self.mgmt_addresses
        _ip_batch(m, [
            'link set lo up',
            'link add br-mgmt type bridge stp_state 0 forward_delay 0',
            f'link add m-src type veth peer name mgmt0 netns {self.src_netns}',
            f'link add m-hv type veth peer name mgmt0 netns {self.hv_netns}',
            'link set m-src master br-mgmt',
            'link set m-hv master br-mgmt',
            f'addr add {a.mgmt}/{a.prefixlen} dev br-mgmt',
            'link set br-mgmt up', 'link set m-src up', 'link set m-hv up'])
        for ns, addr in ((self.src_netns, a.src), (self.hv_netns, a.hv)):
            _ip_batch(ns, [f'addr add {addr}/{a.prefixlen} dev mgmt0',
                           'link set mgmt0 up'])

    # -- injected truth ------------------------------------------------------

    def inject_loss(self, loss):
        """Drop every Nth probe to a guest after the pif (the layout's
        way: see :meth:`truth`)."""
        self._check_injection(loss)
        self.layout.inject_loss(loss)
        self._losses.append(loss)
        self._save_state()
        LOG.info('Lab %(prefix)s: every %(n)dth probe to %(tap)s dropped',
                 {'prefix': self.prefix, 'n': loss.every,
                  'tap': self.guests[loss.guest].tap})

    def inject_delay(self, delay):
        """Hold every probe to a guest for ``delay.delay_ms`` (the
        layout's way: see :meth:`truth`); the :class:`ActiveDelay`."""
        self._check_injection(delay)
        if any(d.injection.guest == delay.guest for d in self._delays):
            raise LabError(f"lab {self.prefix!r}: guest {delay.guest} "
                           "already has a delay")
        active = self.layout.inject_delay(delay)
        self._delays.append(active)
        self._save_state()
        return active

    def _check_injection(self, inj):
        if not self._built:
            raise LabError(f"lab {self.prefix!r} is not built")
        if not 0 <= inj.guest < len(self.guests):
            raise LabError(f"lab {self.prefix!r} has no guest {inj.guest}")

    def start_delayer(self, delay, module='netweaver_agent.lab.delayer',
                      args=None, backend='nfqueue'):
        """Start a delayer process in the hypervisor's namespace; its
        :class:`ActiveDelay`.

        Default: a :mod:`delayer` on the next NFQUEUE number (the layout
        sends packets to ``queue``).  ``module``/``args``: another delayer
        taking the same ``--delay-ms``, ``--records`` and ``--watch-pid``
        and printing :data:`delayer.READY` (``backend`` names it).
        """
        queue = len(self._delays) if args is None else None
        guest = self.guests[delay.guest]
        records = os.path.join(self.state_dir, f'delay-g{delay.guest}.records')
        logfile = os.path.join(self.state_dir, f'delayer-g{delay.guest}.log')
        open(records, 'w').close()
        argv = [sys.executable, '-m', module,
                *(['--queue', str(queue)] if args is None else args),
                '--delay-ms', str(delay.delay_ms), '--records', records]
        if args is None and getattr(delay, 'record', 'probe') != 'probe':
            argv += ['--keys', delay.record]
        if not self.spec.persistent:
            argv += ['--watch-pid', str(os.getpid())]
        with open(logfile, 'ab') as log_f:
            # bandit B603: a fixed argv: this Python running
            # netweaver_agent.lab.delayer
            proc = subprocess.Popen(  # nosec B603
                netns.netns_argv(self.hv_netns, argv),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=log_f, start_new_session=True)
        self._procs.append((proc, module))
        self._save_state()
        self._wait_ready(proc, logfile)
        LOG.info('Lab %(prefix)s: probes to %(tap)s held %(ms)s ms by '
                 '%(backend)s delayer %(pid)d',
                 {'prefix': self.prefix, 'tap': guest.tap,
                  'ms': delay.delay_ms, 'pid': proc.pid, 'backend': backend})
        return ActiveDelay(injection=delay, backend=backend, queue=queue,
                           records_path=records, pid=proc.pid)

    def _wait_ready(self, proc, logfile):
        end = time.monotonic() + DELAYER_READY_TIMEOUT_S
        line = b''
        while time.monotonic() < end:
            ready, _, _ = select.select([proc.stdout], [], [],
                                        max(0.0, end - time.monotonic()))
            if not ready:
                break
            chunk = os.read(proc.stdout.fileno(), 64)
            if not chunk:
                break
            line += chunk
            if line.startswith(delayer.READY.encode()):
                return
        proc.poll()
        try:
            with open(logfile, encoding='utf-8', errors='replace') as f:
                err = f.read().strip()[-500:]
        except OSError:
            err = ''
        raise LabError(
            f"lab {self.prefix!r}: the delayer in {self.hv_netns} "
            f"(pid {proc.pid}) did not become ready within "
            f"{DELAYER_READY_TIMEOUT_S:.0f} s (exit status {proc.returncode}"
            f"): {err or 'no output'}")

    def delay_records(self, guest=None):
        """The :class:`delayer.DelayRecord` of every probe held so far.

        ``guest``: one guest's index (None: every nfqueue delay).  A netem
        delay keeps no records: its truth is its configured delay.
        """
        out = []
        for d in self._delays:
            if d.records_path and (guest is None or
                                   d.injection.guest == guest):
                out.extend(delayer.read_records(d.records_path))
        return out

    def passive_holds(self, guest):
        """The :class:`delayer.PassiveHold` of every packet guest
        ``guest``'s passive-recording delayer held so far."""
        out = []
        for d in self._delays:
            if (d.records_path and d.injection.guest == guest and
                    getattr(d.injection, 'record', 'probe') == 'passive'):
                out.extend(delayer.read_passive_records(d.records_path))
        return out

    # -- state and teardown --------------------------------------------------

    def _pids(self):
        return ([{'pid': p.pid, 'marker': module}
                 for p, module in self._procs] + self.layout.pids())

    def save_state(self):
        """Record the lab's state now (a layout calls it once it started
        daemons, so a kept or failed lab ends them)."""
        self._save_state()

    def _save_state(self):
        if not os.path.isdir(self.state_dir):
            return
        _write_json(os.path.join(self.state_dir, STATE_FILE), {
            'prefix': self.prefix,
            'namespaces': self.spec.namespaces(),
            'pids': self._pids(),
            'guests': [dataclasses.asdict(g) for g in self.guests],
            'pif': self.pif, 'bridge': self.bridge,
            'switch': self.layout.state(),
            'network_type': self.spec.network_type,
            'delays': [{'guest': d.injection.guest,
                        'delay_ms': d.injection.delay_ms,
                        'backend': d.backend,
                        'records': d.records_path} for d in self._delays],
            'losses': [dataclasses.asdict(x) for x in self._losses],
            'persistent': self.spec.persistent,
            'owner_pid': os.getpid(),
        })

    def teardown(self):
        """Remove everything the lab made; safe after a partial build."""
        pids = self._pids()
        try:
            try:
                self.layout.teardown()
            except Exception as exc:  # the namespaces must still go
                LOG.warning('Lab %(prefix)s: switch teardown: %(exc)s',
                            {'prefix': self.prefix, 'exc': exc})
            _remove(self.prefix, self.spec.namespaces(), pids)
        finally:
            for p, _ in self._procs:
                if p.stdout is not None:
                    p.stdout.close()
                if p.poll() is None:
                    p.kill()
                    p.wait()
            self._procs = []
            self._delays = []
            self._losses = []
            self._built = False
        LOG.info('Lab %s removed', self.prefix)
