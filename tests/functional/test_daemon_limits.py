"""The real privsep daemon does only what the agent needs.

The production daemon (CAP_NET_RAW context, started the way the agent
starts it as root: ``python -m oslo_privsep.daemon``) runs inside a
namespace of this test with no way out: ``lo``, and a veth pair whose
both ends are inside it (``out0``, with 198.18.0.1/24, 2001:2::1/64 and
the routes for 198.18.0.0/15 and 2001:2::/48, and ``sink0``, with no
address, which drops what it receives).  A capture opened by the
test itself (not the daemon) in that namespace sees every probe the
daemon sends, on ``out0`` or ``lo``.  Destinations outside
``probe_networks`` ("foreign") are taken from 198.19.0.0/16; loopback,
link-local, multicast, broadcast and unspecified addresses are refused
before anything is built, so nothing is ever sent to them.

The daemon is called directly, as a buggy agent would call it, so that
the daemon's own checks are what is tested; a last test goes through
``probe_window.run_window`` in the lab.
"""

import os
import shlex
import sys
import threading
import time

from ceilometer.polling import plugin_base
import pytest

from netweaver_agent.agent import daemonlimits
from netweaver_agent.agent import opts
from netweaver_agent.agent import privileged
from netweaver_agent.core import capture
from netweaver_agent.core import destinations
from netweaver_agent.core import netns
from netweaver_agent.core import sources
from netweaver_agent.core import vifpath
from netweaver_agent.core import window as probe_window
from tests.functional import inprocess
from tests.functional import privsep
from tests.functional.conftest import require_root
from tests.functional.conftest import unique_prefix

CTX = privileged.capture_pctxt
NETWORKS = ['198.18.0.0/24', '2001:2::/64']
GOOD = '198.18.0.10'
FOREIGN = '198.19.0.10'          # routable here, outside NETWORKS
OUT = 'out0'
NEVER = ['127.0.0.1', '169.254.169.254', '224.0.0.1', '255.255.255.255',
         '0.0.0.0', '198.18.0.255', '240.0.0.1', '::1', 'fe80::1',
         'ff02::1', '::', '::ffff:198.18.0.10', '198.18.0.300']


class Box:
    """A namespace with no route out, and the real daemon inside it."""

    def __init__(self, config_file=None):
        self.name = unique_prefix('dl') + 'box'
        self.config_file = config_file
        self.pid = None

    def start(self):
        netns.run(['ip', 'netns', 'add', self.name])
        for argv in (['ip', 'link', 'set', 'lo', 'up'],
                     ['ip', 'link', 'add', OUT, 'type', 'veth', 'peer',
                      'name', 'sink0'],
                     ['sysctl', '-qw', 'net.ipv6.conf.sink0.disable_ipv6=1'],
                     ['ip', 'link', 'set', OUT, 'up'],
                     ['ip', 'link', 'set', 'sink0', 'up'],
                     ['ip', 'addr', 'add', '198.18.0.1/24', 'dev', OUT],
                     ['ip', 'addr', 'add', '2001:2::1/64', 'dev', OUT,
                      'nodad'],
                     ['ip', 'route', 'add', '198.18.0.0/15', 'dev', OUT],
                     ['ip', 'route', 'add', '2001:2::/48', 'dev', OUT],
                     # No ARP: probes leave at once, into sink0.
                     ['ip', 'neigh', 'replace', GOOD, 'lladdr',
                      '02:00:00:00:00:0a', 'dev', OUT, 'nud', 'permanent'],
                     ['ip', 'neigh', 'replace', FOREIGN, 'lladdr',
                      '02:00:00:00:00:0b', 'dev', OUT, 'nud', 'permanent']):
            netns.run(argv, netns=self.name)
        # The agent starts the daemon this way when it runs as root; here
        # inside the box.
        privileged.stop()
        extra = ['--config-file', self.config_file] if self.config_file \
            else []
        privileged.configure(shlex.join(netns.netns_argv(
            self.name, [sys.executable, '-W', 'ignore', '-m',
                        'oslo_privsep.daemon', *extra])))
        self.pid = privileged.status(CTX).pid

    def close(self):
        privileged.stop()
        privileged.configure(None)
        netns.run(['ip', 'netns', 'del', self.name], check=False)

    def status(self):
        return privileged.call(CTX, 'status')

    def fds(self):
        return len(list(_proc(self.pid, 'fd')))

    def tasks(self):
        return len(list(_proc(self.pid, 'task')))

    def kib(self, field):
        with open(f'/proc/{self.pid}/status', encoding='ascii') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1])
        raise AssertionError(f'no {field} in /proc/{self.pid}/status')

    def watch(self, session, protocol='icmp'):
        """A capture of the test's own, in the box (all interfaces)."""
        return capture.LiveCapture(session, protocol, netns_name=self.name)


