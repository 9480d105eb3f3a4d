"""The one place that owns console output: a rich console, progress bars and tables.

Library code calls :func:`log`, :func:`progress` and :func:`table` instead of
``print``. Output happens on the main process only (RANK 0 or no RANK).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

T = TypeVar("T")

console = Console(stderr=True, highlight=False)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def log(message: str, *, style: str | None = None) -> None:
    """Print one line on the main process, never broken by the console's width (a terminal wraps it itself;
    a log file or a pipe keeps a path or a message that a script greps for whole)."""
    if is_main_process():
        console.print(message, style=style, soft_wrap=True)


def warn(message: str) -> None:
    log(f"[yellow]warning:[/yellow] {message}")


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                    MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console, transient=False,
                    disable=not is_main_process() or os.environ.get("ITERATIVE_RLHF_NO_PROGRESS") == "1")


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a rich progress bar (main process only)."""
    if total is None and isinstance(items, Sequence):
        total = len(items)
    with _progress() as prog:
        task = prog.add_task(description, total=total)
        for item in items:
            yield item
            prog.advance(task)


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Any]:
    """Context manager yielding ``advance(n=1)`` for a progress bar."""
    with _progress() as prog:
        task = prog.add_task(description, total=total)
        yield lambda n=1: prog.advance(task, n)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Show a rich table on the main process."""
    if not is_main_process():
        return
    t = Table(title=title)
    for c in columns:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    console.print(t)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)
