"""The netdevs of a network namespace, from one rtnetlink link dump.

What ``ip -j link show`` tells the topology (each link's name, master and
``link``: a veth's peer, a VLAN's or macvlan's parent), read in process
over one ``AF_NETLINK``/``NETLINK_ROUTE`` socket instead of a child
process and its JSON: ``RTM_GETLINK`` with ``NLM_F_DUMP``, statistics
left out (``IFLA_EXT_MASK``), the multipart replies read until
``NLMSG_DONE``.  A namespace by name is entered as
:func:`netns.socket_in_netns` does: the socket keeps it.

A link comes with some forty attributes and four are wanted; walking
each header in Python cost more than ``ip`` and its JSON together, so
the parser walks a message only when its layout is new in the dump, and
reads a message laid out alike (every attribute header the same, checked
with one ``struct`` call) at the offsets the walk found.

:class:`LinkDump` is the parser (bytes in, :class:`Link` out, no I/O);
:func:`read_dump` reads one dump from a socket, bounded in bytes, links
and time; :func:`links_of` asks again while the kernel says a dump was
interrupted; :func:`dump_links` is the whole thing.  Anything the kernel
sends that does not parse raises :class:`RtnlError` naming the
namespace, never a guess.
"""

import dataclasses
import errno as errno_mod
import os
import socket
import struct

from netweaver_agent.core import netns

# <linux/netlink.h>
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLA_TYPE_MASK = 0x3fff
# <linux/rtnetlink.h>, <linux/if_link.h>
RTM_NEWLINK = 16
RTM_GETLINK = 18
IFLA_IFNAME = 3
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_EXT_MASK = 29
IFLA_LINK_NETNSID = 37
RTEXT_FILTER_SKIP_STATS = 1 << 3

_NLMSGHDR = struct.Struct('=IHHII')
_IFINFOMSG = struct.Struct('=BxHiII')
_RTATTR = struct.Struct('=HH')
_U32 = struct.Struct('=I')
_S32 = struct.Struct('=i')
# {attribute type, flags included: wanted}, as a table of every type.
_WANTED_TYPES = bytes(
    (t & NLA_TYPE_MASK) in (IFLA_IFNAME, IFLA_LINK, IFLA_MASTER,
                            IFLA_LINK_NETNSID) for t in range(1 << 16))

# A host with a thousand vNICs has a few thousand links; a dump past
# these is a kernel (or a socket) that does not stop.
MAX_LINKS = 65536
MAX_BYTES = 64 << 20
RECV_BUFFER = 1 << 17
TIMEOUT_S = 5.0
# A dump the kernel marks inconsistent (links changed meanwhile) is
# asked again, this many times in all.
DUMP_ATTEMPTS = 3


class RtnlError(RuntimeError):
    """A link dump could not be read; the message names the namespace."""


@dataclasses.dataclass(frozen=True, slots=True)
class Link:
    """One netdev of a link dump.

    ``master`` is the ifindex of its master (a bridge, a bond), in the
    same namespace.  ``link`` is ``IFLA_LINK``: a veth's peer, a VLAN's
    or macvlan's parent.  With ``link_netnsid`` set, that ifindex is in
    another namespace (the one of that id), not in this one.
    """

    index: int
    name: str
    master: int | None = None
    link: int | None = None
    link_netnsid: int | None = None


def where_of(netns_name):
    """How errors name the namespace ``netns_name`` (None: this one)."""
    return f'namespace {netns_name}' if netns_name else 'this host'


def request(seq):
    """The bytes of an ``RTM_GETLINK`` dump request, statistics skipped."""
    attr = _RTATTR.pack(_RTATTR.size + _U32.size, IFLA_EXT_MASK) + \
        _U32.pack(RTEXT_FILTER_SKIP_STATS)
    body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), RTM_GETLINK,
                          NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def _errno_text(code):
    name = errno_mod.errorcode.get(code, f'errno {code}')
    return f'{name} ({os.strerror(code)})'


class _Layout:
    """Where the attributes of one ``RTM_NEWLINK`` sat: links of one kind
    from one kernel come alike.  ``headers`` reads every attribute header
    of a message at once; a message whose headers all equal
    ``expected`` is laid out the same, header by header (each one's size
    places the next), so its wanted values are where they were."""

    __slots__ = ('headers', 'expected', '_values', '_kinds', '_name')

    def __init__(self, seen):
        """``seen``: ``[(offset in the message, size, type)]`` of every
        attribute, in order, as a walk met them."""
        head, values = ['='], ['=']
        head_end = values_end = 0
        self._kinds, self._name, expected = [], None, []
        for offset, size, type_ in seen:
            head.append(f'{offset - head_end}xHH')
            head_end = offset + _RTATTR.size
            expected += (size, type_)
            kind = type_ & NLA_TYPE_MASK
            if kind == IFLA_IFNAME:
                self._name = (offset + _RTATTR.size, offset + size)
            elif kind in (IFLA_MASTER, IFLA_LINK, IFLA_LINK_NETNSID):
                gap = offset + _RTATTR.size - values_end
                values.append(
                    f"{gap}x{'i' if kind == IFLA_LINK_NETNSID else 'I'}")
                values_end = offset + _RTATTR.size + _U32.size
                self._kinds.append(kind)
        self.headers = struct.Struct(''.join(head))
        self.expected = tuple(expected)
        self._values = struct.Struct(''.join(values))

    def fields(self, data, start):
        """``{attribute type: value}`` of a message laid out alike, at
        ``data[start:]``."""
        out = dict(zip(self._kinds, self._values.unpack_from(data, start)))
        if self._name is not None:
            raw = bytes(data[start + self._name[0]:start + self._name[1]])
            out[IFLA_IFNAME] = raw.split(b'\0', 1)[0].decode(
                'utf-8', 'replace')
        return out


