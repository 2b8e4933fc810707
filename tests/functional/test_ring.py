"""The TPACKET_V3 ring against recvmsg and tcpdump, on one window.

In one probe window of the namespace lab, three instruments watch the same
packets: the capture reading its receive ring, a second capture forced to
``recvmsg``, and tcpdump (``--time-stamp-precision=nano``) on the pif and
every tap.  Keys, interfaces, directions, VLAN ids and timestamps must be
the same, row for row; the pcaps must hold the same sightings at the same
nanoseconds.  Then the daemon's capture (privsep) reads a ring too, and a
ring the kernel refuses is an error naming it.  Needs root; fails (never
skips) without a lab.
"""

import collections
import logging
import os
import socket
import threading
import time

import dpkt
import pytest

from netweaver_agent.agent import privileged
from netweaver_agent.core import capture
from netweaver_agent.core import netns
from netweaver_agent.core import pcapfile
from netweaver_agent.core import probe
from netweaver_agent.core import ring
from netweaver_agent.core import sightings
from netweaver_agent.core import window
from tests.functional import privsep
from tests.functional.tcpdump import recording
from tests.functional.tcpdump import Tcpdump

COUNT = 40


class Twin:
    """A ``capture_class``: the ring capture, and beside it a capture of
    the same window forced to recvmsg (``self.other``)."""

    made = []

    def __init__(self, session, protocol='icmp', netns_name=None,
                 interfaces=None, **extra):
        self.ring = capture.LiveCapture(session, protocol, netns_name,
                                        interfaces, **extra)
        self.other = capture.LiveCapture(session, protocol, netns_name,
                                         interfaces, use_ring=False,
                                         **extra)
        self.made.append(self)

    @property
    def batch(self):
        return self.ring.batch

    @property
    def stats(self):
        return self.ring.stats

    def __enter__(self):
        self.other.open()
        try:
            self.ring.open()
        except BaseException:
            self.other.close()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self.ring.close()
        finally:
            self.other.close()
        return False

    def settle(self, quiet_s, max_s=None):
        self.ring.settle(quiet_s, max_s)
        self.other.settle(quiet_s, max_s)


def rows(batch):
    """The multiset of (key, interface, direction, t_ns, VLAN ids)."""
    names = batch.ifnames
    return collections.Counter(
        (k, names[i], d, t, batch.encap.get((k, i), probe.NO_ENCAP).vlan)
        for k, i, d, t in zip(batch.keys, batch.ifindex, batch.direction,
                              batch.t_ns))


def _window(the_lab, source, interval_ms, capture_class):
    """One window of COUNT probes to the lab's paths, captured in the
    hypervisor by ``capture_class``; the source closed."""
    try:
        return window.run_window(
            the_lab.paths(), source,
            window.WindowSettings(count=COUNT, interval_ms=interval_ms,
                                  timeout_ms=100),
            capture_netns=the_lab.spec.hv_netns, capture_class=capture_class)
    finally:
        source.close()


def pcap_rows(paths, session):
    """``{(key, interface, t_ns, VLAN ids)}`` read from tcpdump's pcaps."""
    out = collections.Counter()
    for name, path in paths.items():
        read = pcapfile.read_pcap(path, ifname=name, session=session)
        assert not read.truncated, path
        b = read.batch
        for k, i, t in zip(b.keys, b.ifindex, b.t_ns):
            vlan = b.encap.get((k, i), probe.NO_ENCAP).vlan
            out[(k, name, t, vlan)] += 1
    return out


