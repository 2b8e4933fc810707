"""Unit tests of ssh/session.py, ssh/probesource.py and cli/seedjob.py:
quoting, options, parsing.

The real SSH paths (sshd, host keys, timeouts, the seed's job end to end)
are in tests/functional/test_ssh.py.
"""

import os
import shlex
import subprocess
import time

import fixtures
from hypothesis import given
from hypothesis import strategies as st
from oslo_config import cfg
from oslo_config import fixture as config_fixture
import testtools

from netweaver_agent.agent import opts
from netweaver_agent.cli import seedjob
from netweaver_agent.core import sources
from netweaver_agent.ssh import probesource
from netweaver_agent.ssh import session

EVIL = 'x; touch pwned-marker'
EVIL_NAMES = [EVIL, "x' ; touch pwned-marker; '", 'x$(touch pwned-marker)',
              'x`touch pwned-marker`', 'x\ntouch pwned-marker', '-rf',
              '--domain=other', '"x" && touch pwned-marker', '{}', '']


class TestCommandLine(testtools.TestCase):

    def test_evil_names_stay_one_argument(self):
        for name in EVIL_NAMES:
            argv = ['xe', 'vm-list', f'name-label={name}', 'params=dom-id']
            self.assertEqual(argv, shlex.split(session.command_line(argv)))

    def test_a_real_shell_sees_one_argument_and_runs_nothing(self):
        # sshd hands the command line to the user's shell with -c: do the
        # same locally, in a scratch directory, with printf as the command.
        tmp = self.useFixture(fixtures.TempDir()).path
        for name in EVIL_NAMES:
            line = session.command_line(['printf', '%s\\0', name])
            out = subprocess.run(['sh', '-c', line], cwd=tmp, check=True,
                                 capture_output=True).stdout
            self.assertEqual(name.encode() + b'\0', out)
        self.assertEqual([], os.listdir(tmp))

    @given(st.lists(st.text(alphabet=st.characters(
        blacklist_categories=('Cs',), blacklist_characters='\0')),
        min_size=1).filter(lambda a: a[0] != ''))
    def test_any_argv_round_trips(self, argv):
        self.assertEqual(argv, shlex.split(session.command_line(argv)))

    def test_non_strings_are_converted(self):
        self.assertEqual("kill -s INT 42",
                         session.command_line(['kill', '-s', 'INT', 42]))

    def test_empty_command_is_refused(self):
        self.assertRaises(ValueError, session.command_line, [])
        self.assertRaises(ValueError, session.command_line, [''])


class TestErrors(testtools.TestCase):

    def test_command_error_names_host_command_status_stderr(self):
        err = session.RemoteCommandError(
            'root@hv1', ['xe', 'vm-list', f'name-label={EVIL}'], 1,
            'The server failed to handle your request\n')
        msg = str(err)
        self.assertIn('root@hv1', msg)
        self.assertIn("name-label=x; touch pwned-marker", msg)
        self.assertIn('exit status 1', msg)
        self.assertIn('The server failed', msg)
        self.assertEqual(1, err.exit_status)

    def test_timeout_says_so(self):
        err = session.RemoteCommandError('root@hv1', ['sleep', '9'], None,
                                         '', reason='did not end within 1 s')
        self.assertIn('did not end within 1 s', str(err))
        self.assertIn('(no stderr)', str(err))


class TestOptions(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(cfg.ConfigOpts()))
        opts.register_opts(self.conf.conf)

    def test_defaults_are_safe(self):
        got = opts.ssh_options(self.conf.conf)
        self.assertFalse(got.accept_new_host_key)
        self.assertEqual('~/.ssh/known_hosts', got.known_hosts_file)
        self.assertIsNone(got.key_file)
        self.assertEqual(session.SSHOptions(), got)

    def test_overrides(self):
        self.conf.config(group='netweaver', ssh_key_file='/etc/k',
                         ssh_accept_new_host_key=True,
                         ssh_connect_timeout_s=2.5,
                         ssh_command_timeout_s=7.0, max_capture_mb=3)
        got = opts.ssh_options(self.conf.conf)
        self.assertEqual(session.SSHOptions(
            key_file='/etc/k', accept_new_host_key=True,
            connect_timeout_s=2.5, command_timeout_s=7.0, max_capture_mb=3),
            got)

    def test_bounds(self):
        self.assertRaises(ValueError, self.conf.config, group='netweaver',
                          ssh_connect_timeout_s=0)
        self.assertRaises(ValueError, self.conf.config, group='netweaver',
                          ssh_command_timeout_s=-1)

    def test_every_option_has_help(self):
        for opt in opts.SSH_OPTS:
            self.assertTrue(opt.help, opt.name)
            self.assertTrue(opt.name.startswith('ssh_'), opt.name)

    def test_dataclass_validates(self):
        self.assertRaises(ValueError, session.SSHOptions, connect_timeout_s=0)

    def test_ssh_source_takes_overrides(self):
        src = probesource.SSHSource('198.18.0.1', 2222, 'root',
                                    key_file='/k', connect_timeout_s=1.0)
        self.assertEqual('ssh://root@198.18.0.1:2222', src.name)
        self.assertEqual('/k', src.remote.options.key_file)
        self.assertEqual(1.0, src.remote.options.connect_timeout_s)

    def test_parse_source_builds_ssh_source(self):
        src = probesource.parse_source('ssh://probe@198.18.0.1:2200',
                                       key_file='/k')
        self.assertIsInstance(src, probesource.SSHSource)
        self.assertEqual('probe', src.remote.username)
        self.assertEqual(2200, src.remote.port)


