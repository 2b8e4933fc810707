"""Test modules share helpers, never each other.

What several test modules use lives in helper modules (tests/packets.py,
tests/flows.py, tests/command.py, tests/unit/fakes.py,
tests/unit/pollsterfakes.py, tests/functional/tcpdump.py,
tests/functional/privsep.py, tests/functional/conftest.py ...): a test
module that imports another (at the top or inside a function) runs or
re-collects that module's tests and ties the two together.  The check
reads every tests/**/test_*.py with :mod:`ast`.
"""

import ast
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent.parent


def _is_test_module(dotted):
    return any(part.startswith('test_') for part in dotted.split('.'))


def imported_test_modules(source, package):
    """``[(line, dotted name)]``: the test modules ``source`` imports.

    ``package`` is the dotted package of the module (for relative
    imports)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = package.split('.')
                parent = parts[:len(parts) - node.level + 1]
                base = '.'.join(parent + ([base] if base else []))
            names = [f'{base}.{alias.name}' for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith('tests.') and _is_test_module(name):
                found.append((node.lineno, name))
    return found


def _test_files():
    return sorted(p for p in TESTS.rglob('test_*.py')
                  if '.hypothesis' not in p.parts)


def test_no_test_module_imports_another():
    offenders = []
    for path in _test_files():
        rel = path.relative_to(TESTS.parent)
        package = '.'.join(rel.parent.parts)
        for line, name in imported_test_modules(path.read_text(), package):
            offenders.append(f'{rel}:{line}: imports {name}')
    assert _test_files(), TESTS
    assert offenders == [], '\n'.join(offenders)


def test_the_check_sees_every_form_of_import():
    planted = '''
import os
from tests import packets
from tests.functional import conftest
from tests.unit import test_probe as tp
from tests.unit.test_pcapfile import frames
import tests.functional.test_ssh


def helper():
    from tests.functional import test_privsep
    from . import test_fuzz
    from .test_analyze import answered
    return tp, frames, test_privsep, test_fuzz, answered
'''
    found = imported_test_modules(planted, 'tests.unit')
    assert [name for _, name in found] == [
        'tests.unit.test_probe', 'tests.unit.test_pcapfile.frames',
        'tests.functional.test_ssh', 'tests.functional.test_privsep',
        'tests.unit.test_fuzz', 'tests.unit.test_analyze.answered']
    assert [line for line, _ in found] == [5, 6, 7, 11, 12, 13]
