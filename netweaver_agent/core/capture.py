"""Observe probes on the host's interfaces with kernel timestamps.

Live capture uses one ``AF_PACKET``/``ETH_P_ALL`` socket in the
hypervisor's network namespace: every interface of that namespace is seen
through it, each packet with the name of the interface it crossed, the
kernel's packet type (received there, or sent by this host) and a
``SO_TIMESTAMPNS`` nanosecond timestamp from one clock.  A classic BPF
filter keeps all other traffic in the kernel, and the kernel's drop counter
(``PACKET_STATISTICS``) is read when the window closes.

The packets are read from a ``TPACKET_V3`` receive ring shared with the
kernel (:mod:`netweaver_agent.core.ring`): timestamps, packet types, VLAN tags
and interface indexes come from the ring's headers, decoded in columns,
with no system call per packet.  Where the kernel gives no ring, or the
caller turns it off, each packet is read with ``recvmsg`` (the reason is
logged); both give the same sightings.

An ``ETH_P_ALL`` socket taxes every packet sent on the host while it is
open, so it is opened for one probe window and closed right after.

What comes out is a :class:`sightings.SightingBatch`: columns of
integers, which the matcher consumes without building one object per
packet.  Offline pcap files give the same batches (see
:mod:`netweaver_agent.core.pcapfile`).
"""

import array
import ctypes
import dataclasses
import errno
import fcntl
import os
import select
import socket
import struct
import threading
import time

import dpkt
from oslo_log import log

from netweaver_agent.core import netns
from netweaver_agent.core import pcapkeys
from netweaver_agent.core import probe
from netweaver_agent.core import ring
from netweaver_agent.core import sightings

LOG = log.getLogger(__name__)

ETH_P_ALL = 0x0003
PACKET_STATISTICS = 6
PACKET_AUXDATA = 8
SO_TIMESTAMPNS = 35
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
PACKET_OUTGOING = 4


_TIMESPEC = struct.Struct('@qq')
# struct tpacket_auxdata: status, len, snaplen, mac, net, vlan_tci, tpid.
_AUXDATA = struct.Struct('@IIIHHHH')
_TPACKET_STATS = struct.Struct('@II')
_SOCK_FILTER = struct.Struct('HBBI')
_SOCK_FPROG = struct.Struct('HL')

RCVBUF_BYTES = 8 * 1024 * 1024
# The first SO_TIMESTAMPNS socket switches the kernel's packet timestamps on
# through deferred work; until that has run, packets carry no stamp and
# recvmsg() stamps them when read, late.  Wait this long before probing.
TIMESTAMP_WARMUP_S = 0.05
SNAPLEN = 256
# Receive ring: room for every sighting the window expects, RING_MARGIN
# times over (a stalled reader loses nothing), within these bounds.
SLOT_BYTES = ring.HEADER_BYTES + SNAPLEN
RING_MARGIN = 2
MIN_RING_BYTES = ring.MIN_BLOCKS * ring.BLOCK_BYTES
DEFAULT_RING_BYTES = RCVBUF_BYTES
MAX_RING_BYTES = 64 * 1024 * 1024
# Runs of fewer packets are keyed one by one.
MIN_RUN = 4
# At close, how long to wait for the kernel to hand over the last block.
RING_FINISH_S = 4 * ring.BLOCK_TOV_MS / 1000.0 + 0.05
SIOCGIFNAME = 0x8910
# The reader thread waits this long at most in one select() (close()
# wakes it at once); _finish_ring waits for a block this long at most in
# one select().
READER_IDLE_S = 1.0
RING_POLL_S = 0.02
# settle() wakes this much after the quiet time would be over.
SETTLE_SLACK_S = 0.0005
_IFREQ = struct.Struct('16si20x')
# Direction column from the packet type column.
_T_DIR = bytes(1 if b == 4 else 0 for b in range(256))


class CaptureError(RuntimeError):
    """A capture could not be opened or read."""


class CapturePermissionError(CaptureError):
    """Opening a packet socket needs CAP_NET_RAW."""


@dataclasses.dataclass(frozen=True, slots=True)
class CaptureStats:
    """What the kernel and the reader counted during one window."""

    packets: int        # packets that passed the filter (kernel count)
    drops: int          # packets the kernel dropped for lack of room
    probes: int         # rows kept in the batch
    foreign: int        # passed the filter but not a probe of this session
    reader: str = ''    # 'ring' or 'recvmsg'


def ring_bytes(expected_packets=None, cap=MAX_RING_BYTES):
    """Receive ring bytes for a window expecting ``expected_packets``
    sightings (None: unknown): :data:`RING_MARGIN` times their slots, at
    least :data:`MIN_RING_BYTES`, at most ``cap``."""
    if expected_packets is None:
        want = DEFAULT_RING_BYTES
    else:
        want = RING_MARGIN * int(expected_packets) * SLOT_BYTES
    return max(MIN_RING_BYTES, min(int(cap), want))


_PROTOS = {'icmp': (1,), 'udp': (17, 1), 'tcp': (6,)}
_PROTOS6 = {'icmp': (58,), 'udp': (17, 58), 'tcp': (6,)}
# Classic BPF opcodes.
_LDH_ABS, _LDB_ABS, _LDH_IND, _LDB_IND = 0x28, 0x30, 0x48, 0x50
_LDX_IMM, _JEQ, _RET = 0x01, 0x15, 0x06
_JSET, _AND_K, _LSH_K, _ADD_X, _ADD_K = 0x45, 0x54, 0x64, 0x0c, 0x04
_JGT, _JGE = 0x25, 0x35
_TAX, _TXA = 0x07, 0x87
# Offsets of a VXLAN packet with an IPv4 underlay without options (an IPv6
# underlay is 20 bytes longer); a Geneve packet's inner frame is its
# options' length further.
_VX_UDP = 14 + 20
_VX_INNER = _VX_UDP + 8 + probe.VXLAN_HDR_LEN
_GENEVE_BASE = _VX_UDP + 8
if probe.GENEVE_HDR_LEN != probe.VXLAN_HDR_LEN:
    raise ImportError("the capture filter reads a Geneve packet's inner "
                      "frame at VXLAN's offset plus the options")


