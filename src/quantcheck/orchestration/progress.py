"""Live progress on the terminal: a bar with count and ETA per phase, a line per event."""

from __future__ import annotations

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
        elif kind == "advance" and self._task is not None:
            self.progress.advance(self._task, int(event.get("count", 1)))
        elif kind == "loaded":
            self.line(f"{self._label}: loaded in {float(event['seconds']):.1f} s")
        elif kind == "warning":
            self.line(f"[yellow]warning[/yellow] {escape(str(event['message']))}")

    def _finish_task(self) -> None:
        if self._task is not None:
            task = self.progress.tasks[self._task]
            self.progress.update(self._task, completed=task.total)

    def line(self, text: str) -> None:
        self.progress.console.print(text)

    def skipped(self, label: str, why: str) -> None:
        self.line(f"[dim]{escape(label)}: skipped ({escape(why)})[/dim]")

    def failed(self, label: str, message: str) -> None:
        self.console.quiet = False
        # one line however narrow the terminal: a log or a grep sees the whole message
        self.progress.console.print(f"[red]{escape(label)} failed[/red]: {escape(message)}", soft_wrap=True)
        self.console.quiet = self.quiet
