"""``netweaver measure``: the seed's job, over SSH, on a real hypervisor.

Probes one instance from a source host, captures on the hypervisor's pif
and the instance's vif, fetches both pcaps and analyses them like
``netweaver analyze``.  The seed's flags (``-n``, ``--hv``, ``-s``, ``-i``,
``--num``, ``-d``, ``-k``) are accepted.
"""

import json
import os
import shutil
import sys
import tempfile

from netweaver_agent.agent import opts
from netweaver_agent.cli import report
from netweaver_agent.cli import seedjob
from netweaver_agent.core import sources
from netweaver_agent.ssh import session as ssh


def add_parser(subparsers):
    p = subparsers.add_parser(
        'measure',
        help='the seed\'s job over SSH: probe an instance from a source '
             'host, capture on its hypervisor, analyse',
        description='The seed\'s job over SSH: probe one instance from a '
                    'source host, capture on its hypervisor\'s pif and vif, '
                    'fetch both pcaps and analyse them.  Needs key-based '
                    'root SSH to the hypervisor and to the source host, '
                    'whose keys must be in known_hosts.')
    p.add_argument('--hypervisor', '--hv', required=True, metavar='HOST',
                   help='the destination instance\'s hypervisor')
    p.add_argument('--source', '-s', required=True, metavar='HOST',
                   help='the host that sends (the seed\'s source VM)')
    p.add_argument('--destination', '-d', required=True, metavar='IP',
                   help='the instance\'s IPv4 or IPv6 address')
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument('--instance', '-n', metavar='NAME',
                       help='instance name on the hypervisor (XenServer '
                            'name-label, or libvirt domain)')
    which.add_argument('--vif', metavar='DEV',
                       help='the instance\'s host device (e.g. vif3.0, '
                            'tap…), instead of --instance')
    p.add_argument('--interface', '-i', metavar='DEV',
                   help='the hypervisor\'s physical interface (pif; '
                        'default: found there, as the agent does: the '
                        'vif\'s Linux bridge\'s other port, or from '
                        'ovs-vsctl on Open vSwitch)')
    p.add_argument('--vif-number', '--num', type=int, default=0,
                   metavar='N', help='which vNIC of the instance: x in '
                                     'vif<domid>.x (default: %(default)s)')
    p.add_argument('--key', '-k', metavar='FILE',
                   help='SSH private key (default: the user\'s keys)')
    p.add_argument('--known-hosts', default='~/.ssh/known_hosts',
                   metavar='FILE', help='known_hosts file checked against '
                                        '(default: %(default)s)')
    p.add_argument('--accept-new-host-key', action='store_true',
                   help='accept and record keys of hosts not in known_hosts'
                        ' (a changed key is always refused)')
    p.add_argument('--user', default='root',
                   help='SSH user on both hosts (default: %(default)s)')
    p.add_argument('--hypervisor-port', type=int, default=22, metavar='PORT')
    p.add_argument('--source-port', type=int, default=22, metavar='PORT')
    p.add_argument('--count', '-c', type=int, default=100,
                   help='probes to send (default: %(default)s)')
    p.add_argument('--protocol', default='icmp',
                   choices=('icmp', 'udp', 'tcp'),
                   help='protocol of our probes (default: %(default)s)')
    p.add_argument('--interval-ms', type=opts.finite_float, default=1.0,
                   help='spacing of our probes (default: %(default)s)')
    p.add_argument('--source-command', metavar='TEMPLATE',
                   help='send with this command on the source host instead '
                        'of our probes, e.g. "%s"; placeholders {count}, '
                        '{destination}, {source_ip} are filled per '
                        'argument, no shell' % seedjob.SEED_SOURCE_COMMAND
                        .replace('%', '%%'))
    p.add_argument('--libvirt-uri', metavar='URI',
                   help='virsh -c URI, when libvirt resolves the vif')
    p.add_argument('--connect-timeout', type=opts.finite_float, default=10.0,
                   metavar='S', help='SSH connect timeout (default: '
                                     '%(default)s s)')
    p.add_argument('--command-timeout', type=opts.finite_float, default=60.0,
                   metavar='S', help='remote command timeout (default: '
                                     '%(default)s s)')
    p.add_argument('--max-capture-mb', type=int,
                   default=ssh.DEFAULT_MAX_CAPTURE_MB, metavar='MB',
                   help='refuse a fetched capture larger than this (MiB; '
                        'default: %(default)s)')
    p.add_argument('--capture-timeout', type=opts.finite_float, default=60.0,
                   metavar='S', help='longest the sending may take '
                                     '(default: %(default)s s)')
    p.add_argument('--settle', type=opts.finite_float, default=0.5,
                   metavar='S',
                   help='wait for late answers before stopping the '
                        'captures (default: %(default)s s)')
    p.add_argument('--output-dir', metavar='DIR',
                   help='keep the fetched pif.pcap and vif.pcap here '
                        '(default: a temporary directory, removed)')
    p.add_argument('--ssh-netns', metavar='NAME',
                   help='open SSH connections from this network namespace '
                        '(e.g. a lab\'s management network)')
    p.add_argument('--json', action='store_true',
                   help='print JSON instead of a table')
    p.set_defaults(run=run)
    return p


