"""The ``ghostify`` command: a thin click layer over the Python API.

``app`` holds the command group (errors become one line there), the parameter types and the options several
commands share; each command lives in the module named after it and registers itself on import.
"""

from . import analyze, convert, deploy, finetune, report  # noqa: F401 - each registers its commands on ``main``
from .app import main

__all__ = ["main"]
