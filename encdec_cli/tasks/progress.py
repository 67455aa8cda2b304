"""Progress display and summary line for long jobs (on stderr, so stdout stays clean)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class JobProgress:
    """Counts finished items and an amount (audio seconds or tokens) with its rate."""

    def __init__(self, name: str, total: int | None, quiet: bool = False, unit: str = "tokens"):
        self.console = Console(stderr=True)
        self.quiet, self.unit = quiet, unit
        self.files = 0
        self.amount = 0.0
        self.start = time.perf_counter()
        self._progress = Progress(
            TextColumn(f"[bold]{name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=quiet,
            transient=False,
        )
        self._task = self._progress.add_task(name, total=total, rate="")

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)

    def advance(self, files: int = 0, amount: float = 0.0) -> None:
        self.files += files
        self.amount += amount
        wall = max(time.perf_counter() - self.start, 1e-9)
        rate = (
            f"{self.amount:,.0f} {self.unit}, RTFx {self.amount / wall:,.1f}"
            if self.unit == "audio s"
            else f"{self.amount:,.0f} {self.unit}, {self.amount / wall:,.0f}/s"
        )
        self._progress.update(self._task, advance=files, rate=rate)

    def log(self, message: str) -> None:
        if not self.quiet:
            self._progress.console.print(message)

    def summary(self, message: str) -> None:
        self.console.print(message, highlight=False, soft_wrap=True)  # one line, also in logs