class TestParseUint(testtools.TestCase):

    def test_small_numbers(self):
        self.assertEqual(7, session.parse_uint('7\n'))
        self.assertEqual(4294967295, session.parse_uint(b' 4294967295 '))
        self.assertEqual(0, session.parse_uint('0'))

    def test_refused(self):
        for text in ('', ' ', '-1', '+1', '1.0', '0x10', '\u00b2', '\u0663',
                     '1 2', '9' * 11, '9' * 1_000_000):
            self.assertIsNone(session.parse_uint(text), text[:20])


class FakeChannel:
    """A channel with a stream of ``total`` bytes ready on stdout (a faked
    boundary: the real server is in tests/functional/test_ssh_limits.py).
    Records the sizes asked for."""

    def __init__(self, total):
        self.left = total
        self.asked = []

    def recv_ready(self):
        return self.left > 0

    def recv_stderr_ready(self):
        return False

    def recv_stderr(self, n):
        raise AssertionError('nothing is ready on stderr')

    def recv(self, n):
        self.asked.append(n)
        n = min(n, self.left)
        self.left -= n
        return b'7' * n


class TestOutputCap(testtools.TestCase):

    def read_all(self, total, cap):
        io = session._Output('root@hv', ('xe', 'vm-list'), cap)
        ch = FakeChannel(total)
        while ch.recv_ready():
            io.read_ready(ch)
        return io, ch
    # Streams here are at most 100 MB: a broken cap fails, never hangs.

    def test_exactly_the_cap_is_fine(self):
        io, ch = self.read_all(1000, 1000)
        self.assertEqual(1000, len(io.out))

    def test_past_the_cap_stops_there(self):
        err = self.assertRaises(session.OutputTooLarge, self.read_all,
                                10 ** 8, 1000)
        self.assertIn('root@hv', str(err))
        self.assertIn("'xe vm-list'", str(err))
        self.assertIn('more than 1000 bytes', str(err))

    def test_never_asks_for_more_than_the_cap_leaves(self):
        io = session._Output('h', ('c',), 100_000)
        ch = FakeChannel(10 ** 8)
        try:
            while ch.recv_ready():
                io.read_ready(ch)
        except session.OutputTooLarge:
            pass
        self.assertLessEqual(sum(ch.asked), 100_001)
        self.assertLessEqual(len(io.out), 100_000)


class FakeHost:
    """A hypervisor answering commands from a table (a faked boundary)."""

    name = 'root@hv-fake'

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def run(self, argv, check=True, **kwargs):
        self.calls.append(list(argv))
        status, out, err = self.answers.get(argv[0], (127, '', 'not found'))
        return session.CommandResult(tuple(argv), status, out.encode(),
                                     err.encode())


DOMIFLIST = """\
 Interface   Type     Source   Model    MAC
-------------------------------------------------------------
 tap3f2a     bridge   br-int   virtio   fa:16:3e:00:00:01
 tap3f2b     bridge   br-int   virtio   fa:16:3e:00:00:02
"""