def job_from_args(args):
    return seedjob.SeedJob(
        hypervisor=args.hypervisor, source=args.source,
        destination=args.destination, instance=args.instance, vif=args.vif,
        interface=args.interface or None, vif_number=args.vif_number,
        count=args.count, protocol=args.protocol,
        interval_ms=args.interval_ms, source_command=args.source_command,
        username=args.user, hypervisor_port=args.hypervisor_port,
        source_port=args.source_port, libvirt_uri=args.libvirt_uri,
        capture_timeout_s=args.capture_timeout, settle_s=args.settle)


def options_from_args(args):
    return ssh.SSHOptions(
        key_file=args.key, known_hosts_file=args.known_hosts,
        accept_new_host_key=args.accept_new_host_key,
        connect_timeout_s=args.connect_timeout,
        command_timeout_s=args.command_timeout,
        max_capture_mb=args.max_capture_mb)


def result_to_dict(result):
    reports = result.analysis.reports
    out = {'hypervisor': result.job.hypervisor, 'source': result.job.source,
           'source_ip': result.source_ip,
           'destination': result.job.destination, 'pif': result.pif,
           'vif': result.vif, 'session': result.session,
           'sent': result.send.sent if result.send else None,
           'mode': result.analysis.mode,
           'authenticated': result.analysis.authenticated,
           'reports': report.to_jsonable(reports)}
    first = next(iter(reports.values()), None)
    if first is not None:
        out['summary'] = report.seed_summary(first.ingress)
    return out


def _authentication(result):
    """Our probes are verified with the window's secret; a source
    command's traffic (fingerprints) cannot be."""
    return ('authenticated' if result.analysis.authenticated else
            'unauthenticated')


def print_result(result, as_json, kept):
    reports = result.analysis.reports
    if as_json:
        out = result_to_dict(result)
        if kept:
            out['pcaps'] = {'pif': result.pif_pcap, 'vif': result.vif_pcap}
        print(json.dumps(out, indent=2, sort_keys=True))
        return
    print(report.format_table(
        reports, title=f'{result.job.destination} on {result.job.hypervisor}'
                       f': {result.pif} → {result.vif}, from '
                       f'{result.source_ip} ({result.job.source}), '
                       f'{_authentication(result)}'))
    for rep in reports.values():
        print(report.seed_summary(rep.ingress))
    if kept:
        print(f'pcaps: {result.pif_pcap} {result.vif_pcap}')


def run(args):
    try:
        job = job_from_args(args)
        options = options_from_args(args)
    except ValueError as exc:
        print(f'netweaver measure: {exc}', file=sys.stderr)
        return 2
    workdir = args.output_dir
    if workdir:
        os.makedirs(workdir, exist_ok=True)
    else:
        workdir = tempfile.mkdtemp(prefix='netweaver-measure-')
    try:
        result = seedjob.run(job, workdir, options,
                             netns_name=args.ssh_netns)
        print_result(result, args.json, kept=bool(args.output_dir))
    except (ssh.RemoteError, seedjob.SeedJobError,
            sources.SourceError, ValueError) as exc:
        print(f'netweaver measure: {exc}', file=sys.stderr)
        return 1
    finally:
        if not args.output_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
