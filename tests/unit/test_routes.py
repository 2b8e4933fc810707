"""Unit tests of the per-vNIC route check (netweaver_agent.core.routes)."""

import pytest

from netweaver_agent.core import routes
from netweaver_agent.core import vifpath


def path(vif='tapaaa', address='198.18.0.10', interfaces=None, via=()):
    return vifpath.VifPath(vif=vif, address=address,
                           interfaces=interfaces or ('eth1', vif), via=via)


def test_no_route_refuses_only_that_vnic():
    assert 'no route to 198.18.0.10' in routes.refusal(
        path(), routes.Route('198.18.0.10'), local=False)
    assert routes.refusal(path(), None, local=False) is not None
    assert routes.refusal(path(), routes.Route('198.18.0.10', 'eth0'),
                          local=False) is None


@pytest.mark.parametrize('kind', ['local', 'broadcast'])
def test_an_address_of_the_source_itself(kind):
    why = routes.refusal(path(), routes.Route('198.18.0.10', 'lo', kind),
                         local=False)
    assert f'{kind} address of the probe source' in why


@pytest.mark.parametrize('dev', ['brq1', 'qvbaaa', 'tapaaa'])
def test_local_route_onto_the_vnics_own_path(dev):
    hybrid = path(interfaces=('eth1', 'qvoaaa', 'qvbaaa', 'tapaaa'),
                  via=(('br-ex', 'br-int'), (), ('qbraaa',)))
    plain = path(via=(('brq1',),))
    p = hybrid if dev == 'qvbaaa' else plain
    route = routes.Route('198.18.0.10', dev)
    assert f'leaves by {dev}' in routes.refusal(p, route, local=True)
    # A netns or remote source's device names are another namespace's.
    assert routes.refusal(p, route, local=False) is None
    # Out by the pif is how probes should leave a local source's host
    # when routing brings them back in.
    assert routes.refusal(p, routes.Route('198.18.0.10', 'eth1'),
                          local=True) is None


def test_lookup_refuses_option_like_addresses():
    with pytest.raises(ValueError, match='not an address'):
        list(routes._batch_lines(['-force']))
    with pytest.raises(ValueError, match='not an address'):
        list(routes._batch_lines(['198.18.0.1 dev lo']))