def _proc(pid, what):
    return os.listdir(f'/proc/{pid}/{what}')


@pytest.fixture
def box():
    require_root()
    b = Box()
    try:
        b.start()
        yield b
    finally:
        b.close()


@pytest.fixture
def narrow_box(tmp_path):
    """The box, its daemon started with a configuration file of its own
    (as the sudo line gives it /etc/ceilometer/ceilometer.conf)."""
    require_root()
    conf = tmp_path / 'ceilometer.conf'
    conf.write_text('[netweaver]\nprobe_networks = 198.18.0.0/28\n')
    b = Box(str(conf))
    try:
        b.start()
        yield b
    finally:
        b.close()


def _wire(dsts, step_ns=10**6, first_seq=0):
    return [(first_seq + i, dst, i * step_ns) for i, dst in enumerate(dsts)]


def _prepare(session, probes, networks=NETWORKS, size=64, netns_name=None):
    return privileged.call(CTX, 'prepare_probes', netns_name, session,
                           'icmp', size, None, probes, networks)


def _send(handle, within_s=5.0):
    return privileged.call(CTX, 'send_probes', handle,
                           time.monotonic() + within_s)


def test_refused_destinations_raise_in_the_daemon_before_any_send(box):
    session = probe_window.new_session()
    with box.watch(session) as cap:
        for dst in [FOREIGN, *NEVER]:
            with pytest.raises(destinations.RefusedDestination) as err:
                _prepare(session, _wire([GOOD, dst, GOOD]))
            assert err.value.address == dst
        # 'local' without probe networks sends nothing at all.
        with pytest.raises(destinations.RefusedDestination,
                           match='probe_networks'):
            _prepare(session, _wire([GOOD]), networks=None)
        assert box.status()['held']['probes'] == 0
        # The control: an allowed destination does leave, and is seen.
        sent, failed, errors = _send(_prepare(session, _wire([GOOD] * 3)))
        assert (sent, failed) == (3, 0), errors
        cap.settle(0.2)
    seen = {(key >> 1) for key in cap.batch.keys}
    assert seen == {0, 1, 2}, seen
    assert box.status()['held'] == {'capture': 0, 'probes': 0, 'bytes': 0}


def test_a_netns_source_refuses_foreign_destinations_before_sending(box):
    session = probe_window.new_session()
    policy = destinations.policy(NETWORKS)
    src = sources.LocalSource(netns_name=box.name, policy=policy)
    plan = sources.schedule(session, 'icmp', [GOOD, FOREIGN], 3, 10**6).plan
    try:
        with box.watch(session) as cap:
            with pytest.raises(destinations.RefusedDestination,
                               match=FOREIGN):
                src.prepare(plan)
            with pytest.raises(destinations.RefusedDestination):
                src.send(plan, time.monotonic() + 2)
            cap.settle(0.1)
    finally:
        src.close()
    assert len(cap.batch) == 0


