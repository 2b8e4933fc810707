"""Bounded real TCP and UDP streams through the lab (passive mode's truth).

Each exchange runs between the lab's source namespace and one guest's
namespace, in both directions: the source sends ``tcp_bytes`` over one TCP
connection and the guest sends them back over the same connection, then
``udp_count`` datagrams go each way.  Sockets are created inside the
namespaces from this process (no helper program), every operation has a
timeout, and the whole exchange ends by ``deadline_s``.  Only the lab's
own addresses are used (198.18.0.0/15 or 2001:2::/48).
"""

import dataclasses
import ipaddress
import socket
import threading
import time

from oslo_log import log

from netweaver_agent.core import netns

LOG = log.getLogger(__name__)

MAX_TCP_BYTES = 64 * 1024 * 1024
MAX_UDP_COUNT = 100_000
_ALLOWED = (ipaddress.ip_network('198.18.0.0/15'),
            ipaddress.ip_network('2001:2::/48'))


class TrafficError(RuntimeError):
    """A stream could not run (the reason and the endpoint named)."""


@dataclasses.dataclass(frozen=True, slots=True)
class StreamResult:
    """What one exchange moved: bytes each way over TCP, datagrams each
    way over UDP (sent, received)."""

    tcp_sent: int
    tcp_echoed: int
    udp_sent: int
    udp_received: int
    udp_back_sent: int
    udp_back_received: int


def _check(address, what):
    try:
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        raise TrafficError(f"{what} {address!r} is no address") from exc
    if not any(ip in n for n in _ALLOWED):
        raise TrafficError(f"{what} {address} is outside the lab's "
                           "198.18.0.0/15 and 2001:2::/48")
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def exchange(src_netns, guest_netns, guest_address, tcp_bytes=256 * 1024,
             udp_count=200, payload=b'netweaver-passive ', port=5201,
             deadline_s=20.0, udp_gap_s=0.001, guest_bind=None):
    """Run one bounded exchange; a :class:`StreamResult`.

    ``payload`` is repeated to fill every segment and datagram (a marker a
    test can look for).  ``guest_bind``: the address the guest's sockets
    bind to when the source reaches it at another one (``guest_address``
    a NAT on the way translates to it, e.g. a floating IP); None: the
    same.
    """
    family = _check(guest_address, 'guest address')
    bind = guest_address if guest_bind is None else guest_bind
    if _check(bind, 'guest bind address') != family:
        raise TrafficError(f"guest bind address {bind} and guest address "
                           f"{guest_address} are not of one family")
    if not 0 <= tcp_bytes <= MAX_TCP_BYTES:
        raise TrafficError(f"tcp_bytes {tcp_bytes} is not within "
                           f"0..{MAX_TCP_BYTES}")
    if not 0 <= udp_count <= MAX_UDP_COUNT:
        raise TrafficError(f"udp_count {udp_count} is not within "
                           f"0..{MAX_UDP_COUNT}")
    if not payload:
        raise TrafficError("payload must not be empty")
    end = time.monotonic() + deadline_s
    data = (payload * (tcp_bytes // len(payload) + 1))[:tcp_bytes]
    tcp_sent = tcp_echoed = 0
    if tcp_bytes:
        tcp_sent, tcp_echoed = _tcp(src_netns, guest_netns, family,
                                    (guest_address, bind), port, data, end)
    sent, got = _udp(src_netns, guest_netns, family, (guest_address, bind),
                     port + 1, payload, udp_count, end, udp_gap_s,
                     forward=True)
    back_sent, back_got = _udp(src_netns, guest_netns, family,
                               (guest_address, bind), port + 2, payload,
                               udp_count, end, udp_gap_s, forward=False)
    return StreamResult(tcp_sent, tcp_echoed, sent, got, back_sent,
                        back_got)


def _left(end):
    left = end - time.monotonic()
    if left <= 0:
        raise TrafficError("the exchange ran out of time")
    return left


def _tcp(src_netns, guest_netns, family, addresses, port, data, end):
    """``addresses``: (where the source connects, where the guest
    listens)."""
    address, bind = addresses
    listener = netns.socket_in_netns(guest_netns, family,
                                     socket.SOCK_STREAM)
    echoed = []
    errors = []

    def serve():
        try:
            listener.settimeout(_left(end))
            conn, _peer = listener.accept()
            with conn:
                conn.settimeout(_left(end))
                got = 0
                while got < len(data):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got += len(chunk)
                conn.sendall(data[:got])
                echoed.append(got)
        except (OSError, TrafficError) as exc:
            errors.append(exc)

    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((bind, port))
        listener.listen(1)
        server = threading.Thread(target=serve, daemon=True,
                                  name='netweaver-labtraffic')
        server.start()
        client = netns.socket_in_netns(src_netns, family, socket.SOCK_STREAM)
        with client:
            client.settimeout(_left(end))
            client.connect((address, port))
            client.sendall(data)
            back = 0
            while back < len(data):
                chunk = client.recv(65536)
                if not chunk:
                    break
                back += len(chunk)
        server.join(_left(end))
    finally:
        listener.close()
    if errors:
        raise TrafficError(f"TCP to {address}:{port} in {guest_netns}: "
                           f"{errors[0]}")
    return len(data), back


def _udp(src_netns, guest_netns, family, addresses, port, payload, count,
         end, gap_s, forward):
    """``count`` datagrams source → guest (``forward``) or guest → source,
    each carrying ``payload``; (sent, received).  ``addresses``: (where
    the source sends, where the guest binds)."""
    address, bind = addresses
    server = netns.socket_in_netns(guest_netns, family, socket.SOCK_DGRAM)
    client = netns.socket_in_netns(src_netns, family, socket.SOCK_DGRAM)
    try:
        server.bind((bind, port))
        client.connect((address, port))
        if forward:
            sender, receiver = client, server
        else:
            # The guest answers to the source's address and port.
            client.send(b'hello')
            server.settimeout(_left(end))
            _msg, peer = server.recvfrom(2048)
            server.connect(peer)
            sender, receiver = server, client
        receiver.setblocking(False)
        sent = got = 0
        for _ in range(count):
            _left(end)
            sender.send(payload)
            sent += 1
            time.sleep(gap_s)
            got += _drain(receiver)
        settle = min(time.monotonic() + 0.2, end)
        while time.monotonic() < settle and got < sent:
            time.sleep(0.01)
            got += _drain(receiver)
        return sent, got
    finally:
        server.close()
        client.close()


def _drain(sock):
    n = 0
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            return n
        n += 1