@pytest.mark.parametrize('vlan', [None, (100,)], ids=['plain', '802.1Q'])
def test_ring_recvmsg_and_tcpdump_agree(lab_factory, workdir,
                                        vlan):
    the_lab = lab_factory(guests=2)
    source = (the_lab.layout.source() if vlan is None
              else the_lab.vlan_source(vlan))
    ifaces = [the_lab.spec.pif] + [g.vif for g in the_lab.guests]
    paths = {i: os.path.join(workdir, f'{i}.pcap') for i in ifaces}
    Twin.made.clear()
    with recording(Tcpdump(the_lab.spec.hv_netns, name, path, [],
                           limit=20 * COUNT)
                   for name, path in paths.items()):
        result = _window(the_lab, source, 0.5, Twin)
    (twin,) = Twin.made
    assert twin.ring.stats.reader == 'ring'
    assert twin.other.stats.reader == 'recvmsg'
    assert twin.ring.stats.drops == 0 and twin.other.stats.drops == 0
    from_ring = rows(twin.ring.batch)
    from_recvmsg = rows(twin.other.batch)
    # Probes (and, untagged, answers) of both guests on pif and tap.
    per_probe = 2 if vlan else 4
    assert sum(from_ring.values()) == per_probe * 2 * COUNT, from_ring
    assert from_ring == from_recvmsg
    assert {r[2] for r in from_ring} == {sightings.DIR_IN, sightings.DIR_OUT}
    assert {r[4] for r in from_ring} == {vlan or ()}
    # tcpdump's pcaps: the same sightings at the same nanoseconds.
    assert pcap_rows(paths, result.session) == collections.Counter(
        (k, name, t, v) for (k, name, _d, t, v) in from_ring.elements())
    for g in the_lab.guests:
        assert result.reports[g.vif].ingress.count == COUNT


def test_daemon_reads_a_ring(lab_factory):
    """The privsep daemon's capture reads a ring; its sightings reach the
    agent like recvmsg's did."""
    the_lab = lab_factory(guests=2)
    ctx = privileged.netns_pctxt
    source = privileged.PrivsepLocalSource(the_lab.spec.src_netns, context=ctx)
    result = privsep.daemon_window(
        the_lab, source, window.WindowSettings(
            count=COUNT, timeout_ms=100.0, max_window_ms=2000.0), ctx)
    assert result.capture.reader == 'ring'
    assert result.capture.drops == 0
    assert len(result.batch) == 4 * 2 * COUNT
    for g in the_lab.guests:
        rep = result.reports[g.vif]
        assert rep.ingress.count == COUNT and rep.egress.count == COUNT


def test_a_refused_ring_is_an_error_naming_it(lab_factory):
    """A geometry the kernel refuses (blocks not a multiple of the page
    size) raises RingError with the ring's size; the socket stays usable."""
    the_lab = lab_factory(guests=1)
    sock = netns.socket_in_netns(the_lab.spec.hv_netns, socket.AF_PACKET,
                                 socket.SOCK_RAW,
                                 socket.htons(capture.ETH_P_ALL))
    try:
        with pytest.raises(ring.RingError, match='TPACKET_V3 receive ring'):
            ring.PacketRing(sock, 1 << 20, block_bytes=4096 + 16)
    finally:
        sock.close()


class NoSettle(capture.LiveCapture):
    """Closed as soon as the probes are sent: the ring's last block is
    still the kernel's then."""

    made = []

    def __init__(self, session, protocol='icmp', netns_name=None,
                 interfaces=None, **extra):
        super().__init__(session, protocol, netns_name, None, **extra)
        self.made.append(self)

    def settle(self, quiet_s, max_s=None):
        pass


def test_close_reads_what_the_kernel_still_holds(lab_factory):
    """Every packet the kernel put in the ring is read at close, the last
    block included: kept or foreign, none left over."""
    the_lab = lab_factory(guests=2)
    NoSettle.made.clear()
    source = the_lab.layout.source()
    _window(the_lab, source, 0.2, NoSettle)
    (cap,) = NoSettle.made
    stats = cap.stats
    assert stats.reader == 'ring' and stats.drops == 0
    assert stats.probes >= 2 * 2 * COUNT
    assert stats.probes + stats.foreign == stats.packets - stats.drops


