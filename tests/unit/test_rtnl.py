"""The rtnetlink link dump: hand-built netlink bytes in, links out.

The messages are built here from the kernel's numbers (``<linux/
netlink.h>``, ``<linux/rtnetlink.h>``, ``<linux/if_link.h>``), written
out, not taken from the module under test.  The same dump against the
real kernel is in tests/functional/test_rtnl.py.
"""

import errno
import re
import socket
import struct

import pytest

from netweaver_agent.agent import rtnl
from netweaver_agent.agent import topology

# The kernel's numbers.
NOOP, ERROR, DONE = 1, 2, 3
NEWLINK, GETLINK = 16, 18
MULTI, DUMP_INTR = 0x2, 0x10
IFNAME, LINK, MASTER, MTU, AF_SPEC, NETNSID, EXT_MASK = 3, 5, 10, 4, 26, 37, 29
NESTED = 0x8000
SEQ = 7


def attr(kind, value):
    """One rtattr, padded to 4 bytes."""
    raw = struct.pack('=HH', 4 + len(value), kind) + value
    return raw + b'\0' * (-len(raw) % 4)


def u32(n):
    return struct.pack('=I', n)


def msg(type_, body, seq=SEQ, flags=MULTI, length=None):
    """One netlink message (header + body), padded to 4 bytes."""
    raw = struct.pack('=IHHII', 16 + len(body) if length is None else length,
                      type_, flags, seq, 4242) + body
    return raw + b'\0' * (-len(raw) % 4)


def newlink(index, name=None, master=None, link=None, netnsid=None,
            extra=b'', **kw):
    body = struct.pack('=BxHiII', 0, 1, index, 0x1003, 0)
    if name is not None:
        body += attr(IFNAME, name.encode() + b'\0')
    body += attr(MTU, u32(1500))
    if master is not None:
        body += attr(MASTER, u32(master))
    if link is not None:
        body += attr(LINK, u32(link))
    if netnsid is not None:
        body += attr(NETNSID, struct.pack('=i', netnsid))
    return msg(NEWLINK, body + extra, **kw)


def done(code=0, **kw):
    return msg(DONE, struct.pack('=i', code), **kw)


def error(code, **kw):
    # The error code, then the header of the request it answers.
    return msg(ERROR, struct.pack('=i', code) +
               struct.pack('=IHHII', 40, GETLINK, 0x301, SEQ, 0), **kw)


def parse(*chunks, max_links=rtnl.MAX_LINKS, where='namespace nwx-hv'):
    dump = rtnl.LinkDump(SEQ, where, max_links)
    for chunk in chunks:
        dump.feed(chunk)
    return dump


def test_request_is_a_link_dump_that_skips_statistics():
    raw = rtnl.request(9)
    length, type_, flags, seq, pid = struct.unpack_from('=IHHII', raw)
    assert (length, type_, seq, pid) == (len(raw), GETLINK, 9, 0)
    # NLM_F_REQUEST | NLM_F_DUMP (NLM_F_ROOT | NLM_F_MATCH).
    assert flags == 0x1 | 0x100 | 0x200
    family, _, index, _, _ = struct.unpack_from('=BxHiII', raw, 16)
    assert (family, index) == (socket.AF_UNSPEC, 0)
    # IFLA_EXT_MASK = RTEXT_FILTER_SKIP_STATS (1 << 3).
    assert raw[32:] == attr(EXT_MASK, u32(8))


def test_links_over_several_chunks():
    nested = attr(AF_SPEC | NESTED, attr(2, attr(1, u32(0))))
    dump = parse(
        newlink(1, 'lo') + newlink(2, 'br0') +
        newlink(3, 'vA1', master=2, link=4, extra=nested),
        newlink(4, 'vA2', link=3) + newlink(5, 'x1', link=9, netnsid=0) +
        newlink(6, 'mv0', master=2, link=7) +
        newlink(7, 'd0', master=0),
        done())
    assert dump.done and not dump.interrupted
    assert dump.links == (
        rtnl.Link(1, 'lo'), rtnl.Link(2, 'br0'),
        rtnl.Link(3, 'vA1', master=2, link=4),
        rtnl.Link(4, 'vA2', link=3),
        rtnl.Link(5, 'x1', link=9, link_netnsid=0),
        rtnl.Link(6, 'mv0', master=2, link=7),
        rtnl.Link(7, 'd0'))


