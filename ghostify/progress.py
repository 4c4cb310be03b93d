"""Progress on stderr for long work: a rich bar on a terminal, plain periodic lines anywhere else.

A job run with its stderr sent to a log file (a cluster job, ``nohup``, CI) still shows that it is alive and
how far it got: one line when a task starts, then at most one every ``every`` seconds, and one at its end.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Optional

EVERY_S = 10.0


class _Unknown(float):
    """A numeric field not measured yet (a loss before the first step): shown as "-" whatever the format."""

    def __format__(self, spec: str) -> str:
        return "-"


UNKNOWN = _Unknown("nan")


class PlainProgress:
    """The subset of ``rich.progress.Progress`` ghostify uses, written as plain lines to a stream."""

    def __init__(self, template: str, stream=None, every: float = EVERY_S) -> None:
        self.template, self.stream, self.every = template, stream or sys.stderr, every
        self.tasks: Dict[int, Dict[str, Any]] = {}

    def add_task(self, description: str, total: Optional[int] = None, **fields) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "completed": 0, "fields": fields,
                            "start": time.monotonic(), "printed": None}
        self._print(task)
        return task

    def update(self, task: int, advance: int = 0, description: Optional[str] = None, **fields) -> None:
        state = self.tasks[task]
        state["completed"] += advance
        state["description"] = state["description"] if description is None else description
        state["fields"].update(fields)
        done = state["total"] is not None and state["completed"] >= state["total"]
        if done or time.monotonic() - state["printed"] >= self.every:
            self._print(task)

    def advance(self, task: int, advance: int = 1) -> None:
        self.update(task, advance=advance)

    def _print(self, task: int) -> None:
        state = self.tasks[task]
        elapsed = time.monotonic() - state["start"]
        of = f"/{state['total']}" if state["total"] is not None else ""
        text = self.template.format(description=state["description"], **state["fields"])
        self.stream.write(f"{text} [{state['completed']}{of}, {elapsed:.0f} s]\n")
        self.stream.flush()
        state["printed"] = time.monotonic()


@contextmanager
def progress(template: str, *columns, show: bool = True) -> Iterator[Optional[Any]]:
    """A progress display on stderr, or None when ``show`` is False.

    Args:
        template: the text of a plain line, formatted with the task's ``description`` and fields.
        columns: rich columns for the terminal bar (a description, a bar and a count by default).
    """
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield PlainProgress(template)
        return
    columns = columns or (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        yield bar


def loss_progress(verb: str, measure: str):
    """``progress`` for work over steps that each report a loss: ``VERB <step> ... MEASURE <loss>``."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return progress(f"{verb} {{description}}, {measure} {{loss:.4f}}", TextColumn(f"{verb} {{task.description}}"),
                    BarColumn(), MofNCompleteColumn(), TextColumn(f"{measure} {{task.fields[loss]:.4f}}"),
                    TimeElapsedColumn())