def _assemble(code):
    """``[(op, jt, jf, k)]`` from instructions whose jumps name labels.

    ``code`` holds ``(op, jt, jf, k)`` with ``jt``/``jf`` label names (or
    0: the next instruction) and ``'label'`` strings marking places.
    """
    where, n = {}, 0
    for item in code:
        if isinstance(item, str):
            where[item] = n
        else:
            n += 1
    prog = []
    for item in code:
        if isinstance(item, str):
            continue
        op, jt, jf, k = item
        here = len(prog) + 1
        jt = where[jt] - here if jt else 0
        jf = where[jf] - here if jf else 0
        if not 0 <= jt < 256 or not 0 <= jf < 256:
            raise ValueError(f"BPF jump out of range in {item!r}")
        prog.append((op, jt, jf, k))
    return prog


def _match_any(load, values, yes, no):
    """Load with ``load``, go to ``yes`` if it equals one of ``values``."""
    out = [load]
    for i, v in enumerate(values):
        last = i == len(values) - 1
        out.append((_JEQ, yes, no if last else 0, v))
    return out


def _narrow(session, protocol, v6, tunnel_ports):
    """Checks keeping only ``session``'s ICMP/UDP probes and answers of an
    IPv4 (``v6``: IPv6) packet behind X bytes of VLAN tags; they end at
    ``accept`` or ``reject``.  What user space keys is never refused here:
    an IPv4 header with options is left to it, and in ``udp`` mode so is
    UDP to ``tunnel_ports`` (probes inside VXLAN/Geneve).
    """
    n = 'n6' if v6 else 'n4'
    l4 = 14 + (40 if v6 else 20)
    magic_hi, magic_lo = struct.unpack('!HH', probe.MAGIC)

    def identity(at):
        # MAGIC and the session, where the payload starts.
        return [(_LDH_IND, 0, 0, at), (_JEQ, 0, 'reject', magic_hi),
                (_LDH_IND, 0, 0, at + 2), (_JEQ, 0, 'reject', magic_lo),
                (_LDH_IND, 0, 0, at + 4),
                (_JEQ, 'accept', 'reject', session)]

    code = [n]
    if not v6:
        code += [(_LDB_IND, 0, 0, 14), (_JEQ, 0, 'accept', 0x45)]
    code += [(_LDB_IND, 0, 0, 20 if v6 else 23)]
    if protocol == 'udp':
        code += [(_JEQ, n + 'udp', 0, 17)]
    # ICMP: echo (request or reply) of the session, or an unreachable
    # quoting a UDP probe of it (user space keys both in either mode).
    echo = ((dpkt.icmp6.ICMP6_ECHO_REQUEST, dpkt.icmp6.ICMP6_ECHO_REPLY) if v6
            else (8, 0))
    code += [(_JEQ, 0, 'reject', 58 if v6 else 1), (_LDB_IND, 0, 0, l4),
             (_JEQ, n + 'echo', 0, echo[0]), (_JEQ, n + 'echo', 0, echo[1]),
             (_JEQ, 0, 'reject', dpkt.icmp6.ICMP6_DST_UNREACH if v6 else 3)]
    inner = l4 + 8
    if not v6:
        code += [(_LDB_IND, 0, 0, inner), (_JEQ, 0, 'accept', 0x45)]
    code += identity(inner + (40 if v6 else 20) + 8)
    code += [n + 'echo', (_LDH_IND, 0, 0, l4 + 4),
             (_JEQ, 0, 'reject', session)]
    code += identity(l4 + 8)
    if protocol != 'udp':
        return code
    code += [n + 'udp', (_LDH_IND, 0, 0, l4 + 2)]
    for port in sorted(tunnel_ports):
        code += [(_JEQ, 'accept', 0, port)]
    code += [(_LDH_IND, 0, 0, l4),
             (_JEQ, 0, 'reject', probe.udp_source_port(session))]
    return code + identity(l4 + 8)


def _narrow_tcp(v6, ports):
    """Checks keeping TCP packets whose source or destination port lies
    in ``ports``' range (a probe from one of them, or an answer to one),
    behind X bytes of VLAN tags; an IPv4 header with options is left to
    user space."""
    n = 'n6' if v6 else 'n4'
    l4 = 14 + (40 if v6 else 20)
    low, high = min(ports), max(ports)
    code = [n]
    if not v6:
        code += [(_LDB_IND, 0, 0, 14), (_JEQ, 0, 'accept', 0x45)]
    return code + [
        (_LDH_IND, 0, 0, l4), (_JGE, 0, n + 'dst', low),
        (_JGT, 0, 'accept', high),
        n + 'dst', (_LDH_IND, 0, 0, l4 + 2), (_JGE, 0, 'reject', low),
        (_JGT, 'reject', 'accept', high)]


