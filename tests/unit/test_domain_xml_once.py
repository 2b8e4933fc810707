"""One domain XML fetch per instance and cycle.

libvirt's ``test:///`` driver (the real libvirt library, a node of two
guests) is read by the agent's inspector as in the polling agent:
Ceilometer's ``LibvirtInspector.inspect_vnics`` lists an instance's vNICs
from the domain XML, and the domain's path is parsed from the same XML,
not fetched again.  libvirt's ``virDomain.XMLDesc`` is counted.
"""

import types

import libvirt
import pytest

from netweaver_agent.agent import inspector
from netweaver_agent.agent import topology
from netweaver_agent.lab import virt
from tests.unit import pollsterfakes

GUESTS = [
    virt.GuestDomain(index=i, name=f'g{i}',
                     uuid=f'5d0c6e2a-1b3c-4d5e-8f6a-7b8c9d0e1f{i:02x}',
                     vif=f'tap{i}abc', mac=f'fa:16:3e:00:01:{i:02x}',
                     address=f'198.18.3.{10 + i}', bridge='brq1')
    for i in range(2)]


@pytest.fixture
def prober(tmp_path):
    yield from pollsterfakes.libvirt_inspector(
        virt.write_node(tmp_path / 'node.xml', GUESTS))


@pytest.fixture
def fetches(monkeypatch):
    """The uuids of the domains whose XML libvirt was asked for."""
    asked = []
    real = libvirt.virDomain.XMLDesc

    def counted(dom, flags=0):
        asked.append(dom.UUIDString())
        return real(dom, flags)

    monkeypatch.setattr(libvirt.virDomain, 'XMLDesc', counted)
    return asked


def _instance(guest):
    return types.SimpleNamespace(id=guest.uuid, name=guest.name)


def test_each_instance_xml_is_fetched_once_per_cycle(prober, fetches):
    for guest in GUESTS:
        vnics, domain = prober._inspect(_instance(guest))
        assert [v.name for v in vnics] == [guest.vif]
        assert [i.target for i in domain.interfaces] == [guest.vif]
    assert fetches == [g.uuid for g in GUESTS]


def test_the_next_cycle_fetches_anew(prober, fetches):
    # The XML is the cycle's, not kept: a domain changed between cycles
    # (a vNIC plugged) is read as it is now.
    first = _instance(GUESTS[0])
    prober._inspect(first)
    prober._inspect(first)
    assert fetches == [GUESTS[0].uuid] * 2


def test_a_domain_asked_for_is_its_own(prober, fetches):
    # What one instance's listing read never answers for another.
    list(prober.libvirt.inspect_vnics(_instance(GUESTS[0]), None))
    other = prober.domain(_instance(GUESTS[1]))
    assert [i.target for i in other.interfaces] == [GUESTS[1].vif]
    again = prober.domain(_instance(GUESTS[0]))
    assert [i.target for i in again.interfaces] == [GUESTS[0].vif]


@pytest.fixture
def parses(monkeypatch):
    """The domain names whose XML the inspector parsed."""
    parsed = []
    real = topology.parse_domain

    def counted(xml, domid=None):
        info = real(xml, domid)
        parsed.append(info.name)
        return info

    monkeypatch.setattr(topology, 'parse_domain', counted)
    return parsed


def test_an_unchanged_domain_is_parsed_once(prober, parses):
    # Listing every cycle, a host's domains are parsed when their XML
    # (or id) changed, not every cycle: the XML is still fetched.
    instances = [_instance(g) for g in GUESTS]
    for _ in range(3):
        prober.paths(instances)
    assert sorted(parses) == sorted(g.domain_name for g in GUESTS)


def test_a_changed_domain_is_parsed_anew(prober, parses, monkeypatch):
    # The tenant's port got another fixed IP (nova rewrote the domain's
    # metadata; the inspector's read-only connection cannot, so libvirt's
    # answer is rewritten): the next listing reads the new address.
    instances = [_instance(g) for g in GUESTS]
    prober.paths(instances)
    old, new = GUESTS[0].address, '198.18.3.99'
    real = libvirt.virDomain.XMLDesc

    def moved(dom, flags=0):
        xml = real(dom, flags)
        if dom.UUIDString() != GUESTS[0].uuid:
            return xml
        assert old in xml
        return xml.replace(old, new)

    monkeypatch.setattr(libvirt.virDomain, 'XMLDesc', moved)
    prober.paths(instances)
    assert sorted(parses) == sorted(
        [g.domain_name for g in GUESTS] + [GUESTS[0].domain_name])
    _vnics, domain = prober._inspect(instances[0])
    assert [p.addresses for p in domain.ports] == [(new,)]
    _vnics, other = prober._inspect(instances[1])
    assert [p.addresses for p in other.ports] == [(GUESTS[1].address,)]


def test_gone_domains_are_forgotten(prober):
    # A long-lived agent keeps what the last listings parsed, not every
    # domain it ever saw.
    prober.paths([_instance(g) for g in GUESTS])
    for _ in range(inspector.KEEP_PARSED_LISTINGS - 1):
        prober.paths([_instance(GUESTS[1])])
    assert set(prober._parsed) == {g.uuid for g in GUESTS}
    prober.paths([_instance(GUESTS[1])])
    assert set(prober._parsed) == {GUESTS[1].uuid}
