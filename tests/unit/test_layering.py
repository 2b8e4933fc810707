"""The package's rooms import only downwards.

* ``core`` imports nothing of ours outside ``core``;
* nothing but the command's ``lab`` sub-command (``cli/lab.py``) and the
  lab itself imports ``lab``;
* no import cycle between our modules.

Imports inside functions count: a lazy import is still a dependency.  The
graph is read from the source with :mod:`ast`, nothing is imported.  Each
rule is also run on a small planted tree, to show it fails when broken.
"""

import ast
import pathlib

import pytest

PACKAGE = 'netweaver_agent'
ROOT = pathlib.Path(__file__).resolve().parents[2] / PACKAGE
LAB_IMPORTERS = {f'{PACKAGE}.cli.lab'}


def modules(root, package=PACKAGE):
    """``{dotted module name: path}`` of every module under ``root``."""
    found = {}
    for path in sorted(root.rglob('*.py')):
        parts = (package,) + path.relative_to(root).with_suffix('').parts
        if parts[-1] == '__init__':
            parts = parts[:-1]
        found['.'.join(parts)] = path
    # C extensions (setup.py builds each from its .c file): modules that
    # import none of ours.
    for path in sorted(root.rglob('*.c')):
        parts = (package,) + path.relative_to(root).with_suffix('').parts
        found['.'.join(parts)] = None
    return found


def import_graph(root, package=PACKAGE):
    """``{module: {module it imports}}``, our modules only."""
    mods = modules(root, package)
    graph = {}
    for name, path in mods.items():
        deps = set()
        if path is None:
            graph[name] = deps
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.level:
                    raise AssertionError(f'{path}: relative import')
                # "from pkg import mod" names a module when one exists.
                targets = [f'{node.module}.{a.name}'
                           if f'{node.module}.{a.name}' in mods
                           else node.module for a in node.names]
            else:
                continue
            deps.update(t for t in targets
                        if t == package or t.startswith(package + '.'))
        deps.discard(name)
        graph[name] = deps
    return graph


def room(module, package=PACKAGE):
    """The sub-package a module lives in (``''`` at the top)."""
    parts = module.split('.')
    return parts[1] if len(parts) > 2 else ''


def core_violations(graph, package=PACKAGE):
    return sorted((m, d) for m, deps in graph.items()
                  if room(m, package) == 'core'
                  for d in deps if room(d, package) != 'core')


def lab_violations(graph, package=PACKAGE):
    allowed = {m.replace(PACKAGE, package, 1) for m in LAB_IMPORTERS}
    return sorted((m, d) for m, deps in graph.items()
                  if room(m, package) != 'lab' and m not in allowed
                  for d in deps if room(d, package) == 'lab')


def cycles(graph):
    """Every strongly connected set of two or more modules (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_core_imports_only_core():
    assert core_violations(import_graph(ROOT)) == []


def test_only_the_lab_command_imports_the_lab():
    assert lab_violations(import_graph(ROOT)) == []


def test_no_import_cycle():
    assert cycles(import_graph(ROOT)) == []


def test_every_room_says_who_it_serves():
    for init in sorted(ROOT.glob('*/__init__.py')):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and doc.splitlines()[0].endswith('.'), init


def test_the_graph_sees_the_rooms():
    # The rules above are vacuous if the graph lost its edges.
    graph = import_graph(ROOT)
    assert f'{PACKAGE}.core.probe' in graph[f'{PACKAGE}.core.window']
    assert f'{PACKAGE}.lab.build' in graph[f'{PACKAGE}.cli.lab']
    assert {room(m) for m in graph} >= {'core', 'ssh', 'agent', 'cli',
                                        'lab'}


# --- each rule fails on a planted violation ----------------------------------

def _tree(tmp_path, files):
    root = tmp_path / 'pkg'
    for rel, text in {'__init__.py': '', 'core/__init__.py': '',
                      'agent/__init__.py': '', 'cli/__init__.py': '',
                      'lab/__init__.py': '', **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(root, 'pkg')


def test_planted_core_import_outside_core_fails(tmp_path):
    graph = _tree(tmp_path, {
        'core/window.py': 'def f():\n    from pkg.agent import opts\n',
        'agent/opts.py': '',
    })
    assert core_violations(graph, 'pkg') == [('pkg.core.window',
                                              'pkg.agent.opts')]


def test_planted_lab_import_outside_the_lab_command_fails(tmp_path):
    graph = _tree(tmp_path, {
        'agent/pollsters.py': 'from pkg.lab import virt\n',
        'cli/lab.py': 'from pkg.lab import build\n',
        'lab/virt.py': '', 'lab/build.py': '',
    })
    assert lab_violations(graph, 'pkg') == [('pkg.agent.pollsters',
                                             'pkg.lab.virt')]


@pytest.mark.parametrize('second', [
    'from pkg.core import a\n',
    'def later():\n    import pkg.core.a\n',
])
def test_planted_cycle_fails(tmp_path, second):
    graph = _tree(tmp_path, {
        'core/a.py': 'from pkg.core import b\n',
        'core/b.py': second,
    })
    assert cycles(graph) == [['pkg.core.a', 'pkg.core.b']]
