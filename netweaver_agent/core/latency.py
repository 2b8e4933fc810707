"""Match sightings of probes across interfaces; compute latency statistics.

This module does no I/O (as h11 does none): sightings in, reports out.

For each probe we keep its first timestamp on every interface of its
path, ``pif → hop … → vif``, and the same for the guest's reply:

* ingress    = t(vif, probe) − t(pif, probe)   (the seed's number)
* egress     = t(pif, reply) − t(vif, reply)
* turnaround = t(vif, reply) − t(vif, probe)  (guest + vhost/QEMU)
* hops       = the ingress subtraction between neighbouring interfaces

A pif sighting of a probe counts only if the kernel says the probe was
*received* there (not ``DIR_OUT``): a probe the host itself sent out of the
pif never measured the in-host path.  A probe received on the pif and not
seen on the vif within ``timeout_ns`` is *lost*.  Probes never received on
the pif are counted as ``unseen_at_pif`` and measure nothing.

Tenants see their own probes and may send look-alikes.  With the window's
secret, a sighting counts only if it is authentic: its auth (tag and
address, see :mod:`netweaver_agent.core.probe`) is the one the planned probe to
the planned address carries (computed once per probe, then compared per
row), and a TCP key is found through the plan's ISNs.  Rows that fail are
counted per vNIC as ``rejected``.  Without a secret (offline files with no
key) sightings are matched unverified.

One clock stamps every interface, so a packet seen on an interface of its
path *before* one it crossed earlier (a vif sighting before the pif's, a
reply on the pif before the vif) is no latency at all: a negative value is
never reported; it is counted as an *anomaly* and left out of the
statistics.
"""

import bisect
import collections
import dataclasses
import math
import socket

from netweaver_agent.core import probe
from netweaver_agent.core import sightings


# Roles of an interface on a vNIC's path (Matcher._roles).
_PIF, _HOP, _VIF = 0, 1, 2

# Latency histogram buckets, log2 µs: bucket 0 holds [0, 1) µs, bucket k
# (1..20) [2**(k-1), 2**k) µs, bucket 21 everything from 2**20 µs (~1 s).
HISTOGRAM_EDGES_US = (0,) + tuple(1 << k for k in range(21))


# Bucket k >= 1 starts here (ns): a value's bucket is how many of these
# it reaches.
_BUCKET_STARTS_NS = tuple(1000 * e for e in HISTOGRAM_EDGES_US[1:])


def log2_histogram(values_ns):
    """Counts per :data:`HISTOGRAM_EDGES_US` bucket of latencies in ns
    (bucket ``k`` of value ``v``: the bit length of ``int(v) // 1000``,
    at least 0, at most the last bucket): found by bisecting the sorted
    values at each bucket's start, not value by value."""
    return _histogram_of_sorted(sorted(values_ns))


def _histogram_of_sorted(values):
    """:func:`log2_histogram` of values already sorted: only the bucket
    starts between the least and the greatest value are bisected (below
    them no value is reached, above them every one)."""
    starts = _BUCKET_STARTS_NS
    counts = [0] * (len(starts) + 1)
    if not values:
        return tuple(counts)
    lo = bisect.bisect_right(starts, values[0])
    hi = bisect.bisect_right(starts, values[-1])
    before = 0
    for k in range(lo, hi):
        reached = bisect.bisect_left(values, starts[k])
        counts[k] = reached - before
        before = reached
    counts[hi] = len(values) - before
    return tuple(counts)


