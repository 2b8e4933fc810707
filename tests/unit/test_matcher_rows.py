"""The matcher's per-row rules (``Matcher.feed_batch``), row by row:
a sighting counts only on its probe's own path, probes received on the
pif and replies sent out of it, and a "reply" the host sends towards
the guest is a look-alike, not the guest's answer."""

from netweaver_agent.core import latency
from netweaver_agent.core import sightings
from netweaver_agent.core import vifpath

SESSION = 4242
T0 = 1_700_000_000_000_000_000
US = 1000
PATHS = [vifpath.VifPath(vif='tapa', address='198.18.0.10',
                         interfaces=('eth1', 'tapa')),
         vifpath.VifPath(vif='tapb', address='198.18.0.11',
                         interfaces=('eth1', 'tapb'))]
PLAN = {1: 'tapa', 2: 'tapb'}


def _matcher(rows):
    """A matcher fed ``rows``: (seq, reply, ifname, t_ns, direction)."""
    batch = sightings.SightingBatch(SESSION)
    for seq, reply, ifname, t_ns, direction in rows:
        batch.append(seq << 1 | reply, batch.interface_index(ifname), t_ns,
                     direction)
    m = latency.Matcher(SESSION, PATHS, PLAN, 200_000 * US)
    m.feed_batch(batch)
    return m


def _round_trip(seq, vif, t0):
    return [(seq, 0, 'eth1', t0, sightings.DIR_IN),
            (seq, 0, vif, t0 + 5 * US, sightings.DIR_OUT),
            (seq, 1, vif, t0 + 9 * US, sightings.DIR_IN),
            (seq, 1, 'eth1', t0 + 12 * US, sightings.DIR_OUT)]


def test_a_sighting_off_the_probes_path_is_not_its():
    # Probe 1 (tapa's) also seen on tapb: not on its path, not kept.
    m = _matcher(_round_trip(1, 'tapa', T0) +
                 [(1, 0, 'tapb', T0 + 1 * US, sightings.DIR_OUT)])
    assert set(m.accepted()[(1, False)]) == {'eth1', 'tapa'}
    assert m.reports()['tapa'].ingress.min_us == 5.0


def test_a_reply_sent_towards_the_guest_is_a_look_alike():
    # An echo reply leaving on tapa (towards the guest) before the
    # guest's own: the egress and turnaround are the guest's answer's.
    m = _matcher(_round_trip(1, 'tapa', T0) +
                 [(1, 1, 'tapa', T0 + 6 * US, sightings.DIR_OUT)])
    report = m.reports()['tapa']
    assert (report.egress.count, report.egress.min_us) == (1, 3.0)
    assert report.turnaround.min_us == 4.0


def test_the_pif_counts_probes_in_and_replies_out_only():
    m = _matcher([(2, 0, 'eth1', T0, sightings.DIR_OUT),
                  (2, 0, 'tapb', T0 + 5 * US, sightings.DIR_OUT),
                  (2, 1, 'tapb', T0 + 9 * US, sightings.DIR_IN),
                  (2, 1, 'eth1', T0 + 12 * US, sightings.DIR_IN)])
    report = m.reports()['tapb']
    assert report.unseen_at_pif == 1
    assert report.egress.count == 0 and report.egress.lost == 1


def test_the_first_sighting_per_interface_counts():
    m = _matcher(_round_trip(1, 'tapa', T0) +
                 [(1, 0, 'tapa', T0 + 2 * US, sightings.DIR_OUT),
                  (1, 0, 'tapa', T0 + 7 * US, sightings.DIR_OUT)])
    assert m.reports()['tapa'].ingress.min_us == 2.0
