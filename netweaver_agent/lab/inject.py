"""The delayer processes a lab starts, and the truth they record.

A layout injects delay by sending the probes bound to one guest to a
delayer process in the hypervisor's namespace (a :mod:`delayer` on an
NFQUEUE on the Linux bridge, an OpenFlow controller that holds them on
Open vSwitch and OVN).  :class:`Delayers` starts them, waits until each
says :data:`delayer.READY`, and ends them; each records every hold in a
file of the lab's state directory, read back by :func:`delay_records`
and :func:`passive_holds`.
"""

import os
import select
# bandit B404: argument lists only (netns.run style), never a shell
import subprocess  # nosec B404
import sys
import time

from oslo_log import log

from netweaver_agent.core import netns
from netweaver_agent.lab import delayer
from netweaver_agent.lab import switch

LOG = log.getLogger(__name__)

DELAYER_READY_TIMEOUT_S = 20.0
DELAYER_MODULE = 'netweaver_agent.lab.delayer'


class Delayers:
    """The delayer processes of one lab, in its hypervisor namespace.

    ``state_dir`` holds their records and logs; unless ``persistent``,
    each delayer ends when this process does (``--watch-pid``).
    """

    def __init__(self, hv_netns, state_dir, persistent):
        self.hv_netns = hv_netns
        self.state_dir = state_dir
        self.persistent = persistent
        self._procs = []

    def pids(self):
        """``[{'pid': …, 'marker': module}]`` of every delayer started."""
        return [{'pid': p.pid, 'marker': module} for p, module in self._procs]

    def start(self, delay, queue, module=DELAYER_MODULE, args=None,
              backend='nfqueue', on_started=None):
        """Start a delayer holding ``delay`` (a ``DelayInjection``); its
        :class:`switch.ActiveDelay` once it is ready.

        Default: a :mod:`delayer` on NFQUEUE ``queue``.  ``module`` and
        ``args``: another delayer taking the same ``--delay-ms``,
        ``--records`` and ``--watch-pid`` and printing
        :data:`delayer.READY` (``backend`` names it; no queue).
        ``on_started()`` runs once the process exists, before it is ready
        (the lab records its pid then).
        """
        if args is not None:
            queue = None
        g = delay.guest
        records = os.path.join(self.state_dir, f'delay-g{g}.records')
        logfile = os.path.join(self.state_dir, f'delayer-g{g}.log')
        open(records, 'w').close()
        argv = [sys.executable, '-m', module,
                *(['--queue', str(queue)] if args is None else args),
                '--delay-ms', str(delay.delay_ms), '--records', records]
        if delay.record != 'probe':
            argv += ['--keys', delay.record]
        if not self.persistent:
            argv += ['--watch-pid', str(os.getpid())]
        with open(logfile, 'ab') as log_f:
            # bandit B603: a fixed argv: this Python running a lab delayer
            proc = subprocess.Popen(  # nosec B603
                netns.netns_argv(self.hv_netns, argv),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=log_f, start_new_session=True)
        self._procs.append((proc, module))
        if on_started is not None:
            on_started()
        self._wait_ready(proc, logfile)
        LOG.info('Probes to guest %(g)d held %(ms)s ms by %(backend)s '
                 'delayer %(pid)d in %(ns)s',
                 {'g': g, 'ms': delay.delay_ms, 'pid': proc.pid,
                  'backend': backend, 'ns': self.hv_netns})
        return switch.ActiveDelay(injection=delay, backend=backend,
                                  queue=queue, records_path=records,
                                  pid=proc.pid)

    def _wait_ready(self, proc, logfile):
        end = time.monotonic() + DELAYER_READY_TIMEOUT_S
        line = b''
        while time.monotonic() < end:
            ready, _, _ = select.select([proc.stdout], [], [],
                                        max(0.0, end - time.monotonic()))
            if not ready:
                break
            chunk = os.read(proc.stdout.fileno(), 64)
            if not chunk:
                break
            line += chunk
            if line.startswith(delayer.READY.encode()):
                return
        proc.poll()
        try:
            with open(logfile, encoding='utf-8', errors='replace') as f:
                err = f.read().strip()[-500:]
        except OSError:
            err = ''
        raise switch.LabError(
            f"the delayer in {self.hv_netns} (pid {proc.pid}) did not "
            f"become ready within {DELAYER_READY_TIMEOUT_S:.0f} s (exit "
            f"status {proc.returncode}): {err or 'no output'}")

    def close(self):
        """Kill every delayer still running (the lab's teardown has
        already asked them to end)."""
        for p, _ in self._procs:
            if p.stdout is not None:
                p.stdout.close()
            if p.poll() is None:
                p.kill()
                p.wait()
        self._procs = []


def delay_records(delays, guest=None):
    """The :class:`delayer.DelayRecord` of every probe the delayers of
    ``delays`` (:class:`switch.ActiveDelay`) held so far; ``guest``: one
    guest's only.  A netem delay keeps no records: its truth is its
    configured delay."""
    out = []
    for d in delays:
        if d.records_path and (guest is None or d.injection.guest == guest):
            out.extend(delayer.read_records(d.records_path))
    return out


def passive_holds(delays, guest):
    """The :class:`delayer.PassiveHold` of every packet ``guest``'s
    passive-recording delayer (of ``delays``) held so far."""
    out = []
    for d in delays:
        if (d.records_path and d.injection.guest == guest and
                d.injection.record == 'passive'):
            out.extend(delayer.read_passive_records(d.records_path))
    return out
