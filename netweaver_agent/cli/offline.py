"""Latency from two capture files: one taken on the pif, one on the vif.

What the seed did with ``tcpdump -tttt`` text, done right: nanosecond
timestamps from the files (no truncation to milliseconds), full dates,
and every probe matched on its own, so a missing packet is counted as lost
instead of ending the analysis.

The *plan* (the probes the report is about) is every probe seen received
on the pif or seen on the vif: the files cannot tell what a source sent,
so ``sent`` in the report is that count, and probes that were sent but
never reached the pif are invisible here.

Two ways to know a packet again on the other interface:

* ``probe`` mode: our probes' tags (any ``netweaver`` probe window; one
  session is analysed, by default the most common one in the pif file);
* ``fingerprint`` mode: foreign traffic (the seed's hping3 SYNs), keyed by
  invariant header fields (see :mod:`netweaver_agent.core.pcapfile`).  Where
  the protocol pairs an answer with its request (ICMP echo id/seq, TCP
  SYN -> SYN-ACK/RST with ack = seq + 1) the two share a key and the
  guest's turnaround is measured too; other replies give egress only.
  Only request/response traffic to and from
  the instance counts (never ARP, IGMP, neighbour discovery, DHCP...);
  either file may carry it inside VXLAN or Geneve (the inner packet is
  matched, the VNI reported).

Either way a packet seen on the vif before the pif (or a reply on the pif
before the vif) gives no latency: it is counted in the report's
``anomalies`` and left out of the statistics.

``auto`` (the default) uses probe mode, or fingerprint mode when neither
file holds a probe of ours and the instance's address is known.

Authentication: with the window's secret (``key``, ``netweaver analyze
--key HEX``; ``netweaver measure`` passes its own) and the instance's
address, probe mode counts only sightings whose tag and address verify
(see :mod:`netweaver_agent.core.probe`); TCP probes also need the plan that
sent them (their ISN is the tag).  Without a key, probes are matched
*unauthenticated*: anyone who saw one probe of the window could have
added look-alikes, and the report says so.
"""

import dataclasses
import functools
import os

from oslo_log import log

from netweaver_agent.core import latency
from netweaver_agent.core import pcapfile
from netweaver_agent.core import pcaprows
from netweaver_agent.core import probe
from netweaver_agent.core import sightings
from netweaver_agent.core import vifpath

LOG = log.getLogger(__name__)

MODES = ('auto', 'probe', 'fingerprint')
DEFAULT_TIMEOUT_MS = 1000.0


class AnalyzeError(ValueError):
    """The two files cannot be analysed together (message names them)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Analysis:
    """The report of one pif/vif pair of captures, and what was read."""

    report: latency.LatencyReport
    pif: pcaprows.PcapRead
    vif: pcaprows.PcapRead
    mode: str
    session: int
    # Sightings verified with the window's secret (tags and addresses).
    authenticated: bool = False

    @property
    def reports(self):
        """``{vif name: report}``, the shape ``report.format_table`` takes."""
        return {self.report.vif: self.report}


def interface_names(pif_path, vif_path, pif_name=None, vif_name=None):
    """Names for the two files' interfaces: given, else the file names."""
    pif_name = pif_name or pcaprows.stem(os.fspath(pif_path))
    vif_name = vif_name or pcaprows.stem(os.fspath(vif_path))
    if pif_name == vif_name:
        pif_name, vif_name = f'pif:{pif_name}', f'vif:{vif_name}'
    return pif_name, vif_name


def build_plan(batch, pif, vif):
    """``{seq: vif}`` for every probe received on ``pif`` or seen on
    ``vif`` (replies' keys are left out)."""
    names = batch.ifnames
    plan = {}
    for key, index, direction in zip(batch.keys, batch.ifindex,
                                     batch.direction):
        if key & 1:
            continue
        name = names[index]
        if name == vif or (name == pif and direction != sightings.DIR_OUT):
            plan[key >> 1] = vif
    return plan


def _replies_plan(batch, pif, vif):
    """``{seq: vif}`` for fingerprint replies seen on ``vif``."""
    names = batch.ifnames
    return {key >> 1: vif for key, index in zip(batch.keys, batch.ifindex)
            if key & 1 and names[index] == vif}


