"""Progress display for long jobs (on stderr, so stdout stays clean).

On a terminal: a live bar with items done, the work measure, elapsed time and an ETA. Elsewhere (a
log file, a pipe, a batch scheduler): the same status as a plain line every
``ENCDEC_PROGRESS_SECONDS`` (default 5) seconds, never a redraw. ``quiet``: nothing but summaries.
"""

from __future__ import annotations

import os
import threading
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Column

PLAIN_LINE_SECONDS = 5.0  # seconds between plain progress lines when stderr is not a terminal


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class JobProgress:
    """Counts finished items and an amount of work done: audio seconds transcribed (``unit``
    "audio s") or tokens generated, with its rate and an ETA.

    The ETA comes from the work planned so far (``advance(planned=, started=)``: audio read ahead
    and the items it belongs to) and, for the items not begun, the mean work per item begun; a job
    that plans nothing gets its ETA from the items finished.
    Safe to call from several threads."""

    def __init__(
        self, name: str, total: int | None, quiet: bool = False, unit: str = "tokens", items: str = "items"
    ):
        self.console = Console(stderr=True)
        self.name, self.total, self.quiet, self.unit, self.items = name, total, quiet, unit, items
        self.approximate = False  # ``total`` is an estimate (see estimate_total)
        self.files = 0  # items finished: done, failed or skipped
        self.skipped = 0  # of those, skipped (done in an earlier run)
        self.amount = 0.0  # work done
        self.planned = 0.0  # work known ahead (audio read), where the job tracks it
        self.planned_items = 0  # items begun, whose work is (partly) known
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._plain = not quiet and not self.console.is_terminal
        self._interval = float(os.environ.get("ENCDEC_PROGRESS_SECONDS", PLAIN_LINE_SECONDS))
        self._last_line = self.start
        self._progress = Progress(
            TextColumn(f"[bold]{name}", table_column=Column(min_width=len(name), no_wrap=True)),
            BarColumn(bar_width=20, table_column=Column(min_width=20)),
            TextColumn("{task.fields[status]}", table_column=Column(no_wrap=True, ratio=1)),
            console=self.console,
            expand=True,  # the status takes the width left, the bar keeps its own
            disable=quiet or self._plain,
            transient=False,
        )
        self._task = self._progress.add_task(name, total=None, status="")

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        self._progress.__exit__(*exc)

    def advance(self, files: int = 0, amount: float = 0.0, planned: float = 0.0, started: int = 0) -> None:
        """``files`` items finished, ``amount`` more work done; ``planned`` more work known to come
        (negative: planned work that will not be done), ``started`` more items begun."""
        with self._lock:
            self.files += files
            self.amount += amount
            self.planned += planned
            self.planned_items += started
            self._refresh()

    def estimate_total(self, total: int) -> None:
        """An estimate of the number of items, where it is not known up front (lines of a text
        file): shown as ``~N`` and used for the ETA; never below the items already finished."""
        with self._lock:
            if self.total is None:
                self.total, self.approximate = max(total, self.files), True

    def skip(self, files: int = 1) -> None:
        """``files`` items finished in an earlier run: no work, and no part of the ETA."""
        with self._lock:
            self.files += files
            self.skipped += files
            self._refresh()

    def fraction(self) -> float | None:
        """The estimated fraction of the job done, None while it cannot be estimated."""
        total = None if self.total is None else max(self.total, self.files) - self.skipped
        if self.planned_items:
            unread = None if total is None else max(total - self.planned_items, 0)
            if unread is None:
                return None
            work = self.planned + unread * self.planned / self.planned_items
            return min(self.amount / work, 1.0) if work > 0 else None
        done = self.files - self.skipped
        return done / total if total else None

    def status(self) -> str:
        """One line: items, ETA, work, rate and elapsed time (the first parts fit 80 columns)."""
        wall = max(time.perf_counter() - self.start, 1e-9)
        frac = self.fraction()
        eta = None if not frac else wall * (1 - frac) / frac
        parts = [
            f"{self.files}/{self._total_text()} {self.items}",
            f"ETA {'?' if eta is None else _clock(eta)}",
        ]
        if self.unit == "audio s":
            parts.append(f"audio {_clock(self.amount)}/{_clock(self.planned)} transcribed")
            parts.append(f"RTFx {self.amount / wall:,.1f}")
        else:
            parts.append(f"{self.amount:,.0f} {self.unit} ({self.amount / wall:,.0f}/s)")
        parts.append(f"{_clock(wall)} elapsed")
        return ", ".join(parts)

    def _total_text(self) -> str:
        if self.total is None:
            return "?"
        return f"~{max(self.total, self.files)}" if self.approximate else str(self.total)

    def _refresh(self) -> None:
        if self.quiet:
            return
        status = self.status()
        if self._plain:
            now = time.perf_counter()
            if now - self._last_line >= self._interval:
                self._last_line = now
                self.console.print(f"{self.name}: {status}", highlight=False, markup=False, soft_wrap=True)
            return
        frac = self.fraction()
        self._progress.update(
            self._task, total=None if frac is None else 1.0, completed=frac or 0.0, status=status
        )

    def log(self, message: str) -> None:
        """A line above the bar (rich markup; escape file names)."""
        if not self.quiet:
            self._progress.console.print(message, highlight=False, soft_wrap=True)

    def summary(self, message: str) -> None:
        """A line printed even when quiet (plain text)."""
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)  # one line, also in logs
