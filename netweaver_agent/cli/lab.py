"""``netweaver lab``: build the namespace lab, probe it, print the report.

By default: two guests on a Linux bridge, probes to guest 1 held 2 ms on
the bridge, no loss; the injected truth is printed next to what was
measured, so one run shows the measurement catching a known delay.
``--switch`` builds an Open vSwitch (hybrid plug or native) or OVN
compute node instead, ``--network-type`` a VLAN or tunnelled network;
the output then names each hop, the devices crossed but never seen, and
which truth the layout can inject.  Everything the lab
made is removed at the end, also on Ctrl-C, SIGTERM or error, unless
``--keep`` (then ``netweaver lab down`` removes it).

``--passive`` sends no probe: bounded real TCP and UDP streams run between
the source and each guest, both ways, under one passive window (the
instances' own traffic, :mod:`netweaver_agent.core.passive`), and the delayed
guest's report is printed beside the NFQUEUE delayer's hold of each
packet it matched.
"""

import dataclasses
import functools
import json
import os
import signal
import sys

from netweaver_agent.agent import opts
from netweaver_agent.agent import ovsdb
from netweaver_agent.agent import topology
from netweaver_agent.cli import report
from netweaver_agent.core import latency
from netweaver_agent.core import probe
from netweaver_agent.core import window as probe_window
from netweaver_agent.lab import build
from netweaver_agent.lab import spec as labspec
from netweaver_agent.lab import state as labstate
from netweaver_agent.lab import switch as labswitch
from netweaver_agent.lab import traffic

DEFAULT_DELAY_MS = 2.0
# The NFQUEUE delayer handles probes one at a time: space them.
DELAYED_SPACING_MS = 5.0
MAX_WINDOW_MS = 600_000


def add_parser(subparsers):
    parser = subparsers.add_parser(
        'lab', help='build the namespace lab, inject delay/loss, measure',
        description=__doc__.split('\n\n', 1)[1])
    parser.add_argument('action', nargs='?', default='run',
                        choices=('run', 'down', 'list'),
                        help='run (default): build, measure, remove; '
                             'down: remove kept labs (--prefix: one); '
                             'list: show kept labs')
    parser.add_argument('--switch', choices=tuple(labspec.SWITCHES),
                        default='linuxbridge',
                        help='what connects the pif to the taps (default '
                             'linuxbridge)')
    parser.add_argument('--network-type', choices=labspec.NETWORK_TYPES,
                        default=None,
                        help='the guests\' network: flat (default), vlan, '
                             'vxlan or geneve, as the switch allows')
    parser.add_argument('--guests', type=int, default=2,
                        help='number of guests (default 2)')
    parser.add_argument('--count', type=int, default=50,
                        help='probes per guest (default 50)')
    parser.add_argument('--protocol', choices=probe.PROTOCOLS,
                        default='icmp', help='probe protocol')
    parser.add_argument('--delay-ms', type=opts.finite_float, default=None,
                        help='delay injected on the bridge for probes to '
                             '--delay-guest (default 2 where the switch has '
                             'delay truth, else none; 0: none)')
    parser.add_argument('--delay-guest', type=int, default=None,
                        help='guest index to delay (default 1, or 0 with '
                             'one guest)')
    parser.add_argument('--delay-backend', choices=labspec.DELAY_BACKENDS,
                        default='auto',
                        help='netem where the kernel has it, else the '
                             'NFQUEUE delayer (default auto)')
    parser.add_argument('--loss-every', type=int, default=0,
                        help='drop every Nth probe to --loss-guest '
                             '(default 0: no loss)')
    parser.add_argument('--loss-guest', type=int, default=0,
                        help='guest index to drop probes of (default 0)')
    parser.add_argument('--interval-ms', type=opts.finite_float, default=1.0,
                        help='spacing between probes of the window')
    parser.add_argument('--timeout-ms', type=opts.finite_float, default=None,
                        help='a probe later than this is lost (default '
                             '200, or more than twice the delay)')
    parser.add_argument('--prefix', default=None,
                        help='namespace name prefix (default nwlab<pid>-)')
    parser.add_argument('--mgmt', action='store_true',
                        help='also build a management namespace '
                             '(198.19.0.0/24 to the source and hypervisor)')
    parser.add_argument('--keep', action='store_true',
                        help='leave the lab running; remove it later with '
                             '"netweaver lab down"')
    parser.add_argument('--json', action='store_true',
                        help='print JSON instead of a table')
    parser.add_argument('--agent', action='store_true',
                        help='run the Ceilometer polling agent against the '
                             'lab instead of one probe window')
    parser.add_argument('--pipeline', action='store_true',
                        help='run the agent with the telemetry pipeline in '
                             'the management namespace (RabbitMQ, Gnocchi, '
                             'Aodh, Prometheus; tools/pipeline-bootstrap.sh '
                             'installs them) and print each guest\'s value '
                             'as each of them sees it')
    parser.add_argument('--passive', action='store_true',
                        help='send no probe: run bounded real TCP and UDP '
                             'streams (both ways) between the source and '
                             'each guest and measure them passively, '
                             'beside the delayer\'s hold of each packet '
                             '(Linux bridge)')
    parser.add_argument('--passive-sample', type=int, default=1,
                        help='with --passive: keep 1 flow in N (a power of '
                             'two; default 1, every flow)')
    parser.add_argument('--stream-kb', type=int, default=256,
                        help='with --passive: KiB sent over TCP to each '
                             'guest and echoed back (default 256)')
    parser.add_argument('--datagrams', type=int, default=60,
                        help='with --passive: UDP datagrams each way per '
                             'guest (default 60)')
    parser.set_defaults(run=run)
    return parser


