"""Where a vNIC's probes go: host netdev, address, and path from the pif.

The full resolution from Ceilometer's inspector output (libvirt target
dev, Xen ``vif<domid>.<n>``, sysfs walk to the pif) lives here too; the
:class:`VifPath` is what the rest of the agent passes around.
"""

import dataclasses

from netweaver_agent import latency


@dataclasses.dataclass(frozen=True, slots=True)
class VifPath:
    """One vNIC to measure.

    ``interfaces`` are host netdev names in the order a probe crosses
    them: the pif first, the vif (tap) last, bridge ports in between.
    """

    vnic: str
    address: str
    interfaces: tuple
    mac: str | None = None

    def __post_init__(self):
        if len(self.interfaces) < 2:
            raise ValueError(
                f"path of vNIC {self.vnic!r} needs a pif and a vif, got "
                f"{self.interfaces!r}")
        if self.interfaces[-1] != self.vnic:
            raise ValueError(
                f"path of vNIC {self.vnic!r} must end at it, got "
                f"{self.interfaces!r}")

    @property
    def pif(self):
        return self.interfaces[0]

    def spec(self):
        """The :class:`latency.PathSpec` the matcher needs."""
        return latency.PathSpec(vnic=self.vnic, interfaces=self.interfaces)
