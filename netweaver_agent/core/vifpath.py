"""The path one vNIC's packets take through the host, pif first."""

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Encapsulation:
    """A UDP tunnel that may carry a vNIC's probes on the pif."""

    kind: str                 # 'vxlan' or 'geneve'
    port: int                 # UDP destination port


@dataclasses.dataclass(frozen=True, slots=True)
class VifPath:
    """One vNIC to measure: where its probes go and what they cross.

    ``interfaces`` are host netdev names in the order a probe crosses
    them, every one where a packet socket sees it: the pif first, the vif
    (tap) last, bridge ports in between (OVS hybrid plug: pif, qvo, qvb,
    tap).  ``via`` holds, per hop, the devices crossed in between where
    no packet socket sees the probe (bridges, OVS patch and tunnel
    ports, in path order; ``()`` when nothing is known).  ``encap``: the
    UDP tunnels (:class:`Encapsulation`) that may carry the probes on the
    pif.  ``address``: where its probes go (None where nothing is sent,
    e.g. two capture files read offline).

    The agent finds paths (``netweaver_agent.agent.topology``), the lab
    builds them, the window and the matcher measure along them.
    """

    vif: str
    address: str | None
    interfaces: tuple
    mac: str | None = None
    via: tuple = ()
    encap: tuple = ()

    def __post_init__(self):
        if len(self.interfaces) < 2:
            raise ValueError(
                f"path of vNIC {self.vif!r} needs a pif and a vif, got "
                f"{self.interfaces!r}")
        if self.interfaces[-1] != self.vif:
            raise ValueError(
                f"path of vNIC {self.vif!r} must end at it, got "
                f"{self.interfaces!r}")
        if self.via and len(self.via) != len(self.interfaces) - 1:
            raise ValueError(
                f"path of vNIC {self.vif!r}: {len(self.via)} via entries "
                f"for {len(self.interfaces) - 1} hops")

    @property
    def pif(self):
        return self.interfaces[0]

    @property
    def unseen(self):
        """Every device crossed and never seen, in path order."""
        return tuple(dev for hop in self.via for dev in hop)

    def hop_via(self):
        """``{(src, dst): devices crossed in between}`` per hop."""
        return dict(zip(zip(self.interfaces, self.interfaces[1:]),
                        self.via))

    def encap_port(self, kind):
        """The UDP port of the ``kind`` tunnel carrying probes, or None."""
        for found in self.encap:
            if found.kind == kind:
                return found.port
        return None