class LinkDump:
    """The replies to one link dump request, fed as they arrive.

    :param seq: the request's sequence number (every reply carries it).
    :param where: names the namespace in errors.
    :param max_links: more links than this is an error.
    """

    def __init__(self, seq, where='this host', max_links=MAX_LINKS):
        self.seq = seq
        self.where = where
        self.max_links = max_links
        self.done = False
        # The kernel marked the dump inconsistent (NLM_F_DUMP_INTR).
        self.interrupted = False
        self._links = []
        # {(message length, first attribute's header): _Layout} of the
        # messages met so far in this dump.
        self._layouts = {}

    @property
    def links(self):
        """The :class:`Link` of every ``RTM_NEWLINK`` fed so far."""
        return tuple(self._links)

    def _error(self, what):
        return RtnlError(f"unreadable link dump (rtnetlink) in "
                         f"{self.where}: {what}")

    def feed(self, data):
        """Parse one received chunk (one or more netlink messages);
        True once ``NLMSG_DONE`` was read."""
        if self.done:
            raise self._error('data after NLMSG_DONE')
        end = len(data)
        words = memoryview(data).cast('B')[:end & ~1].cast('H')
        offset = 0
        while offset < end:
            if end - offset < _NLMSGHDR.size:
                raise self._error(
                    f'truncated message header: {end - offset} bytes at '
                    f'offset {offset}')
            length, type_, flags, seq, _ = _NLMSGHDR.unpack_from(
                data, offset)
            if length < _NLMSGHDR.size or offset + length > end:
                raise self._error(
                    f'message of type {type_} at offset {offset} claims '
                    f'{length} bytes, {end - offset} are there')
            if seq != self.seq:
                raise self._error(
                    f'reply with sequence number {seq}, not {self.seq}')
            if flags & NLM_F_DUMP_INTR:
                self.interrupted = True
            body = offset + _NLMSGHDR.size
            if type_ == RTM_NEWLINK:
                self._link(data, words, body, offset + length)
            elif type_ in (NLMSG_ERROR, NLMSG_DONE):
                code = self._status(data, body, offset + length, type_)
                if code:
                    raise RtnlError(
                        f"the kernel refused the link dump in "
                        f"{self.where}: {_errno_text(code)}")
                if type_ == NLMSG_DONE:
                    self.done = True
                    return True
            elif type_ != NLMSG_NOOP:
                raise self._error(f'unexpected message type {type_}')
            offset += (length + 3) & ~3
        return False

    def _status(self, data, start, end, type_):
        """The errno an ``NLMSG_ERROR`` (or ``NLMSG_DONE``) carries, 0
        for none."""
        if end - start < _S32.size:
            if type_ == NLMSG_DONE:
                return 0
            raise self._error('NLMSG_ERROR without its error code')
        return -_S32.unpack_from(data, start)[0]

    def _link(self, data, words, start, end):
        """One ``RTM_NEWLINK`` in ``data[start:end]``; ``words`` is
        ``data`` as 16-bit words (attributes sit on 4-byte boundaries)."""
        if end - start < _IFINFOMSG.size:
            raise self._error(
                f'RTM_NEWLINK of {end - start} bytes, shorter than its '
                'ifinfomsg')
        if len(self._links) >= self.max_links:
            raise self._error(f'more than {self.max_links} links')
        index = _IFINFOMSG.unpack_from(data, start)[2]
        first = (start + _IFINFOMSG.size) >> 1
        key = (end - start, words[first], words[first + 1]) \
            if end - start >= _IFINFOMSG.size + _RTATTR.size else None
        layout = self._layouts.get(key)
        if layout is not None and \
                layout.headers.unpack_from(data, start) == layout.expected:
            fields = layout.fields(data, start)
        else:
            fields, layout = self._walk(data, words, index, start, end)
            self._layouts[key] = layout
        if not fields.get(IFLA_IFNAME):
            raise self._error(f'link index {index} has no IFLA_IFNAME')
        self._links.append(Link(
            index=index, name=fields[IFLA_IFNAME],
            master=fields.get(IFLA_MASTER) or None,
            link=fields.get(IFLA_LINK),
            link_netnsid=fields.get(IFLA_LINK_NETNSID)))

    def _walk(self, data, words, index, start, end):
        """The wanted attributes of one link, each header read in turn,
        and the :class:`_Layout` of that message."""
        fields = {}
        seen = []
        # A link carries some forty attributes, four of them wanted: the
        # walk reads each header as two 16-bit words (attributes sit on
        # 4-byte boundaries), not through struct.
        wanted = _WANTED_TYPES
        word = (start + _IFINFOMSG.size) >> 1
        last = (end >> 1) - 2
        while word <= last:
            size = words[word]
            if size < 4 or (word << 1) + size > end:
                raise self._error(
                    f'link index {index}: attribute {words[word + 1]} at '
                    f'offset {word << 1} claims {size} bytes, '
                    f'{end - (word << 1)} are there')
            seen.append(((word << 1) - start, size, words[word + 1]))
            if wanted[words[word + 1]]:
                kind = words[word + 1] & NLA_TYPE_MASK
                fields[kind] = self._value(data, index, kind, word << 1, size)
            word += ((size + 3) >> 2) << 1
        return fields, _Layout(seen)

    def _value(self, data, index, kind, offset, size):
        value = offset + _RTATTR.size
        if kind == IFLA_IFNAME:
            raw = bytes(data[value:offset + size]).split(b'\0', 1)[0]
            return raw.decode('utf-8', 'replace')
        if size - _RTATTR.size < _U32.size:
            raise self._error(
                f'link index {index}: attribute {kind} of '
                f'{size - _RTATTR.size} bytes, not 4')
        form = _S32 if kind == IFLA_LINK_NETNSID else _U32
        return form.unpack_from(data, value)[0]


