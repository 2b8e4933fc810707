"""Where probes may go: one destination policy for every probe source.

A probe is sent only to a unicast host address outside the ranges that
would take it somewhere else than an instance's vNIC: loopback,
link-local (``169.254.0.0/16`` with the metadata service
``169.254.169.254``, ``fe80::/10``), multicast, broadcast
(``255.255.255.255``, and the broadcast of a known subnet),
unspecified and reserved ranges (``0.0.0.0/8``, ``240.0.0.0/4``, IPv6's
reserved blocks such as IPv4-mapped ``::ffff:0:0/96`` and NAT64
``64:ff9b::/96``, deprecated site-local ``fec0::/10``).  When the operator
sets ``[netweaver] probe_networks``, the address must also lie inside one
of those networks; a ``local`` source (the host's own stack) sends nothing
until they are set.

Pure: no I/O.  Every source checks its destinations here (``local`` and
``netns:`` in :mod:`sources`, the privsep daemon again before it builds
anything, the ``ssh://`` source and ``netweaver measure``), and the
pollsters drop a refused vNIC alone, with the reason
(:class:`RefusedDestination`).
"""

import dataclasses
import ipaddress

# Reserved IPv4 blocks beyond ipaddress's is_reserved (240.0.0.0/4).
_THIS_NETWORK = ipaddress.ip_network('0.0.0.0/8')
_SITE_LOCAL = ipaddress.ip_network('fec0::/10')
_LIMITED_BROADCAST = ipaddress.ip_address('255.255.255.255')


class RefusedDestination(ValueError):
    """A probe destination the policy refuses; names address and reason.

    A :class:`ValueError` (bad input), raised per address: callers drop
    that one vNIC and go on.  ``args`` are ``(address, reason)`` so that
    oslo.privsep rebuilds it on the agent's side.
    """

    def __init__(self, address, reason):
        super().__init__(address, reason)
        self.address = address
        self.reason = reason

    def __str__(self):
        return f"probe destination {self.address!r} refused: {self.reason}"


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """A vNIC left out of a window because its destination was refused."""

    vif: str
    address: str
    reason: str


def parse_networks(cidrs):
    """``probe_networks`` CIDR strings as a tuple of ip_network objects.

    :raises ValueError: naming the CIDR that is not a network (bad
        syntax, host bits set)
    """
    out = []
    for cidr in cidrs or ():
        if isinstance(cidr, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            out.append(cidr)
            continue
        try:
            out.append(ipaddress.ip_network(str(cidr).strip(), strict=True))
        except ValueError as exc:
            raise ValueError(
                f"probe_networks entry {cidr!r} is not a network in CIDR "
                f"notation: {exc}") from exc
    return tuple(out)


def _class_refusal(ip):
    """Why ``ip`` is no unicast host address at all, or None."""
    if getattr(ip, 'scope_id', None):
        return 'a scoped (link-local) address'
    if ip.is_unspecified:
        return 'the unspecified address'
    if ip.is_loopback:
        return 'a loopback address'
    if ip.is_link_local:
        return 'a link-local address (e.g. the metadata service)'
    if ip.is_multicast:
        return 'a multicast address'
    if ip == _LIMITED_BROADCAST:
        return 'the broadcast address'
    if ip.version == 4 and ip in _THIS_NETWORK:
        return 'in 0.0.0.0/8 ("this network")'
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return 'an IPv4-mapped IPv6 address'
    if ip.version == 6 and ip in _SITE_LOCAL:
        return 'a (deprecated) site-local address'
    if ip.is_reserved:
        return 'in a reserved range'
    return None


def _subnet_refusal(ip, networks):
    """Why ``ip`` is a subnet's broadcast or network address, or None."""
    for net in networks:
        if net.version != ip.version or ip not in net:
            continue
        # /31 and /32 (RFC 3021) and IPv6 have no broadcast address.
        if net.version == 4 and net.prefixlen <= 30:
            if ip == net.broadcast_address:
                return f'the broadcast address of {net}'
            if ip == net.network_address:
                return f'the network address of {net}'
    return None


# Verdicts a policy keeps (then forgets them all and starts again).
MAX_VERDICTS = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class DestinationPolicy:
    """Which addresses probes may be sent to.

    ``networks``: the operator's ``probe_networks`` (ip_network objects;
    empty: any unicast address); ``require_networks``: refuse everything
    while ``networks`` is empty (the ``local`` source, whose probes could
    otherwise leave by the default route); ``subnets``: networks whose
    broadcast and network addresses are refused too (e.g. the instances'
    subnets when known).
    """

    networks: tuple = ()
    require_networks: bool = False
    subnets: tuple = ()
    # {address: (canonical form or None, refusal or None)}: a cycle asks
    # of every vNIC's address several times, each cycle (bounded).
    _verdicts: dict = dataclasses.field(default_factory=dict, compare=False,
                                        hash=False, repr=False)

    def _verdict(self, address):
        if not isinstance(address, str):
            return None, 'not an IPv4 or IPv6 address'
        found = self._verdicts.get(address)
        if found is None:
            why = self._refusal(address)
            found = (None if why else str(ipaddress.ip_address(address)),
                     why)
            if len(self._verdicts) >= MAX_VERDICTS:
                self._verdicts.clear()
            self._verdicts[address] = found
        return found

    def refusal(self, address):
        """Why ``address`` is refused, or None if probes may go there."""
        return self._verdict(address)[1]

    def _refusal(self, address):
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return 'not an IPv4 or IPv6 address'
        why = _class_refusal(ip)
        if why is None:
            why = _subnet_refusal(ip, self.networks + self.subnets)
        if why is None and self.networks:
            if not any(ip in net for net in self.networks
                       if net.version == ip.version):
                why = ('outside [netweaver] probe_networks (' +
                       ', '.join(str(n) for n in self.networks) + ')')
        if why is None and self.require_networks and not self.networks:
            why = ("probe_source 'local' sends from this host's own stack: "
                   'set [netweaver] probe_networks to the networks whose '
                   'routes lead out and back in through the pif')
        return why

    def check(self, address):
        """``address`` in canonical form, or :class:`RefusedDestination`."""
        canonical, why = self._verdict(address)
        if why is not None:
            raise RefusedDestination(address, why)
        return canonical

    def check_all(self, addresses):
        """Canonical forms of every address; the first refusal raises."""
        return [self.check(a) for a in addresses]

    def cidrs(self):
        """``networks`` as CIDR strings (what crosses privsep)."""
        return [str(n) for n in self.networks]


def policy(probe_networks=(), require_networks=False, subnets=()):
    """A :class:`DestinationPolicy` from CIDR strings (checked)."""
    return DestinationPolicy(networks=parse_networks(probe_networks),
                             require_networks=bool(require_networks),
                             subnets=parse_networks(subnets))


def for_source(spec, probe_networks=()):
    """The policy of probe source ``spec`` (``local``, ``netns:``, ``ssh://``).

    ``local`` (and an empty spec) requires ``probe_networks``; the others
    apply them when set.
    """
    local = not spec or spec == 'local'
    return policy(probe_networks, require_networks=local)


def check(address, probe_networks=()):
    """``address`` canonical if probes may go there, else raise.

    The one call for senders outside :mod:`sources` (the ``ssh://`` source,
    ``netweaver measure``): the classes above, and ``probe_networks``
    (CIDR strings or networks) when given.

    :raises RefusedDestination: naming the address and the reason
    """
    return policy(probe_networks).check(address)


DEFAULT = DestinationPolicy()