@dataclasses.dataclass(frozen=True, slots=True)
class DirectionStats:
    """Latency statistics of one direction, in microseconds.

    ``count`` measured values; ``lost`` probes (or replies) that entered
    the segment and did not leave it within the timeout.  The figures are
    None when ``count`` is 0.
    """

    count: int = 0
    lost: int = 0
    min_us: float | None = None
    max_us: float | None = None
    mean_us: float | None = None
    stdev_us: float | None = None
    p50_us: float | None = None
    p90_us: float | None = None
    p99_us: float | None = None

    @property
    def loss_pct(self):
        """Lost as a percentage of those that entered (None if none did)."""
        total = self.count + self.lost
        return 100.0 * self.lost / total if total else None

    @classmethod
    def from_ns(cls, values_ns, lost=0):
        """Statistics of latencies given in nanoseconds."""
        return cls._of_sorted(sorted(values_ns), lost)

    @classmethod
    def _of_sorted(cls, sorted_ns, lost=0):
        """:meth:`from_ns` of values already sorted."""
        if not sorted_ns:
            return cls(count=0, lost=lost)
        values = [v / 1000.0 for v in sorted_ns]
        n = len(values)
        mean = math.fsum(values) / n
        if n > 1:
            var = math.fsum([(v - mean) ** 2 for v in values]) / (n - 1)
            stdev = math.sqrt(var)
        else:
            stdev = 0.0
        return cls(count=n, lost=lost, min_us=values[0], max_us=values[-1],
                   mean_us=mean, stdev_us=stdev,
                   p50_us=_percentile(values, 50),
                   p90_us=_percentile(values, 90),
                   p99_us=_percentile(values, 99))