def _spec(args):
    if args.guests < 1:
        raise ValueError(f"--guests {args.guests} must be at least 1")
    delays, losses = (), ()
    delay_ms = args.delay_ms
    if delay_ms is None:
        has_delay = labspec.layout_class(args.switch).delay_truth is not None
        delay_ms = DEFAULT_DELAY_MS if has_delay else 0.0
    if delay_ms and delay_ms > 0:
        guest = args.delay_guest
        if guest is None:
            guest = 1 if args.guests > 1 else 0
        if getattr(args, 'passive', False):
            # All the guest's traffic held, each packet's key recorded.
            delays = (labspec.DelayInjection(
                guest=guest, delay_ms=delay_ms,
                backend=PASSIVE_TRUTH.get(args.switch, 'auto'),
                record='passive'),)
        else:
            delays = (labspec.DelayInjection(guest=guest, delay_ms=delay_ms,
                                             protocol=args.protocol,
                                             backend=args.delay_backend),)
    if args.loss_every:
        losses = (labspec.LossInjection(guest=args.loss_guest,
                                        every=args.loss_every,
                                        protocol=args.protocol),)
    return labspec.LabSpec(
        prefix=args.prefix or f'nwlab{os.getpid()}-', guests=args.guests,
        delays=delays, losses=losses, mgmt=args.mgmt or args.pipeline,
        persistent=args.keep, switch=args.switch,
        network_type=args.network_type)


def _settings(args, spec):
    if not 1 <= args.count <= 100_000:
        raise ValueError(f"--count {args.count} must be within 1..100000")
    if args.interval_ms <= 0:
        raise ValueError(f"--interval-ms {args.interval_ms} must be > 0")
    delay = max((d.delay_ms for d in spec.delays), default=0.0)
    timeout = args.timeout_ms
    if timeout is None:
        timeout = probe_window.timeout_for_delay_ms(delay)
    per_vnic = DELAYED_SPACING_MS if spec.delays else 0.0
    step = max(args.interval_ms, per_vnic / spec.guests)
    window = args.count * spec.guests * step + timeout + 2000.0
    if window > MAX_WINDOW_MS:
        raise ValueError(
            f"{args.count} probes to {spec.guests} guests every {step} ms "
            f"need {window / 1000:.0f} s, more than the "
            f"{MAX_WINDOW_MS // 1000} s a window may last")
    return probe_window.WindowSettings(
        protocol=args.protocol, count=args.count,
        interval_ms=args.interval_ms, per_vnic_interval_ms=per_vnic,
        timeout_ms=timeout, max_window_ms=window,
        vxlan_port=(labswitch.VXLAN_PORT if spec.network_type == 'vxlan'
                    else None),
        geneve_port=(labswitch.GENEVE_PORT if spec.network_type == 'geneve'
                     else None))


def _truth(the_lab, guest, session, sent):
    """What the lab injected for ``guest`` (a plain dict, for output)."""
    out = {'delay_ms': None, 'delay_backend': None, 'holds': None,
           'loss_every': None, 'expected_lost': 0}
    for d in the_lab.delays:
        if d.injection.guest == guest.index:
            out['delay_ms'] = d.injection.delay_ms
            out['delay_backend'] = d.backend
            # TCP keys carry no session (the ISN is a keyed hash).
            holds = [r.hold_ns for r in the_lab.delay_records(guest.index)
                     if r.session in (session, probe.TCP_SESSION)
                     and not r.reply]
            if d.records_path:
                out['holds'] = report.stats_to_dict(
                    latency.DirectionStats.from_ns(holds))
    for loss in the_lab.losses:
        if loss.guest == guest.index:
            out['loss_every'] = loss.every
            out['expected_lost'] = sent // loss.every
    return out


