"""Prepared probes on their way out: the one pacing loop, and the one
encoding that hands prepared packets to a sender elsewhere.

Standard library only, and nothing of ours: :mod:`netweaver_agent.ssh.sender`
ships this file to a remote host next to itself and runs there with the
host's ``python3``.  :class:`sources.LocalSource` (the privsep daemon's
sender too) paces with the same :func:`pace`.

* :class:`Packet`: one prepared probe, its offset in the window, its
  destination, the whole IPv4 or IPv6 packet (or frame).
* :func:`pace`: sends packets at their offsets, several per timer wake-up
  (those due within :data:`SEND_QUANTUM_S`), never one closer to its
  destination's previous packet than the plan put them, stopping at a
  deadline.
* :func:`encode` / :func:`decode`: packets as length-prefixed records
  (offset, length, IP version, destination, packet) on a byte stream.
"""

import dataclasses
import ipaddress
import socket
import struct
import time

# Several probes per timer wake-up: a probe may leave up to this much
# before its planned time, never closer to its vNIC's previous probe than
# the plan put them.  The host's rate holds over any stretch of this
# length; every wake-up sends what is due within it.
SEND_QUANTUM_S = 0.002
# Errors a send keeps (the first ones), each cut to this length.
MAX_ERRORS = 5
MAX_ERROR_CHARS = 300
# A record: offset_ns, packet length, IP version, destination (16 bytes,
# an IPv4 address in the first 4), then the packet.
RECORD = struct.Struct('!QHB16s')
_FAMILIES = {4: (socket.AF_INET, 4), 6: (socket.AF_INET6, 16)}


@dataclasses.dataclass(frozen=True)
class Packet:
    """One prepared probe: when (ns from the window's first), where, what."""

    offset_ns: int
    dst_ip: str
    data: bytes


@dataclasses.dataclass(frozen=True)
class Paced:
    """What :func:`pace` did: packets sent, failed (with the first
    :data:`MAX_ERRORS` errors) and left unsent at the deadline."""

    sent: int
    failed: int
    errors: tuple
    left: int


def family_of(address):
    """``AF_INET6`` for an IPv6 address string, else ``AF_INET``."""
    return socket.AF_INET6 if ':' in address else socket.AF_INET


def pace(packets, transmit, deadline_s, quantum_s=SEND_QUANTUM_S,
         transmit_many=None):
    """Send ``packets`` (in order) at their offsets from now.

    Each wake-up sends every packet due within ``quantum_s``, but none
    closer to its destination's previous packet than their offsets are
    apart: a burst goes to different destinations, one destination's
    rate is the plan's.  Stops before a packet due after ``deadline_s``
    or when ``deadline_s`` (``time.monotonic()``) has passed.

    The packets of one wake-up go out together, as one batch (a slice
    of ``packets``, never two to one destination), just before the loop
    sleeps and at its end; a destination's next packet counts its
    spacing from when its batch was done.

    :param transmit: ``f(packet)``; an ``OSError`` counts the packet failed
    :param transmit_many: ``f(batch) -> [(packet, OSError)]`` (those
        that failed), instead of ``transmit`` once per packet
    :returns: :class:`Paced`
    """
    if transmit_many is None:
        transmit_many = _one_by_one(transmit)
    monotonic = time.monotonic
    sleep = time.sleep
    start = monotonic()
    sent = failed = 0
    errors = []
    # Per destination: when its last packet left (None: in the batch not
    # sent yet), and its planned offset.
    last = {}
    batch = []

    def flush():
        nonlocal sent, failed
        bad = transmit_many(batch)
        done = monotonic()
        for p in batch:
            last[p.dst_ip] = (done, p.offset_ns)
        sent += len(batch) - len(bad)
        failed += len(bad)
        for p, exc in bad:
            if len(errors) < MAX_ERRORS:
                errors.append(f'{p.dst_ip}: {exc}'[:MAX_ERROR_CHARS])
        batch.clear()

    for packet in packets:
        dst, offset_ns = packet.dst_ip, packet.offset_ns
        due = start + offset_ns / 1e9
        earliest = due - quantum_s
        prev = last.get(dst)
        if prev is not None and prev[0] is None:
            flush()         # its previous packet waits in the batch
            prev = last[dst]
        if prev is not None:
            spaced = prev[0] + (offset_ns - prev[1]) / 1e9
            if spaced > earliest:
                earliest = spaced
        now = monotonic()
        if earliest > now and batch:
            flush()
            now = monotonic()
        if earliest > now and due <= deadline_s:
            # On time (or as its destination's spacing says); what is due
            # within the quantum then goes without sleeping.
            sleep((earliest if earliest > due else due) - now)
            now = monotonic()
        if due > deadline_s or now > deadline_s:
            break
        last[dst] = (None, offset_ns)
        batch.append(packet)
    if batch:
        flush()
    return Paced(sent=sent, failed=failed, errors=tuple(errors),
                 left=len(packets) - sent - failed)


def _one_by_one(transmit):
    """A ``transmit_many`` calling ``transmit`` for each packet."""
    def many(batch):
        bad = []
        for p in batch:
            try:
                transmit(p)
            except OSError as exc:
                bad.append((p, exc))
        return bad
    return many


def encode(packets):
    """``packets`` (:class:`Packet`, IPv4 and IPv6) as one byte string of
    records, for :func:`decode` on the other side."""
    out = bytearray()
    for p in packets:
        try:
            addr = ipaddress.ip_address(p.dst_ip)
        except ValueError:
            raise ValueError(f"probe destination {p.dst_ip!r} is not an IP "
                             "address") from None
        out += RECORD.pack(p.offset_ns, len(p.data), addr.version,
                           addr.packed.ljust(16, b'\0'))
        out += p.data
    return bytes(out)


def decode(stream, limit):
    """The :class:`Packet` records of binary ``stream`` up to its end.

    :raises ValueError: a cut record, an unknown IP version, or more than
        ``limit`` records
    """
    packets = []
    while True:
        head = stream.read(RECORD.size)
        if not head:
            return packets
        if len(head) != RECORD.size:
            raise ValueError(f'record {len(packets)}: cut header')
        if len(packets) >= limit:
            raise ValueError(f'more than {limit} records')
        offset_ns, size, version, dst = RECORD.unpack(head)
        if version not in _FAMILIES:
            raise ValueError(f'record {len(packets)}: IP version {version}')
        family, length = _FAMILIES[version]
        data = stream.read(size)
        if len(data) != size:
            raise ValueError(f'record {len(packets)}: cut packet')
        packets.append(Packet(offset_ns=offset_ns,
                              dst_ip=socket.inet_ntop(family, dst[:length]),
                              data=data))
