"""``netweaver analyze PIF.pcap VIF.pcap``: latency from two captures.

Prints the report table (or ``--json``) and, for old habits, the seed's
``{'average', 'minimum', 'maximum', 'stdev'}`` line (ingress, µs).

Either capture may be ``-`` (standard input), a pipe, a fifo or process
substitution (``<(ssh hv cat pif.pcap)``).  Reading a file that takes
more than a second shows a progress line on stderr when stderr is a
terminal.
"""

import json
import os
import sys

from netweaver_agent.agent import opts
from netweaver_agent.cli import offline
from netweaver_agent.cli import report
from netweaver_agent.core import pcaprows
from netweaver_agent.core import probe
from netweaver_agent.core import sources


def add_parser(subparsers):
    p = subparsers.add_parser(
        'analyze',
        help='latency from two capture files (pif and vif)',
        description='Match the packets of a capture taken on the '
                    'hypervisor\'s physical interface (pif) with one taken '
                    'on the instance\'s vif (tcpdump pcap or pcapng, '
                    'ideally --time-stamp-precision=nano) and report the '
                    'in-host latency.  netweaver probes are matched by '
                    'their tags; other traffic (e.g. hping3) by a '
                    'fingerprint of invariant header fields, which needs '
                    '--destination.')
    p.add_argument('pif_pcap', metavar='PIF.pcap',
                   help='capture taken on the physical interface ("-": '
                        'standard input; pipes and fifos are read too)')
    p.add_argument('vif_pcap', metavar='VIF.pcap',
                   help='capture taken on the instance\'s vif (tap)')
    p.add_argument('--lenient', action='store_true',
                   help='skip (and count) records whose timestamp field '
                        'is out of range instead of refusing the file')
    p.add_argument('--destination', '-d', metavar='IP',
                   help='the instance\'s address: in fingerprint mode, '
                        'packets from it are replies')
    p.add_argument('--mode', choices=offline.MODES, default='auto',
                   help='probe: our tagged probes; fingerprint: any '
                        'traffic; auto: probes if there are any '
                        '(default: %(default)s)')
    p.add_argument('--fingerprint', dest='mode', action='store_const',
                   const='fingerprint', help='same as --mode fingerprint')
    p.add_argument('--session', type=int, metavar='N',
                   help='probe window to analyse (default: the most common '
                        'in the pif file)')
    p.add_argument('--timeout-ms', type=opts.finite_float,
                   default=offline.DEFAULT_TIMEOUT_MS, metavar='MS',
                   help='slower than this counts as lost (default: '
                        '%(default)s)')
    p.add_argument('--pif-name', metavar='NAME',
                   help='name shown for the pif (default: its file name)')
    p.add_argument('--vif-name', metavar='NAME',
                   help='name shown for the vif (default: its file name)')
    p.add_argument('--protocol', metavar='NAME',
                   help='label shown for the traffic (default: the mode)')
    p.add_argument('--tcp-source-ports', metavar='LOW-HIGH',
                   default='{}-{}'.format(
                       probe.DEFAULT_TCP_SOURCE_PORTS[0],
                       probe.DEFAULT_TCP_SOURCE_PORTS[-1]),
                   help='source ports of the TCP probes ([netweaver] '
                        'tcp_source_ports of the agent that sent them); TCP '
                        'probes from other ports are not ours (default: '
                        '%(default)s)')
    p.add_argument('--key', metavar='HEX',
                   help='the probe window\'s secret (hex): probe mode then '
                        'counts only probes whose tags verify for '
                        '--destination (needed); without it probes are '
                        'matched unauthenticated (look-alikes would count)')
    p.add_argument('--json', action='store_true',
                   help='print JSON instead of a table')
    p.set_defaults(run=run)
    return p


def _read_to_dict(read):
    return {'path': read.path, 'format': read.format,
            'records': read.records, 'matched': read.probes,
            'foreign': read.foreign, 'other_sessions': read.other_sessions,
            'untimed': read.untimed, 'truncated': read.truncated,
            'invalid_times': read.invalid_times,
            'directions_known': read.directions_known}


def _progress_line():
    """A ``progress(path, done, total)`` writing one self-overwriting line
    to stderr, or None when stderr is no terminal."""
    err = sys.stderr
    if err is None or not err.isatty():
        return None

    def progress(path, done, total):
        pct = 100 * done // total if total else 0
        name = os.path.basename(os.fspath(path)) or path
        err.write(f'\rnetweaver analyze: reading {name}: {pct}% '
                  f'({done >> 20} of {total >> 20} MiB)\x1b[K')
        err.flush()
        progress.shown = True

    progress.shown = False
    return progress


def _clear(progress):
    """Remove the progress line, if one was shown."""
    if progress is not None and progress.shown:
        sys.stderr.write('\r\x1b[K')
        sys.stderr.flush()


def _file_line(role, read):
    extra = ', last record cut short (ignored)' if read.truncated else ''
    if read.invalid_times:
        extra += (f', {read.invalid_times} records with an invalid '
                  'timestamp skipped')
    return (f'{role} {read.path}: {read.format}, {read.records} records, '
            f'{read.probes} matched, {read.foreign} other{extra}')


def _key(text):
    """``--key HEX`` as bytes (the error never shows it)."""
    if text is None:
        return None
    try:
        return probe.check_secret(bytes.fromhex(text.strip()), '--key')
    except ValueError:
        raise ValueError('--key: expected 32 to 128 hex digits (the probe '
                         'window\'s secret)') from None


def run(args):
    progress = _progress_line()
    try:
        result = offline.analyze_pcaps(
            args.pif_pcap, args.vif_pcap, destination=args.destination,
            session=args.session, protocol=args.protocol, mode=args.mode,
            timeout_ms=args.timeout_ms, pif_name=args.pif_name,
            vif_name=args.vif_name,
            tcp_ports=sources.parse_port_range(args.tcp_source_ports,
                                               '--tcp-source-ports'),
            key=_key(args.key), lenient=args.lenient,
            progress=progress)
    except (pcaprows.PcapError, offline.AnalyzeError, ValueError) as exc:
        _clear(progress)
        print(f'netweaver analyze: {exc}', file=sys.stderr)
        return 1
    _clear(progress)
    rep = result.report
    summary = report.seed_summary(rep.ingress)
    if args.json:
        print(json.dumps({
            'mode': result.mode, 'session': result.session,
            'authenticated': result.authenticated,
            'authentication': _authentication(result),
            'rejected': result.report.rejected,
            'pif': _read_to_dict(result.pif),
            'vif': _read_to_dict(result.vif),
            'report': report.to_jsonable(rep), 'summary': summary},
            indent=2, sort_keys=True))
        return 0
    title = f'{rep.pif} → {rep.vif} ({result.mode} mode'
    if result.mode == 'probe' and result.session != probe.TCP_SESSION:
        title += f', session {result.session}'
    if result.mode == 'probe':
        title += f', {_authentication(result)}'
        if result.authenticated:
            title += f', {rep.rejected} rejected'
    undirected = () if result.pif.directions_known is not False else (
        rep.pif,)
    print(report.format_table(result.reports, title=title + ')',
                              undirected=undirected))
    print(_file_line('pif', result.pif))
    print(_file_line('vif', result.vif))
    print(summary)
    return 0


def _authentication(result):
    return 'authenticated' if result.authenticated else 'unauthenticated'
