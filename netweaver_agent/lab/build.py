"""The network-namespace lab: a compute host in miniature, with known truth.

Namespaces (all named ``<prefix>...``):

* ``<prefix>src``: the probe source on the physical network, ``eth0``
  198.18.0.1/24 (the lab network's first host: a /24 up to 245 guests,
  a larger 198.18.0.0/N beyond, see :mod:`netweaver_agent.lab.spec`);
* ``<prefix>hv``: the compute host: the pif (a veth whose peer is the
  source's ``eth0``), a Linux bridge named as Neutron's linuxbridge agent
  names them (``brq`` + network id), and one nova-like ``tap<port id>``
  per guest;
* ``<prefix>g<i>``: guest ``i``, ``eth0`` host 10+i of the lab network
  (198.18.0.(10+i)/24 in a /24) with an
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
:class:`switch.SwitchLayout` found by name in :data:`spec.SWITCHES` and
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
:func:`state.teardown_kept` (``netweaver lab down``) removes it later.

What a lab is (names, addresses, the injections) is
:mod:`netweaver_agent.lab.spec`; its state file and removal
:mod:`netweaver_agent.lab.state`; its delayer processes
:mod:`netweaver_agent.lab.inject`.  This module builds it.
"""

import dataclasses
import os

from oslo_log import log

from netweaver_agent.core import netns
from netweaver_agent.lab import framesource
from netweaver_agent.lab import inject
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import state
from netweaver_agent.lab import switch as labswitch
from netweaver_agent.lab import virt

LOG = log.getLogger(__name__)


def _write_proc_sys(settings):
    for key, value in settings:
        path = os.path.join('/proc/sys', *key.split('.'))
        try:
            with open(path, 'w', encoding='ascii') as f:
                f.write(f'{value}\n')
        except OSError as exc:
            raise labswitch.LabError(f"sysctl {key}={value}: {exc}") from exc


def write_sysctls(ns, settings):
    """Set each ``(key, value)`` of ``settings`` (``net.ipv4.ip_forward``
    ...) inside namespace ``ns``, through ``/proc/sys`` from a thread that
    entered it (``/proc/sys/net`` shows the reading thread's namespace)."""
    try:
        netns.run_in_netns(ns, _write_proc_sys, settings)
    except labswitch.LabError as exc:
        raise labswitch.LabError(f"namespace {ns}: {exc}") from exc
    except netns.NetnsError as exc:
        raise labswitch.LabError(str(exc)) from exc