def test_handles_and_captures_are_capped_and_all_come_back(box):
    lim = daemonlimits.LIMITS
    fds, tasks = box.fds(), box.tasks()
    session = probe_window.new_session()
    caps = []
    try:
        for _ in range(lim.captures):
            caps.append(privileged.call(CTX, 'open_capture', session,
                                        'icmp', None, None))
            if len(caps) == 1:
                # The socket, its receive ring's mapping (Python's mmap
                # keeps a duplicate of the socket's descriptor) and the
                # pipe close() wakes the reader through (two ends).
                per = box.fds() - fds
        with pytest.raises(daemonlimits.LimitError, match='captures'):
            privileged.call(CTX, 'open_capture', session, 'icmp', None,
                            None)
        assert 3 <= per <= 4
        assert box.fds() == fds + lim.captures * per
        prepared = []
        while len(caps) + len(prepared) < lim.handles:
            prepared.append(_prepare(session, _wire([GOOD])))
        with pytest.raises(daemonlimits.LimitError, match='handles'):
            _prepare(session, _wire([GOOD]))
        held = box.status()['held']
        assert (held['capture'], held['probes']) == (lim.captures,
                                                     len(prepared))
        for handle in prepared:
            privileged.call(CTX, 'discard_probes', handle)
    finally:
        for handle in caps:
            privileged.call(CTX, 'close_capture', handle)
    _settle_threads(box, tasks)
    assert box.fds() == fds
    assert box.status()['held'] == {'capture': 0, 'probes': 0, 'bytes': 0}


def _own_threads(box):
    return [n for n in box.status()['threads'] if n.startswith('netweaver-')]


def _settle_threads(box, tasks, wait_s=10.0):
    """Capture threads end a moment after their socket closes.

    Of the daemon's own threads only the reaper (started with the first
    handle) stays; oslo.privsep's pool may have grown to its size.
    """
    deadline = time.monotonic() + wait_s
    while (_own_threads(box) != ['netweaver-privsep-reaper'] and
           time.monotonic() < deadline):
        time.sleep(0.05)
    assert _own_threads(box) == ['netweaver-privsep-reaper']
    pool = CTX.conf.thread_pool_size
    assert box.tasks() <= tasks + 1 + pool, (box.tasks(), tasks, pool)


def test_a_wrong_kind_call_is_an_error_and_leaks_nothing(box):
    fds, tasks = box.fds(), box.tasks()
    session = probe_window.new_session()
    cap = privileged.call(CTX, 'open_capture', session, 'icmp', None, None)
    prepared = _prepare(session, _wire([GOOD]))
    for op, args in (('discard_probes', (cap,)),
                     ('send_probes', (cap, time.monotonic() + 1)),
                     ('close_capture', (prepared,)),
                     ('settle_capture', (prepared, 0.01, 0.01)),
                     ('send_probes', (prepared, float('nan')))):
        with pytest.raises(ValueError):
            privileged.call(CTX, op, *args)
    held = box.status()['held']
    assert (held['capture'], held['probes']) == (1, 1)
    # Both still work, and closing them gives everything back.
    privileged.call(CTX, 'settle_capture', cap, 0.01, 0.05)
    assert _send(prepared)[0] == 1
    raw = privileged.call(CTX, 'close_capture', cap)
    assert raw['probes'] >= 1
    _settle_threads(box, tasks)
    assert box.fds() == fds