def _truth_line(guest, truth, rep):
    parts = []
    if truth['delay_ms']:
        text = f"delay {truth['delay_ms']:g} ms ({truth['delay_backend']}"
        holds = truth['holds']
        if holds and holds['count']:
            text += (f", {holds['count']} probes held, hold p50 "
                     f"{holds['p50_us']:.1f} µs")
        parts.append(text + ')')
    if truth['loss_every']:
        parts.append(f"drop every {truth['loss_every']}th probe "
                     f"(expect {truth['expected_lost']} lost)")
    injected = '; '.join(parts) or 'nothing'
    ing = rep.ingress
    measured = (f"ingress p50 {ing.p50_us:.1f} µs" if ing.count else
                'no ingress measured')
    if ing.loss_pct is not None:
        measured += f", {ing.lost} lost ({ing.loss_pct:.1f}%)"
    holds = truth['holds']
    if ing.count and holds and holds['count']:
        measured += (f", {ing.p50_us - holds['p50_us']:+.1f} µs over the "
                     'hold')
    return (f"  {guest.name} {guest.vif} {guest.address}: injected "
            f"{injected}; measured {measured}")


def _hops(the_lab, guest):
    """The guest's path hop by hop, with what is crossed unseen."""
    return [{'src': h.src, 'dst': h.dst, 'unseen': list(h.unseen)}
            for h in the_lab.layout.unseen(guest)]


def _path_line(the_lab, guest):
    parts = []
    for h in the_lab.layout.unseen(guest):
        if not parts:
            parts.append(h.src)
        if h.unseen:
            parts.append(f"[{', '.join(h.unseen)}]")
        parts.append(h.dst)
    return f"  {guest.vif}: {' → '.join(parts)}"


def discovered_paths(the_lab):
    """The lab's paths as the product finds them: from the hypervisor's
    links and its Open vSwitch database (:func:`topology.find_path`), the
    way the pollsters do, with no ``pif`` given.

    :raises topology.TopologyError: a path not found, or not the one the
        lab built (the lab's truth): a product bug, never measured
    """
    hv = the_lab.spec.hv_netns
    connection = getattr(the_lab.layout, 'ovsdb_connection', None)
    switch = topology.SwitchView(
        functools.partial(ovsdb.read_snapshot, connection, netns_name=hv)
        if connection else None,
        functools.partial(topology.read_addresses, hv), where=connection)
    links = topology.IpLinks(hv)
    out = []
    for truth in the_lab.paths():
        found = topology.find_path(truth.vif, links, switch)
        path = dataclasses.replace(truth, interfaces=found.interfaces,
                                   via=found.via, encap=found.encap)
        if path != truth:
            raise topology.TopologyError(
                f"{truth.vif}: found {found.interfaces} via {found.via} "
                f"({found.encap}), the lab built {truth.interfaces} via "
                f"{truth.via} ({truth.encap})")
        out.append(path)
    return out


def _measure(the_lab, args):
    settings = _settings(args, the_lab.spec)
    try:
        paths = discovered_paths(the_lab)
    except topology.TopologyError as exc:
        print(f'netweaver lab: the topology found is not the lab\'s: {exc}',
              file=sys.stderr)
        return 1
    result = probe_window.run_window(paths, the_lab.layout.source(), settings,
                                     capture_netns=the_lab.spec.hv_netns)
    guests = []
    for g in the_lab.guests:
        rep = result.reports[g.vif]
        guests.append((g, _truth(the_lab, g, result.session, rep.sent),
                       rep))
    if args.json:
        print(json.dumps({
            'prefix': the_lab.spec.prefix,
            'session': result.session,
            'hv_netns': the_lab.spec.hv_netns,
            'src_netns': the_lab.spec.src_netns,
            'pif': the_lab.spec.pif,
            'bridge': the_lab.layout.bridge,
            'switch': the_lab.spec.switch,
            'network_type': the_lab.spec.network_type,
            'segmentation_id': the_lab.spec.segmentation_id,
            'truth': the_lab.layout.truth(),
            'settings': report.to_jsonable(settings),
            'guests': [{'index': g.index, 'name': g.name, 'uuid': g.uuid,
                        'tap': g.vif, 'mac': g.mac, 'address': g.address,
                        'netns': g.netns, 'injected': truth,
                        'hops': _hops(the_lab, g),
                        'report': report.report_to_dict(rep)}
                       for g, truth, rep in guests],
            'capture': report.to_jsonable(result.capture),
            'send': report.to_jsonable(result.send),
            'kept': args.keep,
        }, indent=1))
    else:
        title = (f"netweaver lab {the_lab.spec.prefix}: {settings.count} "
                 f"{settings.protocol} probes per guest from "
                 f"{the_lab.spec.src_netns} to {len(guests)} guests, "
                 f"captured in {the_lab.spec.hv_netns}")
        print(report.format_table(result.reports, result.capture,
                                  title=title))
        if the_lab.spec.switch == 'linuxbridge':
            print('truth (injected on the bridge, after the pif):')
        else:
            print(f'path ({the_lab.spec.switch}, '
                  f'{the_lab.spec.network_type}; [crossed, never seen by a '
                  'packet socket]):')
            for g, _, _ in guests:
                print(_path_line(the_lab, g))
            print(f'truth ({the_lab.layout.truth()}):')
        for g, truth, rep in guests:
            print(_truth_line(g, truth, rep))
    return 0


