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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
from transformers import AutoConfig, AutoTokenizer

from encdec_cli.engine import Engine, Request, Result, SamplingParams
from encdec_cli.errors import UsageError
from encdec_cli.io.manifest import file_key
from encdec_cli.io.tables import Row, SinkOptions, TableError, open_sink, open_table
from encdec_cli.io.tables.sources import missing_column
from encdec_cli.tasks import summary
from encdec_cli.tasks.data_parallel import DataParallel, RunReport, chunks
from encdec_cli.tasks.distributed import Distributed
from encdec_cli.tasks.generation import decoder_prompt, sampling_params_from_generation_config
from encdec_cli.tasks.interrupts import InterruptGuard
from encdec_cli.tasks.languages import example_code, language_codes, language_token_id
from encdec_cli.tasks.outcome import ROWS, JobOutcome, prefix_cache_details, stage_busy_note
from encdec_cli.tasks.progress import JobProgress
from encdec_cli.tasks.ranks import UnitRequests
from encdec_models.loading import generation_config_of
from encdec_models.registry import check_tokenizer, resolve_model_path

TASK_COLUMNS = {"summarize": "summary", "translate": "translation", "generate": "generated"}
UNLIMITED = 1 << 30  # a tokenizer's "no limit" model_max_length is a huge sentinel
TABLE_OUTPUTS = {
    ".parquet": ".parquet",
    ".pq": ".parquet",
    ".arrow": ".parquet",
    ".jsonl": ".jsonl",
    ".csv": ".csv",
}


@dataclass(frozen=True)
class Seq2SeqOptions:
    task: str = "generate"  # summarize | translate | generate
    column: str = "text"  # input column
    output_column: str | None = None  # default: summary / translation / generated
    prefix: str | None = None  # prepended to each text; None: the model's task prefix (T5), else ""
    source_lang: str | None = None  # language code of the inputs: en_XX (mBART), eng_Latn (NLLB), en (M2M100)
    target_lang: str | None = None  # language code of the outputs (forced first token)
    target_lang_column: str | None = None  # input column with each row's target language code
    truncate: bool = True  # cut inputs longer than the model's limit (counted); False: row error
    generation: dict = field(default_factory=dict)  # GenerationConfig-named overrides (None = keep)

    def __post_init__(self):
        if self.task not in TASK_COLUMNS:
            raise ValueError(f"unknown task {self.task!r}")
        if self.target_lang and self.target_lang_column:
            raise ValueError("pass --target-lang or --target-lang-column, not both")

    @property
    def result_column(self) -> str:
        return self.output_column or TASK_COLUMNS[self.task]


def default_output(input_path: str, opts: Seq2SeqOptions) -> str:
    """Next to the input, with the task as a suffix: articles.parquet -> articles.summary.parquet."""
    if input_path == "-":
        return "-"
    p = Path(input_path)
    if p.is_dir():  # a save_to_disk folder: typed columns, as Parquet
        return str(p.with_name(f"{p.name}.{opts.result_column}.parquet"))
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
        check_tokenizer(path)  # the job reads and writes text
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
            language_token_id(self.tok, opts.source_lang, "--source-lang")
            self.tok.src_lang = opts.source_lang
        self.max_len: int | None = None  # see fit()
        self.truncate = opts.truncate
        self.truncated = 0

    def fit(self, max_source_len: int) -> None:
        """Inputs longer than this or the tokenizer's limit are cut (or are errors, ``truncate=False``)."""
        limits = [max_source_len, getattr(self.tok, "model_max_length", None)]
        limits = [x for x in limits if x and x < UNLIMITED]
        self.max_len = min(limits) if limits else None

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


def _estimate_rows(path: str, fmt: str, progress: JobProgress) -> None:
    """The rows of a line-based table, estimated from its lines (a CSV field may span lines; blank
    lines may not be rows), for the progress' total and ETA; counted at the speed of the disk."""
    lines = 0
    last = b"\n"
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except OSError:
        return  # the job itself reports what it cannot read
    lines += last != b"\n"
    progress.estimate_total(max(lines - (fmt == "csv"), 0))


