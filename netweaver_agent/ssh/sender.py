"""The sender that runs on a remote host: prepared probes in, paced out.

:class:`netweaver_agent.ssh.probesource.SSHSource` ships this file and
:mod:`netweaver_agent.core.pacing` into a fresh remote directory and runs
``python3 DIR/sender.py LIMIT BUDGET_S`` there (the remote user needs
CAP_NET_RAW).  Standard library only, besides ``pacing`` next to it.

* argv: the most records it takes, and its time budget in seconds
  (0 < budget <= :data:`MAX_BUDGET_S`), counted from its start;
* stdin: :func:`pacing.encode` records, read to the end first;
* each family's packets go to an ``IPPROTO_RAW`` socket of that family
  (the header is the packet's own), paced by :func:`pacing.pace` until
  the budget ends;
* stdout: one JSON line, ``{"sent", "failed", "errors", "left"}``;
  bad arguments or input: exit status 1, the reason on stderr.
"""

import json
import math
import socket
import sys
import time

if __package__:
    from netweaver_agent.core import pacing
else:                       # shipped: pacing.py lies next to this file
    import pacing

MAX_BUDGET_S = 3600.0


class SenderError(Exception):
    """Bad arguments or input; nothing was sent."""


def parse_args(argv):
    """``(limit, budget_s)`` from ``[LIMIT, BUDGET_S]``."""
    if len(argv) != 2:
        raise SenderError(f'usage: sender.py LIMIT BUDGET_S, not {argv!r}')
    try:
        limit, budget = int(argv[0]), float(argv[1])
    except ValueError:
        raise SenderError(f'bad arguments {argv!r}') from None
    if limit < 0:
        raise SenderError(f'bad record limit {argv[0]!r}')
    if not (math.isfinite(budget) and 0 < budget <= MAX_BUDGET_S):
        raise SenderError(f'bad time budget {argv[1]!r}')
    return limit, budget


def _raw_socket(family):
    return socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)


def run(argv, stdin, open_socket=_raw_socket):
    """Read the records of ``stdin``, send them; the JSON answer (dict).

    :param open_socket: ``f(family)`` -> a socket to ``sendto`` packets
    """
    limit, budget = parse_args(argv)
    deadline = time.monotonic() + budget
    try:
        packets = pacing.decode(stdin, limit)
    except ValueError as exc:
        raise SenderError(f'bad input: {exc}') from None
    socks = {}
    try:
        for p in packets:
            family = pacing.family_of(p.dst_ip)
            if family not in socks:
                socks[family] = open_socket(family)

        def transmit(p):
            socks[pacing.family_of(p.dst_ip)].sendto(p.data, (p.dst_ip, 0))

        done = pacing.pace(packets, transmit, deadline)
    finally:
        for sock in socks.values():
            sock.close()
    return {'sent': done.sent, 'failed': done.failed,
            'errors': list(done.errors), 'left': done.left}


def main():
    try:
        done = run(sys.argv[1:], sys.stdin.buffer)
    except SenderError as exc:
        sys.exit(f'netweaver sender: {exc}')
    print(json.dumps(done))


if __name__ == '__main__':
    main()
