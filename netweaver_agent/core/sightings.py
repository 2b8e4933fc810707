"""Sightings: what every reader of probes gives the matcher.

A *sighting* is one probe (or its reply) seen on one interface at one
instant, travelling one way.  The live capture (:mod:`capture`, through
:mod:`ring` or ``recvmsg``), the pcap and pcapng readers (:mod:`pcapfile`)
and the privileged daemon all hand the matcher (:mod:`latency`) a
:class:`SightingBatch`: columns of integers, one row per sighting, with no
object per packet.  This module holds that model and nothing else, so the
matcher and the readers need not import the socket code.
"""

import array
import dataclasses

from netweaver_agent.core import probe

# Direction column values.
DIR_IN = 0       # received on that interface
DIR_OUT = 1      # sent by this host on that interface (PACKET_OUTGOING)
DIR_UNKNOWN = 2  # pcap files without direction


@dataclasses.dataclass(frozen=True, slots=True)
class Sighting:
    """One probe (or reply) seen on one interface at one instant."""

    key: probe.ProbeKey
    ifname: str
    t_ns: int
    direction: int = DIR_IN
    # probe.auth_value of the packet (its tag and address).
    auth: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class SightingBatch:
    """Sightings of one probe window (one session), as columns.

    Row ``i`` is: key ``keys[i]`` (:meth:`ProbeKey.as_int`), seen on
    interface ``ifnames[ifindex[i]]`` at ``t_ns[i]`` (ns since the epoch,
    CLOCK_REALTIME) travelling ``direction[i]`` (``DIR_*``).

    ``encap`` holds how the frame carried the probe, for the rows that
    were VLAN-tagged or VXLAN only: ``{(key, ifindex): probe.Encap}``
    (the first such sighting of that key on that interface).

    ``auth[i]``: :func:`probe.auth_value` of the row's packet (the tag it
    carries XOR a fold of its address), which the matcher checks against
    the planned probe's.  TCP rows (session :data:`probe.TCP_SESSION` on
    the wire) are kept in any window's batch: their ISN is the key.
    """

    session: int
    t_ns: array.array = dataclasses.field(
        default_factory=lambda: array.array('q'))
    keys: array.array = dataclasses.field(
        default_factory=lambda: array.array('Q'))
    ifindex: array.array = dataclasses.field(
        default_factory=lambda: array.array('i'))
    direction: array.array = dataclasses.field(
        default_factory=lambda: array.array('B'))
    auth: array.array = dataclasses.field(
        default_factory=lambda: array.array('Q'))
    ifnames: dict = dataclasses.field(default_factory=dict)
    encap: dict = dataclasses.field(default_factory=dict)
    # ifname -> index, a cache of ``ifnames`` (checked before use: callers
    # may fill ``ifnames`` themselves).
    _index_of: dict = dataclasses.field(default_factory=dict, repr=False,
                                        compare=False)

    def __len__(self):
        return len(self.t_ns)

    def interface_index(self, ifname):
        """The column index standing for ``ifname`` (added if new)."""
        index = self._index_of.get(ifname)
        if index is not None and self.ifnames.get(index) == ifname:
            return index
        for index, name in self.ifnames.items():
            if name == ifname:
                break
        else:
            index = len(self.ifnames)
            self.ifnames[index] = ifname
        self._index_of[ifname] = index
        return index

    def append(self, key_int, ifindex, t_ns, direction, auth=0):
        self.keys.append(key_int)
        self.ifindex.append(ifindex)
        self.t_ns.append(t_ns)
        self.direction.append(direction)
        self.auth.append(auth)

    def extend(self, other):
        """Append every row of ``other`` (same session), remapping names."""
        if other.session != self.session:
            raise ValueError(
                f"cannot merge sightings of session {other.session} into "
                f"session {self.session}")
        remap = {i: self.interface_index(n) for i, n in other.ifnames.items()}
        self.keys.extend(other.keys)
        self.t_ns.extend(other.t_ns)
        self.direction.extend(other.direction)
        self.auth.extend(other.auth)
        if len(other.auth) < len(other.keys):      # filled without auth
            self.auth.extend(bytes(len(other.keys) - len(other.auth)))
        self.ifindex.extend(remap[i] for i in other.ifindex)
        for (k, i), encap in other.encap.items():
            self.encap.setdefault((k, remap[i]), encap)

    def auth_column(self):
        """``auth``, padded with zeros to the rows' number (columns
        filled by hand may lack it)."""
        short = len(self.keys) - len(self.auth)
        if short > 0:
            self.auth.extend(bytes(short))
        return self.auth
