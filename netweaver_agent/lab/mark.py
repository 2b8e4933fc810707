"""A lab probe source that marks every Nth probe to a guest.

Where the lab's switch runs in user space (Open vSwitch's ``netdev``
datapath, OVN), netfilter never sees the probes, so exact loss cannot be
injected with ``iptables -m statistic``.  Instead the lab's source marks
every Nth probe bound to a guest, and the switch drops what carries the
mark (an OpenFlow drop, an OVN ACL): the Nth, 2Nth... probe is lost, the
others pass, exactly.

The mark is the IP TTL (the IPv6 hop limit): the path from the source to
the guest is one layer-2 segment, nothing decrements it, and every
switch here matches on it.  (DSCP would be the natural choice, but OVN
23.03's ovn-controller silently leaves ``ip.dscp`` and ``ip.ecn`` out of
the OpenFlow flows it installs: such an ACL drops every packet to the
port.)  Probes are built with TTL 64; marks are chosen away from it.

:class:`MarkTable` holds the marks and their counters; the lab's layout
owns it, so marks added after a source was made apply to it too, and the
count carries over windows as iptables' nth counter does.
"""

import dataclasses
import struct
import threading

from oslo_log import log

from netweaver_agent.core import sources

LOG = log.getLogger(__name__)

# The TTL probes are built with (probe.build_ip_seqs' default); a switch
# that passes a marked probe on puts it back.
PROBE_TTL = 64
# TTL values used as marks: far from the probes' 64 and from common
# operating-system defaults (64, 128, 255).
FIRST_MARK = 33
LAST_MARK = 62
_IP4_TTL = 8
_IP4_CSUM = 10
_IP6_HLIM = 7


@dataclasses.dataclass(frozen=True, slots=True)
class Mark:
    """Give every ``every``-th probe to ``dst_ip`` the TTL ``ttl``.

    ``every`` 1 marks every probe (a switch then picks out the probes to
    that guest, e.g. to delay them).  ``protocol``: count only probes of
    that protocol (None: all).
    """

    dst_ip: str
    every: int
    ttl: int
    protocol: str | None = None

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"mark every {self.every!r} probes: must be "
                             ">= 1")
        if not FIRST_MARK <= self.ttl <= LAST_MARK:
            raise ValueError(f"mark TTL {self.ttl!r} is not within "
                             f"{FIRST_MARK}..{LAST_MARK}")


def ip4_header_checksum(header):
    """The IPv4 header checksum of ``header`` (its checksum field zero)."""
    if len(header) % 2:
        header += b'\0'
    total = sum(struct.unpack(f'!{len(header) // 2}H', header))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return ~total & 0xffff


def set_ttl(packet, ttl):
    """``packet`` (IPv4 or IPv6, from its IP header) with TTL ``ttl``.

    The IPv4 header checksum is recomputed; transport checksums do not
    cover the TTL.
    """
    data = bytearray(packet)
    if not data:
        raise ValueError('empty packet')
    version = data[0] >> 4
    if version == 4:
        ihl = (data[0] & 0x0f) * 4
        if ihl < 20 or len(data) < ihl:
            raise ValueError(f"truncated IPv4 header ({len(data)} bytes)")
        data[_IP4_TTL] = ttl
        data[_IP4_CSUM:_IP4_CSUM + 2] = b'\0\0'
        csum = ip4_header_checksum(bytes(data[:ihl]))
        data[_IP4_CSUM:_IP4_CSUM + 2] = struct.pack('!H', csum)
    elif version == 6:
        if len(data) < 40:
            raise ValueError(f"truncated IPv6 header ({len(data)} bytes)")
        data[_IP6_HLIM] = ttl
    else:
        raise ValueError(f"not an IP packet (version {version})")
    return bytes(data)


class MarkTable:
    """The marks of a lab and how many probes each has counted."""

    def __init__(self):
        self._marks = {}
        self._counts = {}
        self._lock = threading.Lock()

    def add(self, mark):
        """Start marking; a destination has at most one mark."""
        with self._lock:
            if mark.dst_ip in self._marks:
                raise ValueError(f"probes to {mark.dst_ip} are already "
                                 f"marked ({self._marks[mark.dst_ip]})")
            self._marks[mark.dst_ip] = mark
            self._counts[mark.dst_ip] = 0

    def free_ttl(self):
        """A mark TTL no mark uses yet."""
        with self._lock:
            used = {m.ttl for m in self._marks.values()}
        for ttl in range(FIRST_MARK, LAST_MARK + 1):
            if ttl not in used:
                return ttl
        raise ValueError('no mark TTL left')

    def marks(self):
        with self._lock:
            return tuple(self._marks.values())

    def apply(self, protocol, dst, data):
        """``data``, marked if it is the Nth probe counted for ``dst``."""
        mark = self._marks.get(dst)
        if mark is None or (mark.protocol is not None
                            and mark.protocol != protocol):
            return data
        with self._lock:
            self._counts[dst] += 1
            nth = self._counts[dst] % mark.every == 0
        return set_ttl(data, mark.ttl) if nth else data


class Marking:
    """Mixin of a probe source (before it in the bases) that marks the
    IP packets it transmits through :meth:`mark`.

    :param table: the :class:`MarkTable` to apply (shared with the switch
        that drops the marked probes)
    """

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table = table
        self._protocol = None

    def send(self, plan, deadline_s):
        self._protocol = plan.protocol
        return super().send(plan, deadline_s)

    def mark(self, dst, packet):
        """The IP ``packet`` to ``dst``, marked if it is the Nth."""
        return self.table.apply(self._protocol, dst, packet)


class MarkingSource(Marking, sources.LocalSource):
    """A namespace's stack sending probes, every Nth marked (see module).

    :param table: the :class:`MarkTable` to apply
    """

    def __init__(self, netns_name, table):
        super().__init__(table, netns_name=netns_name)

    def _transmit(self, sock, dst, data):
        sock.sendto(self.mark(dst, data), (dst, 0))
