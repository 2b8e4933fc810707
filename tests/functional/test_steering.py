"""A tenant cannot steer our probes: the real pollsters on the lab.

Guest 0's domain names guest 1's address in its filterref (the port's
fixed IP recorded by Nova says otherwise), guest 2's names no address at
all.  Before, guest 0's probes went to guest 1 and the bad address
failed the whole window; now both vNICs are not measurable, with the
reason, and guest 1 is measured with its own probes only.
"""

import pytest

from netweaver_agent.core import netns
from tests.functional import inprocess
from tests.functional.inprocess import by_resource
from tests.functional.inprocess import METERS

PROBE = {'probe_count': 20, 'probe_interval_ms': 1.0,
         'per_vnic_interval_ms': 5.0, 'probe_timeout_ms': 100.0,
         'max_window_ms': 3000.0}
ALL = {m.sample_name for m in METERS}


@pytest.fixture
def cycle_factory(tmp_path):
    yield from inprocess.cycles(tmp_path)


def _set_filterref_ip(cycle, index, address):
    """Rewrite guest ``index``'s filterref IP in the node, as a tenant
    controlling what its port says would; the nova port is unchanged."""
    with open(cycle.node, encoding='utf-8') as f:
        text = f.read()
    guest = cycle.lab.guests[index]
    old = f"<parameter name=\"IP\" value=\"{guest.address}\" />"
    if old not in text:
        old = old.replace('"', "'").replace(' />', '/>')
    assert text.count(old) == 1, (old, text)
    with open(cycle.node, 'w', encoding='utf-8') as f:
        f.write(text.replace(old, old.replace(guest.address, address)))
    libvirt = cycle.inspector.libvirt
    libvirt.connection.close()
    libvirt._libvirt_connection = None


def _rx_packets(dev):
    with open('/proc/thread-self/net/dev', encoding='ascii') as f:
        for line in f:
            name, _, rest = line.partition(':')
            if name.strip() == dev:
                return int(rest.split()[1])
    return None


def test_filterref_naming_another_guest_is_not_probed(lab_factory,
                                                      cycle_factory):
    the_lab = lab_factory(guests=3)
    cycle = cycle_factory(the_lab, **PROBE)
    thief, victim, broken = the_lab.guests
    _set_filterref_ip(cycle, thief.index, victim.address)
    _set_filterref_ip(cycle, broken.index, '198.18.0.300')
    rid = {g.index: cycle.resource_of(g.index) for g in the_lab.guests}
    before = netns.run_in_netns(the_lab.guests[victim.index].netns,
                                _rx_packets, 'eth0')
    samples, cache = cycle.run()
    after = netns.run_in_netns(the_lab.guests[victim.index].netns,
                               _rx_packets, 'eth0')
    vols = by_resource(samples)
    got = {i: {name for name, v in vols.items() if rid[i] in v}
           for i in rid}
    assert got == {thief.index: set(), victim.index: ALL,
                   broken.index: set()}, got
    (window,) = cache.windows
    [measured] = window.measurements
    assert measured.path.vif == victim.vif
    assert measured.report.sent == PROBE['probe_count']
    assert measured.report.ingress.count == PROBE['probe_count']
    # The victim's guest received its own probes and none of the thief's
    # (those would double the count; a packet or two of the lab's own
    # traffic may come along).
    got = after - before
    assert PROBE['probe_count'] <= got < 2 * PROBE['probe_count'] - 2, (
        before, after)
    log = cycle.log_text()
    assert (f'filterref IP {victim.address} is not one of port '
            f'{thief.port_id}') in log
    assert "'198.18.0.300' is not an IP address" in log
    assert 'Traceback' not in log
