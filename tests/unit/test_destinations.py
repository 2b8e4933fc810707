"""The destination policy: where probes may go, and what a refusal does.

Pure checks (nothing is sent), then the window: a refused address leaves
out its vNIC alone, and a window that fails after its probes were
prepared has the source forget them.  The real privsep daemon refuses the
same addresses in tests/functional/test_daemon_limits.py.
"""

import ipaddress

import pytest

from netweaver_agent.core import capture
from netweaver_agent.core import destinations
from netweaver_agent.core import sightings
from netweaver_agent.core import sources
from netweaver_agent.core import vifpath
from netweaver_agent.core import window
from netweaver_agent.ssh import probesource

REFUSED = {
    'loopback': ['127.0.0.1', '127.255.255.254', '::1'],
    'link-local': ['169.254.169.254', '169.254.0.1', 'fe80::1',
                   'febf:ffff::1', 'fe80::1%eth0'],
    'multicast': ['224.0.0.1', '239.255.255.250', 'ff02::1', 'ff0e::101'],
    'broadcast': ['255.255.255.255'],
    'unspecified': ['0.0.0.0', '::'],
    'reserved': ['240.0.0.1', '250.1.2.3', '0.1.2.3', '::ffff:198.18.0.10',
                 '64:ff9b::c612:a', 'fec0::1', '100::1'],
    'not an address': ['198.18.0.300', '', 'eth0', '198.18.0.0/24',
                       '198.018.0.1', None, 3323068426],
}
ALLOWED = ['198.18.0.10', '198.19.255.254', '2001:2::10', '2001:2:0:1::a']


@pytest.mark.parametrize('address', [a for v in REFUSED.values()
                                     for a in v])
def test_every_refused_class_is_refused_with_the_address(address):
    policy = destinations.DestinationPolicy()
    why = policy.refusal(address)
    assert why
    with pytest.raises(destinations.RefusedDestination) as err:
        policy.check(address)
    assert err.value.address == address and err.value.reason == why
    assert repr(address) in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize('kind', sorted(REFUSED))
def test_the_reason_names_the_class(kind):
    words = {'loopback': 'loopback', 'link-local': 'link-local',
             'multicast': 'multicast', 'broadcast': 'broadcast',
             'unspecified': 'unspecified',
             'reserved': ('reserved', 'this network', 'IPv4-mapped',
                          'site-local'),
             'not an address': 'not an IPv4 or IPv6 address'}[kind]
    words = (words,) if isinstance(words, str) else words
    for address in REFUSED[kind]:
        why = destinations.DEFAULT.refusal(address)
        assert any(w in why for w in words), (address, why)


@pytest.mark.parametrize('address', ALLOWED)
def test_unicast_addresses_pass_without_probe_networks(address):
    assert destinations.DEFAULT.refusal(address) is None
    assert destinations.check(address) == address


def _fresh(policy):
    """A policy like ``policy`` that never answered anything."""
    return destinations.DestinationPolicy(policy.networks,
                                          policy.require_networks,
                                          policy.subnets)


def _answer(policy, address):
    try:
        return policy.check(address), None
    except destinations.RefusedDestination as exc:
        return None, exc.reason


def test_a_policy_answers_again_what_it_answered_first():
    # Verdicts are kept per policy: the same address asked again, or of
    # another policy (other networks, subnets), gets its own answer.
    addresses = ([a for v in REFUSED.values() for a in v] + ALLOWED +
                 ['2001:2:0:0::A', '198.20.0.1', '198.18.7.255',
                  '198.18.7.0', '198.18.7.9'])
    policies = [destinations.DEFAULT,
                destinations.policy(['198.18.0.0/15']),
                destinations.policy(['198.18.0.0/15'], subnets=[
                    '198.18.7.0/24']),
                destinations.policy(require_networks=True),
                destinations.policy(['2001:2::/48'])]
    for _ in range(2):
        for policy in policies:
            for address in addresses:
                assert _answer(policy, address) == _answer(
                    _fresh(policy), address), (policy, address)
    broadcast = policies[2]
    assert _answer(broadcast, '198.18.7.255')[0] is None
    assert _answer(policies[1], '198.18.7.255') == ('198.18.7.255', None)