def tenant_pings(netns_name, address, count):
    """``count`` plain ICMP echo requests (a guest's own id and data),
    5 ms apart, from namespace ``netns_name``."""
    sock = netns.socket_in_netns(netns_name, socket.AF_INET,
                                 socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        for n in range(count):
            echo = dpkt.icmp.ICMP(
                type=dpkt.icmp.ICMP_ECHO,
                data=dpkt.icmp.ICMP.Echo(id=0x4242, seq=n,
                                         data=b'tenant ping ' * 4))
            sock.sendto(bytes(echo), (address, 0))
            time.sleep(0.005)
    finally:
        sock.close()


def test_tenant_pings_stay_in_the_kernel(lab_factory, workdir):
    """A guest's own pings cross the pif and the tap during the window:
    tcpdump sees them, the window's capture (ring and recvmsg alike) is
    never handed one: its kernel filter keeps only the window's probes
    and answers."""
    the_lab = lab_factory(guests=1)
    guest = the_lab.guests[0]
    path = os.path.join(workdir, 'pif.pcap')
    dump = Tcpdump(the_lab.spec.hv_netns, the_lab.spec.pif, path, ['icmp'],
                   limit=20 * COUNT)
    source = the_lab.layout.source()
    Twin.made.clear()
    pinger = threading.Thread(target=tenant_pings,
                              args=(the_lab.spec.src_netns, guest.address,
                                    2 * COUNT))
    try:
        dump.wait_listening()
        pinger.start()
        time.sleep(0.05)
        window.run_window(
            the_lab.paths(), source,
            window.WindowSettings(count=COUNT, interval_ms=2.0,
                                  timeout_ms=100),
            capture_netns=the_lab.spec.hv_netns, capture_class=Twin)
        pinger.join(timeout=30)
        assert dump.stop() in (0, 124), dump.stderr
    finally:
        source.close()
        pinger.join(timeout=30)
        dump.kill()
    with open(path, 'rb') as f:
        seen = sum(1 for _ in dpkt.pcap.UniversalReader(f))
    # Probes and answers on the pif, and the guest's pings beside them.
    assert seen >= 2 * COUNT + 2 * COUNT
    (twin,) = Twin.made
    for cap in (twin.ring, twin.other):
        s = cap.stats
        assert s.probes == 4 * COUNT, s
        assert s.foreign == 0 and s.packets - s.drops == s.probes, s


@pytest.mark.parametrize('use_ring', [False, True])
def test_nothing_queued_before_the_filter_is_read(lab_factory, monkeypatch,
                                                  use_ring):
    """An AF_PACKET socket queues every packet from its creation: a
    capture whose opener is held up before its filter goes on (50 ms here,
    a descheduled thread) while a guest pings is still handed none of the
    guest's pings, nor anything else: no probe was sent."""
    the_lab = lab_factory(guests=1)
    guest = the_lab.guests[0]
    real_set = capture._set_filter

    def late_set(sock, program):
        time.sleep(0.05)
        real_set(sock, program)

    monkeypatch.setattr(capture, '_set_filter', late_set)
    pinger = threading.Thread(target=tenant_pings,
                              args=(the_lab.spec.src_netns, guest.address,
                                    60))
    pinger.start()
    try:
        time.sleep(0.02)
        cap = capture.LiveCapture(0x4e57, 'icmp',
                                  the_lab.spec.hv_netns, use_ring=use_ring)
        with cap:
            pinger.join(timeout=30)
            cap.settle(0.05, 1.0)
    finally:
        pinger.join(timeout=30)
    assert cap.reader == ('ring' if use_ring else 'recvmsg')
    assert cap.stats.packets == 0 and cap.stats.foreign == 0, cap.stats
    assert len(cap.batch) == 0


def test_without_a_ring_the_window_reads_with_recvmsg(lab_factory, caplog,
                                                      monkeypatch):
    """The kernel refuses the ring (blocks not a multiple of the page
    size): the reason is logged and the same window is read with recvmsg,
    every probe measured."""
    monkeypatch.setattr(ring, 'BLOCK_BYTES', 4096 + 16)
    the_lab = lab_factory(guests=1)
    source = the_lab.layout.source()
    caplog.set_level(logging.WARNING, logger='netweaver_agent.core.capture')
    try:
        result = window.run_window(
            the_lab.paths(), source,
            window.WindowSettings(count=COUNT, timeout_ms=100),
            capture_netns=the_lab.spec.hv_netns)
    finally:
        source.close()
    assert result.capture.reader == 'recvmsg'
    (rep,) = result.reports.values()
    assert rep.ingress.count == COUNT and rep.egress.count == COUNT
    assert 'TPACKET_V3 receive ring' in caplog.text
    assert 'recvmsg instead' in caplog.text
