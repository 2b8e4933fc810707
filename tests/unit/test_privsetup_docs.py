"""docs/deploying.md's privilege section is the shipped sudoers file.

The section quotes ``etc/sudoers.d/netweaver-agent`` verbatim, sets the
same ``privsep_helper_command`` as the file's header, and the command
line oslo.privsep builds from that helper command is the one the file's
regular expression admits (the real ``visudo`` and the real
``PrivContext.helper_command``; the functional test runs real sudo).
"""

import os
import re
import shlex
import shutil
import subprocess
import tempfile

import pytest

from netweaver_agent.agent import privileged
from tests import privsetup


def test_docs_quote_the_shipped_sudoers_file_verbatim():
    assert privsetup.documented_sudoers() == privsetup.read(
        privsetup.SUDOERS)


def test_docs_and_file_set_the_same_helper_command():
    command = privsetup.documented_helper_command()
    assert privsetup.helper_commands(privsetup.read(privsetup.SUDOERS)) == [
        command]
    argv = shlex.split(command)
    assert argv[:2] == ['sudo', '-n'], argv


def test_one_placeholder_the_helper_path():
    """The helper path is the file's one site value: in the rule once."""
    text = privsetup.read(privsetup.SUDOERS)
    path = privsetup.helper_path(privsetup.documented_helper_command())
    rule_text = '\n'.join(privsetup.rules(text))
    assert rule_text.count(path) == 1, rule_text
    assert f'= {path} ^' in rule_text, rule_text


def test_no_rootwrap_filter_is_documented_or_shipped():
    assert '[Filters]' not in privsetup.privilege_section()
    etc = os.path.join(privsetup.REPO, 'etc')
    shipped = [name for _root, _dirs, names in os.walk(etc)
               for name in names if name.endswith('.filters')]
    assert shipped == []


def test_visudo_accepts_the_shipped_file():
    visudo = shutil.which('visudo') or '/usr/sbin/visudo'
    if not os.path.exists(visudo):
        pytest.fail('visudo is not installed (Debian package sudo; '
                    'tools/bootstrap.sh installs it)')
    proc = subprocess.run([visudo, '-cf', privsetup.SUDOERS],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _helper_argv(context, command, sock_path):
    privileged.configure(command)
    try:
        return context.helper_command(sock_path)
    finally:
        privileged.configure(None)


@pytest.fixture
def sock_path():
    """A socket path made as oslo.privsep makes it (mkdtemp in /tmp)."""
    tmpdir = tempfile.mkdtemp(dir='/tmp')
    yield os.path.join(tmpdir, 'privsep.sock')
    os.rmdir(tmpdir)


def _admitted(argv, text):
    """sudo's match: the helper path, then the arguments joined by spaces
    against the ``^…$`` expression (POSIX ERE; this one reads the same in
    Python's ``re``)."""
    path = privsetup.helper_path(privsetup.documented_helper_command())
    if path not in argv:
        return False
    args = ' '.join(argv[argv.index(path) + 1:])
    return re.search(privsetup.argument_regex(text), args) is not None


def test_oslo_privsep_builds_the_admitted_command_line(sock_path):
    text = privsetup.read(privsetup.SUDOERS)
    command = privsetup.documented_helper_command()
    argv = _helper_argv(privileged.capture_pctxt, command, sock_path)
    assert argv[:len(shlex.split(command))] == shlex.split(command)
    assert _admitted(argv, text), argv


def test_the_rule_admits_nothing_else(sock_path):
    text = privsetup.read(privsetup.SUDOERS)
    command = privsetup.documented_helper_command()
    good = _helper_argv(privileged.capture_pctxt, command, sock_path)
    lab = _helper_argv(privileged.netns_pctxt, command, sock_path)
    assert not _admitted(lab, text), lab
    assert not _admitted(good + ['--log-file', '/etc/ld.so.preload'], text)
    other_sock = good[:-1] + [sock_path.replace('/tmp/', '/var/tmp/')]
    assert not _admitted(other_sock, text)
    conf = privsetup.config_file(command)
    other_conf = [w if w != conf else '/tmp/evil.conf' for w in good]
    assert not _admitted(other_conf, text)


def test_the_option_help_names_the_documented_command():
    from netweaver_agent.agent import opts
    (opt,) = [o for o in opts.OPTS if o.name == 'privsep_helper_command']
    assert privsetup.documented_helper_command() in opt.help
    assert os.path.relpath(privsetup.SUDOERS, privsetup.REPO) in opt.help