def read_dump(sock, seq, where='this host', max_links=MAX_LINKS,
              max_bytes=MAX_BYTES, buffer_size=RECV_BUFFER):
    """Read one dump's replies from ``sock`` (the request already sent)
    until ``NLMSG_DONE``: a :class:`LinkDump`.  More than ``max_bytes``
    received, a message larger than the buffer, an end of data or the
    socket's timeout raise :class:`RtnlError`."""
    dump = LinkDump(seq, where, max_links)
    buf = bytearray(buffer_size)
    view = memoryview(buf)
    received = 0
    while not dump.done:
        try:
            n, _, flags, _ = sock.recvmsg_into([buf])
        except OSError as exc:
            # socket.timeout is an OSError too.
            raise RtnlError(f"reading the link dump (rtnetlink) in "
                            f"{where} failed: {exc}") from exc
        if flags & socket.MSG_TRUNC:
            raise RtnlError(
                f"a link dump reply in {where} is larger than the "
                f"{buffer_size}-byte buffer")
        if n == 0:
            raise RtnlError(
                f"the link dump in {where} ended before NLMSG_DONE")
        received += n
        if received > max_bytes:
            raise RtnlError(
                f"the link dump in {where} passed {max_bytes} bytes "
                "without NLMSG_DONE")
        dump.feed(view[:n])
    return dump


def _open(netns_name, where):
    try:
        return netns.socket_in_netns(netns_name, socket.AF_NETLINK,
                                     socket.SOCK_RAW, socket.NETLINK_ROUTE)
    except netns.NetnsError as exc:
        raise RtnlError(str(exc)) from exc
    except OSError as exc:
        raise RtnlError(f"cannot open a rtnetlink socket in {where}: "
                        f"{exc}") from exc


def links_of(sock, where='this host', max_links=MAX_LINKS,
             max_bytes=MAX_BYTES, attempts=DUMP_ATTEMPTS):
    """Every :class:`Link` a dump over ``sock`` (connected to the kernel)
    gives, in the kernel's order; a dump the kernel marks interrupted is
    asked again, up to ``attempts`` dumps in all."""
    for seq in range(1, attempts + 1):
        try:
            sock.send(request(seq))
        except OSError as exc:
            raise RtnlError(f"cannot ask for the links of {where}: "
                            f"{exc}") from exc
        dump = read_dump(sock, seq, where, max_links, max_bytes)
        if not dump.interrupted:
            return dump.links
    raise RtnlError(f"the link dump in {where} was interrupted "
                    f"{attempts} times: links kept changing")


def dump_links(netns_name=None, timeout_s=TIMEOUT_S, max_links=MAX_LINKS,
               max_bytes=MAX_BYTES):
    """Every :class:`Link` of namespace ``netns_name`` (None: this
    process's), in the kernel's order."""
    where = where_of(netns_name)
    with _open(netns_name, where) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.bind((0, 0))
            sock.connect((0, 0))
        except OSError as exc:
            raise RtnlError(f"cannot bind a rtnetlink socket in {where}: "
                            f"{exc}") from exc
        return links_of(sock, where, max_links, max_bytes)
