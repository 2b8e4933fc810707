"""The rtnetlink link dump against the real kernel, beside ``ip -j link``.

Two namespaces of the test's own: ``hv`` holds three Linux bridges (a
tap and a pif veth whose peer is in ``ex``; a tap and a veth whose peer
is in ``hv`` too, the hybrid plug's ``qvb``/``qvo``; a tap and a macvlan
naming its veth parent, which does not name it back), two cross-namespace
veths whose ifindexes are crossed on purpose (each one's peer index is
the other's index in ``hv``: read without ``IFLA_LINK_NETNSID`` they
would look like a pair), and a hundred more veth pairs so that the dump
spans many replies.  The table the dump gives must be the one ``ip -j
link show`` prints, and the paths the agent finds the same either way.
"""

import json
import os
import subprocess
import sys

import pytest

from netweaver_agent.agent import rtnl
from netweaver_agent.agent import topology
from netweaver_agent.core import netns
from tests.functional import conftest

EXTRA_PAIRS = 100
# Chosen ifindexes of the crossed cross-namespace veths.
X_INDEX, Z_INDEX = 1000, 2000


def ip(ns, *argv):
    subprocess.run(['ip', '-n', ns, *argv], check=True, timeout=30,
                   capture_output=True)


@pytest.fixture(scope='module')
def host():
    """``(hv, ex)``: the namespaces, built and removed."""
    conftest.require_root()
    prefix = conftest.unique_prefix('rtl')
    hv, ex = prefix + 'hv', prefix + 'ex'
    made = []
    try:
        for ns in (hv, ex):
            subprocess.run(['ip', 'netns', 'add', ns], check=True)
            made.append(ns)
        for br in ('br0', 'qbr1', 'br2'):
            ip(hv, 'link', 'add', br, 'type', 'bridge')
        ip(hv, 'link', 'add', 'eth1', 'type', 'veth', 'peer', 'name', 'up',
           'netns', ex)
        ip(hv, 'link', 'add', 'qvb1', 'type', 'veth', 'peer', 'name', 'qvo1')
        ip(hv, 'link', 'add', 'd0', 'type', 'veth', 'peer', 'name', 'd1')
        ip(hv, 'link', 'add', 'mv0', 'link', 'd0', 'type', 'macvlan',
           'mode', 'bridge')
        ip(hv, 'link', 'add', 'x1', 'index', str(X_INDEX), 'type', 'veth',
           'peer', 'name', 'x2', 'index', str(Z_INDEX), 'netns', ex)
        ip(hv, 'link', 'add', 'z1', 'index', str(Z_INDEX), 'type', 'veth',
           'peer', 'name', 'z2', 'index', str(X_INDEX), 'netns', ex)
        for tap in ('tap1', 'tap2', 'tap3'):
            ip(hv, 'tuntap', 'add', tap, 'mode', 'tap')
        for dev, br in (('eth1', 'br0'), ('tap1', 'br0'), ('qvb1', 'qbr1'),
                        ('tap2', 'qbr1'), ('mv0', 'br2'), ('tap3', 'br2')):
            ip(hv, 'link', 'set', dev, 'master', br)
        batch = ''.join(f'link add ve{n}a type veth peer name ve{n}b\n'
                        for n in range(EXTRA_PAIRS))
        subprocess.run(['ip', '-n', hv, '-batch', '-'], input=batch,
                       text=True, check=True, timeout=60)
        yield hv, ex
    finally:
        for ns in made:
            subprocess.run(['ip', 'netns', 'del', ns], check=False)


def ip_json(ns):
    return netns.run(['ip', '-j', 'link', 'show'], netns=ns).stdout


def test_the_dump_is_what_ip_link_prints(host):
    hv, _ = host
    text = ip_json(hv)
    links = rtnl.dump_links(hv)
    name_of = {link.index: link.name for link in links}
    dumped = [(link.index, link.name, name_of.get(link.master),
               link.link if link.link_netnsid is not None
               else name_of.get(link.link), link.link_netnsid is not None)
              for link in links]
    printed = [(row['ifindex'], row['ifname'], row.get('master'),
                row.get('link_index') if 'link_netnsid' in row
                else row.get('link'), 'link_netnsid' in row)
               for row in json.loads(text)]
    assert dumped == printed
    assert len(links) > 2 * EXTRA_PAIRS
    by_name = {link.name: link for link in links}
    assert by_name['x1'].index == X_INDEX and by_name['x1'].link == Z_INDEX
    assert by_name['z1'].link_netnsid is not None


