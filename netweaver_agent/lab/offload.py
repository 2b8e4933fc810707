"""Transmit checksums filled in by the kernel in the lab's namespaces.

A veth leaves the transport checksum of what its kernel sends to be
filled in later (offload).  Open vSwitch's userspace datapath reads such
a frame with a packet socket and forwards it as it is, so the receiving
guest (or OVS's own conntrack and tunnel decapsulation) finds the
checksum wrong and drops the packet.  A real guest's virtio NIC says so
in its vnet header, which a vhost port honours; a veth has no such
header.  The Open vSwitch and OVN layouts therefore turn transmit
checksum offload off (``ethtool -K IFNAME tx off``) on the source's and
the guests' interfaces: their kernels fill in every checksum, and real
TCP and UDP streams (``netweaver lab --passive``, the passive tests)
cross the userspace switch whole, as probes always did.
"""

import array
import errno
import fcntl
import socket
import struct

from oslo_log import log

from netweaver_agent.core import netns
from netweaver_agent.lab import switch

LOG = log.getLogger(__name__)

# struct ethtool_value {cmd, data} for SIOCETHTOOL's ETHTOOL_STXCSUM.
SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17
# What a device whose checksum offload cannot be changed answers.
_FIXED = (errno.EOPNOTSUPP, errno.EINVAL)


def _tx_checksum_off(ifname):
    """Make this namespace's kernel fill in ``ifname``'s transport
    checksums itself (``ethtool -K IFNAME tx off``)."""
    value = array.array('B', struct.pack('II', ETHTOOL_STXCSUM, 0))
    ifreq = struct.pack('16sP', ifname.encode(), value.buffer_info()[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)


def tx_checksum_off(netns_name, ifname):
    """:func:`_tx_checksum_off` inside ``netns_name``."""
    try:
        netns.run_in_netns(netns_name, _tx_checksum_off, ifname)
    except OSError as exc:
        raise switch.LabError(
            f"transmit checksum offload of {ifname} in {netns_name} not "
            f"turned off: {exc}") from exc


def _checksums_off_here():
    """Transmit checksum offload off on every interface of this
    namespace but loopback: the names done, and those whose offload
    cannot be changed (``{name: error}``)."""
    done, fixed = [], {}
    for _index, name in socket.if_nameindex():
        if name == 'lo':
            continue
        try:
            _tx_checksum_off(name)
        except OSError as exc:
            if exc.errno not in _FIXED:
                raise OSError(exc.errno, f'{name}: {exc.strerror}') from exc
            fixed[name] = exc.strerror
        else:
            done.append(name)
    return done, fixed


def software_checksums(netns_name):
    """Transmit checksum offload off on every interface of namespace
    ``netns_name`` but loopback; the names of those turned off."""
    try:
        done, fixed = netns.run_in_netns(netns_name, _checksums_off_here)
    except OSError as exc:
        raise switch.LabError(
            f"transmit checksum offload in namespace {netns_name} not "
            f"turned off: {exc}") from exc
    if fixed:
        LOG.debug('Namespace %(ns)s: checksum offload of %(fixed)s cannot '
                  'be changed', {'ns': netns_name, 'fixed': fixed})
    return done
