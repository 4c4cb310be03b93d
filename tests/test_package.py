"""The flat public namespace: every export resolves, and importing submodules never shadows a function."""

import importlib
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
