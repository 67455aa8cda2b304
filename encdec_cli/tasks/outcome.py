"""What a job did, in one shape for both jobs (text rows and audio files): its exit status and the
summary line it prints at the end.

Exit status (README.md, "Exit status"): 0 all done; 1 some items failed, in this run or in an
earlier one (skipped now), or an input matched nothing; 130 after Ctrl-C, 143 after SIGTERM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from encdec_cli import errors
from encdec_cli.tasks import interrupts


@dataclass(frozen=True)
class Wording:
    """How a job's summary names its items and its amount of work; ``str.format`` templates over the
    :class:`JobOutcome` fields (and ``rate``: the amount per second)."""

    head: str
    skipped: str
    failed_before: str
    failed: str
    items: str  # the items, after a number


ROWS = Wording(  # a text job: table rows, tokens generated
    head="{name}: {done} row(s) done, {amount:,.0f} tokens in {wall:.1f} s ({rate:,.0f} tok/s)",
    skipped="{skipped} row(s) already done in an earlier run (skipped)",
    failed_before="{failed_before} row(s) failed in an earlier run (see the 'error' column)",
    failed="{failed} row(s) FAILED (see the 'error' column)",
    items="row(s)",
)
FILES = Wording(  # a transcribe job: audio files, seconds of audio transcribed
    head="transcribed {done} file(s), {minutes:.1f} min of audio in {wall:.1f} s (RTFx {rate:.1f})",
    skipped="{skipped} already done or failed before (skipped; --overwrite / --retry-failed redo them)",
    failed_before="{failed_before} of them FAILED in an earlier run (see the manifest)",
    failed="{failed} FAILED",
    items="file(s)",
)


def _listed(pairs: list[tuple[str, str]], limit: int) -> str:
    return "; ".join(f"{n}: {m}" for n, m in pairs[:limit]) + (" ..." if len(pairs) > limit else "")


@dataclass
class JobOutcome:
    """The counts of one run of a job. ``skipped`` items were finished (done or failed) in an earlier
    run; ``failed_before`` of them failed then."""

    name: str  # the command: summarize, translate, generate, transcribe
    wording: Wording
    done: int = 0  # items done in this run
    failed: int = 0  # items that failed in this run
    failed_before: int = 0
    skipped: int = 0
    amount: float = 0.0  # work done: tokens generated, seconds of audio transcribed
    wall: float = 0.0  # seconds
    output: str | None = None  # where the results went, named in the summary (None: stdout)
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM (interrupts.exit_status says which)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (item, error), listed when given
    warnings: list[tuple[str, str]] = field(default_factory=list)  # (item, warning) of items done
    details: list[str] = field(default_factory=list)  # more clauses of the job's own
    notes: list[str] = field(default_factory=list)  # inputs that matched nothing: exit status 1

    def exit_code(self) -> int:
        if self.interrupted:
            return interrupts.exit_status()
        return errors.ITEMS_FAILED if self.failed or self.failed_before or self.notes else errors.OK

    def summary(self) -> str:
        """The warnings about inputs, a line each, then one line: counts, amount, rate, what failed."""
        w = self.wording
        values = {**vars(self), "rate": self.amount / max(self.wall, 1e-9), "minutes": self.amount / 60}
        line = w.head.format(**values)
        if self.output is not None and not self.interrupted:
            line += f" -> {self.output}"
        clauses = [w.skipped.format(**values)] if self.skipped else []
        clauses += [w.failed_before.format(**values)] if self.failed_before else []
        if self.warnings:
            clauses.append(f"{len(self.warnings)} warning(s): {_listed(self.warnings, 3)}")
        clauses += self.details
        if self.failed:
            listed = f": {_listed(self.failures, 5)}" if self.failures else ""
            clauses.append(w.failed.format(**values) + listed)
        if self.notes:
            clauses.append(f"{len(self.notes)} input(s) matched nothing (see the warning above)")
        if self.interrupted:
            by = " by SIGTERM" if interrupts.exit_status() == 143 else ""
            n = self.done + self.failed
            clauses.append(f"INTERRUPTED{by} after {n} {w.items} (re-run the same command to resume)")
        line = "; ".join([line, *clauses])
        return "\n".join([f"warning: {note}" for note in self.notes] + [line])


def stage_busy_note(stats) -> list[str]:
    """A summary clause with each pipeline stage's busy seconds (none with one stage): a stage far
    busier than the others shows a bad split (--pp-layers)."""
    busy = stats.stage_busy_seconds
    if len(busy) < 2:
        return []
    return ["pipeline stages busy " + " / ".join(f"{b:.1f}" for b in busy) + " s"]
