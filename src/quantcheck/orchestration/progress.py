"""Live progress on the terminal: a bar with count and ETA per phase, a line per event. Without a terminal (a log,
CI), a line per phase as it starts and then one every tenth of it or every 30 s, with the elapsed time and the ETA."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class ProgressView:
    """Renders worker events; `quiet` keeps only errors (for scripts)."""

    LOG_EVERY_S = 30.0
    """Without a terminal, the longest silence within a phase."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet)
        self.progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            disable=quiet,
        )
        self._task: TaskID | None = None
        self._label = ""
        self._reported = (0, 0.0)  # without a terminal: the tenths of the phase reported, when the last line was

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start_job(self, label: str) -> None:
        self._label = label
        self._task = None

    def handle(self, event: dict[str, object]) -> None:
        kind = event["event"]
        if kind == "phase" and "total" in event:
            self._finish_task()
            description = f"{self._label} {event['phase']}"
            self._task = self.progress.add_task(
                description, total=int(event["total"]), completed=int(event.get("done", 0))
            )
            if not self.console.is_terminal:  # logs get no live bars: say when each phase starts
                self.line(f"{description}: {event.get('done', 0)}/{event['total']} done, starting")
                self._reported = (0, time.monotonic())
        elif kind == "advance" and self._task is not None:
            self.progress.advance(self._task, int(event.get("count", 1)))
            if not self.console.is_terminal:
                self._log_progress()
        elif kind == "loaded":
            self.line(f"{self._label}: loaded in {float(event['seconds']):.1f} s")
        elif kind == "warning":
            self.line(f"[yellow]warning[/yellow] {escape(str(event['message']))}")

    def _log_progress(self) -> None:
        """A line when the phase passes another tenth of its work or LOG_EVERY_S went by since the last line."""
        task = self.progress.tasks[self._task]
        tenths = int(10 * task.completed / task.total) if task.total else 10
        reported, at = self._reported
        if tenths <= reported and time.monotonic() - at < self.LOG_EVERY_S:
            return
        self._reported = (max(tenths, reported), time.monotonic())
        remaining = task.time_remaining
        if task.completed >= task.total:
            eta = "finished"
        else:
            eta = f"eta {remaining:.0f} s" if remaining is not None else "eta not known yet"
        self.line(
            f"{escape(task.description)}: {task.completed:.0f}/{task.total:.0f} done, {task.elapsed or 0:.0f} s, {eta}"
        )

    def _finish_task(self) -> None:
        if self._task is not None:
            task = self.progress.tasks[self._task]
            self.progress.update(self._task, completed=task.total)

    def line(self, text: str) -> None:
        self.progress.console.print(text, soft_wrap=True)  # one line in a log: a terminal wraps it itself

    def skipped(self, label: str, why: str) -> None:
        self.line(f"[dim]{escape(label)}: skipped ({escape(why)})[/dim]")

    def failed(self, label: str, message: str) -> None:
        self.console.quiet = False
        # one line however narrow the terminal: a log or a grep sees the whole message
        self.progress.console.print(f"[red]{escape(label)} failed[/red]: {escape(message)}", soft_wrap=True)
        self.console.quiet = self.quiet