def test_twenty_failing_windows_leave_no_fd_or_thread_behind(box):
    """The capture fails to open after the probes were prepared: this
    daemon (CAP_NET_RAW only) refuses to enter a namespace."""
    path = vifpath.VifPath(vif=OUT, address=GOOD,
                           interfaces=('lo', OUT))
    settings = probe_window.WindowSettings(count=3, timeout_ms=20.0,
                                           max_window_ms=1000.0)
    source = privileged.PrivsepLocalSource(
        context=CTX, policy=destinations.policy(NETWORKS))
    make = privileged.capture_class(CTX)
    # One good window first: what a working window holds is not a leak.
    probe_window.run_window([path], source, settings, capture_class=make)
    _settle_threads(box, box.tasks())
    fds, tasks, steady = box.fds(), box.tasks(), _steady_threads(box)
    for _ in range(20):
        with pytest.raises(privileged.PrivilegeError,
                           match='CAP_SYS_ADMIN'):
            probe_window.run_window([path], source, settings,
                                    capture_netns=box.name, capture_class=make)
    assert box.status()['held'] == {'capture': 0, 'probes': 0, 'bytes': 0}
    assert box.fds() == fds
    # No thread per failed window: twenty would leave twenty.  oslo.privsep's
    # pool may still grow to its size when calls overlap (CI saw 3 -> 4).
    _settle_threads(box, tasks)
    assert _steady_threads(box) == steady


def _steady_threads(box):
    """The daemon's thread names but oslo.privsep's call pool's (a
    ThreadPoolExecutor that grows to its size on demand)."""
    return sorted(n for n in box.status()['threads']
                  if not n.startswith('ThreadPoolExecutor'))


def test_prepared_probes_are_capped_in_memory(box):
    lim = daemonlimits.LIMITS
    size = 1500
    n = 1_000_000                    # the finding: 1.9 GB once built
    assert n > lim.max_planned(size)
    rss = box.kib('VmRSS')
    with pytest.raises(daemonlimits.LimitError):
        _prepare(probe_window.new_session(), _wire([GOOD] * n, 10**5),
                 size=size)
    grown = box.kib('VmHWM') - rss
    # Receiving the list costs memory; building n packets would cost
    # n x size bytes at least.
    assert grown * 1024 < n * size / 4, grown
    # What fits is accounted, and given back when discarded.
    fits = 20_000
    handle = _prepare(probe_window.new_session(), _wire([GOOD] * fits, 10**5),
                      size=size)
    assert box.status()['held']['bytes'] >= fits * size
    privileged.call(CTX, 'discard_probes', handle)
    assert box.status()['held']['bytes'] == 0
    print(f'daemon RSS {rss} KiB; peak after refusing {n} x {size} B: '
          f'+{grown} KiB')


def test_the_send_rate_is_bounded_over_concurrent_windows(box):
    """Two windows, each at the daemon's fastest rate for 1500-byte
    probes, sent at the same time: the probes leave no faster than one
    window's rate allows."""
    size = 1500
    step = daemonlimits.LIMITS.min_step_ns(size)
    session = probe_window.new_session()
    # A plan faster than the daemon's rate is refused outright.
    with pytest.raises(ValueError, match='probe offset'):
        _prepare(session, _wire([GOOD] * 3, step - 1), size=size)
    n = 400
    handles = [_prepare(session, _wire([GOOD] * n, step, first_seq=k * n),
                        size=size) for k in range(2)]
    with box.watch(session) as cap:
        threads = [threading.Thread(target=_send, args=(h,))
                   for h in handles]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        cap.settle(0.1)
    times = sorted(t for t, i in zip(cap.batch.t_ns, cap.batch.ifindex)
                   if cap.batch.ifnames[i] == OUT)
    assert len(times) == 2 * n, len(times)
    # The busiest stretch of 100 probe steps holds at most ~100 probes
    # (130: timestamp jitter); unpaced, two windows would put ~200 there.
    span = 100 * step
    busiest = max(_count_within(times, i, span) for i in range(len(times)))
    print(f'busiest {span / 1e6:.1f} ms: {busiest} probes of {2 * n}')
    assert busiest <= 130, busiest


def _count_within(times, i, span):
    j = i
    while j < len(times) and times[j] - times[i] < span:
        j += 1
    return j - i


