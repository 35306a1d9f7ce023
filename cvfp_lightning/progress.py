"""What a long step shows while it runs: one progress utility on ``rich.progress``.

Every long loop of the package reports through :func:`task` (or :func:`track` over an
iterable): tokenisation, the sequential pass (iteration 0, the context cache), the context
cache's digest, the Top-K token loops and the runs of ``cvfp scaling`` / ``cvfp token-scaling``.
What it shows:

- stderr is a terminal: a rich live bar on stderr (description, bar, done/total with the
  unit, rate, elapsed, ETA). While Lightning's own rich bar is live, the task joins that
  display instead (rich's nested live displays), so the two never draw over each other.
  ``live=False`` (a task whose steps contain other bars, e.g. the runs of ``cvfp scaling``)
  prints the bar as one static line after every step instead.
- stderr is a file or a pipe: plain lines on stderr, when the task starts, every 10% and
  at least every 30 s, and when it ends (every step with ``live=False``), e.g.
  ``sequential pass: 4,096/12,288 tokens (33%), 5,210 tokens/s, elapsed 0:00:01, ETA 0:00:02``.
- only on rank 0 (Lightning's ``rank_zero_only.rank``), and nothing when switched off:
  ``cvfp`` sets the switch from ``trainer.enable_progress_bar`` (``--trainer.enable_progress_bar
  false``) and from the ``--progress`` option of ``cvfp scaling`` / ``cvfp token-scaling``;
  ``CVFP_PROGRESS=0`` turns it off where nothing sets it.

Rate and time left are rich's (``Task.speed`` and ``Task.time_remaining``, averaged from the
task's start). Nothing here touches tensors or draws random numbers, so no trained number
depends on whether progress is shown.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterable, Iterator, TypeVar

from lightning.fabric.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

LINE_EVERY_PERCENT = 10  # plain lines: one per 10% of the total ...
LINE_EVERY_S = 30.0  # ... and at least one per 30 s
SPEED_PERIOD_S = 1e9  # rate and ETA averaged over the whole task (rich keeps its last 1000 steps)

T = TypeVar("T")

_switch: bool | None = None  # None: CVFP_PROGRESS decides (default on)
_stderr_console: Console | None = None


# ---- the switch -------------------------------------------------------------------------------
def set_enabled(on: bool | None) -> None:
    """Show progress (True), show none (False), or leave it to ``CVFP_PROGRESS`` (None)."""
    global _switch
    _switch = on


def is_enabled() -> bool:
    """Whether this process shows progress: switched on and rank 0."""
    on = _switch if _switch is not None else os.environ.get("CVFP_PROGRESS", "1") != "0"
    return bool(on) and getattr(rank_zero_only, "rank", 0) == 0


@contextlib.contextmanager
def kept_switch() -> Iterator[None]:
    """Restore the switch on exit: a run that sets it leaves later code as it found it."""
    saved = _switch
    try:
        yield
    finally:
        set_enabled(saved)


@contextlib.contextmanager
def switched(on: bool | None) -> Iterator[None]:
    """The switch set to ``on`` inside the block, restored after it."""
    with kept_switch():
        set_enabled(on)
        yield


# ---- rendering ----------------------------------------------------------------------------------
def _number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 or float(x).is_integer() else f"{x:.3g}"


class RateColumn(ProgressColumn):
    """``5,210 tokens/s``: rich's speed estimate in the task's unit."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{_number(speed)} {task.fields.get('unit', '')}/s" if speed else "", style="progress.data.speed",
                    no_wrap=True)


def _columns() -> list[ProgressColumn]:
    return [TextColumn("[progress.description]{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"), RateColumn(), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn()]


def plain_line(task: Task) -> str:
    """One line of text for ``task`` (the non-terminal form of its bar)."""
    unit = task.fields.get("unit", "")
    line = f"{task.description}: {_number(task.completed)}"
    if task.total:
        line += f"/{_number(task.total)} {unit} ({100.0 * task.completed / task.total:.0f}%)"
    else:
        line += f" {unit}"
    speed = task.finished_speed or task.speed
    if speed:
        line += f", {_number(speed)} {unit}/s"
    line += f", elapsed {TimeElapsedColumn().render(task).plain}"
    if task.total and not task.finished and task.time_remaining is not None:
        line += f", ETA {TimeRemainingColumn().render(task).plain}"
    return line