class TestResolveVif(testtools.TestCase):

    def test_xen_dom_id(self):
        host = FakeHost({'xe': (0, '7\n', '')})
        self.assertEqual('vif7.1', seedjob.resolve_vif(host, EVIL, 1))
        self.assertEqual(['xe', 'vm-list', f'name-label={EVIL}',
                          'params=dom-id', '--minimal'], host.calls[0])

    def test_xen_halted_vm(self):
        host = FakeHost({'xe': (0, '-1\n', '')})
        err = self.assertRaises(seedjob.SeedJobError, seedjob.resolve_vif,
                                host, 'vm1')
        self.assertIn("dom-id '-1'", str(err))

    def test_libvirt_when_no_xe(self):
        host = FakeHost({'virsh': (0, DOMIFLIST, '')})
        self.assertEqual('tap3f2b', seedjob.resolve_vif(
            host, EVIL, 1, libvirt_uri='qemu:///system'))
        self.assertEqual(['virsh', '-c', 'qemu:///system', 'domiflist',
                          '--domain', EVIL], host.calls[1])

    def test_neither_names_both(self):
        host = FakeHost({})
        err = self.assertRaises(seedjob.SeedJobError, seedjob.resolve_vif,
                                host, 'instance-1')
        msg = str(err)
        self.assertIn("'instance-1'", msg)
        self.assertIn('root@hv-fake', msg)
        self.assertIn('xe: not installed', msg)
        self.assertIn('virsh: not installed', msg)
        self.assertIn('--vif', msg)

    def test_domiflist_out_of_range(self):
        err = self.assertRaises(seedjob.SeedJobError,
                                seedjob.parse_domiflist, DOMIFLIST, 2, 'vm')
        self.assertIn('has 2 interfaces', str(err))

    def test_domiflist_without_host_device(self):
        text = DOMIFLIST.replace('tap3f2a', '-      ')
        self.assertRaises(seedjob.SeedJobError, seedjob.parse_domiflist,
                          text, 0, 'vm')


class TestSeedJob(testtools.TestCase):

    def job(self, **kw):
        args = dict(hypervisor='hv', source='src', destination='198.18.0.10',
                    instance='vm')
        args.update(kw)
        return seedjob.SeedJob(**args)

    def test_source_command_placeholders_per_argument(self):
        argv = seedjob.source_argv(seedjob.SEED_SOURCE_COMMAND, 10,
                                   '198.18.0.10', '198.18.0.1')
        self.assertEqual(['hping3', '-c', '10', '-S', '-L', '0', '-Q',
                          '--fast', '198.18.0.10'], argv)

    def test_source_command_value_stays_one_argument(self):
        argv = seedjob.source_argv('echo {destination}', 1, EVIL, 'x')
        self.assertEqual(['echo', EVIL], argv)

    def test_unknown_placeholder(self):
        err = self.assertRaises(ValueError, seedjob.source_argv,
                                'ping {dest}', 1, '198.18.0.10', 'x')
        self.assertIn('{dest}', str(err))

    def test_job_validates_early(self):
        self.assertRaises(ValueError, self.job, destination=EVIL)
        self.assertRaises(ValueError, self.job, vif='tap0')
        self.assertRaises(ValueError, self.job, instance=None)
        self.assertRaises(ValueError, self.job, interface='eth0; reboot')
        self.assertRaises(ValueError, self.job, count=0)
        self.assertRaises(ValueError, self.job, source_command='ping {x}')
        self.job(instance=EVIL)   # any name: it is only ever one argument

    def test_capture_filter_and_argv(self):
        bpf = seedjob.capture_filter('198.18.0.1', '198.18.0.10')
        self.assertEqual('(src host 198.18.0.1 and dst host 198.18.0.10) or'
                         ' (src host 198.18.0.10 and dst host 198.18.0.1)',
                         bpf)
        self.assertRaises(ValueError, seedjob.capture_filter, EVIL,
                          '198.18.0.10')
        argv = seedjob.capture_argv('eth0', '/tmp/netweaver.x/pif.pcap', 264,
                                    30.5, bpf)
        self.assertEqual(['timeout', '-s', 'INT', '31', 'tcpdump'], argv[:5])
        for flag in ('--time-stamp-precision=nano', '-Z', '-c', '-w'):
            self.assertIn(flag, argv)
        self.assertEqual(bpf, argv[-1])