def percentile(sorted_values, pct):
    """Linear-interpolation percentile (numpy's default) of sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile {pct!r} is not within 0..100")
    return _percentile(sorted_values, pct)


def _percentile(sorted_values, pct):
    """:func:`percentile` of values and ``pct`` known to be valid."""
    rank = (len(sorted_values) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    frac = rank - low
    return sorted_values[low] + (sorted_values[high] -
                                 sorted_values[low]) * frac


@dataclasses.dataclass(frozen=True, slots=True)
class HopStats:
    """Latency between two neighbouring interfaces of a path (ingress)."""

    src: str
    dst: str
    stats: DirectionStats


@dataclasses.dataclass(frozen=True, slots=True)
class LatencyReport:
    """What one probe window measured for one vNIC.

    ``vlan``/``vni``/``tunnel``: how the probes were carried on the pif
    (the VLAN ids of their tags, outermost first; the tunnel's network
    identifier and kind, ``'vxlan'`` or ``'geneve'``), the most common
    over the window; ``()``/None when plain.  ``anomalies``: probes or
    replies seen out of path order (e.g. on the vif before the pif, which
    one clock cannot do for one packet): no value, left out of the
    statistics.  ``rejected``: sightings of this vNIC's probes whose tag
    or address did not verify (look-alikes), ignored.  ``authenticated``:
    whether sightings were verified at all.
    """

    vif: str
    pif: str
    protocol: str
    sent: int
    ingress: DirectionStats
    egress: DirectionStats
    turnaround: DirectionStats
    hops: tuple = ()
    unseen_at_pif: int = 0
    late: int = 0
    unknown: int = 0
    vlan: tuple = ()
    vni: int | None = None
    tunnel: str | None = None
    anomalies: int = 0
    rejected: int = 0
    authenticated: bool = False
    # ((direction, counts per HISTOGRAM_EDGES_US bucket), ...): the
    # distribution behind ingress, egress and turnaround.
    histograms: tuple = ()

    def histogram(self, direction):
        """Counts per :data:`HISTOGRAM_EDGES_US` bucket of ``direction``
        (``'ingress'``, ``'egress'``, ``'turnaround'``); () if unknown."""
        return dict(self.histograms).get(direction, ())

    @property
    def filtered(self):
        """Probes reached the pif, yet none reached the vif.

        The usual cause is a security group or port security dropping
        them before the vif, not in-host loss.
        """
        return self.ingress.count == 0 and self.ingress.lost > 0

    @property
    def entered_pif(self):
        """How many probes the pif received."""
        return self.ingress.count + self.ingress.lost


class Matcher:
    """Collects sightings of one window; :meth:`reports` gives the result.

    :param session: the window's session (keys of other sessions ignored)
    :param paths: :class:`vifpath.VifPath` per vNIC
    :param plan: ``{seq: vnic}`` for every probe sent; sightings of other
        sequence numbers are ignored
    :param timeout_ns: a probe (or reply) later than this is lost
    :param protocol: recorded in the reports
    :param capture_dropped: the capture lost packets in this window, so a
        probe missing on the vif may have been dropped by the capture, not
        by the host: such probes are counted as ``unknown``, never as lost
    :param secret: the window's secret (the probes' tags and TCP ISNs);
        None: sightings are not verified (the reports say so)
    :param addresses: ``{vnic: address string}``, the planned destination
        of each vNIC's probes (needed with ``secret``)
    :param label: the protocol shown in the reports (default:
        ``protocol``, which is the probes' and keys their tags)

    TCP: ``plan`` holds :func:`probe.tcp_ident` sequence numbers (or keys
    as read, :func:`probe.tcp_wire_ident`); the ISN each probe carried is
    computed once, and sightings are found through it.
    """

    def __init__(self, session, paths, plan, timeout_ns, protocol='icmp',
                 capture_dropped=False, secret=None, addresses=None,
                 label=None):
        self.session = session
        self.paths = {p.vif: p for p in paths}
        self.plan = dict(plan)
        unknown = set(self.plan.values()) - set(self.paths)
        if unknown:
            raise ValueError(
                f"probes planned for vNICs with no path: {sorted(unknown)}")
        self.timeout_ns = timeout_ns
        self.protocol = protocol
        self.label = label or protocol
        self.capture_dropped = capture_dropped
        self.secret = (None if secret is None else
                       probe.check_secret(secret, 'window secret'))
        self._dst = {}
        if self.secret is not None:
            addresses = addresses or {}
            missing = set(self.plan.values()) - set(addresses)
            if missing:
                raise ValueError("verified matching needs the address of "
                                 f"every vNIC; none for {sorted(missing)}")
            self._dst = {v: _packed(a) for v, a in addresses.items()}
        # vnic -> (packed address, its probe.address_fold), for the auths.
        self._fold = {v: (d, probe.address_fold(d))
                      for v, d in self._dst.items()}
        # seq << 1 | reply -> {ifname: t_ns}
        self._seen = {}
        # (seq, reply) -> probe.Encap on the pif (tagged/VXLAN rows only)
        self._encap = {}
        # seq -> the auth a genuine sighting carries (computed once).
        self._expected = {}
        # ICMP/UDP: vnic -> its planned seqs whose auths are still to be
        # computed (made at the first verification).
        self._unverified = None
        self._tagger = (probe.Tagger(self.secret, protocol, session)
                        if self.secret is not None and protocol != 'tcp'
                        else None)
        self.verifications = 0
        self._rejected = collections.Counter()
        # TCP: the key as read (port and ISN) -> the plan's seq.
        self._wire = self._tcp_keys() if protocol == 'tcp' else None

    def _tcp_keys(self):
        """``{wire seq: plan seq}``: each planned TCP probe's key as read
        from the wire (its port and the ISN it carried)."""
        wire = {}
        for seq, vif in self.plan.items():
            port = probe.tcp_ident_port(seq)
            if port is None or seq >> 40:
                wire[seq] = seq             # a key as read already
                continue
            isn = probe.tcp_isn(self.secret, self.session, seq,
                                self._dst.get(vif))
            wire[probe.tcp_wire_ident(port, isn)] = seq
        return wire

    def _expect(self, seq):
        """The auth planned probe ``seq`` carries (computed once).

        ICMP/UDP: those of every probe planned to its vNIC in one batch
        (:meth:`probe.Tagger.expected_many`).  ``verifications`` counts
        the auths computed."""
        vif = self.plan[seq]
        dst = self._fold[vif][0]
        if self._tagger is None:
            self.verifications += 1
            want = probe.expected_auth(self.secret, self.protocol,
                                       self.session, seq, dst)
            self._expected[seq] = want
            return want
        if self._unverified is None:
            self._unverified = collections.defaultdict(list)
            for s, v in self.plan.items():
                self._unverified[v].append(s)
        seqs = self._unverified.pop(vif)
        self.verifications += len(seqs)
        self._expected.update(zip(seqs,
                                  self._tagger.expected_many(seqs, dst)))
        return self._expected[seq]

    def _roles(self, names):
        """``{vnic: {batch column: (role, ifname)}}`` of the columns
        (``names``: column -> ifname) on each vNIC's path: :data:`_PIF`,
        :data:`_VIF` (its own netdev, the last) or :data:`_HOP`."""
        columns = collections.defaultdict(list)
        for i, name in names.items():
            columns[name].append(i)
        out = {}
        for v, p in self.paths.items():
            pif, last = p.interfaces[0], p.interfaces[-1]
            roles = out[v] = {}
            for name in p.interfaces:
                role = (_PIF if name == pif else _VIF if name == last
                        else _HOP)
                for i in columns.get(name, ()):
                    roles[i] = (role, name)
        return out

    def feed_batch(self, batch):
        """Add every row of a :class:`sightings.SightingBatch`.

        One pass over the columns, the per-row checks inline (12,800 rows
        for 64 vNICs x 50 probes): the planned probe (and its auth,
        computed once per probe), its path (each vNIC's batch columns and
        their roles worked out once per batch), the direction; the first
        sighting per interface is kept."""
        if batch.session != self.session and self._wire is None:
            return
        wire = self._wire
        plan = self.plan
        secret = self.secret
        expected = self._expected
        expect = self._expect
        rejected = self._rejected
        seen_all = self._seen
        roles_of = self._roles(batch.ifnames)
        dir_in, dir_out = sightings.DIR_IN, sightings.DIR_OUT
        for k, i, t_ns, direction, auth in zip(
                batch.keys, batch.ifindex, batch.t_ns, batch.direction,
                batch.auth_column()):
            if wire is None:
                seq = k >> 1
            else:
                seq = wire.get(k >> 1)
                k = -1 if seq is None else (seq << 1) | (k & 1)
            vif = plan.get(seq)
            if vif is None:
                continue
            if secret is not None:
                want = expected.get(seq)
                if auth != (expect(seq) if want is None else want):
                    rejected[vif] += 1
                    continue
            where = roles_of[vif].get(i)
            if where is None:
                continue
            role, ifname = where
            if role == _PIF:
                # Probes must be received on the pif, replies sent out of
                # it.
                if direction == (dir_in if k & 1 else dir_out):
                    continue
            elif role == _VIF and k & 1 and direction == dir_out:
                # A "reply" the host sends towards the guest is a
                # look-alike (e.g. an echo reply nobody asked for), not
                # the guest's.
                continue
            # Keyed (seq << 1 | reply): the key as read, for ICMP/UDP.
            seen = seen_all.get(k)
            if seen is None:
                seen_all[k] = {ifname: t_ns}
                continue
            old = seen.get(ifname)
            if old is None or t_ns < old:
                seen[ifname] = t_ns
        names = batch.ifnames
        for (k, i), encap in batch.encap.items():
            seq = k >> 1 if wire is None else wire.get(k >> 1)
            vif = plan.get(seq)
            if vif is not None and names[i] == self.paths[vif].pif:
                self._encap.setdefault((seq, bool(k & 1)), encap)

    def accepted(self):
        """``{(seq, reply): {ifname: t_ns}}``: the first sighting per
        interface of every planned probe and answer that was accepted
        (verified, on its path, in the right direction)."""
        return {(k >> 1, bool(k & 1)): dict(v)
                for k, v in self._seen.items()}

    def reports(self):
        """``{vnic: LatencyReport}`` for every vNIC with a path."""
        per_vnic = {v: [] for v in self.paths}
        for seq, vif in self.plan.items():
            per_vnic[vif].append(seq)
        return {v: self._report(self.paths[v], seqs)
                for v, seqs in per_vnic.items()}

    def _report(self, path, seqs):
        pif, vif = path.pif, path.interfaces[-1]
        timeout = self.timeout_ns
        ingress, egress, turnaround = [], [], []
        in_lost = eg_lost = unseen = late = unknown = anomalies = 0
        dropped = self.capture_dropped
        hops = list(zip(path.interfaces, path.interfaces[1:]))
        hop_values = [[] for _ in hops]
        hop_lost = [0] * len(hops)
        empty = {}
        seen = self._seen
        # A path of pif and vif alone is in order when the vif's is not
        # the earlier (no hop to walk).
        direct = len(path.interfaces) == 2
        for seq in seqs:
            fwd = seen.get(seq << 1, empty)
            back = seen.get((seq << 1) | 1, empty)
            t_pif = fwd.get(pif)
            t_vif = fwd.get(vif)
            if t_pif is None:
                unseen += 1
            elif t_vif is None:
                if dropped:
                    unknown += 1
                else:
                    in_lost += 1
            elif t_vif - t_pif > timeout:
                in_lost += 1
                late += 1
            elif (t_vif < t_pif if direct
                  else not _in_order(fwd, path.interfaces)):
                anomalies += 1
            else:
                ingress.append(t_vif - t_pif)
                if len(hops) > 1:
                    for n, (a, b) in enumerate(hops):
                        ta, tb = fwd.get(a), fwd.get(b)
                        if ta is None:
                            continue
                        if tb is None:
                            hop_lost[n] += 1
                        else:
                            hop_values[n].append(tb - ta)
            r_vif = back.get(vif)
            r_pif = back.get(pif)
            if r_vif is not None:
                if r_pif is None and dropped:
                    pass
                elif r_pif is None or r_pif - r_vif > timeout:
                    eg_lost += 1
                elif r_pif < r_vif:
                    anomalies += 1
                else:
                    egress.append(r_pif - r_vif)
                if t_vif is not None:
                    if r_vif < t_vif:
                        anomalies += 1
                    else:
                        turnaround.append(r_vif - t_vif)
        vlan, vni, tunnel = self._carried(seqs)
        hop_stats = tuple(
            HopStats(a, b, DirectionStats.from_ns(vals, lost))
            for (a, b), vals, lost in zip(hops, hop_values, hop_lost)
        ) if len(hops) > 1 else ()
        # Each direction sorted once, for its statistics and histogram.
        ingress.sort()
        egress.sort()
        turnaround.sort()
        return LatencyReport(
            vif=path.vif, pif=pif, protocol=self.label, sent=len(seqs),
            ingress=DirectionStats._of_sorted(ingress, in_lost),
            egress=DirectionStats._of_sorted(egress, eg_lost),
            turnaround=DirectionStats._of_sorted(turnaround),
            hops=hop_stats, unseen_at_pif=unseen, late=late,
            unknown=unknown, vlan=vlan, vni=vni, tunnel=tunnel,
            anomalies=anomalies, rejected=self._rejected[path.vif],
            authenticated=self.secret is not None,
            histograms=(('ingress', _histogram_of_sorted(ingress)),
                        ('egress', _histogram_of_sorted(egress)),
                        ('turnaround', _histogram_of_sorted(turnaround))))

    def _carried(self, seqs):
        """``(vlan, vni, tunnel)`` most common on the pif among ``seqs``."""
        if not self._encap:
            return (), None, None
        seen = self._encap
        counts = collections.Counter(
            e for seq in seqs for e in (seen.get((seq, False)),
                                        seen.get((seq, True))) if e)
        if not counts:
            return (), None, None
        encap = counts.most_common(1)[0][0]
        return encap.vlan, encap.vni, encap.tunnel


def _packed(address):
    """An address string (or packed bytes) as packed bytes."""
    if isinstance(address, (bytes, bytearray)):
        return bytes(address)
    family = socket.AF_INET6 if ':' in address else socket.AF_INET
    try:
        return socket.inet_pton(family, address)
    except OSError as exc:
        raise ValueError(f"invalid vNIC address {address!r}") from exc


def _in_order(seen, interfaces):
    """Whether the interfaces in ``seen`` (``{ifname: t_ns}``) saw the
    packet in the order of ``interfaces``."""
    last = None
    for name in interfaces:
        t = seen.get(name)
        if t is not None:
            if last is not None and t < last:
                return False
            last = t
    return True
