"""Per-vNIC route checks against real namespaces (netweaver_agent.core.routes).

A tenant chooses its port's addresses: one that the probe source cannot
reach leaves out that vNIC alone, and a host route leading onto a vNIC's
own bridge (probes that would never enter through the pif) is refused.
"""

import dataclasses

import pytest

from netweaver_agent.core import netns
from netweaver_agent.core import routes
from netweaver_agent.core import window


def test_unroutable_address_leaves_out_one_vnic(lab_factory):
    the_lab = lab_factory(guests=2)
    good, bad = the_lab.paths()
    # Inside 198.18.0.0/15, outside every route of the source namespace.
    bad = dataclasses.replace(bad, address='198.18.9.9')
    result = window.run_window(
        [good, bad], the_lab.layout.source(),
        window.WindowSettings(count=10, interval_ms=1.0),
        capture_netns=the_lab.spec.hv_netns)
    assert set(result.reports) == {good.vif}
    assert result.reports[good.vif].ingress.count == 10
    [refused] = result.refused
    assert refused.vif == bad.vif
    assert 'no route to 198.18.9.9' in refused.reason


def test_local_route_onto_the_vnics_bridge_is_refused(lab_factory):
    the_lab = lab_factory(guests=2)
    paths = the_lab.paths()
    hv = the_lab.spec.hv_netns
    # The hypervisor's own stack, as a 'local' source: no route to the
    # guests at first, then an address on their bridge (probes would go
    # straight onto the bridge, never through the pif).
    first = routes.refusals(paths, hv, local=True)
    assert [r.vif for r in first] == [p.vif for p in paths]
    assert all('no route' in r.reason for r in first)
    netns.run(['ip', 'addr', 'add', '198.18.0.250/24', 'dev',
               the_lab.layout.bridge], netns=hv)
    found = routes.lookup([p.address for p in paths], hv)
    assert {r.dev for r in found.values()} == {the_lab.layout.bridge}
    onto = routes.refusals(paths, hv, local=True)
    assert [r.vif for r in onto] == [p.vif for p in paths]
    for r in onto:
        assert f'leaves by {the_lab.layout.bridge}' in r.reason
        assert f'pif {the_lab.spec.pif}' in r.reason
    # The same routes seen from a netns source: its device names are its
    # own namespace's, so only reachability counts.
    assert routes.refusals(paths, hv, local=False) == []


def test_a_namespace_the_agent_cannot_enter_is_no_route_lookup(
        lab_factory, monkeypatch):
    # As the agent's unprivileged user, 'ip -n' cannot enter a netns:
    # source's namespace.  That says nothing of the routes: the check is
    # skipped (RouteLookupError, logged by measure), never every vNIC
    # refused as unroutable.
    the_lab = lab_factory(guests=1)
    paths = the_lab.paths()
    run = netns.run

    def unprivileged(argv, **kwargs):
        return run(['setpriv', '--reuid=65534', '--regid=65534',
                    '--clear-groups', '--inh-caps=-all', *argv], **kwargs)

    monkeypatch.setattr(routes.netns, 'run', unprivileged)
    with pytest.raises(routes.RouteLookupError,
                       match=f'{the_lab.spec.src_netns}.*not permitted'):
        routes.refusals(paths, the_lab.spec.src_netns)
    monkeypatch.setattr(routes.netns, 'run', run)
    assert routes.refusals(paths, the_lab.spec.src_netns) == []