def encode_error(e: Exception) -> str:
    """A row's error when its text cannot be tokenized."""
    if isinstance(e, ValueError):  # too long with --no-truncate
        return str(e)
    return f"cannot tokenize this text ({type(e).__name__}: {e})"  # the row's error, never the job's


def result_value(r: Result, params: SamplingParams, tok) -> tuple[object, str | None, int]:
    """A finished request as (the result column's value, the error, tokens generated)."""
    tokens = sum(len(c.token_ids) for c in r.completions)
    if r.error:
        return None, r.error, tokens

    def decode(token_ids: list[int]) -> str:
        return tok.decode(token_ids, skip_special_tokens=True).strip()

    if params.num_return_sequences > 1:
        return [decode(c.token_ids) for c in r.completions], None, tokens
    return decode(r.token_ids), None, tokens


UNIT_ROWS = 16  # rows handed to a rank at a time (data parallel)


@dataclass(frozen=True)
class TextWork:
    """A text job's side in a data-parallel rank: blocks of (row id, text, the row's SamplingParams or
    None for the job's) in; per row (row id, value, error, tokens, the length it was truncated to or 0)
    out. Tokenizing and decoding run in the rank."""

    opts: Seq2SeqOptions
    params: SamplingParams
    prompt: list[int]

    def serve(self, engine: Engine, feed, result, progress) -> None:
        enc = TextEncoder(engine.loaded, self.opts)
        enc.fit(engine.max_source_len)
        # rows in hand before the engine has room for them: enough to refill its batch
        most = engine.max_num_seqs // self.params.num_beams + 4 * UNIT_ROWS
        units = UnitRequests(engine, feed, result, most)

        def expand(unit: int, block: list, count) -> Iterator[Request]:
            count(len(block))
            for row_id, text, params in block:  # params: the row's own (its target language) or None
                before = enc.truncated
                try:
                    ids = enc.encode(text)
                except Exception as e:
                    units.answer(unit, (row_id, None, encode_error(e), 0, 0))
                    continue
                cut = enc.max_len if enc.truncated > before else 0
                yield Request(ids, list(self.prompt), params or self.params, (unit, row_id, cut))

        for r in engine.generate(units.requests(expand)):
            unit, row_id, cut = r.request_id
            units.answer(unit, (row_id, *result_value(r, self.params, enc.tok), cut))


def _run_ranks(pool: DataParallel, work: TextWork, units, rows: dict, write, enc: TextEncoder) -> RunReport:
    """The (row id, text, params) of ``units`` through the ranks of ``pool``, in blocks; each result
    written by ``write`` here, in the job's process."""

    def on_result(block, value) -> None:
        row_id, v, error, tokens, cut = value
        if cut:
            enc.truncated, enc.max_len = enc.truncated + 1, cut
        row = rows.pop(row_id, None)
        if row is not None:
            write(row, v, error, tokens)

    def on_failed(block, message: str) -> None:
        for row_id, *_ in block:
            if row_id in rows:
                write(rows.pop(row_id), None, message)

    def remaining(block):
        return [u for u in block if u[0] in rows] or None

    blocks = chunks(units, UNIT_ROWS)
    return pool.run(work, blocks, on_result, on_failed, remaining)


def _check_target_needed(loaded: SimpleNamespace, tok) -> None:
    """A many-to-many model (NLLB-200, M2M100) translates into the language it is told: without
    --target-lang (or a forced first token in its generation config) there is no translation."""
    if getattr(loaded.config, "model_type", None) != "m2m_100" or not language_codes(tok):
        return
    if getattr(loaded.generation_config, "forced_bos_token_id", None) is not None:
        return
    raise ValueError(
        f"this model translates into any of its {len(language_codes(tok))} languages: pass --target-lang "
        f"(e.g. --target-lang {example_code(tok)}) or --target-lang-column"
    )