def test_links_laid_out_alike_keep_their_own_values():
    # Same length, same first attribute: the second and third are read
    # where the first one's attributes were; the fourth has a link where
    # the others have a master, the fifth one more attribute in place of
    # padding, the sixth a header that runs past its message.
    extra = attr(99, b'abcd')
    dump = parse(newlink(3, 'ab1', master=2, extra=extra) +
                 newlink(4, 'ab2', master=9, extra=extra) +
                 newlink(5, 'ab3', master=7, extra=extra) +
                 newlink(6, 'ab4', link=8, extra=extra) +
                 newlink(7, 'ab5', master=6,
                         extra=attr(98, b'') + attr(97, b'')))
    assert dump.links == (rtnl.Link(3, 'ab1', master=2),
                          rtnl.Link(4, 'ab2', master=9),
                          rtnl.Link(5, 'ab3', master=7),
                          rtnl.Link(6, 'ab4', link=8),
                          rtnl.Link(7, 'ab5', master=6))
    # Every wanted attribute, twice alike: each read at its own place.
    dump.feed(newlink(10, 'cd1', master=2, link=11, netnsid=0) +
              newlink(11, 'cd2', master=3, link=10, netnsid=5))
    assert dump.links[-2:] == (
        rtnl.Link(10, 'cd1', master=2, link=11, link_netnsid=0),
        rtnl.Link(11, 'cd2', master=3, link=10, link_netnsid=5))
    with pytest.raises(rtnl.RtnlError, match='link index 8: attribute 99'):
        dump.feed(newlink(8, 'ab6', master=2,
                          extra=struct.pack('=HH', 64, 99) + b'abcd'))


def test_feed_says_when_the_dump_is_done():
    dump = rtnl.LinkDump(SEQ)
    assert dump.feed(newlink(1, 'lo')) is False
    assert dump.feed(msg(NOOP, b'') + done()) is True
    with pytest.raises(rtnl.RtnlError, match='after NLMSG_DONE'):
        dump.feed(newlink(2, 'eth0'))


def test_a_flagged_attribute_type_is_still_read():
    body = struct.pack('=BxHiII', 0, 1, 3, 0, 0) + \
        attr(IFNAME | NESTED, b'eth9\0') + attr(MASTER | NESTED, u32(2))
    assert parse(msg(NEWLINK, body)).links == (
        rtnl.Link(3, 'eth9', master=2),)


def test_an_interrupted_dump_is_marked():
    dump = parse(newlink(1, 'lo', flags=MULTI | DUMP_INTR), done())
    assert dump.interrupted


@pytest.mark.parametrize('chunk, match', [
    (newlink(1, 'lo')[:10], 'truncated message header: 10 bytes'),
    (newlink(1, 'lo') + newlink(2, 'eth0')[:-8],
     'claims .* bytes, .* are there'),
    (msg(NEWLINK, b'', length=8), 'claims 8 bytes'),
    (msg(NEWLINK, b'\0' * 8), 'shorter than its ifinfomsg'),
    (newlink(5, None), 'link index 5 has no IFLA_IFNAME'),
    (newlink(5, 'eth0', extra=struct.pack('=HH', 64, 99)),
     'link index 5: attribute 99 .* claims 64 bytes'),
    (newlink(5, 'eth0', extra=struct.pack('=HH', 0, 99)),
     'link index 5: attribute 99 .* claims 0 bytes'),
    (newlink(5, 'eth0', extra=attr(MASTER, b'\1\0')),
     'link index 5: attribute 10 of 2 bytes'),
    (newlink(1, 'lo', seq=SEQ + 1), f'sequence number {SEQ + 1}'),
    (msg(24, b'\0' * 12), 'unexpected message type 24'),
    (msg(ERROR, b''), 'NLMSG_ERROR without its error code'),
])
def test_garbled_replies_name_the_namespace_and_the_fault(chunk, match):
    with pytest.raises(rtnl.RtnlError) as err:
        parse(chunk)
    assert 'namespace nwx-hv' in str(err.value)
    assert re.search(match, str(err.value)), str(err.value)


@pytest.mark.parametrize('reply', [error(-errno.EPERM),
                                   done(-errno.EPERM)])
def test_a_refusal_names_the_errno(reply):
    with pytest.raises(rtnl.RtnlError,
                       match='namespace nwx-hv: EPERM') as err:
        parse(newlink(1, 'lo'), reply)
    assert 'refused' in str(err.value)


