"""Text-to-text jobs (summarize / translate / generate): table rows -> requests -> result column.

Rows stream from the input (``encdec_cli.io.tables``), through the engine, into a sink that
writes the output in input order, in parts, resumable: a re-run of the same command skips the
rows already done, and a finished job at once (a job reading stdin starts over). Bad rows (null,
empty, not UTF-8, too long with ``--no-truncate``) get an error in the output's ``error`` column
and the job goes on. Ctrl-C lets the part being written finish, saves the rows already done, and
exits with 130.

Finished rows, in whatever order the engine finishes them, are committed within
``ENCDEC_PART_ROWS`` rows (default 4096) and ``ENCDEC_FLUSH_SECONDS`` seconds (default 30): a
crash, even SIGKILL, loses at most the rows finished in the last 30 s, and at most 4096 rows.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
from transformers import AutoConfig, AutoTokenizer

from encdec_cli.engine import Engine, Request, Result
from encdec_cli.io.manifest import file_key
from encdec_cli.io.tables import Row, SinkOptions, TableError, open_sink, open_table
from encdec_cli.tasks.generation import decoder_prompt, sampling_params_from_generation_config
from encdec_cli.tasks.interrupts import InterruptGuard
from encdec_cli.tasks.outcome import ROWS, JobOutcome, stage_busy_note
from encdec_cli.tasks.progress import JobProgress
from encdec_models.loading import generation_config_of
from encdec_models.registry import resolve_model_path

TASK_COLUMNS = {"summarize": "summary", "translate": "translation", "generate": "generated"}
UNLIMITED = 1 << 30  # a tokenizer's "no limit" model_max_length is a huge sentinel
TABLE_OUTPUTS = {".parquet": ".parquet", ".pq": ".parquet", ".jsonl": ".jsonl", ".csv": ".csv"}


@dataclass(frozen=True)
class Seq2SeqOptions:
    task: str = "generate"  # summarize | translate | generate
    column: str = "text"  # input column
    output_column: str | None = None  # default: summary / translation / generated
    prefix: str | None = None  # prepended to each text; None: the model's task prefix (T5), else ""
    source_lang: str | None = None  # mBART-style language code of the inputs, e.g. en_XX
    target_lang: str | None = None  # mBART-style language code of the outputs (forced first token)
    truncate: bool = True  # cut inputs longer than the model's limit (counted); False: row error
    generation: dict = field(default_factory=dict)  # GenerationConfig-named overrides (None = keep)

    def __post_init__(self):
        if self.task not in TASK_COLUMNS:
            raise ValueError(f"unknown task {self.task!r}")

    @property
    def result_column(self) -> str:
        return self.output_column or TASK_COLUMNS[self.task]


def default_output(input_path: str, opts: Seq2SeqOptions) -> str:
    """Next to the input, with the task as a suffix: articles.parquet -> articles.summary.parquet."""
    if input_path == "-":
        return "-"
    p = Path(input_path)
    ext = TABLE_OUTPUTS.get(p.suffix.lower(), ".jsonl")  # .txt / .json / .ndjson -> JSON Lines
    return str(p.with_name(f"{p.stem}.{opts.result_column}{ext}"))


def _env_number(name: str, default: float, kind=int):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a number") from None
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return number


class LazyEngine:
    """The job's engine, loaded by ``load`` when first asked for (:meth:`get`): a re-run that finds every
    row done never loads the weights. ``loaded`` holds what a job needs before a row runs, read without
    the weights: the model's ``path`` (as the loader resolves it), ``config``, ``generation_config`` and
    ``tokenizer``, as an Engine's ``loaded`` does."""

    def __init__(self, path: str | os.PathLike, load: Callable[[], Engine]):
        self.path, self._load, self._engine = path, load, None

    @functools.cached_property
    def loaded(self) -> SimpleNamespace:
        path = resolve_model_path(self.path)
        config = AutoConfig.from_pretrained(path)
        return SimpleNamespace(
            path=path,
            config=config,
            generation_config=generation_config_of(path, config),
            tokenizer=AutoTokenizer.from_pretrained(path),
        )

    def get(self) -> Engine:
        if self._engine is None:
            self._engine = self._load()
        return self._engine


class TextEncoder:
    """Turns input texts into encoder token ids (prefix, language codes, truncation)."""

    def __init__(self, loaded: SimpleNamespace, opts: Seq2SeqOptions):
        self.tok = loaded.tokenizer
        cfg = loaded.config
        task_params = (getattr(cfg, "task_specific_params", None) or {}).get(
            "summarization" if opts.task == "summarize" else "", {}
        )
        self.prefix = opts.prefix if opts.prefix is not None else task_params.get("prefix", "")
        if opts.source_lang:
            self._check_lang(opts.source_lang, "--source-lang")
            self.tok.src_lang = opts.source_lang
        self.max_len: int | None = None  # see fit()
        self.truncate = opts.truncate
        self.truncated = 0

    def fit(self, max_source_len: int) -> None:
        """Inputs longer than this or the tokenizer's limit are cut (or are errors, ``truncate=False``)."""
        limits = [max_source_len, getattr(self.tok, "model_max_length", None)]
        limits = [x for x in limits if x and x < UNLIMITED]
        self.max_len = min(limits) if limits else None

    def _check_lang(self, code: str, flag: str) -> int:
        tid = self.tok.convert_tokens_to_ids(code)
        if tid is None or tid == self.tok.unk_token_id:
            raise ValueError(f"{flag} {code!r} is not a language code of this model's tokenizer")
        return tid

    def encode(self, text: str) -> list[int]:
        ids = self.tok(self.prefix + text, add_special_tokens=True)["input_ids"]
        if self.max_len and len(ids) > self.max_len:
            if not self.truncate:
                raise ValueError(
                    f"input is {len(ids)} tokens, the model takes {self.max_len} (--truncate cuts it)"
                )
            self.truncated += 1
            ids = ids[: self.max_len - 1] + ids[-1:]  # keep the closing special token (</s>)
        return ids