class TestLimitsAndIPv6(testtools.TestCase):
    """Options that can never be safe, remote numbers, IPv6 jobs."""

    def test_options_refuse_non_finite_and_accept_new_without_file(self):
        for name in ('connect_timeout_s', 'command_timeout_s',
                     'max_capture_mb'):
            for bad in (float('nan'), float('inf'), 0, -1):
                err = self.assertRaises(ValueError, session.SSHOptions,
                                        **{name: bad})
                self.assertIn(name, str(err))
        for empty in ('', None):
            err = self.assertRaises(ValueError, session.SSHOptions,
                                    known_hosts_file=empty,
                                    accept_new_host_key=True)
            self.assertIn('known_hosts', str(err))
        session.SSHOptions(known_hosts_file='', accept_new_host_key=False)

    def test_connect_fails_closed_before_any_socket(self):
        # Built past the dataclass check: connect() refuses by itself.
        opts = session.SSHOptions()
        object.__setattr__(opts, 'known_hosts_file', '')
        object.__setattr__(opts, 'accept_new_host_key', True)
        host = session.RemoteHost('198.18.0.1', 2222, options=opts)
        host._socket = lambda: self.fail('connected anyway')
        err = self.assertRaises(session.HostKeyError, host.connect)
        self.assertIn('known_hosts', str(err))
        self.assertIn('198.18.0.1', str(err))

    def test_ipv6_host_names_are_bracketed_with_a_port(self):
        self.assertEqual('root@[2001:2::1]:2222',
                         session.RemoteHost('2001:2::1', 2222).name)
        self.assertEqual('root@2001:2::1',
                         session.RemoteHost('2001:2::1').name)

    def test_huge_or_odd_dom_ids_are_a_clear_error(self):
        for domid in ('9' * 100_000, '\u0663', '12 13', '-1'):
            host = FakeHost({'xe': (0, domid + '\n', '')})
            err = self.assertRaises(seedjob.SeedJobError,
                                    seedjob.resolve_vif, host, 'vm1')
            self.assertIn('root@hv-fake', str(err))
            self.assertLess(len(str(err)), 400)

    def test_ipv6_job_and_filter(self):
        job = seedjob.SeedJob(hypervisor='hv', source='src',
                              destination='2001:2::b', vif='tap0')
        self.assertEqual('2001:2::b', job.destination)
        self.assertEqual('(src host 2001:2::1 and dst host 2001:2::b) or '
                         '(src host 2001:2::b and dst host 2001:2::1)',
                         seedjob.capture_filter('2001:2::1', '2001:2::b'))
        self.assertRaises(ValueError, seedjob.capture_filter, '198.18.0.1',
                          '2001:2::b')

    def test_job_refuses_non_finite_times(self):
        for name in ('interval_ms', 'capture_timeout_s', 'settle_s'):
            err = self.assertRaises(
                ValueError, seedjob.SeedJob, hypervisor='hv', source='src',
                destination='198.18.0.10', vif='tap0',
                **{name: float('nan')})
            self.assertIn(name, str(err))

    def test_ssh_source_refuses_a_non_finite_deadline(self):
        src = probesource.SSHSource('198.18.0.1', 2222)
        plan = sources.schedule(1, 'icmp', ['198.18.0.10'], 1,
                                1_000_000).plan
        src._prepared = sources.Prepared(plan, b'')
        src.remote.run = lambda *a, **k: self.fail('sent anyway')
        for bad in (float('nan'), float('inf')):
            src._prepared = sources.Prepared(plan, b'')
            self.assertRaises(ValueError, src.send, plan, bad)

    def test_ssh_source_with_no_time_left_sends_nothing(self):
        src = probesource.SSHSource('198.18.0.1', 2222)
        plan = sources.schedule(1, 'icmp', ['198.18.0.10'], 1,
                                1_000_000).plan
        src.remote.run = lambda *a, **k: self.fail('sent anyway')
        # Less than the sender's millisecond resolution is no time at all.
        for left in (-1.0, 0.0, 0.0004):
            src._prepared = sources.Prepared(plan, b'')
            got = src.send(plan, time.monotonic() + left)
            self.assertEqual(0, got.attempted)


class TestDestinationPolicy(testtools.TestCase):
    """The ssh:// source and the measure job send only where any source
    may (destinations): refused before anything reaches a remote host."""

    def test_ssh_source_refuses_before_any_remote_command(self):
        from netweaver_agent.core import destinations
        src = probesource.parse_source(
            'ssh://root@198.18.0.1:2222',
            policy=destinations.policy(['198.18.0.0/24']))
        src.remote.connect = lambda: self.fail('connected anyway')
        src.remote.run = lambda *a, **k: self.fail('ran anyway')
        for dst in ('169.254.169.254', '127.0.0.1', '224.0.0.1',
                    '198.19.0.10', 'fe80::1'):
            plan = sources.schedule(1, 'icmp', [dst], 1,
                                    1_000_000).plan
            err = self.assertRaises(destinations.RefusedDestination,
                                    src.prepare, plan)
            self.assertIn(dst, str(err))

    def test_ssh_source_default_policy_is_the_classes(self):
        from netweaver_agent.core import destinations
        src = probesource.SSHSource('198.18.0.1')
        self.assertEqual(destinations.DEFAULT, src.policy)

    def test_measure_job_refuses_such_destinations(self):
        from netweaver_agent.core import destinations
        for dst in ('169.254.169.254', '127.0.0.1', '255.255.255.255',
                    '::1', 'ff02::1'):
            self.assertRaises(destinations.RefusedDestination,
                              seedjob.SeedJob, hypervisor='hv', source='src',
                              destination=dst, vif='tap0')