def test_a_policy_keeps_a_bounded_number_of_verdicts():
    policy = destinations.policy(['198.18.0.0/15'])
    most = destinations.MAX_VERDICTS
    addresses = [str(ipaddress.ip_address('198.18.0.1') + i)
                 for i in range(most + 10)]
    for address in addresses:
        policy.check(address)
    assert 0 < len(policy._verdicts) <= most
    assert policy.check(addresses[0]) == addresses[0]


def test_check_returns_the_canonical_form():
    assert destinations.check('2001:2:0:0::A') == '2001:2::a'


def test_probe_networks_inside_and_outside_ipv4_and_ipv6():
    policy = destinations.policy(['198.18.0.0/24', '2001:2:0:1::/64'])
    assert policy.refusal('198.18.0.10') is None
    assert policy.refusal('2001:2:0:1::10') is None
    for outside in ('198.18.1.10', '198.19.0.10', '2001:2::10',
                    '2001:2:0:2::1'):
        why = policy.refusal(outside)
        assert 'outside [netweaver] probe_networks' in why, outside
        assert '198.18.0.0/24' in why and '2001:2:0:1::/64' in why
    # A family with no network of its own is outside them all.
    v6_only = destinations.policy(['2001:2::/48'])
    assert 'outside' in v6_only.refusal('198.18.0.10')
    assert v6_only.refusal('2001:2::1') is None
    v4_only = destinations.policy(['198.18.0.0/15'])
    assert 'outside' in v4_only.refusal('2001:2::1')


def test_probe_networks_never_admit_a_refused_class():
    everything = destinations.policy(['0.0.0.0/0', '::/0'])
    for address in ('127.0.0.1', '169.254.169.254', '224.0.0.1',
                    '255.255.255.255', '0.0.0.0', '::1', 'fe80::1',
                    'ff02::1', '::'):
        assert everything.refusal(address), address
    assert everything.refusal('198.18.0.10') is None


def test_subnet_broadcast_and_network_addresses_are_refused():
    policy = destinations.policy(['198.18.0.0/24'])
    assert 'broadcast address of 198.18.0.0/24' in policy.refusal(
        '198.18.0.255')
    assert 'network address of 198.18.0.0/24' in policy.refusal(
        '198.18.0.0')
    assert policy.refusal('198.18.0.254') is None
    # Known subnets (not probe networks) narrow nothing else.
    known = destinations.policy(subnets=['198.18.4.0/22'])
    assert 'broadcast' in known.refusal('198.18.7.255')
    assert known.refusal('198.18.9.255') is None
    # RFC 3021 point-to-point /31 and host /32: both addresses are hosts.
    p2p = destinations.policy(['198.18.0.8/31', '198.18.0.20/32'])
    for host in ('198.18.0.8', '198.18.0.9', '198.18.0.20'):
        assert p2p.refusal(host) is None, host


def test_local_needs_probe_networks_the_others_do_not():
    for spec in ('local', '', None):
        why = destinations.for_source(spec).refusal('198.18.0.10')
        assert 'probe_networks' in why, spec
        assert destinations.for_source(
            spec, ['198.18.0.0/15']).refusal('198.18.0.10') is None
    for spec in ('netns:src', 'ssh://probe@198.18.0.1'):
        assert destinations.for_source(spec).refusal('198.18.0.10') is None
        assert 'outside' in destinations.for_source(
            spec, ['198.19.0.0/16']).refusal('198.18.0.10')


@pytest.mark.parametrize('cidr', ['198.18.0.1/24', 'nonsense', '198.18.0.0/33',
                                  '2001:2::1/48'])
def test_a_bad_probe_network_is_named(cidr):
    with pytest.raises(ValueError) as err:
        destinations.parse_networks(['198.18.0.0/15', cidr])
    assert repr(cidr) in str(err.value)


def test_the_refusal_is_rebuilt_from_its_args():
    # oslo.privsep re-raises a daemon's error as type(*args).
    err = destinations.RefusedDestination('224.0.0.1', 'a multicast address')
    again = type(err)(*err.args)
    assert str(again) == str(err)
    assert (again.address, again.reason) == ('224.0.0.1',
                                             'a multicast address')


# --- the window --------------------------------------------------------


def _path(vif, address):
    return vifpath.VifPath(vif=vif, address=address,
                           interfaces=('eth1', vif))