def test_ip_links_from_the_dump_equal_ip_links_from_ip_json(host):
    hv, _ = host
    dumped = topology.IpLinks(hv)
    printed = topology.IpLinks(text=ip_json(hv), where=hv)
    assert dumped.names() == printed.names()
    for dev in printed.names():
        assert dumped.exists(dev)
        assert dumped.master(dev) == printed.master(dev), dev
        assert dumped.peer(dev) == printed.peer(dev), dev
        assert dumped.ports(dev) == printed.ports(dev), dev
    for br in ('br0', 'qbr1', 'br2'):
        assert dumped.bridge_veths(br) == printed.bridge_veths(br)
    # What each kind of link pairs with.
    peers = {dev: dumped.peer(dev) for dev in (
        'qvb1', 'qvo1', 'd0', 'd1', 've7a', 'eth1', 'x1', 'z1', 'mv0',
        'tap1', 'br0')}
    assert peers == {'qvb1': 'qvo1', 'qvo1': 'qvb1', 'd0': 'd1',
                     'd1': 'd0', 've7a': 've7b', 'eth1': None, 'x1': None,
                     'z1': None, 'mv0': None, 'tap1': None, 'br0': None}
    assert dumped.bridge_veths('qbr1') == (('qvb1', 'qvo1'),)
    assert dumped.ports('br2') == ['mv0', 'tap3']


def test_paths_are_found_the_same_from_the_dump(host):
    hv, _ = host
    dumped = topology.IpLinks(hv)
    printed = topology.IpLinks(text=ip_json(hv), where=hv)
    for tap, pif, bridge in (('tap1', 'eth1', 'br0'),
                             ('tap2', 'qvb1', 'qbr1'),
                             ('tap3', 'mv0', 'br2')):
        found = topology.find_path(tap, dumped)
        assert found == topology.find_path(tap, printed)
        assert found.interfaces == (pif, tap)
        assert found.via == ((bridge,),)


def test_sysfs_links_take_their_veth_peers_from_the_dump(host):
    hv, _ = host
    # In process (this sysfs is not the namespace's, but the peers come
    # from a dump in the thread that entered it).
    assert netns.run_in_netns(hv, lambda: [
        topology.SysfsLinks().peer(dev) for dev in ('qvb1', 'eth1', 'mv0')
    ]) == ['qvo1', None, None]
    # As the agent on a compute node: its sysfs is the namespace's.
    # And the agent's own HostLinks (the dump alone) tells the same.
    for cls in ('SysfsLinks', 'HostLinks'):
        code = ('from netweaver_agent.agent import topology as t; l = '
                f't.{cls}(); print(l.bridge_veths("qbr1"), '
                'l.bridge_veths("br0"), l.bridge_veths("br2"), '
                'l.ports("br0"), l.master("tap1"), l.exists("tap3"), '
                'l.exists("nosuch"))')
        out = subprocess.run(
            ['ip', 'netns', 'exec', hv, sys.executable, '-c', code],
            check=True, capture_output=True, text=True, timeout=60,
            env={**os.environ, 'PYTHONPATH': conftest.REPO}).stdout
        assert out.strip() == ("(('qvb1', 'qvo1'),) () () "
                               "['eth1', 'tap1'] br0 True False"), cls


def test_a_namespace_removed_meanwhile_is_named():
    conftest.require_root()
    ns = conftest.unique_prefix('rtl') + 'gone'
    subprocess.run(['ip', 'netns', 'add', ns], check=True)
    subprocess.run(['ip', 'netns', 'del', ns], check=True)
    with pytest.raises(topology.TopologyError, match=ns):
        topology.IpLinks(ns)


def test_live_netdevs_see_what_the_dump_holds_and_a_deletion(host):
    hv, _ = host
    names = topology.IpLinks(hv).names()
    assert 'tap1' in names and 'qvb1' in names

    def ask(devs):
        return [topology.LiveNetdevs.exists(d) for d in devs]

    # In the namespace (the agent's own, after a window): every netdev
    # the dump lists, none it does not, one deleted meanwhile gone.
    assert netns.run_in_netns(hv, lambda: ask(names)) == [True] * len(names)
    assert netns.run_in_netns(hv, lambda: ask(['nosuch0', 'x2'])) == [
        False, False]
    ip(hv, 'link', 'add', 'gone0', 'type', 'veth', 'peer', 'name', 'gone1')
    try:
        assert netns.run_in_netns(hv, lambda: ask(['gone0'])) == [True]
    finally:
        ip(hv, 'link', 'del', 'gone0')
    assert netns.run_in_netns(hv, lambda: ask(['gone0', 'gone1'])) == [
        False, False]