def analyze_pcaps(pif_path, vif_path, destination=None, session=None,
                  protocol=None, mode='auto', timeout_ms=DEFAULT_TIMEOUT_MS,
                  pif_name=None, vif_name=None,
                  tcp_ports=probe.DEFAULT_TCP_SOURCE_PORTS, key=None,
                  plan=None, lenient=False, progress=None):
    """Match the probes of a pif capture and a vif capture.

    :param destination: the instance's address (fingerprint mode: tells
        replies from probes)
    :param session: the probe window to analyse (default: the most common
        in the pif file, else in the vif file)
    :param protocol: shown in the report (default: the mode's name)
    :param timeout_ms: a probe (or reply) slower than this is lost
    :param tcp_ports: the range TCP probes' source ports come from
        (``[netweaver] tcp_source_ports``); in probe mode, TCP packets from
        (or answers to) other ports are not ours (see
        :func:`pcapfile.read_pcap`)
    :param key: the probe window's secret (bytes): probe mode then
        accepts only sightings whose tag and address verify (needs
        ``destination``); None: unauthenticated matching
    :param plan: the :class:`sources.ProbePlan` that sent the probes
        (``netweaver measure``): its probes are the report's, its session
        the one analysed (TCP probes are verified only with it)
    :param lenient: records with a timestamp field out of range are
        skipped and counted instead of refusing the file
    :param progress: ``callable(path, done_bytes, total_bytes)``, called
        about once a second while a long file is read
    :returns: :class:`Analysis`
    :raises pcaprows.PcapError: a file is unreadable or corrupt
    :raises AnalyzeError: nothing to measure, or a bad combination
    """
    if mode not in MODES:
        raise ValueError(f"unknown analysis mode {mode!r}; expected one of "
                         f"{', '.join(MODES)}")
    if timeout_ms <= 0:
        raise ValueError(f"timeout {timeout_ms!r} ms must be > 0")
    pif, vif = interface_names(pif_path, vif_path, pif_name, vif_name)
    if key is not None:
        key = probe.check_secret(key, '--key')
        if destination is None:
            raise AnalyzeError("verifying probes with a key needs the "
                               "instance's address (--destination): the "
                               "tags bind it")
    if plan is not None:
        # TCP keys carry no session on the wire.
        session = (probe.TCP_SESSION if plan.protocol == 'tcp' else
                   plan.session)
    pif_read, vif_read, mode = _read(
        pif_path, vif_path, pif, vif, mode, session, destination,
        tcp_ports, lenient, progress)
    if pif_read.probes == 0 and vif_read.probes == 0:
        raise AnalyzeError(f"no packet to match in {pif_path} or {vif_path}")
    batch = sightings.SightingBatch(pif_read.session)
    batch.extend(pif_read.batch)
    batch.extend(vif_read.batch)
    timeout_ns = int(timeout_ms * 1_000_000)
    label = protocol or mode
    path = vifpath.VifPath(vif=vif, address=None, interfaces=(pif, vif))
    verify = key if mode == 'probe' else None
    session = batch.session
    if plan is not None and mode == 'probe':
        seqs = {p.seq: vif for p in plan.probes}
        session, kind = plan.session, plan.protocol
    else:
        seqs = build_plan(batch, pif, vif)
        kind = (_protocol_of(batch, seqs, protocol, verify, destination)
                if mode == 'probe' else None)
    matcher = latency.Matcher(
        session, [path], seqs, timeout_ns, protocol=kind or 'icmp',
        secret=verify, addresses={vif: destination} if verify else None,
        label=label)
    matcher.feed_batch(batch)
    report = matcher.reports()[vif]
    if mode == 'fingerprint':
        # Every reply seen on the vif, with the requests it answers (the
        # same key): its egress and all anomalies, each counted once.
        back = latency.Matcher(batch.session, [path],
                               {**_replies_plan(batch, pif, vif),
                                **matcher.plan}, timeout_ns,
                               label=label)
        back.feed_batch(batch)
        replies = back.reports()[vif]
        report = dataclasses.replace(
            report, egress=replies.egress, anomalies=replies.anomalies,
            histograms=tuple((d, replies.histogram(d) if d == 'egress'
                              else h) for d, h in report.histograms))
    LOG.debug('Analysed %(pif)s and %(vif)s (%(mode)s mode, session '
              '%(session)d): %(n)d probes', {
                  'pif': pif_path, 'vif': vif_path, 'mode': mode,
                  'session': batch.session, 'n': report.sent})
    return Analysis(report=report, pif=pif_read, vif=vif_read, mode=mode,
                    session=session, authenticated=verify is not None)


