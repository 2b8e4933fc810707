"""The lab's marking source: every Nth probe to a guest gets a TTL mark."""

import dpkt
import pytest

from netweaver_agent.core import probe
from netweaver_agent.core import sources
from netweaver_agent.lab import mark

SRC, DST, OTHER = '198.18.0.1', '198.18.0.10', '198.18.0.11'


def packets(protocol, dst, n, session=7):
    plan = sources.schedule(session, protocol, [dst], n, 1000).plan
    return [data for _, data in sources.build_packets(plan, lambda d: SRC)]


@pytest.mark.parametrize('protocol', probe.PROTOCOLS)
def test_set_ttl_keeps_the_packet_valid(protocol):
    data = packets(protocol, DST, 1)[0]
    marked = mark.set_ttl(data, 40)
    ip = dpkt.ip.IP(marked)
    assert ip.ttl == 40
    # dpkt recomputes the header checksum when it is zeroed: compare.
    checked = dpkt.ip.IP(marked)
    checked.sum = 0
    assert dpkt.ip.IP(bytes(checked)).sum == ip.sum
    # Everything but TTL and checksum is untouched: the probe's identity.
    assert marked[:8] == data[:8] and marked[12:] == data[12:]
    assert probe.parse_key(b'\0' * 12 + b'\x08\x00' + marked) == \
        probe.parse_key(b'\0' * 12 + b'\x08\x00' + data)


def test_set_ttl_ipv6_hop_limit_and_bad_input():
    v6 = bytes([0x60]) + bytes(39)
    assert mark.set_ttl(v6, 50)[7] == 50
    for bad in (b'', b'\x45' + bytes(5), b'\x20' + bytes(40)):
        with pytest.raises(ValueError):
            mark.set_ttl(bad, 50)


def test_every_nth_probe_to_the_destination_is_marked_across_windows():
    table = mark.MarkTable()
    ttl = table.free_ttl()
    table.add(mark.Mark(dst_ip=DST, every=4, ttl=ttl, protocol='icmp'))
    marked = []
    for window in range(3):   # the count carries over windows
        for data in packets('icmp', DST, 6, session=window):
            out = table.apply('icmp', DST, data)
            marked.append(dpkt.ip.IP(out).ttl == ttl)
    assert [i + 1 for i, m in enumerate(marked) if m] == [4, 8, 12, 16]
    # Other destinations and other protocols are neither marked nor
    # counted.
    other = packets('icmp', OTHER, 1)[0]
    assert table.apply('icmp', OTHER, other) == other
    udp = packets('udp', DST, 1)[0]
    assert all(table.apply('udp', DST, udp) == udp for _ in range(8))
    # 18 counted so far: the 19th..22nd; the 20th is marked.
    nxt = packets('icmp', DST, 4)
    assert [dpkt.ip.IP(table.apply('icmp', DST, d)).ttl == ttl
            for d in nxt] == [False, True, False, False]


def test_marks_are_distinct_and_one_per_destination():
    table = mark.MarkTable()
    first = table.free_ttl()
    table.add(mark.Mark(dst_ip=DST, every=2, ttl=first))
    assert table.free_ttl() != first
    with pytest.raises(ValueError, match=DST):
        table.add(mark.Mark(dst_ip=DST, every=3, ttl=table.free_ttl()))
    with pytest.raises(ValueError, match='64'):
        mark.Mark(dst_ip=OTHER, every=2, ttl=64)
    with pytest.raises(ValueError, match='0'):
        mark.Mark(dst_ip=OTHER, every=0, ttl=first)
    # Every probe.
    table.add(mark.Mark(dst_ip=OTHER, every=1, ttl=table.free_ttl()))
    data = packets('udp', OTHER, 1)[0]
    assert all(dpkt.ip.IP(table.apply('udp', OTHER, data)).ttl !=
               dpkt.ip.IP(data).ttl for _ in range(3))