# Layouts whose delayer holds every packet of a guest and records its
# passive key (the truth of --passive), and the delay backend that does:
# NFQUEUE on the bridge or the hybrid plug's qbr, the OpenFlow controller
# on ovs-native's br-int.  OVN's pause/resume holds marked probes only.
PASSIVE_TRUTH = {'linuxbridge': 'nfqueue', 'ovs-hybrid': 'nfqueue',
                 'ovs-native': 'auto'}


def _check_passive(args):
    """--passive's own checks (ValueError naming the flag)."""
    if args.switch not in PASSIVE_TRUTH and args.delay_ms != 0:
        raise ValueError(f"--passive with an injected delay needs a "
                         f"delayer that holds the guests' own packets "
                         f"({', '.join(sorted(PASSIVE_TRUTH))}); --switch "
                         f"{args.switch} has none: add --delay-ms 0 to "
                         "measure it without one")
    if args.agent or args.pipeline:
        raise ValueError("--passive runs one passive window; with --agent "
                         "set [netweaver] mode = passive instead")
    sample = args.passive_sample
    if not 1 <= sample <= 65536 or sample & (sample - 1):
        raise ValueError(f"--passive-sample {sample} is not a power of two "
                         "within 1..65536")
    if not 1 <= args.stream_kb <= 16384:
        raise ValueError(f"--stream-kb {args.stream_kb} must be within "
                         "1..16384")
    if not 0 <= args.datagrams <= 10000:
        raise ValueError(f"--datagrams {args.datagrams} must be within "
                         "0..10000")


def _passive_truth(the_lab, guest, sightings, spec):
    """The delayer's holds of ``guest``'s packets and, per matched
    packet, measured − hold (a plain dict, for output)."""
    from netweaver_agent.core import passive
    holds = the_lab.passive_holds(guest.index)
    out = {'delay_ms': None, 'held': len(holds), 'holds': None,
           'matched_held': 0, 'over_hold': None}
    for d in the_lab.delays:
        if d.injection.guest == guest.index:
            out['delay_ms'] = d.injection.delay_ms
    if not holds:
        return out
    out['holds'] = report.stats_to_dict(latency.DirectionStats.from_ns(
        [h.hold_ns for h in holds]))
    by_key = {}
    for h in holds:
        if h.header is not None and h.header.ident is not None:
            by_key.setdefault((h.header.flow, h.header.ident), []).append(h)
    over = []
    pairs = passive.ingress_pairs(sightings, spec)
    for key, (t_pif, t_vif) in pairs.items():
        held = by_key.get(key, ())
        if len(held) == 1:
            over.append(t_vif - t_pif - held[0].hold_ns)
    out['matched_held'] = len(over)
    if over:
        out['over_hold'] = report.stats_to_dict(
            latency.DirectionStats.from_ns([max(v, 0) for v in over]))
        out['over_hold_negative'] = sum(v < 0 for v in over)
    return out


