"""Read tcpdump captures (pcap, pcapng) into :class:`sightings.SightingBatch`.

This module opens a file (mapped, or read whole from a pipe or standard
input) and hands it to the reader of its format, :mod:`pcapreader`
(classic pcap) or :mod:`pcapngreader`; both fill a :class:`pcaprows.Rows`,
from which :func:`pcaprows.result` gives the chosen session's rows.  What
follows describes them together.

Formats: classic pcap (magic ``a1b2c3d4`` µs and ``a1b23c4d`` ns, either
byte order) and pcapng (sections of either byte order; interface blocks with
``if_name``, ``if_tsresol`` and ``if_tsoffset``; enhanced packet blocks with
``epb_flags`` direction; obsolete packet blocks).  Link types: Ethernet,
Linux cooked v1 and v2 (``tcpdump -i any``; their packet type gives the
direction).  Simple packet blocks carry no timestamp: they are counted as
``untimed`` and measure nothing.  Other link types are counted, not read.

Timestamps become integer nanoseconds since the epoch exactly (integer
arithmetic, never a float); resolutions finer than 1 ns are truncated.

**Fast path.**  Per-packet Python objects cap near 0.3M packets/s, so the
file is mapped into memory and read as *runs* of equal-length records (a
probe capture is mostly that): every field of a whole run is pulled out
at once and turned into keys by :func:`pcapkeys.run_keys`.  Records
outside runs (a pif capture of UDP probes and the guest's ICMP errors
alternates two lengths) are set aside by length, copied together and read
the same way, so a batch's rows are *not* in the file's order.  Everyday
traffic (a pif's TCP, ARP, DNS, IPv6, VLANs, all lengths) is mostly no
probe: blocks of up to :data:`MAX_BLOCK` records of mixed lengths have
their first :data:`PREFIX` bytes copied side by side, and the prefilters
(:func:`pcapkeys.probe_candidates`, :func:`pcapkeys.fingerprint_candidates`)
rule out in columns what cannot be a probe (or a fingerprint to or from
the instance); only the rest is set aside and read.  VLAN tags,
IP options, IPv6, VXLAN, Geneve and foreign traffic are read one record at
a time by :func:`pcapkeys.frame_key`.  Both give exactly the keys
:func:`probe.parse_key` gives.

**Encapsulation.**  VLAN tags stay in the frames tcpdump writes (libpcap
puts back the tag the kernel took out); probes inside VXLAN or Geneve are
keyed by the inner frame.  The batch's ``encap`` holds the tags' VLAN ids,
the tunnel and its VNI (see :class:`sightings.SightingBatch`), as a live
capture does.

**Sessions.**  A file may hold probes of several windows (sessions); the
most common one is kept unless another is asked for.

**Fingerprint mode** (foreign traffic, e.g. the seed's hping3 SYNs with
random sequence numbers and no tag of ours): the key of an IPv4 packet is
a 63-bit BLAKE2b hash of its source and destination addresses, IP id,
protocol and the first 8 bytes of its transport header (TCP ports and
sequence number; UDP ports, length and checksum; ICMP type, code, checksum,
id and sequence): fields no bridge or veth changes.  IPv6: addresses, next
header, payload length and the first 8 bytes after the fixed header.  The
reply bit is set when the packet comes *from* ``dst_ip`` (the instance);
without ``dst_ip`` every packet counts as a probe.  Only request/response
traffic is keyed: unicast TCP, UDP (not DHCP), ICMP/ICMPv6 echo and the
errors quoting a packet, to or from ``dst_ip``; ARP, IGMP, neighbour
discovery, router solicitations, MLD and broadcast never are.  VXLAN and
Geneve packets are keyed by their inner packet, the VNI kept in ``encap``.
A request to ``dst_ip`` and the instance's answer to it (ICMP/ICMPv6 echo:
addresses, id and sequence; TCP SYN and the SYN-ACK or RST-ACK with ack =
seq + 1: addresses, ports, the SYN's sequence number) share their key but
for the reply bit, so the guest's turnaround is measured as for probes.
Fingerprint rows have session 0.  Packets with identical invariant fields
(retransmissions) share a key: the matcher keeps the first sighting on
each interface.

**One read.**  :func:`read_capture` reads a file once, whatever the
analysis needs: probe rows of every session and, asked for, fingerprint
rows of the records that are no probe (what auto mode falls back on), so
a pipe, a fifo, process substitution or ``-`` (standard input) is read
like a file (those are copied into memory; files are mapped).

**Errors.**  An empty, unknown or corrupt file raises :class:`PcapError`
naming the file and the byte offset, as do what tcpdump refuses (a pcap
version other than 2.0-2.4 and DG/UX's 543.0, a pcapng section version
other than 1.0/1.2)
and what it would misread: a link type netweaver does not read (the
message says which it reads) and a timestamp whose fraction is out of
range (µs >= 1,000,000, ns >= 10**9), named by record number and byte;
with ``lenient`` such records are skipped and counted
(:attr:`PcapRead.invalid_times`) instead.  A *truncated last record*
(tcpdump killed mid-write) is a warning, not an error: the records before
it are kept, the partial one is dropped and :attr:`PcapRead.truncated` is
set.
"""

import contextlib
import dataclasses
import mmap
import os
import socket
import stat
import struct
import sys

from netweaver_agent.core import pcapkeys
from netweaver_agent.core import pcapngreader
from netweaver_agent.core import pcapreader
from netweaver_agent.core import pcaprows

STDIN = '-'