def bpf_filter(protocol, vxlan_port=None, geneve_port=None, session=None,
               tcp_ports=None):
    """A classic BPF program accepting frames that may be probes.

    IPv4 and IPv6: ``icmp`` accepts ICMP and ICMPv6; ``udp`` accepts UDP
    and ICMP/ICMPv6 (port unreachable replies); ``tcp`` accepts TCP.  Up to
    two VLAN tags left in the frame are skipped (the kernel usually moves
    the outer one out of it, see ``PACKET_AUXDATA``).  ``vxlan_port``: also
    accept VXLAN packets to that UDP port (over IPv4 without options or
    IPv6 without extension headers) whose inner frame passes the same
    test; ``geneve_port``: the same for Geneve (version 0, Ethernet
    inside, the inner frame after the options).  ``session``: of plain
    (untunnelled) ICMP and UDP packets, keep only that window's probes
    and answers (:func:`_narrow`), so tenants' traffic stays out of the
    ring; ``tcp_ports``: of plain TCP packets, keep those from or to the
    range of the window's probe source ports (TCP probes carry no
    session: their ISN is a keyed hash).  Tunnelled frames are not
    narrowed.  The rest is verified in user
    space by :func:`pcapkeys.frame_key`.  Returns ``(code, jt, jf, k)``
    instructions.
    """
    protos = _PROTOS.get(protocol)
    if protos is None:
        raise ValueError(f"unknown probe protocol {protocol!r}")
    protos6 = _PROTOS6[protocol]
    vlan = (dpkt.ethernet.ETH_TYPE_8021Q, dpkt.ethernet.ETH_TYPE_8021AD)
    code = [(_LDX_IMM, 0, 0, 0)]
    # X: the bytes of VLAN tags before the ethertype.
    code += _match_any((_LDH_ABS, 0, 0, 12), vlan, 'tag1', 'ether')
    code += ['tag1', (_LDX_IMM, 0, 0, 4)]
    code += _match_any((_LDH_ABS, 0, 0, 16), vlan, 'tag2', 'ether')
    code += ['tag2', (_LDX_IMM, 0, 0, 8), (_LDH_ABS, 0, 0, 20)]
    code += ['ether', (_JEQ, 'ip4', 0, dpkt.ethernet.ETH_TYPE_IP),
             (_JEQ, 'ip6', 'reject', dpkt.ethernet.ETH_TYPE_IP6)]
    tunnels = (vxlan_port or geneve_port) and 17 not in protos
    four = protos + ((17,) if tunnels else ())
    narrow = (session is not None and protocol != 'tcp') or bool(
        protocol == 'tcp' and tcp_ports)
    plain4, plain6 = ('n4', 'n6') if narrow else ('accept', 'accept')
    code += ['ip4'] + _match_any((_LDB_IND, 0, 0, 23), four, 'l4', 'reject')
    six = protos6 + ((17,) if tunnels else ())
    code += ['ip6'] + _match_any((_LDB_IND, 0, 0, 20), six,
                                 'l6' if tunnels else plain6, 'reject')
    if tunnels:
        # Ours unless it is UDP: then VXLAN to vxlan_port or Geneve to
        # geneve_port only.  IPv6: X += 20, then as IPv4.
        code += ['l6', (_JEQ, 0, plain6, 17),
                 (_TXA, 0, 0, 0), (_ADD_K, 0, 0, 20), (_TAX, 0, 0, 0),
                 (_JEQ, 'udp', 'udp', 0)]
        code += ['l4', (_JEQ, 0, plain4, 17),
                 (_LDB_IND, 0, 0, 14), (_JEQ, 0, 'reject', 0x45)]
        code += ['udp', (_LDH_IND, 0, 0, _VX_UDP + 2)]
        if vxlan_port:
            code += [(_JEQ, 'inner', 0 if geneve_port else 'reject',
                      vxlan_port)]
        if geneve_port:
            # Version 0 and Ethernet inside; X += the options' length.
            code += [(_JEQ, 0, 'reject', geneve_port),
                     (_LDH_IND, 0, 0, _GENEVE_BASE + 2),
                     (_JEQ, 0, 'reject', dpkt.ethernet.ETH_TYPE_TEB),
                     (_LDB_IND, 0, 0, _GENEVE_BASE),
                     (_JSET, 'reject', 0, 0xc0),
                     (_AND_K, 0, 0, 0x3f), (_LSH_K, 0, 0, 2),
                     (_ADD_X, 0, 0, 0), (_TAX, 0, 0, 0)]
        code += ['inner', (_LDH_IND, 0, 0, _VX_INNER + 12),
                 (_JEQ, 'in4', 0, dpkt.ethernet.ETH_TYPE_IP),
                 (_JEQ, 'in6', 'reject', dpkt.ethernet.ETH_TYPE_IP6)]
        code += ['in4'] + _match_any((_LDB_IND, 0, 0, _VX_INNER + 23),
                                     protos, 'accept', 'reject')
        code += ['in6'] + _match_any((_LDB_IND, 0, 0, _VX_INNER + 20),
                                     protos6, 'accept', 'reject')
    else:
        code += ['l4']
    if narrow and protocol == 'tcp':
        code += _narrow_tcp(False, tcp_ports) + _narrow_tcp(True, tcp_ports)
    elif narrow:
        ports = probe.tunnel_ports(vxlan_port, geneve_port)
        code += _narrow(session, protocol, False, ports)
        code += _narrow(session, protocol, True, ports)
    code += ['accept', (_RET, 0, 0, SNAPLEN), 'reject', (_RET, 0, 0, 0)]
    return _assemble(code)


# More classic BPF opcodes (the passive sampling filter): scratch memory,
# xor, right shift, return A.
_ST, _LD_MEM, _LDX_MEM = 0x02, 0x60, 0x61
_XOR_X, _RSH_K, _RET_A = 0xac, 0x74, 0x16
# Scratch cells: L3 offset, L4 offset, one port (or ethertype), protocol.
_M_L3, _M_L4, _M_PORT, _M_PROTO = 0, 1, 2, 3