class TextTask:
    """The per-row work of a text job, shared by the CLI's table job and the Ray integration
    (``encdec_cli.integrations.ray``), so both give the same result for the same text: a text becomes
    an engine Request (:meth:`request`), a Result the result column's value (:meth:`value`)."""

    def __init__(self, loaded: SimpleNamespace, opts: Seq2SeqOptions):
        self.enc = TextEncoder(loaded, opts)
        gen = loaded.generation_config
        self.prompt = decoder_prompt(gen, loaded.config)
        overrides = dict(opts.generation)
        if opts.target_lang:
            overrides["forced_bos_token_id"] = language_token_id(
                self.enc.tok, opts.target_lang, "--target-lang"
            )
        self.params = sampling_params_from_generation_config(gen, len(self.prompt), overrides)
        # the result column's type: several return sequences are a list of strings
        self.result_type = pa.list_(pa.string()) if self.params.num_return_sequences > 1 else pa.string()

    def fit(self, engine: Engine) -> None:
        """Size the inputs to the engine's encoder (before the first :meth:`request`)."""
        self.enc.fit(engine.max_source_len)

    def request(self, request_id: int, text: str) -> Request:
        """The engine request for ``text``; raises ValueError with the row's error (too long with
        ``truncate=False``, or a text the tokenizer rejects)."""
        try:
            ids = self.enc.encode(text)
        except ValueError:
            raise
        except Exception as e:  # the tokenizer rejects it: the row's error, never the job's
            raise ValueError(f"cannot tokenize this text ({type(e).__name__}: {e})") from e
        return Request(ids, list(self.prompt), self.params, request_id)

    def value(self, result: Result) -> str | list[str]:
        """The result column's value for a finished request (without error)."""
        if self.params.num_return_sequences > 1:
            return [self._decode(c.token_ids) for c in result.completions]
        return self._decode(result.token_ids)

    def _decode(self, token_ids: list[int]) -> str:
        return self.enc.tok.decode(token_ids, skip_special_tokens=True).strip()


