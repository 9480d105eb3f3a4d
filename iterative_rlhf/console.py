"""The one place that owns console output: a rich console, progress bars and tables.

Library code calls :func:`log`, :func:`progress` and :func:`table` instead of
``print``. Output happens on the main process only (RANK 0 or no RANK).

Progress bars open while another is live join its display as one more row
(rich allows one live display at a time). A worker process started by
:mod:`iterative_rlhf.workers` sends its lines and bars to the parent, which
shows them (:func:`forward_to`, :func:`show`).
"""

from __future__ import annotations

import io
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
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

#: In a worker process: where its output goes instead of the terminal (the parent shows it).
_forward: Callable[[tuple], None] | None = None
#: The live progress display and how many bars use it; guarded by _lock (bars open from several threads).
_live: list[Any] = [None, 0]
_lock = threading.RLock()
_ids = itertools.count()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def log(message: str, *, style: str | None = None) -> None:
    """Print one line on the main process, never broken by the console's width (a terminal wraps it itself;
    a log file or a pipe keeps a path or a message that a script greps for whole)."""
    if _forward is not None:
        _forward(("log", message, style))
    elif is_main_process():
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
    with progress(description, total) as advance:
        for item in items:
            yield item
            advance()


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Any]:
    """Context manager yielding ``advance(n=1)`` for a progress bar.

    A bar opened while another is live becomes one more row of the same display, which stops when its last bar
    closes (finished rows stay on screen).
    """
    if _forward is not None:
        send, key = _forward, next(_ids)
        send(("open", key, description, total))
        try:
            yield lambda n=1: send(("advance", key, n))
        finally:
            send(("close", key))
        return
    with _lock:
        if _live[0] is None:
            _live[0] = _progress()
            _live[0].start()
        prog = _live[0]
        _live[1] += 1
        task = prog.add_task(description, total=total)
    try:
        yield lambda n=1: prog.advance(task, n)
    finally:
        with _lock:
            _live[1] -= 1
            if not _live[1]:
                prog.stop()
                _live[0] = None


def forward_to(send: Callable[[tuple], None] | None) -> None:
    """In a worker process: send every log line and progress event to ``send`` (None: print them again)."""
    global _forward
    _forward = send


def show(events: Iterable[tuple]) -> None:
    """Show a worker's forwarded output (:func:`forward_to`) here, in the order it was sent."""
    bars: dict[Any, tuple[Any, Any]] = {}
    try:
        for event in events:
            what = event[0]
            if what == "log":
                log(event[1], style=event[2])
            elif what == "open":
                cm = progress(event[2], event[3])
                bars[event[1]] = (cm, cm.__enter__())
            elif what == "advance" and event[1] in bars:
                bars[event[1]][1](event[2])
            elif what == "close" and event[1] in bars:
                bars.pop(event[1])[0].__exit__(None, None, None)
    finally:
        for cm, _ in bars.values():
            cm.__exit__(None, None, None)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Show a rich table on the main process."""
    if not is_main_process() and _forward is None:
        return
    t = Table(title=title)
    for c in columns:
        t.add_column(str(c))
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    if _forward is not None:  # a worker: the parent prints the rendered text
        text = Console(file=io.StringIO(), width=console.width, highlight=False, force_terminal=False)
        text.print(t)
        _forward(("log", text.file.getvalue().rstrip("\n"), None))
        return
    console.print(t)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)
