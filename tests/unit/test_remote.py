"""Unit tests of remote.py and seedjob.py: quoting, options, parsing.

The real SSH paths (sshd, host keys, timeouts, the seed's job end to end)
are in tests/functional/test_ssh.py.
"""

import os
import shlex
import struct
import subprocess

import fixtures
from hypothesis import given
from hypothesis import strategies as st
from oslo_config import cfg
from oslo_config import fixture as config_fixture
import testtools

from netweaver_agent import remote
from netweaver_agent import seedjob

EVIL = 'x; touch pwned-marker'
EVIL_NAMES = [EVIL, "x' ; touch pwned-marker; '", 'x$(touch pwned-marker)',
              'x`touch pwned-marker`', 'x\ntouch pwned-marker', '-rf',
              '--domain=other', '"x" && touch pwned-marker', '{}', '']


class TestCommandLine(testtools.TestCase):

    def test_evil_names_stay_one_argument(self):
        for name in EVIL_NAMES:
            argv = ['xe', 'vm-list', f'name-label={name}', 'params=dom-id']
            self.assertEqual(argv, shlex.split(remote.command_line(argv)))

    def test_a_real_shell_sees_one_argument_and_runs_nothing(self):
        # sshd hands the command line to the user's shell with -c: do the
        # same locally, in a scratch directory, with printf as the command.
        tmp = self.useFixture(fixtures.TempDir()).path
        for name in EVIL_NAMES:
            line = remote.command_line(['printf', '%s\\0', name])
            out = subprocess.run(['sh', '-c', line], cwd=tmp, check=True,
                                 capture_output=True).stdout
            self.assertEqual(name.encode() + b'\0', out)
        self.assertEqual([], os.listdir(tmp))

    @given(st.lists(st.text(alphabet=st.characters(
        blacklist_categories=('Cs',), blacklist_characters='\0')),
        min_size=1).filter(lambda a: a[0] != ''))
    def test_any_argv_round_trips(self, argv):
        self.assertEqual(argv, shlex.split(remote.command_line(argv)))

    def test_non_strings_are_converted(self):
        self.assertEqual("kill -s INT 42",
                         remote.command_line(['kill', '-s', 'INT', 42]))

    def test_empty_command_is_refused(self):
        self.assertRaises(ValueError, remote.command_line, [])
        self.assertRaises(ValueError, remote.command_line, [''])


class TestErrors(testtools.TestCase):

    def test_command_error_names_host_command_status_stderr(self):
        err = remote.RemoteCommandError(
            'root@hv1', ['xe', 'vm-list', f'name-label={EVIL}'], 1,
            'The server failed to handle your request\n')
        msg = str(err)
        self.assertIn('root@hv1', msg)
        self.assertIn("name-label=x; touch pwned-marker", msg)
        self.assertIn('exit status 1', msg)
        self.assertIn('The server failed', msg)
        self.assertEqual(1, err.exit_status)

    def test_timeout_says_so(self):
        err = remote.RemoteCommandError('root@hv1', ['sleep', '9'], None, '',
                                        reason='did not end within 1 s')
        self.assertIn('did not end within 1 s', str(err))
        self.assertIn('(no stderr)', str(err))


class TestOptions(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.conf = self.useFixture(config_fixture.Config(cfg.ConfigOpts()))
        self.conf.register_opts(remote.OPTS, group=remote.GROUP)

    def test_defaults_are_safe(self):
        opts = remote.SSHOptions.from_conf(self.conf.conf)
        self.assertFalse(opts.accept_new_host_key)
        self.assertEqual('~/.ssh/known_hosts', opts.known_hosts_file)
        self.assertIsNone(opts.key_file)
        self.assertEqual(remote.SSHOptions(), opts)

    def test_overrides(self):
        self.conf.config(group='netweaver', ssh_key_file='/etc/k',
                         ssh_accept_new_host_key=True,
                         ssh_connect_timeout_s=2.5)
        opts = remote.SSHOptions.from_conf(self.conf.conf)
        self.assertEqual('/etc/k', opts.key_file)
        self.assertTrue(opts.accept_new_host_key)
        self.assertEqual(2.5, opts.connect_timeout_s)

    def test_bounds(self):
        self.assertRaises(ValueError, self.conf.config, group='netweaver',
                          ssh_connect_timeout_s=0)
        self.assertRaises(ValueError, self.conf.config, group='netweaver',
                          ssh_command_timeout_s=-1)

    def test_every_option_has_help(self):
        for opt in remote.OPTS:
            self.assertTrue(opt.help, opt.name)
            self.assertTrue(opt.name.startswith('ssh_'), opt.name)

    def test_dataclass_validates(self):
        self.assertRaises(ValueError, remote.SSHOptions, connect_timeout_s=0)

    def test_ssh_source_takes_overrides(self):
        src = remote.SSHSource('198.18.0.1', 2222, 'root',
                               key_file='/k', connect_timeout_s=1.0)
        self.assertEqual('ssh://root@198.18.0.1:2222', src.name)
        self.assertEqual('/k', src.remote.options.key_file)
        self.assertEqual(1.0, src.remote.options.connect_timeout_s)

    def test_parse_source_builds_ssh_source(self):
        from netweaver_agent import sources
        src = sources.parse_source('ssh://probe@198.18.0.1:2200',
                                   key_file='/k')
        self.assertIsInstance(src, remote.SSHSource)
        self.assertEqual('probe', src.remote.username)
        self.assertEqual(2200, src.remote.port)


class TestSenderInput(testtools.TestCase):

    def test_encode_plan_records(self):
        data = remote.encode_plan([(0, '198.18.0.10', b'\x45abc'),
                                   (1500, '198.18.0.11', b'\x45')])
        head = struct.Struct('!QH4s')
        off, n, dst = head.unpack_from(data, 0)
        self.assertEqual((0, 4, bytes([198, 18, 0, 10])), (off, n, dst))
        self.assertEqual(b'\x45abc', data[head.size:head.size + 4])
        off, n, dst = head.unpack_from(data, head.size + 4)
        self.assertEqual((1500, 1, bytes([198, 18, 0, 11])), (off, n, dst))
        self.assertEqual(2 * head.size + 5, len(data))

    def test_sender_script_compiles(self):
        compile(remote.SENDER, '<sender>', 'exec')


class FakeHost:
    """A hypervisor answering commands from a table (a faked boundary)."""

    name = 'root@hv-fake'

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def run(self, argv, check=True, **kwargs):
        self.calls.append(list(argv))
        status, out, err = self.answers.get(argv[0], (127, '', 'not found'))
        return remote.CommandResult(tuple(argv), status, out.encode(),
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
