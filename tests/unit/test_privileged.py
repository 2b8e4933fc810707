"""What the privsep daemon sends back for a window survives the wire.

The batch goes through oslo.privsep's own serializer and deserializer
(msgpack over a socket pair), as between the daemon and the agent.  The
real daemon carries it in tests/functional/test_privsep.py and
test_encap.py.
"""

import socket

from oslo_privsep import comm

from netweaver_agent import capture
from netweaver_agent import privileged
from netweaver_agent import probe


def _through_privsep_wire(value):
    a, b = socket.socketpair()
    try:
        comm.Serializer(a).send(value)
        a.close()
        return next(iter(comm.Deserializer(b)))
    finally:
        a.close()
        b.close()


def _batch():
    batch = capture.SightingBatch(77)
    rows = [
        # (key, interface, t_ns, direction, encap or None)
        (10 << 1, 'eth1', 1_700_000_000_000_000_001, capture.DIR_IN,
         probe.Encap(vni=4242)),
        (10 << 1, 'vxlan-4242', 1_700_000_000_000_010_000, capture.DIR_OUT,
         None),
        (10 << 1, 'tapaaa', 1_700_000_000_000_020_000, capture.DIR_OUT,
         None),
        (10 << 1 | 1, 'eth1', 1_700_000_000_000_090_000, capture.DIR_OUT,
         probe.Encap(vni=4242)),
        (11 << 1, 'eth1', 1_700_000_000_000_100_000, capture.DIR_IN,
         probe.Encap(vlan=(200, 100))),
        (12 << 1, 'eth1', 1_700_000_000_000_200_000, capture.DIR_IN,
         probe.Encap(vlan=(7,), vni=0xffffff)),
        # The largest key a batch holds.
        (2**64 - 1, 'tapaaa', 1_700_000_000_000_300_000, capture.DIR_IN,
         probe.Encap(vlan=(4095,))),
    ]
    for key, ifname, t_ns, direction, encap in rows:
        index = batch.interface_index(ifname)
        batch.append(key, index, t_ns, direction)
        if encap is not None:
            batch.encap.setdefault((key, index), encap)
    return batch


def test_batch_stats_and_encapsulation_round_trip():
    sent = _batch()
    stats = capture.CaptureStats(packets=9, drops=1, probes=7, foreign=2)
    raw = _through_privsep_wire(privileged.batch_to_wire(sent, stats))
    got = capture.SightingBatch(77)
    assert privileged.batch_from_wire(raw, got) == stats
    assert list(got.sightings()) == list(sent.sightings())
    assert got.ifnames == sent.ifnames
    assert got.encap == sent.encap
    assert got.encap[(11 << 1, 0)].vlan == (200, 100)
    assert all(isinstance(e, probe.Encap) and isinstance(e.vlan, tuple)
               for e in got.encap.values())


def test_an_untagged_window_carries_no_encapsulation():
    sent = capture.SightingBatch(5)
    sent.append(3 << 1, sent.interface_index('eth1'), 1, capture.DIR_IN)
    stats = capture.CaptureStats(packets=1, drops=0, probes=1, foreign=0)
    raw = _through_privsep_wire(privileged.batch_to_wire(sent, stats))
    got = capture.SightingBatch(5)
    privileged.batch_from_wire(raw, got)
    assert got.encap == {}
    assert list(got.sightings()) == list(sent.sightings())


def test_the_capture_class_passes_the_vxlan_port():
    make = privileged.capture_class(privileged.netns_pctxt)
    cap = make(9, 'udp', netns_name='hv', interfaces={'eth1'},
               vxlan_port=4789)
    assert cap.vxlan_port == 4789
    assert cap.context is privileged.netns_pctxt
    assert make(9).vxlan_port is None