def run_seq2seq(
    engine: LazyEngine,
    input_path: str,
    output: str | None,
    opts: Seq2SeqOptions,
    quiet: bool = False,
    overwrite: bool = False,
    retry_failed: bool = False,
) -> int:
    """Run the job; returns the exit status (:meth:`JobOutcome.exit_code`).

    Raises ValueError / :class:`TableError` for usage errors (bad option, unreadable input,
    missing column), before any row runs. The engine loads only when some row must run."""
    enc = TextEncoder(engine.loaded, opts)
    gen = engine.loaded.generation_config
    prompt = decoder_prompt(gen, engine.loaded.config)
    overrides = dict(opts.generation)
    if opts.target_lang:
        overrides["forced_bos_token_id"] = enc._check_lang(opts.target_lang, "--target-lang")
    params = sampling_params_from_generation_config(gen, len(prompt), overrides)
    output = output or default_output(input_path, opts)
    if input_path != "-" and output != "-" and Path(output).resolve() == Path(input_path).resolve():
        raise TableError(f"the output {output} would overwrite the input; choose another -o/--output")
    part_rows = _env_number("ENCDEC_PART_ROWS", 4096)
    flush_s = _env_number("ENCDEC_FLUSH_SECONDS", 30.0, float)
    src = open_table(input_path, opts.column)
    stdin = input_path == "-"
    try:
        sink_options = SinkOptions(
            result_columns=[opts.result_column],
            input_schema=src.arrow_schema,
            result_types={opts.result_column: pa.list_(pa.string())}
            if params.num_return_sequences > 1
            else None,
            job_key=None if stdin else f"{file_key(input_path)}|{opts}|{engine.loaded.path}",
            # stdin cannot be told apart from another stdin: no resume; --overwrite starts afresh
            resume=not stdin and not overwrite,
            part_rows=part_rows,
            flush_interval_s=flush_s,
        )
        sink = open_sink(output, options=sink_options)
    except BaseException:
        src.close()
        raise
    done = sink.done_row_ids()
    failed_before = len(sink.failed_row_ids())
    if retry_failed:  # rows that failed in an earlier run are redone; their new result replaces the error
        done = done.difference(sink.failed_row_ids())
        failed_before = 0
    finished = sink.finished and done == sink.done_row_ids()  # and no failed row to retry
    try:  # the weights load only when some row must run
        running = None if finished else engine.get()
    except BaseException:  # a stop signal while the model loads ends the command before the job began
        sink.close()
        src.close()
        raise
    rows: dict[int, Row] = {}
    failed = skipped = 0
    progress = JobProgress(opts.task, total=src.num_rows, quiet=quiet, unit="tokens")
    guard = InterruptGuard()

    def requests() -> Iterator[Request]:
        nonlocal failed, skipped
        for row in src:
            if row.row_id in done:
                skipped += 1
                progress.advance(files=1)
                continue
            error = row.error
            if error is None:
                try:
                    ids = enc.encode(row.text)
                except ValueError as e:  # too long with --no-truncate
                    error = str(e)
                except Exception as e:  # the tokenizer rejects it: the row's error, never the job's
                    error = f"cannot tokenize this text ({type(e).__name__}: {e})"
            if error is not None:
                with guard.protect():  # the write and its count: a stop signal waits for both
                    sink.write_row(row, error=error)
                    failed += 1
                    progress.advance(files=1)
                continue
            rows[row.row_id] = row
            yield Request(ids, list(prompt), params, row.row_id)

    def decode(token_ids: list[int]) -> str:
        return enc.tok.decode(token_ids, skip_special_tokens=True).strip()

    def on_result(r: Result) -> None:
        nonlocal failed
        row = rows.pop(r.request_id)
        with guard.protect():  # the write and its count: a stop signal waits for both
            if r.error:
                failed += 1
                sink.write_row(row, error=r.error)
            else:
                value = (
                    [decode(c.token_ids) for c in r.completions]
                    if params.num_return_sequences > 1
                    else decode(r.token_ids)
                )
                sink.write_row(row, {opts.result_column: value})
            progress.advance(files=1, amount=sum(len(c.token_ids) for c in r.completions))

    start = time.perf_counter()
    interrupted = False
    with guard.installed():
        try:
            if finished:  # an earlier run did every row: nothing to read or run
                skipped = len(done)
                progress.advance(files=skipped)
            else:
                enc.fit(running.max_source_len)
                with progress:
                    for result in running.generate(requests()):
                        on_result(result)
            with guard.protect():
                sink.finalize(expected_rows=None if finished else src.rows_read)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            guard.stopping()  # from here on a Ctrl-C does not cut the saving short
            sink.close()
            src.close()
    details = [f"{enc.truncated} input(s) truncated to {enc.max_len} tokens"] if enc.truncated else []
    if running:
        details += stage_busy_note(running.stats)
    oom = running.stats.oom_recoveries if running else 0
    if oom:
        details.append(
            f"{oom} out-of-memory recoveries (now at most {running.max_num_seqs} sequences per step)"
        )
    outcome = JobOutcome(
        opts.task,
        ROWS,
        done=progress.files - skipped - failed,
        failed=failed,
        failed_before=failed_before,
        skipped=skipped,
        amount=progress.amount,
        wall=time.perf_counter() - start,
        output=None if output == "-" else output,
        interrupted=interrupted,
        details=details,
    )
    progress.summary(outcome.summary())
    return outcome.exit_code()