def _console() -> Console:
    """Lightning's console while its rich bar is live (the task nests there), else one on stderr."""
    global _stderr_console
    from rich import get_console

    shared = get_console()
    if getattr(shared, "_live_stack", None):
        return shared
    if _stderr_console is None:
        _stderr_console = Console(stderr=True)
    return _stderr_console


# ---- tasks --------------------------------------------------------------------------------------
class ProgressTask:
    """A running task; call :meth:`advance` after each piece of work (in the task's unit).

    Created by :func:`task`; when progress is off (or on other ranks) every call is a no-op.
    """

    def __init__(self, description: str, total: float | None, unit: str, live: bool):
        self.mode = "off"
        if not is_enabled():
            return
        console = _console()
        terminal = console.is_terminal and not console.is_dumb_terminal
        self.mode = ("live" if live else "steps") if terminal else ("lines" if live else "every_step")
        self.console = console
        self.progress = Progress(*_columns(), console=console, disable=self.mode != "live",
                                 speed_estimate_period=SPEED_PERIOD_S, transient=False)
        self.task_id: TaskID = self.progress.add_task(description, total=total, unit=unit)
        self.progress.advance(self.task_id, 0)  # the first sample: the rate counts from here
        self._printed_at, self._printed_bucket, self._printed_done = 0.0, -1, None
        if self.mode == "live":
            self.progress.start()
        else:
            self._print()

    @property
    def task(self) -> Task:
        return self.progress.tasks[0]

    def advance(self, n: float = 1.0, description: str | None = None) -> None:
        """``n`` more units done (and a new description, if given)."""
        if self.mode == "off":
            return
        if description is not None:
            self.progress.update(self.task_id, description=description)
        self.progress.advance(self.task_id, n)
        if self.mode in ("steps", "every_step"):
            self._print()
        elif self.mode == "lines":
            task = self.task
            bucket = int(100.0 * task.completed / task.total // LINE_EVERY_PERCENT) if task.total else -1
            if bucket > self._printed_bucket or time.monotonic() - self._printed_at >= LINE_EVERY_S:
                self._print()

    def _print(self) -> None:
        task = self.task
        if self.mode == "steps":
            self.console.print(self.progress.make_tasks_table([task]))
        else:
            sys.stderr.write(plain_line(task) + "\n")
            sys.stderr.flush()
        self._printed_at, self._printed_done = time.monotonic(), task.completed
        if task.total:
            self._printed_bucket = int(100.0 * task.completed / task.total // LINE_EVERY_PERCENT)

    def close(self, failed: bool = False) -> None:
        if self.mode == "live":
            self.progress.stop()
        elif self.mode == "lines" and not failed and self._printed_done != self.task.completed:
            self._print()
        self.mode = "off"


@contextlib.contextmanager
def task(description: str, total: float | None = None, unit: str = "steps", live: bool = True
         ) -> Iterator[ProgressTask]:
    """A progress task for the block (see the module docstring).

    Args:
        description: what runs, e.g. ``"sequential pass"``.
        total: units of work in all (None: unknown, no percentage or ETA).
        unit: what ``advance`` counts (``"tokens"``, ``"samples"``, ``"runs"``).
        live: a live bar on a terminal; False prints one static line per step (for tasks whose
            steps show bars of their own).
    """
    bar = ProgressTask(description, total, unit, live)
    try:
        yield bar
    except BaseException:
        bar.close(failed=True)
        raise
    bar.close()


def track(iterable: Iterable[T], total: float | None = None, description: str = "working", unit: str = "steps",
          live: bool = True) -> Iterator[T]:
    """The items of ``iterable``, advancing a :func:`task` by one after each (``total``: its length)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with task(description, total, unit, live) as bar:
        for item in iterable:
            yield item
            bar.advance(1)
