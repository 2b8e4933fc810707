"""The privilege set-up as docs/deploying.md states it and etc/ ships it.

The unit test (``tests/unit/test_privsetup_docs.py``) checks the two
agree; the functional test (``tests/functional/test_privsetup.py``)
installs what they say.  Both read the values from the documents, never
from constants of their own.
"""

import os
import re
import shlex

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOYING = os.path.join(REPO, 'docs', 'deploying.md')
SUDOERS = os.path.join(REPO, 'etc', 'sudoers.d', 'netweaver-agent')
SECTION = '## Capabilities: the privsep daemon'

_FENCE_RE = re.compile(r'^```(\w*)\n(.*?)^```\n', re.M | re.S)
_HELPER_RE = re.compile(r'^\s*#?\s*privsep_helper_command\s*=\s*(.+?)\s*$',
                        re.M)


def read(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


def privilege_section(text=None):
    """The privilege section of docs/deploying.md (to the next ``## ``)."""
    text = read(DEPLOYING) if text is None else text
    start = text.index(SECTION)
    end = text.find('\n## ', start + len(SECTION))
    return text[start:] if end < 0 else text[start:end + 1]


def fenced_blocks(text, lang):
    """The bodies of the section's fenced code blocks tagged ``lang``."""
    return [body for tag, body in _FENCE_RE.findall(text) if tag == lang]


def documented_sudoers():
    """The sudoers file the docs quote (exactly one ``sudoers`` block)."""
    (block,) = fenced_blocks(privilege_section(), 'sudoers')
    return block


def helper_commands(text):
    """Every ``privsep_helper_command = …`` value in ``text``."""
    return _HELPER_RE.findall(text)


def documented_helper_command():
    """``[netweaver] privsep_helper_command`` as the docs set it."""
    (ini,) = fenced_blocks(privilege_section(), 'ini')
    (command,) = helper_commands(ini)
    return command


def helper_path(command):
    """The ``privsep-helper`` path in a helper command: the placeholder."""
    (path,) = [w for w in shlex.split(command)
               if os.path.basename(w) == 'privsep-helper']
    return path


def config_file(command):
    """The ``--config-file`` a helper command carries."""
    argv = shlex.split(command)
    return argv[argv.index('--config-file') + 1]


def rules(sudoers_text):
    """The non-comment, non-blank lines of a sudoers file."""
    return [line for line in sudoers_text.splitlines()
            if line.strip() and not line.lstrip().startswith('#')]


def agent_user(sudoers_text):
    """The user the file's one user specification allows."""
    (spec,) = [line for line in rules(sudoers_text)
               if not line.startswith(('Cmnd_Alias', 'Defaults'))]
    return spec.split()[0]


def argument_regex(sudoers_text):
    """The ``^…$`` argument regular expression of the file's command."""
    (alias,) = [line for line in rules(sudoers_text)
                if line.startswith('Cmnd_Alias')]
    command = alias.split('=', 1)[1].strip()
    _path, _, args = command.partition(' ')
    return args