def passive_filter(sample, value=0, vxlan_port=None, geneve_port=None):
    """A classic BPF program sampling whole flows for passive matching.

    Keeps the IPv4/IPv6 packets whose flow hash, masked to
    ``sample - 1`` (a power of two), equals ``value``: for TCP and UDP
    ``sport XOR dport``, otherwise (ICMP, later fragments, other
    protocols) the low bytes of the source and destination addresses
    XORed.  Those fields are the same on the pif and on the vif, and in
    every segment of a GSO/GRO packet, so one flow is kept on both
    interfaces or on neither.  Up to two VLAN tags left in the frame are
    skipped; VXLAN (to ``vxlan_port`` and the standard ports) and Geneve
    packets, over an IPv4 or IPv6 underlay, are sampled on their inner
    frame, as the vif sees it; UDP to those ports with no IPv4/IPv6 frame
    inside (too short for one, or another ethertype: a tenant's own
    datagram) on its own ports.  The snapshot returned ends
    where the transport header ends (the IP header for other protocols):
    no payload byte is kept.
    Returns ``(code, jt, jf, k)`` instructions.
    """
    if (not isinstance(sample, int) or isinstance(sample, bool) or
            sample < 1 or sample & (sample - 1) or sample > 1 << 16):
        raise ValueError(f"passive sample {sample!r} is not a power of two "
                         "from 1 to 65536 (keep 1 flow in sample)")
    if not isinstance(value, int) or not 0 <= value < sample:
        raise ValueError(f"passive sample value {value!r} is not within "
                         f"0..{sample - 1}")
    ports = probe.tunnel_ports(vxlan_port, geneve_port)
    vlan = (dpkt.ethernet.ETH_TYPE_8021Q, dpkt.ethernet.ETH_TYPE_8021AD)
    code = [(_LDX_IMM, 0, 0, 0)]
    code += _match_any((_LDH_ABS, 0, 0, 12), vlan, 'ptag1', 'pether')
    code += ['ptag1', (_LDX_IMM, 0, 0, 4)]
    code += _match_any((_LDH_ABS, 0, 0, 16), vlan, 'ptag2', 'pether')
    code += ['ptag2', (_LDX_IMM, 0, 0, 8), (_LDH_ABS, 0, 0, 20)]
    code += ['pether', (_JEQ, 'o4', 0, dpkt.ethernet.ETH_TYPE_IP),
             (_JEQ, 'o6', 'reject', dpkt.ethernet.ETH_TYPE_IP6)]
    # Outer IPv4: X := L3 offset; UDP to a tunnel port goes inside.
    code += ['o4', (_TXA, 0, 0, 0), (_ADD_K, 0, 0, 14), (_TAX, 0, 0, 0)]
    code += [(_LDB_IND, 0, 0, 9), (_JEQ, 0, 'i4', 17),
             (_LDB_IND, 0, 0, 0), (_JEQ, 0, 'i4', 0x45),
             (_LDH_IND, 0, 0, 6), (_JSET, 'i4', 0, 0x1fff),
             (_LDH_IND, 0, 0, 2), (_JGE, 0, 'i4', 20 + 8 + 8),
             (_LDH_IND, 0, 0, 20 + 2)]
    for port, kind in sorted(ports.items()):
        code += [(_JEQ, 'vxl' if kind == 'vxlan' else 'gen', 0, port)]
    code += [(_JEQ, 'i4', 'i4', 0)]
    # Inner frame after 20 + 8 + 8 bytes (+ Geneve options); not an IP
    # frame (the datagram too short for one, or another ethertype): a
    # tenant's own UDP to a tunnel port, sampled on its own ports.
    code += ['gen', (_LDB_IND, 0, 0, 28), (_AND_K, 0, 0, 0x3f),
             (_LSH_K, 0, 0, 2), (_JEQ, 'vx', 'vx', 0),
             'vxl', (_AND_K, 0, 0, 0)]
    code += _passive_inner(False)
    code += [(_JEQ, 'i4', 0, dpkt.ethernet.ETH_TYPE_IP),
             (_JEQ, 'i6', 'outer', dpkt.ethernet.ETH_TYPE_IP6),
             'outer', (_LDX_MEM, 0, 0, _M_L3), (_JEQ, 'i4', 'i4', 0)]
    # Outer IPv6 (UDP right after the fixed header), the same way.
    code += ['o6', (_TXA, 0, 0, 0), (_ADD_K, 0, 0, 14), (_TAX, 0, 0, 0),
             (_LDB_IND, 0, 0, 6), (_JEQ, 0, 'i6', 17),
             (_LDH_IND, 0, 0, 4), (_JGE, 0, 'i6', 8 + 8),
             (_LDH_IND, 0, 0, 40 + 2)]
    for port, kind in sorted(ports.items()):
        code += [(_JEQ, 'vxl6' if kind == 'vxlan' else 'gen6', 0, port)]
    code += [(_JEQ, 'i6', 'i6', 0)]
    code += ['gen6', (_LDB_IND, 0, 0, 48), (_AND_K, 0, 0, 0x3f),
             (_LSH_K, 0, 0, 2), (_JEQ, 'vx6', 'vx6', 0),
             'vxl6', (_AND_K, 0, 0, 0)]
    code += _passive_inner(True)
    code += [(_JEQ, 'i4', 0, dpkt.ethernet.ETH_TYPE_IP),
             (_JEQ, 'i6', 'outer6', dpkt.ethernet.ETH_TYPE_IP6),
             'outer6', (_LDX_MEM, 0, 0, _M_L3), (_JEQ, 'i6', 'i6', 0)]
    code += _passive_l3(sample - 1, value, False)
    code += _passive_l3(sample - 1, value, True)
    code += _passive_l4(sample - 1, value)
    code += ['reject', (_RET, 0, 0, 0)]
    return _assemble(code)