def test_an_acknowledgement_is_not_an_error():
    assert parse(error(0), done()).done


def test_links_past_the_bound_are_refused():
    rows = b''.join(newlink(n, f'eth{n}') for n in range(1, 5))
    assert len(parse(rows, max_links=4).links) == 4
    with pytest.raises(rtnl.RtnlError, match='more than 3 links'):
        parse(rows, max_links=3)


# --- reading from a socket: a real datagram socket pair -----------------

@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def test_read_dump_reads_datagrams_until_done(pair):
    sender, reader = pair
    for chunk in (newlink(1, 'lo') + newlink(2, 'eth0'), newlink(3, 'br0'),
                  done()):
        sender.send(chunk)
    dump = rtnl.read_dump(reader, SEQ, 'namespace nwx-hv')
    assert [link.name for link in dump.links] == ['lo', 'eth0', 'br0']


def test_a_dump_that_never_ends_is_cut_at_the_byte_bound(pair):
    sender, reader = pair
    chunk = newlink(1, 'lo')
    # One chunk past the bound and no more: a reader that did not stop
    # there would wait for the next one and time out.
    for _ in range(4):
        sender.send(chunk)
    with pytest.raises(rtnl.RtnlError,
                       match=f'nwx-hv passed {3 * len(chunk)} bytes'):
        rtnl.read_dump(reader, SEQ, 'namespace nwx-hv',
                       max_bytes=3 * len(chunk))


def interrupted(dump):
    """``dump``'s messages marked as the kernel marks a dump that links
    changed under."""
    out, offset = bytearray(dump), 0
    while offset < len(out):
        length, = struct.unpack_from('=I', out, offset)
        out[offset + 6] |= DUMP_INTR
        offset += length
    return bytes(out)


def test_an_interrupted_dump_is_asked_again(pair):
    kernel, agent = pair
    for seq, name in ((1, 'old'), (2, 'new')):
        dump = newlink(1, 'lo', seq=seq) + newlink(2, name, seq=seq) + \
            done(seq=seq)
        kernel.send(interrupted(dump) if seq == 1 else dump)
    assert [link.name for link in rtnl.links_of(agent)] == ['lo', 'new']
    # The requests, one per attempt, numbered.
    assert [struct.unpack_from('=I', kernel.recv(100), 8)[0]
            for _ in range(2)] == [1, 2]


def test_a_dump_interrupted_every_time_is_an_error(pair):
    kernel, agent = pair
    for seq in (1, 2):
        kernel.send(interrupted(newlink(1, 'lo', seq=seq) + done(seq=seq)))
    with pytest.raises(rtnl.RtnlError,
                       match='nwx-hv was interrupted 2 times'):
        rtnl.links_of(agent, 'namespace nwx-hv', attempts=2)


def test_a_reply_larger_than_the_buffer_is_an_error(pair):
    sender, reader = pair
    sender.send(newlink(1, 'lo') + done())
    with pytest.raises(rtnl.RtnlError, match='larger than the 16-byte'):
        rtnl.read_dump(reader, SEQ, 'namespace nwx-hv', buffer_size=16)


def test_an_empty_reply_or_silence_is_an_error(pair):
    sender, reader = pair
    sender.send(b'')
    with pytest.raises(rtnl.RtnlError, match='ended before NLMSG_DONE'):
        rtnl.read_dump(reader, SEQ, 'namespace nwx-hv')
    reader.settimeout(0.01)
    with pytest.raises(rtnl.RtnlError, match='nwx-hv failed: timed out'):
        rtnl.read_dump(reader, SEQ, 'namespace nwx-hv')


# --- the real kernel, this namespace; a namespace that is not there ------

def test_this_namespace_dump_has_loopback_first():
    links = rtnl.dump_links()
    assert links[0] == rtnl.Link(1, 'lo')
    assert len({link.index for link in links}) == len(links)


def test_a_missing_namespace_is_named():
    with pytest.raises(rtnl.RtnlError, match="'nwx-not-there'"):
        rtnl.dump_links('nwx-not-there')
    with pytest.raises(topology.TopologyError, match="'nwx-not-there'"):
        topology.IpLinks('nwx-not-there')


def test_ip_json_with_no_string_names_is_refused():
    with pytest.raises(topology.TopologyError,
                       match="in rec: link 'eth0' has a name, master"):
        topology.IpLinks(text='[{"ifname": "eth0", "link": [1]}]',
                         where='rec')
