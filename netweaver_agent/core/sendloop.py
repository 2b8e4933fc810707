"""A window's prepared probes packed, and paced out by a loop in C.

:class:`LocalSource <netweaver_agent.core.sources.LocalSource>` (the
privsep daemon's sender) keeps the packets it built as one
:class:`PackedPackets`: one bytes object and three arrays, not a Python
object per probe.  :func:`send` paces them out with the rules of
:func:`pacing.pace` (the same wake-ups, batches and spacing), in the C
loop of ``_sendloop`` when the extension was built: ``sendto`` and
``clock_nanosleep`` with the GIL released, the sender's gate (the
daemon's host-wide limits) called before each batch.  Without the
extension, or for a source that writes its packets its own way,
:func:`pacing.pace` sends :meth:`PackedPackets.packets`.
"""

import array
import dataclasses
import itertools
import os
import socket
import struct
import typing

from netweaver_agent.core import pacing

try:
    from netweaver_agent.core import _sendloop
except ImportError:     # built without a C compiler: pacing.pace
    _sendloop = None

_SOCKADDR_IN = struct.Struct('=HH4s8x')
_SOCKADDR_IN6 = struct.Struct('=HHI16sI')


@dataclasses.dataclass(frozen=True, slots=True)
class PackedPackets:
    """A window's packets, in send order, packed.

    Packet *i* is ``data[bounds[i]:bounds[i + 1]]``, due ``offsets[i]``
    ns after the first, to ``dsts[dst_index[i]]``.
    """

    dsts: tuple
    dst_index: array.array      # 'I'
    offsets: array.array        # 'q', ns
    bounds: array.array         # 'q', len + 1
    data: bytes

    @classmethod
    def pack(cls, items):
        """From ``(offset_ns, dst_ip, packet bytes)`` in send order (a
        sequence)."""
        offsets, dsts, chunks = zip(*items) if items else ((), (), ())
        # Destinations numbered in order of first appearance.
        where = dict.fromkeys(dsts)
        for d, dst in enumerate(where):
            where[dst] = d
        return cls(dsts=tuple(where),
                   dst_index=array.array('I', map(where.__getitem__, dsts)),
                   offsets=array.array('q', offsets),
                   bounds=array.array('q', itertools.accumulate(
                       map(len, chunks), initial=0)),
                   data=b''.join(chunks))

    def __len__(self):
        return len(self.offsets)

    def packets(self):
        """The same as ``[pacing.Packet]``."""
        data, bounds, dsts = self.data, self.bounds, self.dsts
        return [pacing.Packet(off, dsts[d], data[bounds[i]:bounds[i + 1]])
                for i, (off, d) in enumerate(zip(self.offsets,
                                                 self.dst_index))]


class Limiter(typing.NamedTuple):
    """A host-wide spacing of probes applied in C, as :func:`send` takes
    it for its ``gate``: ``state`` (an ``array('q')`` of one item, the
    next free slot in ``time.monotonic_ns()``, shared by every window and
    updated by compare-and-swap), the two rates, the burst allowed."""

    state: array.array
    probes_per_s: int
    bytes_per_s: int
    burst_ns: int


def limit_wait(limiter, nbytes, n=1):
    """Return when ``n`` probes of ``nbytes`` each may leave under
    ``limiter`` (:class:`Limiter`): the last of their slots has come.

    :raises RuntimeError: the extension was not built
    """
    if _sendloop is None:
        raise RuntimeError('netweaver_agent.core._sendloop was not built')
    _sendloop.limit_wait(limiter, nbytes, n)


def available():
    """Whether the C loop was built."""
    return _sendloop is not None


def sockaddr(dst_ip):
    """The packed ``sockaddr_in``/``sockaddr_in6`` of ``dst_ip``, port 0
    (a raw socket's destination)."""
    family = pacing.family_of(dst_ip)
    packed = socket.inet_pton(family, dst_ip)
    if family == socket.AF_INET6:
        return _SOCKADDR_IN6.pack(family, 0, 0, packed, 0)
    return _SOCKADDR_IN.pack(family, 0, packed)


def send(packed, socket_for, deadline_s, gate=None,
         quantum_s=pacing.SEND_QUANTUM_S, times=None):
    """Pace ``packed`` out through the C loop.

    :param socket_for: ``dst_ip -> socket`` (opened before)
    :param deadline_s: ``time.monotonic()`` at which it stops
    :param gate: ``f(largest packet bytes, count)`` called before each
        batch (it may sleep), a :class:`Limiter` applied in C, or None
    :param times: None, or an ``array('q')`` of ``len(packed)`` given
        when each packet's batch was done (``time.monotonic_ns()``)
    :returns: :class:`pacing.Paced`
    :raises RuntimeError: the extension was not built (see
        :func:`available`)
    """
    if _sendloop is None:
        raise RuntimeError('netweaver_agent.core._sendloop was not built')
    fds = tuple(socket_for(d).fileno() for d in packed.dsts)
    addrs = tuple(sockaddr(d) for d in packed.dsts)
    sent, failed, errors, left = _sendloop.send_paced(
        fds, addrs, packed.dst_index, packed.offsets, packed.bounds,
        packed.data, int(deadline_s * 1e9), int(quantum_s * 1e9), gate,
        pacing.MAX_ERRORS, times)
    return pacing.Paced(
        sent=sent, failed=failed, left=left,
        errors=tuple(
            f'{packed.dsts[packed.dst_index[i]]}: '
            f'{OSError(err, os.strerror(err))}'[:pacing.MAX_ERROR_CHARS]
            for i, err in errors))
