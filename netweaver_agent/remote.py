"""Remote hosts over SSH (paramiko): verified connect, run argv, fetch files.

Host keys are checked against a known_hosts file; a new key is refused
unless ``accept_new_host_key`` is set.  Every remote command is built from
an argument list with :func:`shlex.join`, never formatted from input.
"""

from oslo_config import cfg
from oslo_log import log

from netweaver_agent import sources

LOG = log.getLogger(__name__)

GROUP = 'netweaver'

OPTS = [
    cfg.StrOpt('ssh_key_file',
               help='Private key file for SSH to a remote probe source or '
                    'hypervisor (key authentication only). Unset: the SSH '
                    'agent and the default keys of the user.'),
    cfg.StrOpt('ssh_known_hosts_file',
               default='~/.ssh/known_hosts',
               help='known_hosts file against which remote host keys are '
                    'checked.'),
    cfg.BoolOpt('ssh_accept_new_host_key', default=False,
                help='Accept the key of a host absent from the known_hosts '
                     'file and record it there. Off: unknown hosts are '
                     'refused.'),
    cfg.FloatOpt('ssh_connect_timeout_s', default=10.0, min=0.1, max=300.0,
                 help='Timeout for the TCP connect, the SSH banner and '
                      'authentication, in seconds.'),
    cfg.FloatOpt('ssh_command_timeout_s', default=60.0, min=0.1,
                 max=3600.0,
                 help='Timeout for one remote command, in seconds.'),
]


class SSHSource(sources.ProbeSource):
    """Sends a probe plan from a remote host over SSH (stub)."""

    def __init__(self, host, port=22, username='root', **ssh_options):
        self.host = host
        self.port = port
        self.username = username
        self.ssh_options = ssh_options
        self.name = f'ssh://{username}@{host}:{port}'

    def send(self, plan, deadline_s):
        raise NotImplementedError('SSHSource.send is being written')