def _passive_inner(v6):
    """From 'vx' ('vx6') with X = the outer IPv4 (IPv6) header's offset
    and A = the tunnel header's options' bytes (VXLAN: none, A := 0 at
    'vxl'): X := the inner frame's IP header, A := its ethertype; to
    ``outer`` (``outer6``; X restored from ``_M_L3``) when the outer IP
    packet ends before that ethertype."""
    # The outer header's length, where its length field is and what that
    # field leaves out (IPv6's payload length: the fixed header).
    size, length_at, length_adds = (40, 4, 40) if v6 else (20, 2, 0)
    outer = 'outer6' if v6 else 'outer'
    return [
        'vx6' if v6 else 'vx', (_ADD_K, 0, 0, size + 8 + 8),
        (_ADD_X, 0, 0, 0),
        (_ST, 0, 0, _M_L4),                     # inner frame
        (_TXA, 0, 0, 0), (_ST, 0, 0, _M_L3),    # outer IP header
        # The outer packet's end minus the inner IP header's offset, by
        # adding its two's complement: negative (bit 31) is too short.
        (_LD_MEM, 0, 0, _M_L4), (_ADD_K, 0, 0, 14),
        (_LDX_IMM, 0, 0, 0xffffffff), (_XOR_X, 0, 0, 0), (_ADD_K, 0, 0, 1),
        (_ST, 0, 0, _M_PORT),
        (_LDX_MEM, 0, 0, _M_L3), (_LDH_IND, 0, 0, length_at),
        (_ADD_K, 0, 0, length_adds), (_ADD_X, 0, 0, 0),
        (_LDX_MEM, 0, 0, _M_PORT), (_ADD_X, 0, 0, 0),
        (_JSET, outer, 0, 0x80000000),
        (_LDX_MEM, 0, 0, _M_L4), (_LDH_IND, 0, 0, 12), (_ST, 0, 0, _M_PORT),
        (_TXA, 0, 0, 0), (_ADD_K, 0, 0, 14), (_TAX, 0, 0, 0),
        (_LD_MEM, 0, 0, _M_PORT)]


def _passive_l3(mask, value, v6):
    """From X = the IP header's offset: TCP/UDP to ``pl4``, the rest kept
    by their addresses' hash, snapshot to the end of the IP (+ ICMP)
    header."""
    n = 'i6' if v6 else 'i4'
    src, dst = (8 + 15, 24 + 15) if v6 else (12 + 3, 16 + 3)
    code = [n, (_TXA, 0, 0, 0), (_ST, 0, 0, _M_L3)]
    if v6:
        code += [(_ADD_K, 0, 0, 40), (_ST, 0, 0, _M_L4),
                 (_LDB_IND, 0, 0, 6)]
    else:
        code += [(_LDB_IND, 0, 0, 0), (_AND_K, 0, 0, 0xf),
                 (_LSH_K, 0, 0, 2), (_ADD_X, 0, 0, 0), (_ST, 0, 0, _M_L4),
                 (_LDH_IND, 0, 0, 6), (_JSET, n + 'addr', 0, 0x1fff),
                 (_LDB_IND, 0, 0, 9)]
    code += [(_JEQ, 'pl4', 0, 6), (_JEQ, 'pl4', 0, 17)]
    code += [n + 'addr', (_LDB_IND, 0, 0, dst), (_ST, 0, 0, _M_PORT),
             (_LDB_IND, 0, 0, src), (_LDX_MEM, 0, 0, _M_PORT),
             (_XOR_X, 0, 0, 0), (_AND_K, 0, 0, mask),
             (_JEQ, 0, 'reject', value)]
    # ICMP/ICMPv6 (unfragmented or first fragment): its 8-byte header too.
    code += [(_LDX_MEM, 0, 0, _M_L3)]
    if v6:
        code += [(_LDB_IND, 0, 0, 6), (_JEQ, n + 'icmp', 0, 58)]
    else:
        code += [(_LDH_IND, 0, 0, 6), (_JSET, n + 'ip', 0, 0x1fff),
                 (_LDB_IND, 0, 0, 9), (_JEQ, n + 'icmp', 0, 1)]
    code += [n + 'ip', (_LD_MEM, 0, 0, _M_L4), (_RET_A, 0, 0, 0),
             n + 'icmp', (_LD_MEM, 0, 0, _M_L4), (_ADD_K, 0, 0, 8),
             (_RET_A, 0, 0, 0)]
    return code


def _passive_l4(mask, value):
    """TCP or UDP with ``_M_L4`` set and A its protocol: keep the flow by
    ``sport XOR dport``; snapshot to the end of its header."""
    return ['pl4', (_LDX_MEM, 0, 0, _M_L4), (_ST, 0, 0, _M_PROTO),
            (_LDH_IND, 0, 0, 2), (_ST, 0, 0, _M_PORT),
            (_LDH_IND, 0, 0, 0), (_LDX_MEM, 0, 0, _M_PORT),
            (_XOR_X, 0, 0, 0), (_AND_K, 0, 0, mask),
            (_JEQ, 0, 'reject', value),
            (_LDX_MEM, 0, 0, _M_L4), (_LD_MEM, 0, 0, _M_PROTO),
            (_JEQ, 0, 'pudp', 6),
            (_LDB_IND, 0, 0, 12), (_RSH_K, 0, 0, 2), (_AND_K, 0, 0, 0x3c),
            (_ADD_X, 0, 0, 0), (_RET_A, 0, 0, 0),
            'pudp', (_TXA, 0, 0, 0), (_ADD_K, 0, 0, 8), (_RET_A, 0, 0, 0)]


_REJECT_ALL = [(_RET, 0, 0, 0)]


