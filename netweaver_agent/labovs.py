"""The lab's Open vSwitch layouts (``--switch ovs-hybrid|ovs-native``)."""

from netweaver_agent import labswitch


class OvsLayout(labswitch.SwitchLayout):
    """ML2/OVS on the userspace datapath (being written)."""

    network_types = ('flat', 'vlan', 'vxlan')

    @property
    def bridge(self):
        return 'br-int'

    def build_hypervisor(self):
        raise labswitch.LabError(f"lab switch {self.name!r}: not yet built")


class OvsHybridLayout(OvsLayout):
    """ML2/OVS with the iptables hybrid plug."""

    name = 'ovs-hybrid'


class OvsNativeLayout(OvsLayout):
    """ML2/OVS with the native OVS firewall."""

    name = 'ovs-native'