class _Source(sources.ProbeSource):
    """Records what it is asked to do; sends nothing."""

    name = 'recorder'

    def __init__(self, policy=destinations.DEFAULT):
        self.policy = policy
        self.prepared = []
        self.sent = []
        self.discarded = 0

    def prepare(self, plan):
        self.prepared.append(plan)

    def send(self, plan, deadline_s):
        self.sent.append(plan)
        return sources.SendResult(sent=len(plan.probes))

    def discard(self):
        self.discarded += 1


class _Capture:
    """Opens nothing; sees nothing."""

    fail_open = False

    def __init__(self, session, protocol='icmp', netns_name=None,
                 interfaces=None, **extra):
        self.batch = sightings.SightingBatch(session)
        self.stats = None

    def __enter__(self):
        if self.fail_open:
            raise capture.CaptureError('no capture today')
        return self

    def __exit__(self, *exc):
        self.stats = capture.CaptureStats(packets=0, drops=0, probes=0,
                                          foreign=0)
        return False

    def settle(self, quiet_s, max_s=None):
        pass


class _FailingCapture(_Capture):
    fail_open = True


SETTINGS = window.WindowSettings(count=2, timeout_ms=20.0,
                                 max_window_ms=500.0)


def test_one_bad_address_drops_only_its_vnic():
    paths = [_path('tapgood', '198.18.0.10'), _path('tapbad', '198.18.0.300'),
             _path('tapmeta', '169.254.169.254'), _path('tapv6', '2001:2::10')]
    source = _Source()
    result = window.run_window(paths, source, SETTINGS,
                               capture_class=_Capture)
    (plan,) = source.sent
    assert set(plan.targets()) == {'198.18.0.10', '2001:2::10'}
    assert set(result.reports) == {'tapgood', 'tapv6'}
    refused = {r.vif: r for r in result.refused}
    assert set(refused) == {'tapbad', 'tapmeta'}
    assert refused['tapbad'].address == '198.18.0.300'
    assert 'link-local' in refused['tapmeta'].reason


def test_the_sources_policy_decides_probe_networks():
    paths = [_path('tapin', '198.18.0.10'), _path('tapout', '198.19.0.10')]
    source = _Source(destinations.policy(['198.18.0.0/24']))
    result = window.run_window(paths, source, SETTINGS,
                               capture_class=_Capture)
    assert set(result.reports) == {'tapin'}
    assert [r.vif for r in result.refused] == ['tapout']


def test_a_window_with_every_destination_refused_raises_the_refusal():
    source = _Source()
    with pytest.raises(destinations.RefusedDestination, match='224.0.0.1'):
        window.run_window([_path('tapm', '224.0.0.1')], source, SETTINGS,
                          capture_class=_Capture)
    assert source.prepared == [] and source.sent == []


def test_a_capture_that_fails_to_open_discards_the_prepared_probes():
    source = _Source()
    with pytest.raises(capture.CaptureError):
        window.run_window([_path('tapa', '198.18.0.10')], source, SETTINGS,
                          capture_class=_FailingCapture)
    assert len(source.prepared) == 1 and source.sent == []
    assert source.discarded == 1


def test_a_window_that_ends_well_discards_nothing():
    source = _Source()
    window.run_window([_path('tapa', '198.18.0.10')], source, SETTINGS,
                      capture_class=_Capture)
    assert source.discarded == 0


def test_the_local_source_refuses_before_building_or_opening_sockets():
    src = sources.LocalSource(policy=destinations.policy(['198.18.0.0/24']))
    plan = sources.schedule(7, 'icmp', ['198.18.0.10', '198.18.1.10'], 1,
                            10**6).plan
    opened = []
    src._open = lambda family=None: opened.append(family)
    with pytest.raises(destinations.RefusedDestination,
                       match='198.18.1.10'):
        src.prepare(plan)
    with pytest.raises(destinations.RefusedDestination):
        src.send(plan, 0.0)
    assert opened == []
    # 'local' without probe_networks sends nothing at all.
    with pytest.raises(destinations.RefusedDestination,
                       match='probe_networks'):
        sources.LocalSource().prepare(plan)
    assert opened == []


def test_the_local_source_forgets_what_it_prepared_on_discard():
    src = sources.LocalSource(netns_name='x')
    src._prepared = sources.Prepared('plan', [])
    src.discard()
    assert src._prepared is None


def test_parse_source_hands_the_policy_on():
    policy = destinations.policy(['198.18.0.0/15'])
    assert probesource.parse_source('local', policy=policy).policy is policy
    assert probesource.parse_source('local').policy.require_networks