def _set_filter(sock, program):
    blob = b''.join(_SOCK_FILTER.pack(*ins) for ins in program)
    cbuf = ctypes.create_string_buffer(blob, len(blob))
    fprog = _SOCK_FPROG.pack(len(program), ctypes.addressof(cbuf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _attach_filter(sock, program):
    """Attach classic BPF ``program`` to the packet socket ``sock``, with
    nothing queued that it did not pass.

    An ``ETH_P_ALL`` socket queues every packet from its creation on: what
    arrived before the filter (a tenant's packets, payload and all) would
    be read as if it had passed.  As libpcap does, a filter that takes
    nothing goes first, then the queue is emptied, then ``program``.
    """
    _set_filter(sock, _REJECT_ALL)
    while True:
        try:
            sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_TRUNC)
        except BlockingIOError:
            break
    _set_filter(sock, program)


def open_packet_socket(netns_name=None, protocol='icmp', vxlan_port=None,
                       geneve_port=None, session=None, tcp_ports=None):
    """An ``AF_PACKET`` socket with ns timestamps and the probe filter.

    Created in network namespace ``netns_name`` (None: the current one).
    ``PACKET_AUXDATA`` is on: the kernel takes a frame's (outer) VLAN tag
    out of its bytes, and says so in each message's auxiliary data.
    """
    try:
        sock = netns.socket_in_netns(netns_name, socket.AF_PACKET,
                                     socket.SOCK_RAW,
                                     socket.htons(ETH_P_ALL))
    except PermissionError as exc:
        raise CapturePermissionError(
            "opening an AF_PACKET capture socket needs CAP_NET_RAW "
            f"(namespace {netns_name or 'of this process'}): {exc}") from exc
    try:
        _attach_filter(sock, bpf_filter(protocol, vxlan_port, geneve_port,
                                        session, tcp_ports))
        sock.setsockopt(ring.SOL_PACKET, PACKET_AUXDATA, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE,
                            RCVBUF_BYTES)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                            RCVBUF_BYTES)
        # Reset the kernel's counters: reading them clears them.
        sock.getsockopt(ring.SOL_PACKET, PACKET_STATISTICS,
                        _TPACKET_STATS.size)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class LiveCapture:
    """One probe window's capture: open, read in a thread, close.

    Use as a context manager::

        with LiveCapture(session, 'icmp', netns_name='hv') as cap:
            ...send probes...
            cap.settle(timeout_s)
        batch, stats = cap.batch, cap.stats

    Only sightings of ``session`` on interfaces in ``interfaces`` (all
    when None) are kept.  ``vxlan_port``, ``geneve_port``: probes may also
    come inside VXLAN or Geneve packets to that UDP port (see
    :func:`bpf_filter`).  ``expected_packets``: sightings the window
    expects, to size the receive ring (:func:`ring_bytes`, at most
    ``max_ring_bytes``); ``use_ring`` False: read with ``recvmsg``
    (None: :attr:`USE_RING`).  ``reader`` says which one is in use once
    open.  ``tcp_ports``: the
    source ports of the window's TCP probes; TCP keys carry no session
    (their ISN is keyed), so other TCP handshakes on the host are told
    apart by port here, not kept for the matcher to sort out (None: all
    kept).
    """

    USE_RING = True

    def __init__(self, session, protocol='icmp', netns_name=None,
                 interfaces=None, vxlan_port=None, geneve_port=None,
                 expected_packets=None, max_ring_bytes=MAX_RING_BYTES,
                 use_ring=None, tcp_ports=None):
        self.session = session
        self.tcp_ports = frozenset(tcp_ports) if tcp_ports else None
        self.expected_packets = expected_packets
        self.max_ring_bytes = max_ring_bytes
        self.use_ring = self.USE_RING if use_ring is None else use_ring
        self.reader = None
        self._ring = None
        # Kernel ifindex (ring) or name (recvmsg) -> batch column, -1 for
        # interfaces not wanted; name -> batch column.
        self._index_of = {}
        self._column = {}
        # Kernel ifindex -> batch column, for the in-place ring reader.
        self._ring_columns = array.array('i')
        self._seen = 0              # packets read from the ring
        self._kernel = [0, 0]       # packets, drops the kernel counted
        self.vxlan_port = vxlan_port
        self.geneve_port = geneve_port
        # Frames to these ports are opened (standard ones and ours).
        self._tunnels = probe.tunnel_ports(vxlan_port, geneve_port)
        self.protocol = protocol
        self.netns_name = netns_name
        self.interfaces = frozenset(interfaces) if interfaces else None
        self.batch = sightings.SightingBatch(session)
        self.stats = None
        self._sock = None
        self._thread = None
        self._stop = threading.Event()
        # The reader sleeps in select() until a block (or packet) is
        # ready or close() writes here: no wake-up on a timer.
        self._wake = None
        self._foreign = 0
        self._error = None
        self._last_probe_ns = 0

    def __enter__(self):
        self.open()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def open(self):
        self._sock = open_packet_socket(self.netns_name, self.protocol,
                                        self.vxlan_port, self.geneve_port,
                                        self.session, self.tcp_ports)
        try:
            self._ring = self._open_ring()
        except BaseException:
            self._sock.close()
            self._sock = None
            raise
        self.reader = 'recvmsg' if self._ring is None else 'ring'
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='netweaver-capture')
        self._thread.start()
        time.sleep(TIMESTAMP_WARMUP_S)

    def _open_ring(self):
        """The socket's receive ring, or None (reason logged): then the
        socket is a fresh one, read with recvmsg."""
        if not self.use_ring:
            LOG.info('Probe window %d: capture read with recvmsg (the '
                     'receive ring is turned off)', self.session)
            return None
        size = ring_bytes(self.expected_packets, self.max_ring_bytes)
        try:
            return ring.PacketRing(self._sock, size,
                                   block_bytes=ring.BLOCK_BYTES)
        except ring.RingError as exc:
            reason = exc
        LOG.warning('Probe window %(session)d: the kernel gave no packet '
                    'ring (%(reason)s); the capture reads each packet with '
                    'recvmsg instead (more CPU per packet, drops sooner)',
                    {'session': self.session, 'reason': reason})
        self._sock.close()
        self._sock = open_packet_socket(self.netns_name, self.protocol,
                                        self.vxlan_port, self.geneve_port,
                                        self.session, self.tcp_ports)
        return None

    def settle(self, quiet_s, max_s=None):
        """Wait until no probe was seen for ``quiet_s`` (at most ``max_s``)."""
        start = time.monotonic()
        limit = start + (max_s if max_s is not None else quiet_s * 4)
        while True:
            now = time.monotonic()
            last = self._last_probe_ns / 1e9
            if now >= limit:
                return
            if last and now - last >= quiet_s and now - start >= quiet_s:
                return
            if not last and now - start >= quiet_s:
                return
            # Asleep until the quiet time would be over, unless a probe
            # is seen meanwhile (then again from it): a few wake-ups, not
            # one every few ms.
            quiet_at = max(start, last) + quiet_s
            time.sleep(max(0.0, min(quiet_at, limit) - now) + SETTLE_SLACK_S)

    def close(self):
        if self._sock is None:
            return
        self._stop.set()
        if self._wake is not None:
            os.write(self._wake[1], b'x')
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            if self._ring is not None:
                packets, drops = self._finish_ring()
            else:
                self._drain()
                packets, drops = self._kernel_stats()
        finally:
            if self._ring is not None:
                self._ring.close()
                self._ring = None
            self._sock.close()
            self._sock = None
            if self._wake is not None:
                for fd in self._wake:
                    os.close(fd)
                self._wake = None
        self.stats = CaptureStats(packets=packets, drops=drops,
                                  probes=len(self.batch),
                                  foreign=self._foreign, reader=self.reader)
        if drops:
            LOG.warning('Capture dropped %(drops)d of %(packets)d packets '
                        'in probe window %(session)d',
                        {'drops': drops, 'packets': packets + drops,
                         'session': self.session})
        if self._error is not None:
            raise CaptureError(
                f"reading the capture socket failed: {self._error}")

    def _kernel_stats(self):
        """``(packets, drops)`` the kernel counted since the socket
        opened (each read resets its counters: they are summed here)."""
        size = (ring.STATS_V3.size if self._ring is not None
                else _TPACKET_STATS.size)
        raw = self._sock.getsockopt(ring.SOL_PACKET, PACKET_STATISTICS, size)
        packets, drops = _TPACKET_STATS.unpack_from(raw)
        self._kernel[0] += packets
        self._kernel[1] += drops
        return tuple(self._kernel)

    def _finish_ring(self):
        """Read the ring until every packet the kernel took is read (its
        last block is handed over ``ring.BLOCK_TOV_MS`` after its first
        packet), for at most :data:`RING_FINISH_S`; the kernel's
        ``(packets, drops)``."""
        limit = time.monotonic() + RING_FINISH_S
        while True:
            packets, drops = self._kernel_stats()
            self._read_ring()
            left = limit - time.monotonic()
            if self._seen >= packets - drops or left <= 0:
                return packets, drops
            # Woken when the kernel hands the next block over.
            select.select([self._sock], [], [], min(left, RING_POLL_S))

    def _run(self):
        sock = self._sock.fileno()
        # One poll set for the window (select() builds its sets anew on
        # every wake-up).
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        idle_ms = int(READER_IDLE_S * 1000)
        try:
            if self._ring is not None:
                self._read_ring(poller, idle_ms)
                return
            while not self._stop.is_set():
                for fd, _events in poller.poll(idle_ms):
                    if fd == sock:
                        self._drain()
        except OSError as exc:
            self._error = exc

    def _ifname(self, ifindex):
        """The name of the capture namespace's interface ``ifindex``
        (asked through the socket: right in any namespace)."""
        try:
            out = fcntl.ioctl(self._sock.fileno(), SIOCGIFNAME,
                              _IFREQ.pack(b'', ifindex))
        except OSError:
            return f'#{ifindex}'     # gone since: kept apart, never wanted
        return out[:16].split(b'\0', 1)[0].decode('ascii', 'replace')

    def _column_of(self, ifname):
        """The batch column of interface ``ifname``, -1 if not wanted."""
        if self.interfaces is not None and ifname not in self.interfaces:
            return -1
        index = self._column.get(ifname)
        if index is None:
            index = self._column[ifname] = self.batch.interface_index(
                ifname)
        return index

    def _columns(self, ifindexes):
        """Batch columns of the kernel ``ifindexes`` (array 'i')."""
        table = self._index_of
        try:
            return array.array('i', map(table.__getitem__, ifindexes))
        except KeyError:
            for k in set(ifindexes) - table.keys():
                table[k] = self._column_of(self._ifname(k))
            return array.array('i', map(table.__getitem__, ifindexes))

    def _read_ring(self, poller=None, idle_ms=None):
        """Read the blocks the kernel handed over, in order: in place, in
        one C call, while each holds only this window's probes or answers
        that :meth:`ring.PacketRing.taker` keys (the common case); any
        other block copied and decoded in runs (:meth:`_take_run`).

        With ``poller`` (the reader thread's, holding the socket and the
        wake-up pipe): then wait for the next block, until the capture
        closes.  Everything a wake-up uses is set up once here: at probe
        rates a wake-up costs more than its packets, most of it the
        interpreter's (its caches are cold after tens of milliseconds
        asleep)."""
        pring = self._ring
        columns = self._ring_columns
        batch = self.batch
        # Every reader of this class appends an auth with each key.
        take = pring.taker(self.session, columns, (
            batch.keys, batch.ifindex, batch.t_ns, batch.direction,
            batch.auth), _T_DIR)
        clock = time.monotonic_ns
        stopped = self._stop.is_set
        idle, slow = ring.IDLE, ring.SLOW
        while True:
            seen, kept, stop = take()
            if kept:
                self._last_probe_ns = clock()
            self._seen += seen
            if stop == idle:
                if poller is None:
                    return
                # Asleep until the kernel hands a block over or close()
                # writes to the pipe (then stop, even if blocks are
                # coming: close() reads the rest).
                events = poller.poll(idle_ms)
                while not events:
                    if stopped():
                        return
                    events = poller.poll(idle_ms)
                if stopped():
                    return
            elif stop != slow and 0 <= stop < ring.TABLE_IFINDEXES:
                # An interface not seen yet.
                if len(columns) <= stop:
                    columns.extend([ring.NO_COLUMN] *
                                   (stop + 1 - len(columns)))
                columns[stop] = self._columns((stop,))[0]
            else:
                data = pring.next_block()
                for run in ring.decode_block(data):
                    self._seen += run.n
                    self._take_run(data, run)

    def _take_run(self, data, run):
        """Keep the probes of one :class:`ring.Run`: in columns when they
        all are this window's, on wanted interfaces, untagged; else one by
        one through :meth:`_frame`, as recvmsg's."""
        n = run.n
        index = self._columns(run.ifindex)
        direction = run.pkttype.translate(_T_DIR)
        found = None
        if n >= MIN_RUN:
            found = pcapkeys.run_keys(data, run.frame, run.stride, n,
                                      run.caplen)
        if (found is not None and found.all_ok and
                self._ours(found.session, found.keys) and
                found.encaps is None and
                found.auth is not None and run.vlan is None and
                min(index) >= 0):
            batch = self.batch
            batch.auth_column().extend(found.auth)
            batch.keys.extend(found.keys)
            batch.ifindex.extend(index)
            batch.t_ns.extend(run.t_ns)
            batch.direction.frombytes(direction)
            self._last_probe_ns = time.monotonic_ns()
            return
        for i in range(n):
            if index[i] < 0:
                continue
            if found is not None and found.ok[i] and not self._ours(
                    found.sessions[i], found.keys[i:i + 1]):
                self._foreign += 1
                continue
            self._frame(data, run.frame + i * run.stride, run.caplen,
                        index[i], run.t_ns[i], direction[i],
                        None if run.vlan is None else run.vlan[i])

    def _drain(self):
        sock = self._sock
        table = self._index_of
        cmsg_space = (socket.CMSG_SPACE(_TIMESPEC.size) +
                      socket.CMSG_SPACE(_AUXDATA.size))
        while True:
            try:
                data, ancdata, _flags, addr = sock.recvmsg(SNAPLEN,
                                                           cmsg_space)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EINTR):
                    return
                raise
            ifname = addr[0]
            index = table.get(ifname)
            if index is None:
                index = table[ifname] = self._column_of(ifname)
            if index < 0:
                continue
            t_ns = None
            vid = None
            for level, ctype, cdata in ancdata:
                if level == socket.SOL_SOCKET and ctype == SO_TIMESTAMPNS:
                    sec, nsec = _TIMESPEC.unpack_from(cdata)
                    t_ns = sec * 1_000_000_000 + nsec
                elif level == ring.SOL_PACKET and ctype == PACKET_AUXDATA:
                    aux = _AUXDATA.unpack_from(cdata)
                    if aux[0] & ring.TP_STATUS_VLAN_VALID:
                        vid = aux[5] & 0x0fff
            if t_ns is None:
                t_ns = time.time_ns()
            direction = (sightings.DIR_OUT if addr[2] == PACKET_OUTGOING
                         else sightings.DIR_IN)
            self._frame(data, 0, len(data), index, t_ns, direction, vid)

    def _ours(self, session, keys):
        """Whether rows of ``session`` with ``keys`` may be this window's:
        its session, or TCP (no session) from one of ``tcp_ports``."""
        if session == self.session:
            return True
        if session != probe.TCP_SESSION:
            return False
        ports = self.tcp_ports
        return ports is None or all((k >> 17) & 0xffff in ports
                                    for k in keys)

    def _frame(self, data, off, caplen, index, t_ns, direction, vid):
        """Keep the frame at ``data[off:off+caplen]`` (seen on batch
        column ``index``) if it is a probe or answer of this window; both
        readers key frames here.  ``vid``: the VLAN id the kernel took out
        of it, or None."""
        # Fixed-offset parse (no packet objects): ~10x parse_key.
        found = pcapkeys.frame_key(data, off, caplen, tunnels=self._tunnels)
        if found is None or not self._ours(found[0], (found[1],)):
            self._foreign += 1
            return
        auth = pcapkeys.frame_auth(
            data, off, caplen,
            tunnel=found[2].tunnel if len(found) > 2 else None) or 0
        batch = self.batch
        batch.append(found[1], index, t_ns, direction, auth)
        if vid is not None or len(found) > 2:
            batch.encap.setdefault((found[1], index),
                                   _live_encap(vid, found))
        self._last_probe_ns = time.monotonic_ns()


def _live_encap(vid, found):
    """The :class:`probe.Encap` of a live frame: the tag the kernel took
    out (``vid``), then whatever :func:`pcapkeys.frame_key` read."""
    encap = found[2] if len(found) > 2 else probe.NO_ENCAP
    if vid is None:
        return encap
    return probe.Encap(vlan=(vid,) + encap.vlan, vni=encap.vni,
                       tunnel=encap.tunnel)
