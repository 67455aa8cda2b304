"""``--summary-json FILE``: what a command did, as one JSON object, for pipelines to read instead of
parsing stderr.

The command wrapper (``commands/common.py``) opens a report when a command starts (:func:`begin`)
and writes it when the command ends (:func:`finish`), however it ends: done, items failed, a usage or
I/O fault, or a stop signal. A job adds what it did with :func:`record` (its :class:`JobOutcome`,
its engine's statistics, fields of its own). The file is committed atomically
(``encdec_cli.io.atomic``): a reader sees the whole summary or none.

The object (``"schema": 1``; README.md, "Summary JSON"):

- ``command``, ``status`` (ok | items_failed | interrupted | usage_error | io_error | error),
  ``exit_code``, ``error`` (the fault that ended the command, else null), ``started_at`` and
  ``finished_at`` (UTC, ISO 8601), ``wall_seconds``;
- ``counts``: ``done``, ``failed``, ``skipped`` (finished in an earlier run), ``failed_before``
  (of those, failed then); ``failures``: ``[{"item", "error"}]``; ``warnings``: ``[{"item",
  "warning"}]``; ``notes``; ``output``;
- the work: ``audio_seconds`` (transcribe) or ``tokens`` (text jobs), and ``throughput``:
  ``{"unit": "rtfx" | "tokens_per_second", "value"}``;
- ``engine``: every field of the engine's ``EngineStats`` (null when no engine ran);
- fields of the command's own (``eval``: its scores).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from encdec_cli import errors
from encdec_cli.errors import UsageError
from encdec_cli.tasks import interrupts

SCHEMA = 1
STATUS = {errors.OK: "ok", errors.ITEMS_FAILED: "items_failed", errors.USAGE: "usage_error",
          errors.IO_FAILURE: "io_error", 130: "interrupted", 143: "interrupted"}  # fmt: skip


def _utc(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(value: Any) -> Any:
    """JSON-safe: dataclasses as dicts, tuples as lists, non-finite floats as null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def engine_stats(engine: Any) -> dict | None:
    """All fields of ``engine.stats`` (an ``EngineStats``) as a dict, or None without an engine; with
    the KV cache's value dtype (``kv_dtype``: "bfloat16", "fp8_e4m3", ...; a data-parallel job's
    ranks: the option, "auto" or "fp8")."""
    stats = getattr(engine, "stats", None) if engine is not None else None
    if stats is None:
        return None
    out = _plain(stats)
    kv = getattr(engine, "kv_dtype_name", None)
    if kv is None:  # data-parallel ranks: the option they were started with
        kv = dict(getattr(getattr(engine, "spec", None), "config", ())).get("kv_dtype", "auto")
    out["kv_dtype"] = kv
    return out


class Report:
    """One command's summary, filled as it runs and written once at its end."""

    def __init__(self, path: str | os.PathLike, command: str):
        self.path, self.command = Path(path), command
        if self.path.is_dir():
            raise UsageError(f"--summary-json {path} is a folder; name a file, e.g. {path}/summary.json")
        self.started = time.time()
        self._clock = time.perf_counter()
        self.fields: dict[str, Any] = {}

    def record(self, outcome=None, engine=None, **fields) -> None:
        """What the job did: its ``JobOutcome``, the ``Engine`` it ran (its ``stats``), more fields."""
        if outcome is not None:
            self.fields.update(outcome.as_dict())
        if engine is not None:
            self.fields["engine"] = engine_stats(engine)
        self.fields.update(fields)

    def as_dict(self, exit_code: int, error: str | None = None) -> dict:
        wall = time.perf_counter() - self._clock
        head = {
            "schema": SCHEMA,
            "command": self.command,
            "status": STATUS.get(exit_code, "error"),
            "exit_code": exit_code,
            "error": error,
            "started_at": _utc(self.started),
            "finished_at": _utc(self.started + wall),
            "wall_seconds": round(wall, 6),
            "counts": {"done": 0, "failed": 0, "skipped": 0, "failed_before": 0},
            "failures": [],
            "warnings": [],
            "notes": [],
            "output": None,
            "engine": None,
        }
        return _plain({**head, **self.fields, "exit_code": exit_code, "error": error})

    def write(self, exit_code: int, error: str | None = None) -> None:
        from encdec_cli.io.atomic import atomic_write_text

        text = json.dumps(self.as_dict(exit_code, error), indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(self.path, text)


_active: Report | None = None


def begin(path: str | os.PathLike | None, command: str) -> Report | None:
    """Start the report of ``command`` (None: no --summary-json given)."""
    global _active
    _active = None if path is None else Report(path, command)
    return _active


def record(outcome=None, engine=None, **fields) -> None:
    """Add to the running command's report, if it has one (see :meth:`Report.record`)."""
    if _active is not None:
        _active.record(outcome, engine, **fields)


def finish(exit_code: int, error: str | None = None) -> None:
    """Write the running command's report, if it has one; a stop signal meanwhile is only noted (the
    command's outcome is decided). Raises OSError when it cannot be written."""
    global _active
    with interrupts.noted_only():
        report, _active = _active, None
        if report is not None:
            report.write(exit_code, error)
