"""The lab's paths as the product finds them (``netweaver lab`` measures
along these), on the Linux-bridge layouts: the VXLAN overlay's underlay is
the pif, never the VXLAN port past decapsulation."""

import dataclasses
import os
import subprocess
import sys

import pytest

from netweaver_agent.agent import topology
from netweaver_agent.cli import lab as cmd_lab
from tests.functional import conftest


def test_linux_bridge_flat_and_vxlan_found_as_built(lab_factory):
    for network_type in ('flat', 'vxlan'):
        the_lab = lab_factory(guests=2, network_type=network_type)
        assert cmd_lab.discovered_paths(the_lab) == the_lab.paths()
    # The VXLAN lab: pif → vxlan-<VNI> → tap, the tunnel's port known.
    path = the_lab.paths()[0]
    assert path.interfaces[0] == the_lab.spec.pif
    assert path.interfaces[1].startswith('vxlan-')
    assert path.encap_port('vxlan') == 4789


def test_sysfs_tells_a_vxlan_port_in_its_own_namespace(lab_factory):
    # sysfs shows the namespace that mounted it: 'ip netns exec' mounts
    # the hypervisor's, as the agent on a compute node sees its own.
    the_lab = lab_factory(guests=1, network_type='vxlan')
    vxlan = the_lab.paths()[0].interfaces[1]
    expected = topology.VxlanPort(name=vxlan, link=the_lab.spec.pif,
                                  local=the_lab.spec.underlay_addresses()[1],
                                  port=4789)
    # SysfsLinks, and the agent's HostLinks (the rtnetlink dump, sysfs
    # only to tell a VXLAN).
    for cls in ('SysfsLinks', 'HostLinks'):
        code = ('import sys; from netweaver_agent.agent import topology '
                f'as t; l = t.{cls}(); '
                'print(l.vxlan(sys.argv[1]), l.vxlan(sys.argv[2]))')
        out = subprocess.run(
            ['ip', 'netns', 'exec', the_lab.spec.hv_netns, sys.executable,
             '-c', code, vxlan, the_lab.guests[0].vif], check=True,
            capture_output=True, text=True, timeout=60,
            env={**os.environ, 'PYTHONPATH': os.getcwd()}).stdout
        assert out.strip() == f'{expected} None', cls


def test_a_path_found_unlike_the_lab_is_refused(lab_factory, monkeypatch):
    the_lab = lab_factory(guests=1)
    [truth] = the_lab.paths()
    wrong = dataclasses.replace(truth, interfaces=('eth9', truth.vif))
    monkeypatch.setattr(the_lab, 'paths', lambda: [wrong])
    with pytest.raises(topology.TopologyError,
                       match=f"{truth.vif}: found \\('{the_lab.spec.pif}'"):
        cmd_lab.discovered_paths(the_lab)


def test_ip_links_reads_a_real_bridge_in_a_namespace():
    conftest.require_root()
    ns = conftest.unique_prefix('topo') + 'hv'
    subprocess.run(['ip', 'netns', 'add', ns], check=True)
    try:
        for argv in (['link', 'add', 'br0', 'type', 'bridge'],
                     ['link', 'add', 'eth1', 'type', 'veth', 'peer', 'name',
                      'tapx'],
                     ['link', 'set', 'eth1', 'master', 'br0'],
                     ['link', 'set', 'tapx', 'master', 'br0']):
            subprocess.run(['ip', '-n', ns, *argv], check=True)
        links = topology.IpLinks(ns)
        assert links.ports('br0') == ['eth1', 'tapx']
        assert topology.find_pif('tapx', links, ('tap',)) == 'eth1'
    finally:
        subprocess.run(['ip', 'netns', 'del', ns], check=True)
