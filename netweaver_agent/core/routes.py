"""Where a probe source's routing would send each vNIC's probes.

A tenant chooses its ports' addresses and subnets.  Before a window, the
addresses a ``local`` or ``netns:`` source would probe are looked up in
that source's routing table (one ``ip -j -force -batch -`` of ``route
get`` lines, in the source's namespace), and a vNIC is left out, with the
reason, when its probes could not measure it:

* no route: the address is unreachable from the source (one vNIC is not
  measurable; the others are probed);
* a local address: the source itself holds it (probes would never leave);
* ``local`` only: the route leaves by a device of the vNIC's own path (its
  tap, bridge or bridge ports): the probes would reach the tap without
  entering through the pif, so they would not measure the in-host path.
"""

import dataclasses
import json
# bandit B404: argument lists only (netns.run)
import subprocess  # nosec B404

from oslo_log import log

from netweaver_agent.core import destinations
from netweaver_agent.core import netns

LOG = log.getLogger(__name__)

LOOKUP_TIMEOUT_S = 10


class RouteLookupError(RuntimeError):
    """The source's routing table could not be read."""


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """How the source's routing reaches one address (``dev`` None: no
    route)."""

    address: str
    dev: str | None = None
    type: str = 'unicast'


def _batch_lines(addresses):
    for address in addresses:
        if any(c.isspace() for c in address) or address.startswith('-'):
            raise ValueError(f"not an address: {address!r}")
        yield f'route get {address}'


def lookup(addresses, netns_name=None):
    """``{address: Route}`` of each address (unroutable: ``dev`` None).

    :raises RouteLookupError: ``ip`` could not run or enter the namespace
    """
    addresses = sorted(set(addresses))
    if not addresses:
        return {}
    argv = ['ip', *(['-n', netns_name] if netns_name else []), '-j',
            '-force', '-batch', '-']
    text = '\n'.join(_batch_lines(addresses)) + '\n'
    try:
        proc = netns.run(argv, check=False, input=text,
                         timeout=LOOKUP_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RouteLookupError(
            f"cannot look up routes in {netns_name or 'this namespace'}: "
            f"{exc}") from exc
    if not proc.stdout.strip() and 'RTNETLINK answers' not in proc.stderr:
        # Nothing was looked up: 'ip' could not run there (e.g. entering
        # the namespace needs CAP_SYS_ADMIN), not "no route" for each.
        raise RouteLookupError(
            f"cannot look up routes in {netns_name or 'this namespace'}: "
            f"{proc.stderr.strip() or f'exit status {proc.returncode}'}")
    routes = {a: Route(address=a) for a in addresses}
    for line in proc.stdout.splitlines():
        try:
            entries = json.loads(line)
        except ValueError:
            continue
        for entry in entries if isinstance(entries, list) else ():
            dst = entry.get('dst') if isinstance(entry, dict) else None
            if dst in routes:
                routes[dst] = Route(address=dst, dev=entry.get('dev'),
                                    type=entry.get('type', 'unicast'))
    return routes


def refusal(path, route, local):
    """Why ``path`` cannot be probed by that route, or None."""
    if route is None or route.dev is None:
        return f"no route to {path.address} from the probe source"
    if route.type == 'local' or route.type == 'broadcast':
        return (f"{path.address} is a {route.type} address of the probe "
                "source itself")
    if local and (route.dev in path.interfaces[1:] or
                  route.dev in path.unseen):
        return (f"the host's route to {path.address} leaves by "
                f"{route.dev}, on vNIC {path.vif}'s own path: probes "
                f"would reach the tap without entering through pif "
                f"{path.pif}")
    return None


def refusals(paths, netns_name=None, local=False):
    """``[destinations.Refusal]`` of the paths whose route is unusable.

    :param local: the source is the host's own stack (``local``): its
        route must not lead onto the vNIC's own path
    """
    routes = lookup((p.address for p in paths), netns_name)
    out = []
    for path in paths:
        why = refusal(path, routes.get(path.address), local)
        if why is not None:
            out.append(destinations.Refusal(vif=path.vif,
                                            address=path.address,
                                            reason=why))
    return out
