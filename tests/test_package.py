"""The flat public namespace: every export resolves, and importing submodules never shadows a function."""

import ast
import importlib
import pathlib
import pkgutil
import subprocess
import sys

import ghostify


def test_every_export_resolves():
    for name in ghostify.__all__:
        assert getattr(ghostify, name) is not None


def test_submodule_imports_do_not_shadow_functions():
    for info in pkgutil.walk_packages(ghostify.__path__, "ghostify."):
        importlib.import_module(info.name)
    for name in ("convert", "report", "save", "load", "deploy", "export", "bench"):
        assert callable(getattr(ghostify, name)) and not isinstance(getattr(ghostify, name), type(ghostify)), name


def test_import_and_help_do_not_load_torch():
    code = "import sys, ghostify, ghostify.cli; assert 'torch' not in sys.modules, 'torch imported eagerly'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def _internal_imports(path, package: str) -> set:
    """The ghostify modules a source file imports, at top level or inside functions (TYPE_CHECKING too)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                names = [f"{target}.{alias.name}" for alias in node.names] + [target]
            else:
                names = [node.module or ""] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(name for name in names if name.startswith("ghostify"))
    return found


def test_no_import_cycles():
    root = pathlib.Path(ghostify.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if parts[-1] == "__init__" else name.rpartition(".")[0]
        modules[name] = (path, package)
    graph = {name: {target for target in _internal_imports(path, package) if target in modules and target != name}
             for name, (path, package) in modules.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", "import cycle: " + " -> ".join(trail[trail.index(name):] + [name])
        state[name] = "open"
        for target in sorted(graph[name]):
            if not target.startswith(name + "."):  # a package importing its own submodules is fine
                visit(target, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])