def _measure_passive(the_lab, args):
    from netweaver_agent.core import passive
    from netweaver_agent.core import passivecapture
    try:
        paths = discovered_paths(the_lab)
    except topology.TopologyError as exc:
        print(f'netweaver lab: the topology found is not the lab\'s: {exc}',
              file=sys.stderr)
        return 1
    specs = {s.vif: s for s in probe_window.passive_specs(paths)}
    interfaces = [the_lab.spec.pif] + [g.vif for g in the_lab.guests]
    streams = {}
    with passivecapture.PassiveCapture(
            args.passive_sample, netns_name=the_lab.spec.hv_netns,
            interfaces=interfaces, cap=passivecapture.MAX_CAP) as cap:
        for g in the_lab.guests:
            streams[g.vif] = traffic.exchange(
                the_lab.spec.src_netns, g.netns, g.address,
                tcp_bytes=args.stream_kb * 1024, udp_count=args.datagrams,
                udp_gap_s=0.002)
    results = passive.match(cap.sightings, list(specs.values()))
    rows = []
    for g in the_lab.guests:
        r = results[g.vif]
        rows.append((g, r, streams[g.vif],
                     _passive_truth(the_lab, g, cap.sightings,
                                    specs[g.vif])))
    if args.json:
        print(json.dumps({
            'prefix': the_lab.spec.prefix, 'mode': 'passive',
            'hv_netns': the_lab.spec.hv_netns,
            'src_netns': the_lab.spec.src_netns,
            'pif': the_lab.spec.pif, 'sample': args.passive_sample,
            'capture': report.to_jsonable(cap.stats),
            'guests': [{'index': g.index, 'name': g.name, 'tap': g.vif,
                        'address': g.address,
                        'streams': report.to_jsonable(st),
                        'injected': truth,
                        'counts': {k: getattr(r, k) for k in (
                            'packets', 'unmatched', 'local', 'ambiguous',
                            'covered', 'unkeyable')},
                        'report': (None if r.report is None else
                                   report.report_to_dict(r.report))}
                       for g, r, st, truth in rows],
            'kept': args.keep}, indent=1))
        return 0
    reports = {g.vif: r.report for g, r, _, _ in rows
               if r.report is not None}
    print(report.format_table(
        reports, title=(f"netweaver lab {the_lab.spec.prefix}: passive, no "
                        f"probe; {args.stream_kb} KiB TCP echoed and "
                        f"{args.datagrams} UDP datagrams each way per "
                        f"guest, 1 flow in {args.passive_sample} sampled, "
                        f"{cap.stats.kept} packets kept")))
    print('passive counts and truth (the delayer holds all of the guest\'s '
          'packets, each packet\'s key recorded):')
    for g, r, _st, truth in rows:
        line = (f"  {g.name} {g.vif} {g.address}: {r.packets} matched, "
                f"{r.unmatched} unmatched, {r.covered} covered, "
                f"{r.ambiguous} ambiguous, {r.local} local")
        if truth['delay_ms']:
            holds = truth['holds'] or {}
            line += (f"; injected delay {truth['delay_ms']:g} ms, "
                     f"{truth['held']} packets held (hold p50 "
                     f"{holds.get('p50_us') or 0:.1f} µs)")
            over = truth['over_hold']
            if over:
                line += (f"; {truth['matched_held']} matched packets: "
                         f"measured − hold p50 {over['p50_us']:.1f} µs, "
                         f"p99 {over['p99_us']:.1f} µs")
        else:
            line += '; injected nothing'
        print(line)
    return 0


def _run_agent(the_lab, args):
    try:
        from netweaver_agent.lab import agent
    except ModuleNotFoundError as exc:
        if exc.name != 'netweaver_agent.lab.agent':
            raise
        print('netweaver lab --agent: netweaver_agent.lab.agent is not '
              'available in this installation', file=sys.stderr)
        return 2
    return agent.run(the_lab, args)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f'signal {signum}')


def run(args):
    if args.action == 'list':
        for prefix in labstate.kept_prefixes():
            print(prefix)
        return 0
    if args.action == 'down':
        removed = labstate.teardown_kept(args.prefix)
        for prefix in removed:
            print(f'removed lab {prefix}')
        if not removed:
            print('no kept lab to remove')
        return 0
    try:
        if getattr(args, 'passive', False):
            _check_passive(args)
        spec = _spec(args)
        if not (args.agent or args.pipeline):
            _settings(args, spec)
    except ValueError as exc:
        print(f'netweaver lab: {exc}', file=sys.stderr)
        return 2
    the_lab = build.Lab(spec)
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    done = False
    try:
        try:
            the_lab.build()
        except labswitch.LabError as exc:
            print(f'netweaver lab: {exc}', file=sys.stderr)
            return 1
        if args.pipeline:
            from netweaver_agent.lab import downstream
            status = downstream.run(the_lab)
        elif args.agent:
            status = _run_agent(the_lab, args)
        elif getattr(args, 'passive', False):
            status = _measure_passive(the_lab, args)
        else:
            status = _measure(the_lab, args)
        done = True
        return status
    finally:
        # Finish removing the lab even if another signal arrives.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if args.keep and done:
                print(f'lab {spec.prefix} kept '
                      f'({", ".join(spec.namespaces())}); remove it with: '
                      f'netweaver lab down --prefix {spec.prefix}',
                      file=sys.stderr)
            else:
                the_lab.teardown()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