class Lab:
    """A built (or to be built) namespace lab; see the module docstring.

    Use as a context manager, or call :meth:`build` and :meth:`teardown`.
    ``spec`` (a :class:`spec.LabSpec`) names everything: namespaces
    (``spec.hv_netns``...), the pif, addresses.  What sits between the pif
    and the taps is the spec's ``switch``: a :class:`switch.SwitchLayout`
    (``layout``, which knows its ``bridge``) builds it, and gives the
    paths, the probe source and the injected truth.
    """

    def __init__(self, spec):
        self.spec = spec
        self.guests = tuple(spec.guest(i) for i in range(spec.guests))
        self.state_dir = state.state_dir(spec.prefix)
        self.layout = labspec.layout_class(spec.switch)(self)
        self.delayers = inject.Delayers(spec.hv_netns, self.state_dir,
                                        spec.persistent)
        self._delays = []
        self._losses = []
        self._built = False

    @property
    def delays(self):
        """:class:`switch.ActiveDelay` of every delay in place."""
        return tuple(self._delays)

    @property
    def losses(self):
        """:class:`spec.LossInjection` of every loss in place."""
        return tuple(self._losses)

    def paths(self, ipv6=False):
        """One :class:`vifpath.VifPath` per guest, the layout's seen hops:
        pif → tap on a flat Linux bridge (pif → ``vxlan-<VNI>`` → tap with
        VXLAN); ``ipv6``: to the guests' IPv6 addresses."""
        if ipv6 and not self.spec.ipv6:
            raise labswitch.LabError(
                f"lab {self.spec.prefix!r} was built without IPv6")
        return self.layout.paths(ipv6=ipv6)

    def vlan_source(self, vlan=(100,), priority=0):
        """A source sending 802.1Q-tagged probe frames (VLAN ids ``vlan``,
        outermost first) out of the source's ``eth0``; see the module."""
        spec = self.spec
        if spec.tunnelled:
            raise labswitch.LabError(
                f"lab {spec.prefix!r}: tagged frames on the "
                f"{spec.network_type} underlay would reach no bridge")
        macs = {}
        for g in self.guests:
            macs[g.address] = g.mac
            if g.address6:
                macs[g.address6] = g.mac
        return framesource.FrameSource(
            netns_name=spec.src_netns, ifname='eth0', src_mac=spec.src_mac,
            macs=macs, vlan=tuple(vlan), priority=priority)

    def guest_domain(self, guest, **overrides):
        """``guest`` as a :class:`virt.GuestDomain` whose interface is
        what Nova writes for this layout (bridge, virtualport)."""
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
        spec = self.spec
        if self._built:
            raise labswitch.LabError(f"lab {spec.prefix!r} is already built")
        if os.geteuid() != 0:
            raise labswitch.LabError(
                "building the namespace lab needs root (namespaces, veth, "
                "bridge, iptables)")
        stale = state.stale_names(spec.prefix, set(spec.namespaces()))
        if stale or os.path.exists(self.state_dir):
            LOG.info('Lab %(prefix)s: removing a previous lab (%(ns)s)',
                     {'prefix': spec.prefix, 'ns': ', '.join(stale)})
            state.teardown_kept(spec.prefix)
        self._built = True
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            self.save_state()
            self._build_namespaces()
            self.layout.build_hypervisor()
            self.save_state()
            self.layout.build_source()
            for guest in self.guests:
                self._build_guest(guest)
            if spec.mgmt:
                self._build_mgmt()
            for loss in spec.losses:
                self.inject_loss(loss)
            for delay in spec.delays:
                self.inject_delay(delay)
            self.save_state()
        except BaseException as exc:
            LOG.error('Lab %(prefix)s: build failed, removing it: %(exc)s',
                      {'prefix': spec.prefix, 'exc': exc})
            try:
                self.teardown()
            except labswitch.LabError as err:
                LOG.error('%s', err)
            if isinstance(exc, (labswitch.LabError, KeyboardInterrupt,
                                SystemExit)):
                raise
            raise labswitch.LabError(
                f"lab {spec.prefix!r} could not be built: {exc}") from exc
        LOG.info('Lab %(prefix)s built: %(n)d guests behind %(pif)s '
                 '(%(switch)s, %(ntype)s)',
                 {'prefix': spec.prefix, 'n': len(self.guests),
                  'pif': spec.pif, 'switch': spec.switch,
                  'ntype': spec.network_type})
        return self

    def _build_namespaces(self):
        spec = self.spec
        labswitch.ip_batch(None, [f'netns add {n}' for n in spec.namespaces()])
        quiet = [('net.ipv6.conf.all.disable_ipv6', 1),
                 ('net.ipv6.conf.default.disable_ipv6', 1),
                 ('net.ipv4.ip_forward', 0)]
        host = quiet + [('net.ipv4.conf.all.rp_filter', 0),
                        ('net.ipv4.conf.default.rp_filter', 0)]
        if spec.ipv6:
            # Before the interfaces arrive: they take the defaults.
            host = host + [
                (f'net.ipv6.conf.{c}.{k}', v) for c in ('all', 'default')
                for k, v in (('disable_ipv6', 0), ('accept_ra', 0),
                             ('autoconf', 0), ('router_solicitations', 0),
                             ('dad_transmits', 0))]
        # In this process (a thread enters each namespace): an ``ip netns
        # exec sysctl`` per namespace costs ~6 ms, 6 s for 1,000 guests.
        write_sysctls(spec.src_netns, host)
        for g in self.guests:
            write_sysctls(g.netns, host)
        write_sysctls(spec.hv_netns, quiet)
        if spec.mgmt:
            write_sysctls(spec.mgmt_netns, quiet)

    def _build_guest(self, guest):
        spec = self.spec
        lines = [
            'link set lo up',
            f'addr add {guest.address}/{guest.prefixlen} dev eth0',
            'link set eth0 up',
            f'neigh replace {spec.src_address} lladdr {spec.src_mac} '
            'dev eth0 nud permanent']
        if spec.ipv6:
            lines += [
                f'addr add {guest.address6}/{spec.prefixlen6} dev eth0 nodad',
                f'neigh replace {spec.src_address6} lladdr {spec.src_mac} '
                'dev eth0 nud permanent']
        labswitch.ip_batch(guest.netns, lines)

    def _build_mgmt(self):
        spec = self.spec
        a = spec.mgmt_addresses()
        labswitch.ip_batch(spec.mgmt_netns, [
            'link set lo up',
            'link add br-mgmt type bridge stp_state 0 forward_delay 0',
            f'link add m-src type veth peer name mgmt0 netns {spec.src_netns}',
            f'link add m-hv type veth peer name mgmt0 netns {spec.hv_netns}',
            'link set m-src master br-mgmt',
            'link set m-hv master br-mgmt',
            f'addr add {a.mgmt}/{a.prefixlen} dev br-mgmt',
            'link set br-mgmt up', 'link set m-src up', 'link set m-hv up'])
        for ns, addr in ((spec.src_netns, a.src), (spec.hv_netns, a.hv)):
            labswitch.ip_batch(ns, [f'addr add {addr}/{a.prefixlen} dev mgmt0',
                                    'link set mgmt0 up'])

    # -- injected truth ------------------------------------------------------

    def inject_loss(self, loss):
        """Drop every Nth probe to a guest after the pif (the layout's
        way: see ``layout.truth()``)."""
        self._check_injection(loss)
        self.layout.inject_loss(loss)
        self._losses.append(loss)
        self.save_state()
        LOG.info('Lab %(prefix)s: every %(n)dth probe to %(vif)s dropped',
                 {'prefix': self.spec.prefix, 'n': loss.every,
                  'vif': self.guests[loss.guest].vif})

    def inject_delay(self, delay):
        """Hold every probe to a guest for ``delay.delay_ms`` (the
        layout's way: see ``layout.truth()``); the
        :class:`switch.ActiveDelay`."""
        self._check_injection(delay)
        if any(d.injection.guest == delay.guest for d in self._delays):
            raise labswitch.LabError(
                f"lab {self.spec.prefix!r}: guest {delay.guest} already has "
                "a delay")
        active = self.layout.inject_delay(delay)
        self._delays.append(active)
        self.save_state()
        return active

    def _check_injection(self, inj):
        if not self._built:
            raise labswitch.LabError(f"lab {self.spec.prefix!r} is not built")
        if not 0 <= inj.guest < len(self.guests):
            raise labswitch.LabError(
                f"lab {self.spec.prefix!r} has no guest {inj.guest}")

    def start_delayer(self, delay, module=inject.DELAYER_MODULE, args=None,
                      backend='nfqueue'):
        """Start a delayer process for ``delay`` in the hypervisor's
        namespace (see :meth:`inject.Delayers.start`; a :mod:`delayer`
        gets the next NFQUEUE number); its :class:`switch.ActiveDelay`.
        The lab's state records its pid as soon as it runs."""
        return self.delayers.start(delay, queue=len(self._delays),
                                   module=module, args=args, backend=backend,
                                   on_started=self.save_state)

    def delay_records(self, guest=None):
        """The :class:`delayer.DelayRecord` of every probe held so far by
        this lab's delayers (``guest``: one guest's); see
        :func:`inject.delay_records`."""
        return inject.delay_records(self._delays, guest)

    def passive_holds(self, guest):
        """The :class:`delayer.PassiveHold` of every packet guest
        ``guest``'s passive-recording delayer held so far."""
        return inject.passive_holds(self._delays, guest)

    # -- state and teardown --------------------------------------------------

    def _pids(self):
        return self.delayers.pids() + self.layout.pids()

    def save_state(self):
        """Record the lab's state now, if its state directory exists (a
        layout calls it once it started daemons, so a kept or failed lab
        ends them)."""
        if not os.path.isdir(self.state_dir):
            return
        spec = self.spec
        state.write_json(os.path.join(self.state_dir, state.STATE_FILE), {
            'prefix': spec.prefix,
            'namespaces': spec.namespaces(),
            'pids': self._pids(),
            'guests': [dataclasses.asdict(g) for g in self.guests],
            'pif': spec.pif, 'bridge': self.layout.bridge,
            'switch': self.layout.state(),
            'network_type': spec.network_type,
            'delays': [{'guest': d.injection.guest,
                        'delay_ms': d.injection.delay_ms,
                        'backend': d.backend,
                        'records': d.records_path} for d in self._delays],
            'losses': [dataclasses.asdict(x) for x in self._losses],
            'persistent': spec.persistent,
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
                            {'prefix': self.spec.prefix, 'exc': exc})
            state.remove(self.spec.prefix, self.spec.namespaces(), pids)
        finally:
            self.delayers.close()
            self._delays = []
            self._losses = []
            self._built = False
        LOG.info('Lab %s removed', self.spec.prefix)
