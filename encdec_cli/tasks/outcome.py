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
    amount_key: str  # the amount's name in the summary JSON (encdec_cli.tasks.summary)
    rate_unit: str  # the rate's unit there


ROWS = Wording(  # a text job: table rows, tokens generated
    head="{name}: {done} row(s) done, {amount:,.0f} tokens in {wall:.1f} s ({rate:,.0f} tok/s)",
    skipped="{skipped} row(s) already done in an earlier run (skipped)",
    failed_before="{failed_before} row(s) failed in an earlier run (see the 'error' column)",
    failed="{failed} row(s) FAILED (see the 'error' column)",
    items="row(s)",
    amount_key="tokens",
    rate_unit="tokens_per_second",
)
FILES = Wording(  # a transcribe job: audio files, seconds of audio transcribed
    head="transcribed {done} file(s), {minutes:.1f} min of audio in {wall:.1f} s (RTFx {rate:.1f})",
    skipped="{skipped} already done or failed before (skipped; --overwrite / --retry-failed redo them)",
    failed_before="{failed_before} of them FAILED in an earlier run (see the manifest)",
    failed="{failed} FAILED",
    items="file(s)",
    amount_key="audio_seconds",
    rate_unit="rtfx",
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
    faults: list[str] = field(default_factory=list)  # the job's processes failed (a rank died): status 1

    @classmethod
    def combined(cls, outcomes: list[JobOutcome]) -> JobOutcome:
        """The outcome of a job whose ranks had ``outcomes`` (torchrun): counts, amounts and lists
        added up, the longest wall time, the job's notes once."""
        first = outcomes[0]
        joined = {
            name: sum(getattr(o, name) for o in outcomes)
            for name in ("done", "failed", "failed_before", "skipped", "amount")
        }
        for name in ("failures", "warnings", "faults"):
            joined[name] = [x for o in outcomes for x in getattr(o, name)]
        for name in ("notes", "details"):  # the same on every rank
            joined[name] = list(dict.fromkeys(x for o in outcomes for x in getattr(o, name)))
        return cls(
            first.name,
            first.wording,
            wall=max(o.wall for o in outcomes),
            output=first.output,
            interrupted=any(o.interrupted for o in outcomes),
            **joined,
        )

    def exit_code(self) -> int:
        if self.interrupted:
            return interrupts.exit_status()
        return (
            errors.ITEMS_FAILED
            if self.failed or self.failed_before or self.notes or self.faults
            else errors.OK
        )

    def as_dict(self) -> dict:
        """The counts, failures, work and rate, as the summary JSON holds them
        (encdec_cli.tasks.summary)."""
        w = self.wording
        return {
            "counts": {
                "done": self.done,
                "failed": self.failed,
                "skipped": self.skipped,
                "failed_before": self.failed_before,
            },
            "failures": [{"item": item, "error": error} for item, error in self.failures],
            "warnings": [{"item": item, "warning": warning} for item, warning in self.warnings],
            "notes": list(self.notes),
            "details": list(self.details),
            "interrupted": self.interrupted,
            "output": self.output,
            "job_seconds": self.wall,
            w.amount_key: self.amount,
            "throughput": {"unit": w.rate_unit, "value": self.amount / max(self.wall, 1e-9)},
        }

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
        if self.faults:
            clauses.append(f"{len(self.faults)} process fault(s) (see the warning above)")
        if self.interrupted:
            by = " by SIGTERM" if interrupts.exit_status() == 143 else ""
            n = self.done + self.failed
            clauses.append(f"INTERRUPTED{by} after {n} {w.items} (re-run the same command to resume)")
        line = "; ".join([line, *clauses])
        return "\n".join([f"warning: {note}" for note in self.notes + self.faults] + [line])


def prefix_cache_details(stats) -> list[str]:
    """The summary clause about the engine's prefix cache (``EngineStats``), when it saved work:
    encoder inputs reused, the encoder time that saved (an estimate), entries evicted."""
    hits, misses = stats.prefix_cache_hits, stats.prefix_cache_misses
    if not hits and not stats.prefix_cache_prompt_tokens:
        return []
    clause = (
        f"prefix cache: {hits} of {hits + misses} encoder runs reused "
        f"(~{stats.encoder_seconds_saved:.1f} s of encoder time saved"
    )
    if stats.prefix_cache_prompt_tokens:
        clause += f", {stats.prefix_cache_prompt_tokens} prompt tokens"
    if stats.prefix_cache_evictions:
        clause += f", {stats.prefix_cache_evictions} entries evicted"
    return [clause + ")"]


def stage_busy_note(stats) -> list[str]:
    """A summary clause with each pipeline stage's busy seconds (none with one stage): a stage far
    busier than the others shows a bad split (--pp-layers)."""
    busy = stats.stage_busy_seconds
    if len(busy) < 2:
        return []
    return ["pipeline stages busy " + " / ".join(f"{b:.1f}" for b in busy) + " s"]
