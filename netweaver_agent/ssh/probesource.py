"""A probe source by its option value: ``local``, ``netns:NAME``, ``ssh://``.

``local`` and ``netns:`` sources are :mod:`netweaver_agent.core.sources`;
``ssh://`` is :class:`netweaver_agent.ssh.remote.SSHSource`.  The agent
(``[netweaver] probe_source``) and the command (``--source``) both read
their option through :func:`parse_source`.
"""

import urllib.parse

from netweaver_agent.core import netns
from netweaver_agent.core import sources
from netweaver_agent.ssh import remote


def parse_source(spec, policy=None, **ssh_options):
    """A :class:`sources.ProbeSource` from ``local``, ``netns:NAME`` or
    ``ssh://``.

    ``policy``: where probes of any source may go (None: the
    built-in classes only; ``local`` then sends nothing, see
    :class:`destinations.DestinationPolicy`).
    """
    if not spec or spec == 'local':
        return sources.LocalSource(policy=policy)
    if spec.startswith('netns:'):
        name = spec[len('netns:'):]
        netns.netns_path(name)
        return sources.LocalSource(netns_name=name, policy=policy)
    if spec.startswith('ssh://'):
        url = urllib.parse.urlsplit(spec)
        if not url.hostname:
            raise ValueError(f"probe source {spec!r} names no host")
        return remote.SSHSource(host=url.hostname, port=url.port or 22,
                                username=url.username or 'root',
                                policy=policy, **ssh_options)
    raise ValueError(f"unknown probe source {spec!r}: expected 'local', "
                     "'netns:NAME' or 'ssh://user@host[:port]'")