def read_pcap(path, ifname=None, session=None, fingerprint=False,
              dst_ip=None, tcp_ports=None, lenient=False):
    """Read one capture file into a :class:`PcapRead`.

    :param ifname: the interface name for every record (one file = one
        interface); default: pcapng ``if_name`` options, else the file
        name without its extension
    :param session: keep this session's probes (default: the most common)
    :param fingerprint: key foreign packets by their invariant fields (see
        the module docstring) instead of our probes' tags
    :param dst_ip: (fingerprint) the instance's address, as a string
    :param tcp_ports: the source ports our TCP probes come from (a range,
        ``[netweaver] tcp_source_ports``): with no plan to check each
        probe's own port against, TCP packets from (answers to) other
        ports are not ours.  None: any port.
    :param lenient: skip (and count) records whose timestamp field is out
        of range instead of refusing the file
    :raises pcaprows.PcapError: the file is empty, unknown, corrupt or
        unreadable
    """
    cap = read_capture(path, ifname=ifname, probes=not fingerprint,
                       fingerprint=fingerprint, dst_ip=dst_ip,
                       tcp_ports=tcp_ports, lenient=lenient)
    return cap.fingerprints() if fingerprint else cap.probes(session)


@dataclasses.dataclass(frozen=True, slots=True)
class Capture:
    """One capture file, read once: :meth:`probes` of any session and,
    when asked for, :meth:`fingerprints` of the records that are no probe.
    """

    path: str
    format: str
    _rows: pcaprows.Rows
    _keyed_probes: bool = True

    @property
    def sessions(self):
        """``((session, probe rows), ...)``, most common first."""
        return pcaprows.ranked(self._rows)

    def probes(self, session=None):
        """The probe rows of ``session`` (default: the most common); None
        unless read with ``probes``."""
        if not self._keyed_probes:
            return None
        return pcaprows.result(self._rows, self.format, session)

    def fingerprints(self):
        """The fingerprint rows (None unless read with ``fingerprint``)."""
        rows = self._rows
        if not self._keyed_probes:
            return pcaprows.result(rows, self.format, 0)
        if rows.prints is None:
            return None
        prints = rows.prints
        prints.records, prints.untimed = rows.records, rows.untimed
        prints.truncated, prints.linktypes = rows.truncated, rows.linktypes
        prints.invalid_times = rows.invalid_times
        return pcaprows.result(prints, self.format, 0)


def _fingerprint_keyfunc(dst_ip):
    """``(keyfunc, prefilter, packed address)`` of fingerprints for
    instance ``dst_ip``."""
    packed = None
    if dst_ip is not None:
        family = socket.AF_INET6 if ':' in dst_ip else socket.AF_INET
        try:
            packed = socket.inet_pton(family, dst_ip)
        except OSError as exc:
            raise ValueError(
                f"invalid instance address {dst_ip!r}") from exc

    def keyfunc(buf, off, caplen, link):
        return pcapkeys.fingerprint_key(buf, off, caplen, link, packed)

    def prefilter(buf, first, stride, n, caplen, link, short=None):
        return pcapkeys.fingerprint_candidates(buf, first, stride, n, caplen,
                                               link, packed, short)
    return keyfunc, prefilter, packed


def read_capture(path, ifname=None, probes=True, fingerprint=False,
                 dst_ip=None, tcp_ports=None, lenient=False, progress=None):
    """Read one capture file once into a :class:`Capture`.

    ``path`` may be a regular file (mapped), or ``-`` (standard input), a
    pipe or a fifo (read whole into memory).

    :param probes: key our probes (see :func:`read_pcap` for ``ifname``,
        ``tcp_ports`` and ``lenient``)
    :param fingerprint: key by fingerprint (``dst_ip``: the instance's
        address): every record, or with ``probes`` those that are no probe
    :param progress: ``callable(done_bytes, total_bytes)``, called about
        once a second on files that take longer than a second
    :raises pcaprows.PcapError: the file is empty, unknown, corrupt or
        unreadable
    """
    path = os.fspath(path)
    if not probes and not fingerprint:
        raise ValueError("read_capture: nothing to key (neither probes "
                         "nor fingerprints)")
    if probes:
        rows = pcaprows.Rows(path, pcapkeys.frame_key, ifname)
        rows.tcp_ports = tcp_ports
        if fingerprint:
            rows.fingerprint_too(*_fingerprint_keyfunc(dst_ip))
    else:
        keyfunc, prefilter, packed = _fingerprint_keyfunc(dst_ip)
        rows = pcaprows.Rows(path, keyfunc, ifname)
        rows.fp_filter, rows.fp_dst = prefilter, packed
    rows.lenient = lenient
    rows.progress = progress
    try:
        with _open(path) as buf:
            if not len(buf):
                raise pcaprows.PcapError(
                    f"{path}: empty file (no pcap header)")
            if buf[:4] == pcapngreader.PCAPNG_SHB.to_bytes(4, 'little'):
                fmt = 'pcapng'
                pcapngreader.Reader(buf, rows).read()
            else:
                fmt = 'pcap'
                pcapreader.Reader(buf, rows).read()
    except OSError as exc:
        raise pcaprows.PcapError(
            f"{path}: cannot read: {exc.strerror or exc}") \
            from exc
    except (struct.error, IndexError) as exc:
        raise pcaprows.PcapError(f"{path}: corrupt capture: {exc}") from exc
    return Capture(path=path, format=fmt, _rows=rows, _keyed_probes=probes)


@contextlib.contextmanager
def _open(path):
    """The bytes of ``path``: a map of a regular file; standard input
    (``-``), pipes, fifos and character devices read whole."""
    if path == STDIN:
        yield sys.stdin.buffer.read()
        return
    with open(path, 'rb') as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            yield f.read()
        elif info.st_size == 0:
            yield b''
        else:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                yield buf