def run_seq2seq(
    engine: LazyEngine,
    input_path: str,
    output: str | None,
    opts: Seq2SeqOptions,
    quiet: bool = False,
    overwrite: bool = False,
    retry_failed: bool = False,
    speculative: bool = False,
    dist: Distributed | None = None,
) -> int:
    """Run the job; returns the exit status (:meth:`JobOutcome.exit_code`). ``speculative``: the
    engine decodes speculatively (beam search, also from the model's generation config, is refused).

    Raises ValueError / :class:`TableError` for usage errors (bad option, unreadable input,
    missing column), before any row runs. The engine loads only when some row must run.

    Under torchrun (``dist``) this rank runs its share of the rows, blocks of ``UNIT_ROWS``
    (``encdec_cli.tasks.distributed``), into the output's shared parts folder; rank 0 merges them
    when all are done. The exit status is the whole job's."""
    enc = TextEncoder(engine.loaded, opts)
    gen = engine.loaded.generation_config
    prompt = decoder_prompt(gen, engine.loaded.config)
    overrides = dict(opts.generation)
    if opts.target_lang:
        overrides["forced_bos_token_id"] = language_token_id(enc.tok, opts.target_lang, "--target-lang")
    elif opts.task == "translate" and not opts.target_lang_column:
        _check_target_needed(engine.loaded, enc.tok)
    params = sampling_params_from_generation_config(gen, len(prompt), overrides)
    if speculative and params.num_beams > 1:
        raise ValueError(
            f"--speculative cannot be combined with beam search, and this model's generation config "
            f"asks for {params.num_beams} beams: pass --num-beams 1 (or --speculative off)"
        )
    row_params: dict[str, object] = {}  # --target-lang-column: language code -> SamplingParams

    def params_of(row: Row):
        """The row's SamplingParams (its own target language with --target-lang-column)."""
        if not opts.target_lang_column:
            return params
        code = (row.record or {}).get(opts.target_lang_column)
        code = code.strip() if isinstance(code, str) else code
        if not code:
            raise ValueError(f"no target language in column {opts.target_lang_column!r}")
        if code not in row_params:
            what = f"target language (column {opts.target_lang_column!r})"
            tid = language_token_id(enc.tok, str(code), what)
            row_params[code] = sampling_params_from_generation_config(
                gen, len(prompt), {**overrides, "forced_bos_token_id": tid}
            )
        return row_params[code]

    output = output or default_output(input_path, opts)
    if input_path != "-" and output != "-" and Path(output).resolve() == Path(input_path).resolve():
        raise TableError(f"the output {output} would overwrite the input; choose another -o/--output")
    part_rows = _env_number("ENCDEC_PART_ROWS", 4096)
    flush_s = _env_number("ENCDEC_FLUSH_SECONDS", 30.0, float)
    if dist is not None:
        if "-" in (input_path, output):
            raise UsageError("under torchrun every rank reads the input and writes the output: stdin and "
                             "stdout ('-') cannot be shared; pass files")  # fmt: skip
        dist.start()
    src = open_table(input_path, opts.column)
    stdin = input_path == "-"
    if opts.target_lang_column and src.columns and opts.target_lang_column not in src.columns:
        src.close()  # (JSON Lines: the first object's columns; a later row without it fails alone)
        raise missing_column(opts.target_lang_column, f"--target-lang-column: {input_path}", src.columns)
    first = dist is None or dist.rank == 0  # opens the output first, merges it at the end
    try:
        sink_options = SinkOptions(
            result_columns=[opts.result_column],
            input_schema=src.arrow_schema,
            result_types={opts.result_column: pa.list_(pa.string())}
            if params.num_return_sequences > 1
            else None,
            job_key=None if stdin else f"{file_key(input_path)}|{opts}|{engine.loaded.path}",
            # stdin cannot be told apart from another stdin: no resume; --overwrite starts afresh
            resume=not stdin and (not overwrite or not first),  # with --overwrite rank 0 starts afresh
            part_rows=part_rows,
            flush_interval_s=flush_s,
            writer=None if dist is None else (dist.rank, dist.world),
        )
        if not first:
            dist.barrier()  # rank 0 has opened the output (and discarded it, with --overwrite)
        sink = open_sink(output, options=sink_options)
        if dist is not None:
            if first:
                dist.barrier()
            dist.barrier()  # every rank has read what is done before any rank writes
    except BaseException:
        src.close()
        raise
    done = sink.done_row_ids()
    failed_before = len(sink.failed_row_ids()) if first else 0  # (counted once, by rank 0)
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
    failures: list[tuple[str, str]] = []  # (row N, error) of the rows that failed in this run
    total = src.num_rows
    if dist is not None:  # rank 0 shows its own share's progress, the summary the whole job's
        quiet = quiet or not first
        total = (
            None
            if total is None
            else sum(
                min(UNIT_ROWS, total - b) for b in range(dist.rank * UNIT_ROWS, total, dist.world * UNIT_ROWS)
            )
        )
    progress = JobProgress(opts.task, total=total, quiet=quiet, unit="tokens", items="rows")
    if src.num_rows is None and dist is None and not stdin and not finished:  # lines of a text file
        threading.Thread(target=_estimate_rows, args=(input_path, src.format, progress), daemon=True).start()
    final_error = None  # rank 0's merge failed: told once the ranks have met
    guard = InterruptGuard()
    report = None  # the ranks' report (data parallel)

    def to_run() -> Iterator[Row]:
        """The rows that must run; rows already done are skipped, bad rows written as errors."""
        nonlocal skipped
        for row in src:
            if dist is not None and not dist.owns(row.row_id // UNIT_ROWS):  # another rank's
                continue
            if row.row_id in done:
                skipped += 1
                progress.advance(files=1)
                continue
            if row.error is not None:
                write(row, None, row.error)
                continue
            rows[row.row_id] = row
            yield row

    def requests() -> Iterator[Request]:
        for row in to_run():
            try:
                row_sp = params_of(row)  # ValueError: an unknown target language in its column
                ids = enc.encode(row.text)
            except Exception as e:
                write(rows.pop(row.row_id), None, encode_error(e))
                continue
            yield Request(ids, list(prompt), row_sp, row.row_id)

    def rank_units() -> Iterator[tuple]:
        """(row id, text, the row's params or None) for the ranks, which tokenize themselves."""
        for row in to_run():
            try:
                row_sp = params_of(row) if opts.target_lang_column else None
            except ValueError as e:
                write(rows.pop(row.row_id), None, encode_error(e))
                continue
            yield row.row_id, row.text, row_sp

    def write(row: Row, value, error: str | None, tokens: int = 0) -> None:
        nonlocal failed
        with guard.protect():  # the write and its count: a stop signal waits for both
            if error is not None:
                failed += 1
                failures.append((f"row {row.row_id}", error))
                sink.write_row(row, error=error)
            else:
                sink.write_row(row, {opts.result_column: value})
            progress.advance(files=1, amount=tokens)

    start = time.perf_counter()
    interrupted = False
    with guard.installed():
        try:
            if finished:  # an earlier run did every row: nothing to read or run
                skipped = len(done) if first else 0
                progress.advance(files=skipped)
            elif isinstance(running, DataParallel):
                with progress:
                    work = TextWork(opts, params, prompt)
                    report = _run_ranks(running, work, rank_units(), rows, write, enc)
            else:
                enc.fit(running.max_source_len)
                with progress:
                    for r in running.generate(requests()):
                        value, error, tokens = result_value(r, params, enc.tok)
                        write(rows.pop(r.request_id), value, error, tokens)
            with guard.protect():
                if dist is not None:
                    sink.flush() if first else sink.close()
                    dist.barrier()  # every rank's rows are committed
                    if first:
                        sink.adopt_new_parts()
                if first:
                    try:
                        sink.finalize(expected_rows=None if finished else src.rows_read)
                    except (TableError, OSError) as e:
                        if dist is None:
                            raise
                        final_error = e
        except KeyboardInterrupt:
            interrupted = True
        finally:
            guard.stopping()  # from here on a Ctrl-C does not cut the saving short
            sink.close()
            src.close()
    if running is None or isinstance(running, DataParallel):
        oom, max_seqs = (report.oom_recoveries, report.max_num_seqs) if report else (0, None)
    else:
        oom, max_seqs = running.stats.oom_recoveries, running.max_num_seqs
    truncated, max_len = enc.truncated, enc.max_len
    if dist is not None and not interrupted:  # the whole job's counts
        ranks = dist.gather((truncated, max_len, oom, max_seqs))
        truncated, oom = sum(r[0] for r in ranks), sum(r[2] for r in ranks)
        max_len = next((r[1] for r in ranks if r[0]), max_len)
        max_seqs = min((r[3] for r in ranks if r[2]), default=max_seqs)
    details = [f"{truncated} input(s) truncated to {max_len} tokens"] if truncated else []
    spec_line = running.stats.speculation_summary() if isinstance(running, Engine) else None
    if spec_line:
        details.append(spec_line)
    if oom:
        details.append(f"{oom} out-of-memory recoveries (now at most {max_seqs} sequences per step)")
    if isinstance(running, Engine):
        details += prefix_cache_details(running.stats) + stage_busy_note(running.stats)
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
        failures=failures,
        details=details,
        faults=report.notes() if report is not None else [],
    )
    if dist is not None:
        if not interrupted:  # (an interrupted rank stops alone, torchrun stops the others)
            outcome = JobOutcome.combined(dist.gather(outcome))
        dist.stop()
        if final_error is not None:
            raise final_error
        if not first and not interrupted:  # rank 0 says how the job went (its summary, its status)
            return 0
    progress.summary(outcome.summary())
    summary.record(outcome, running)
    return outcome.exit_code()