def _protocol_of(batch, seqs, protocol, key, destination):
    """The probes' protocol (their tags are keyed with it): ``'tcp'`` for
    TCP keys; else ``protocol`` if it names one, else, with a ``key``, the
    one whose tags verify on more of the first rows; None unverified."""
    for seq in seqs:
        if probe.tcp_ident_port(seq) is not None:
            if key is not None:
                raise AnalyzeError(
                    "TCP probes carry their tag in the ISN, which only the "
                    "plan that sent them can check: analyse TCP captures "
                    "without --key (unauthenticated)")
            return 'tcp'
        break
    if protocol in ('icmp', 'udp') or key is None:
        return protocol if protocol in ('icmp', 'udp') else None
    packed = latency._packed(destination)
    votes = {'icmp': 0, 'udp': 0}
    for k, a in zip(batch.keys[:64], batch.auth_column()[:64]):
        for kind in votes:
            if a == probe.expected_auth(key, kind, batch.session, k >> 1,
                                        packed):
                votes[kind] += 1
    return 'udp' if votes['udp'] > votes['icmp'] else 'icmp'


def _read(pif_path, vif_path, pif, vif, mode, session, destination,
          tcp_ports, lenient, progress):
    """Each file read once, for what ``mode`` may need (auto mode: probes,
    and fingerprints of the rest when the instance's address is known);
    ``(pif PcapRead, vif PcapRead, mode)``, the mode decided."""
    if mode == 'fingerprint' and destination is None:
        raise AnalyzeError(
            "fingerprint mode needs the instance's address to tell "
            f"probes from replies ({pif_path}, {vif_path})")
    if pif_path == vif_path == pcapfile.STDIN:
        raise AnalyzeError("standard input (-) can hold only one of the "
                           "two captures")
    probes = mode != 'fingerprint'
    prints = destination is not None and mode != 'probe'
    caps = []
    for path, name in ((pif_path, pif), (vif_path, vif)):
        told = None if progress is None else functools.partial(progress,
                                                               path)
        caps.append(pcapfile.read_capture(
            path, ifname=name, probes=probes, fingerprint=prints,
            dst_ip=destination, tcp_ports=tcp_ports, lenient=lenient,
            progress=told))
    if probes:
        if session is None:
            ranked = caps[0].sessions or caps[1].sessions
            session = ranked[0][0] if ranked else None
        if session is not None:
            reads = [c.probes(session) for c in caps]
            for read in reads:
                others = [s for s, _ in read.sessions if s != session]
                if others:
                    LOG.warning(
                        '%(path)s also holds probes of session(s) '
                        '%(others)s, not analysed (session %(session)d is)',
                        {'path': read.path, 'session': session,
                         'others': ', '.join(map(str, others))})
            _not_the_same(pif_path, vif_path, *reads)
            return reads[0], reads[1], 'probe'
        if not prints:
            hint = ('' if mode == 'probe' else
                    '; for foreign traffic (e.g. hping3) give the '
                    'instance\'s address to use fingerprint mode')
            raise AnalyzeError(
                f"no netweaver probe in {pif_path} or {vif_path}{hint}")
    reads = caps[0].fingerprints(), caps[1].fingerprints()
    _not_the_same(pif_path, vif_path, *reads)
    return reads[0], reads[1], 'fingerprint'


def _not_the_same(pif_path, vif_path, pif_read, vif_read):
    """Refuse one capture given as both: each packet's two sightings would
    be one, every latency 0 and, where the file says which way packets
    went, the vif's outgoing probes "not received on the pif"."""
    same = False
    if pcapfile.STDIN not in (pif_path, vif_path):
        try:
            same = os.path.samefile(pif_path, vif_path)
        except OSError:
            same = False
    if not same and pif_read.records and len(pif_read.batch):
        a, b = pif_read.batch, vif_read.batch
        same = (pif_read.records == vif_read.records and
                a.t_ns == b.t_ns and a.keys == b.keys)
    if same:
        raise AnalyzeError(
            f"{pif_path} and {vif_path} are the same capture (the same "
            "packets at the same times): nothing in-host can be measured "
            "from one capture; give the one taken on the pif and the one "
            "taken on the vif")