def test_one_refused_vnic_leaves_the_others_measured(lab_factory):
    """Through probe_window.run_window and the real lab daemon: a bad address
    and a foreign one are left out; the guests are measured."""
    the_lab = lab_factory(guests=2)
    ctx = privileged.netns_pctxt
    policy = destinations.policy([the_lab.spec.network])
    source = privileged.PrivsepLocalSource(the_lab.spec.src_netns, context=ctx,
                                           policy=policy)
    good = the_lab.paths()
    pif = the_lab.spec.pif
    bad = [vifpath.VifPath(vif='tapbad', address='198.18.0.300',
                           interfaces=(pif, 'tapbad')),
           vifpath.VifPath(vif='tapforeign', address=FOREIGN,
                           interfaces=(pif, 'tapforeign'))]
    settings = probe_window.WindowSettings(count=5, timeout_ms=100.0,
                                           max_window_ms=2000.0)
    result = privsep.daemon_window(the_lab, source, settings, ctx,
                                   paths=[bad[0], *good, bad[1]])
    assert {r.vif for r in result.refused} == {'tapbad', 'tapforeign'}
    assert set(result.reports) == {p.vif for p in good}
    for rep in result.reports.values():
        assert rep.ingress.count == 5, rep


@pytest.fixture
def cycle_factory(tmp_path):
    yield from inprocess.cycles(tmp_path)


def test_the_agent_measures_only_the_vnics_inside_probe_networks(
        lab_factory, cycle_factory):
    """Ceilometer's discovery and our pollsters: guest 1's address is
    outside probe_networks, so only guest 0 is probed and published;
    guest 1 is logged as not measurable, with the reason."""
    the_lab = lab_factory(guests=2)
    inside, outside = the_lab.guests
    cycle = cycle_factory(the_lab, probe_networks=[f'{inside.address}/32'],
                          probe_count=5, probe_timeout_ms=100.0,
                          max_window_ms=3000.0)
    samples, cache = cycle.run()
    latency = inprocess.by_resource(samples)['network.vif.latency']
    assert set(latency) == {cycle.resource_of(0)}, latency
    (window,) = cache.windows
    assert [m.path.vif for m in window.measurements] == [inside.vif]
    assert window.measurements[0].report.sent == 5
    log = cycle.log_text()
    assert f'vNIC {outside.vif} is not measurable' in log, log
    assert f"'{outside.address}' refused: outside [netweaver] " \
           'probe_networks' in log, log


def test_the_agent_refuses_to_load_options_beyond_the_daemons_limits(
        lab_factory, cycle_factory):
    """Ceilometer loading our meters: probe_interval_ms at its minimum
    with max_window_ms at its maximum would plan more probes than the
    daemon takes; the meters refuse to load, naming the options."""
    the_lab = lab_factory(guests=1)
    # Ceilometer skips a meter whose setup raises ExtensionLoadError.
    with pytest.raises((opts.OptionsError,
                        plugin_base.ExtensionLoadError)) as err:
        cycle_factory(the_lab, probe_interval_ms=0.01,
                      max_window_ms=300000.0)
    msg = str(getattr(err.value, 'msg', err.value))
    assert 'max_window_ms' in msg and 'privsep daemon' in msg, msg
    assert 'probe_interval_ms' in msg, msg


def test_the_daemons_own_probe_networks_bound_what_the_agent_asks(
        narrow_box):
    """The agent asks for 198.18.0.0/24; the daemon's configuration says
    198.18.0.0/28: .20 is refused, .10 goes out; without the agent's
    networks the configured ones apply."""
    session = probe_window.new_session()
    inside, outside = GOOD, '198.18.0.20'
    with narrow_box.watch(session) as cap:
        with pytest.raises(destinations.RefusedDestination,
                           match='outside'):
            _prepare(session, _wire([inside, outside]))
        with pytest.raises(destinations.RefusedDestination,
                           match='configured probe_networks'):
            _prepare(session, _wire([inside]), networks=['198.19.0.0/24'])
        sent, failed, errors = _send(_prepare(session, _wire([inside] * 2),
                                              networks=None))
        assert (sent, failed) == (2, 0), errors
        cap.settle(0.2)
    assert {key >> 1 for key in cap.batch.keys} == {0, 1}
