"""The ``encdec image-to-text`` job: image inputs -> pixel tensors -> requests -> text outputs.

Inputs are planned into named items by ``encdec_cli.io.inputs`` (image files, folders, '-' lists,
Parquet/JSONL tables with an image column), decoded with Pillow (``encdec_cli.io.images``) and
preprocessed by the model's own image processor (resize, rescale, normalise, from its
``preprocessor_config.json``) in worker threads, a bounded number of images ahead of the engine.

Outputs, by ``-f``:

- ``txt``: one ``NAME.txt`` per image in the output folder (``NAME.json`` for Florence-2 tasks with
  coordinates), recorded in its manifest (as ``encdec transcribe`` does): a re-run skips finished
  (and failed) images.
- ``jsonl`` / ``parquet``: one table, a row per image in input order (``input``, ``row``, ``text``,
  (``regions``,) ``error``), written in parts and finalised atomically (``encdec_cli.io.tables``): a
  re-run resumes.
- ``-o -``: JSON Lines on stdout, in input order.

A bad image (unreadable, damaged, empty, too large) is an error record; the job goes on and the
exit status is 1. Ctrl-C / SIGTERM let the write in flight finish (exit 130 / 143).
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.markup import escape

from encdec_cli.engine import Engine, Request, Result
from encdec_cli.errors import UsageError
from encdec_cli.io.atomic import atomic_write_text
from encdec_cli.io.images import IMAGE_EXTENSIONS, load_image
from encdec_cli.io.inputs import AudioItem, Namer, count_files, plan_inputs
from encdec_cli.io.manifest import Manifest, file_key
from encdec_cli.io.tables import open_sink
from encdec_cli.tasks import summary
from encdec_cli.tasks.generation import decoder_prompt, sampling_params_from_generation_config
from encdec_cli.tasks.interrupts import InterruptGuard
from encdec_cli.tasks.outcome import JobOutcome, Wording, prefix_cache_details, stage_busy_note
from encdec_cli.tasks.progress import JobProgress

FORMATS = ("txt", "jsonl", "parquet")
PREFETCH_IMAGES = 64  # images decoded and preprocessed ahead of the engine
IMAGES = Wording(
    head="image-to-text: {done} image(s) done, {amount:,.0f} tokens in {wall:.1f} s ({rate:,.0f} tok/s)",
    skipped="{skipped} already done or failed before (skipped; --overwrite / --retry-failed redo them)",
    failed_before="{failed_before} of them FAILED in an earlier run",
    failed="{failed} FAILED",
    items="image(s)",
    amount_key="tokens",
    rate_unit="tokens_per_second",
)


@dataclass(frozen=True)
class ImageToTextOptions:
    task: str | None = None  # a task prompt: Donut's "<s_cord-v2>", Florence-2's "<CAPTION>"
    prompt: str | None = None  # text after the task prompt (a question, a prefix)
    image_column: str = "image"  # table inputs
    id_column: str | None = None  # table inputs: names rows' outputs
    generation: dict | None = None  # GenerationConfig-named overrides (None values keep the config's)
    workers: int = 0  # preprocessing threads (0: up to 8, one per core)


def worker_count(requested: int = 0) -> int:
    return requested if requested > 0 else max(1, min(8, os.cpu_count() or 1))


def prefetch_map(fn: Callable[[Any], Any], items: Iterable, workers: int, ahead: int = PREFETCH_IMAGES):
    """(item, (value, None)) or (item, (None, error message)) for each item, in order, with ``fn``
    running in ``workers`` threads at most ``ahead`` items ahead of the consumer."""

    def guarded(x):
        try:
            return fn(x), None
        except Exception as e:  # the item's error, never the job's
            return None, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="encdec-images") as pool:
        pending: deque = deque()
        for x in items:
            pending.append((x, pool.submit(guarded, x)))
            while len(pending) >= ahead or (pending and pending[0][1].done()):
                x0, f = pending.popleft()
                yield x0, f.result()
        while pending:
            x0, f = pending.popleft()
            yield x0, f.result()


def _quiet_transformers():
    """transformers' logging at error level for a block ("torchvision missing, the PIL backend is used")."""
    import contextlib

    import transformers

    @contextlib.contextmanager
    def block():
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            yield
        finally:
            transformers.logging.set_verbosity(verbosity)

    return block()


class ImagePreprocessor:
    """The model's own image processor (``AutoImageProcessor`` from its folder): image -> pixels [C, H, W]."""

    def __init__(self, model_path: str | os.PathLike):
        from transformers import AutoImageProcessor

        with _quiet_transformers():
            try:
                self.processor = AutoImageProcessor.from_pretrained(model_path)
            except (OSError, ValueError) as e:
                raise UsageError(
                    f"the model in {model_path} has no usable image processor (preprocessor_config.json): {e}"
                ) from None

    def __call__(self, source):
        image = load_image(source)
        pixels = self.processor(images=image, return_tensors="pt").pixel_values[0]
        return pixels, image.size


def build_prompt(loaded, opts: ImageToTextOptions) -> list[int]:
    """The decoder prompt: the decoder start token, or (``--task``) the task prompt's tokens in its
    place (Donut), then the ``--prompt`` text's tokens."""
    tok = loaded.tokenizer
    start = decoder_prompt(loaded.generation_config, loaded.config)
    task_ids: list[int] = []
    if opts.task:
        task_ids = tok(opts.task, add_special_tokens=False)["input_ids"]
        if tok.unk_token_id is not None and tok.unk_token_id in task_ids:
            raise UsageError(f"--task {opts.task!r} is not a task prompt of this model's tokenizer")
    text_ids = tok(opts.prompt, add_special_tokens=False)["input_ids"] if opts.prompt else []
    return (task_ids or start) + text_ids


class ImageReader:
    """How one kind of model reads an image: ``prepare(source) -> (encoder input, (width, height))``
    (run in worker threads), the decoder ``prompt``, and ``result(token_ids, size) -> (text, regions)``
    (regions: None, or the coordinates of a Florence-2 task in image pixels)."""

    regions = False  # whether results carry regions

    def __init__(self, loaded, opts: ImageToTextOptions):
        self.tok = loaded.tokenizer
        self.prompt = build_prompt(loaded, opts)
        self.pixels = ImagePreprocessor(loaded.path)

    def prepare(self, source):
        return self.pixels(source)

    def result(self, token_ids: list[int], size) -> tuple[str, dict | None]:
        return self.tok.decode(token_ids, skip_special_tokens=True).strip(), None


class Florence2Reader(ImageReader):
    """Florence-2: the processor lays out image tokens and the task's prompt as the encoder input
    (``--task <CAPTION>``, the default; ``--prompt`` is the input of tasks that take one, e.g.
    ``<CAPTION_TO_PHRASE_GROUNDING>``); its post-processor turns coordinate outputs (``<OD>``,
    ``<OCR_WITH_REGION>``, ...) into boxes or polygons in image pixels."""

    DEFAULT_TASK = "<CAPTION>"

    def __init__(self, loaded, opts: ImageToTextOptions):
        from transformers import AutoProcessor

        with _quiet_transformers():
            try:
                self.processor = AutoProcessor.from_pretrained(loaded.path)
            except (OSError, ValueError, TypeError) as e:
                raise UsageError(
                    f"the Florence-2 model in {loaded.path} has no usable processor: {e}"
                ) from None
        kinds = self.processor.tasks_answer_post_processing_type
        self.task = opts.task or self.DEFAULT_TASK
        if self.task not in kinds:
            raise UsageError(f"--task {self.task!r} is not a Florence-2 task; use one of: {', '.join(kinds)}")
        self.kind = kinds[self.task]
        self.regions = self.kind != "pure_text"
        takes_input = self.task in self.processor.task_prompts_with_input
        if opts.prompt and not takes_input:
            raise UsageError(f"--task {self.task} takes no --prompt")
        text = self.task + (opts.prompt or "") if takes_input else self.task
        # every image of the job has the same encoder token layout (image tokens, then the prompt):
        # made once here, so the worker threads never share the tokenizer
        from PIL import Image

        with _quiet_transformers():
            self.input_ids = self.processor(text=text, images=Image.new("RGB", (64, 64)))["input_ids"][0]
        self.input_ids = [int(t) for t in self.input_ids]
        self.tok = loaded.tokenizer
        self.prompt = decoder_prompt(loaded.generation_config, loaded.config.text_config)

    def prepare(self, source):
        image = load_image(source)
        pixels = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "input_ids": self.input_ids}, image.size

    def result(self, token_ids: list[int], size) -> tuple[str, dict | None]:
        raw = self.tok.decode(token_ids, skip_special_tokens=False)
        parsed = self.processor.post_process_generation(text=raw, task=self.task, image_size=size)[self.task]
        if not self.regions:
            return parsed, None
        text = raw.replace("<s>", "").replace("</s>", "").replace("<pad>", "").strip()
        return text, parsed


class T5Gemma2Reader(ImageReader):
    """T5Gemma 2: its processor (Gemma 3's) puts the image's tokens where ``<start_of_image>`` stands
    in ``--prompt`` (before the prompt when it has none) as the encoder input; the decoder starts from
    its start token."""

    def __init__(self, loaded, opts: ImageToTextOptions):
        from transformers import AutoProcessor

        if opts.task:
            raise UsageError("T5Gemma 2 takes no --task; pass its input text with --prompt")
        with _quiet_transformers():
            try:
                self.processor = AutoProcessor.from_pretrained(loaded.path)
                boi = self.processor.tokenizer.boi_token
            except (OSError, ValueError, TypeError, AttributeError) as e:
                raise UsageError(
                    f"the T5Gemma 2 model in {loaded.path} has no usable image processor and processor "
                    f"(processor_config.json, preprocessor_config.json): {e}"
                ) from None
        text = opts.prompt or ""
        if boi not in text:
            text = boi + text
        # one token layout for every image (a fixed number of image tokens): made once here, so the
        # worker threads never share the tokenizer
        from PIL import Image

        with _quiet_transformers():
            size = getattr(self.processor.image_processor, "size", None) or {}
            blank = Image.new("RGB", (size.get("width", 64), size.get("height", 64)))
            self.input_ids = [int(t) for t in self.processor(text=text, images=blank)["input_ids"][0]]
        self.tok = loaded.tokenizer
        self.prompt = decoder_prompt(loaded.generation_config, loaded.config)

    def prepare(self, source):
        image = load_image(source)
        with _quiet_transformers():
            pixels = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "input_ids": self.input_ids}, image.size


def image_reader(loaded, opts: ImageToTextOptions) -> ImageReader:
    if loaded.architecture == "Florence2ForConditionalGeneration":
        return Florence2Reader(loaded, opts)
    if loaded.architecture == "T5Gemma2ForConditionalGeneration":
        return T5Gemma2Reader(loaded, opts)
    return ImageReader(loaded, opts)


def _text(value: str) -> str:
    """A path as text for a table cell (bytes that are not UTF-8 escaped)."""
    return os.fsencode(value).decode("utf-8", "backslashreplace") if isinstance(value, str) else str(value)


class _FolderOutput:
    """``-f txt``: NAME.txt per image in a folder, with the folder's manifest."""

    def __init__(self, folder: str, overwrite: bool, retry_failed: bool):
        self.folder, self.overwrite, self.retry_failed = folder, overwrite, retry_failed
        self.manifest = Manifest.in_dir(folder)
        self.namer = Namer(self.manifest, folder)

    def skip(self, item: AudioItem) -> tuple[bool, bool]:
        """(skip it, it failed in an earlier run)."""
        if self.overwrite:
            return False, False
        failed = self.manifest.failed(item.key) is not None and not self.retry_failed
        return self.manifest.is_done(item.key) or failed, failed

    def ok(self, item: AudioItem, text: str, regions: dict | None) -> None:
        if regions is None:
            path = atomic_write_text(Path(self.folder) / f"{item.name}.txt", text + "\n")
        else:  # coordinates: NAME.json, {"text", "bboxes"|"quad_boxes"|"polygons", "labels"}
            record = json.dumps({"text": text, **regions}, ensure_ascii=False)
            path = atomic_write_text(Path(self.folder) / f"{item.name}.json", record + "\n")
        self.manifest.record_ok(item.key, [path], [])

    def error(self, item: AudioItem, message: str) -> None:
        self.manifest.record_error(item.key, message)

    def close(self, finished: bool, items: int) -> None:
        self.manifest.close()


class _TableOutput:
    """``-f jsonl|parquet`` (or ``-o -``): a row per image, in input order, resumable by row id
    (the item's position in the planned inputs, which is deterministic)."""

    SCHEMA = pa.schema([("input", pa.string()), ("row", pa.int64())])

    def __init__(
        self,
        output: str,
        fmt: str,
        inputs: list[str],
        job_key: str,
        overwrite: bool,
        retry_failed: bool,
        regions: bool = False,
    ):
        stdout = output == "-"
        self.sink = open_sink(
            output,
            None if stdout else fmt,
            result_columns=["text", "regions"] if regions else ["text"],
            input_schema=self.SCHEMA,
            job_key=None if stdout else job_key,
            # a list of paths on stdin cannot be told apart from another: no resume
            resume=not stdout and not overwrite and "-" not in inputs,
        )
        self.done = self.sink.done_row_ids()
        self.failed = self.sink.failed_row_ids()
        if retry_failed:
            self.done = self.done.difference(self.failed)

    def skip(self, item: AudioItem) -> tuple[bool, bool]:
        if item.index in self.done:
            return True, item.index in self.failed
        return False, False

    def _record(self, item: AudioItem) -> dict:
        return {"input": _text(item.input), "row": item.row}

    def ok(self, item: AudioItem, text: str, regions: dict | None) -> None:
        results = {"text": text}
        if regions is not None:  # a JSON object as text: {"bboxes"|"quad_boxes"|"polygons", "labels"}
            results["regions"] = json.dumps(regions, ensure_ascii=False)
        self.sink.write(item.index, self._record(item), results, None)

    def error(self, item: AudioItem, message: str) -> None:
        self.sink.write(item.index, self._record(item), None, message)

    def close(self, finished: bool, items: int) -> None:
        try:
            if finished:
                self.sink.finalize(expected_rows=items)
        finally:
            self.sink.close()


def check_output(output: str, fmt: str) -> None:
    """``-f txt`` writes a folder; ``-f jsonl|parquet`` one table file; ``-o -`` JSON Lines."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown -f {fmt!r}; use txt, jsonl or parquet")
    if output == "-":
        if fmt == "parquet":
            raise UsageError("-o - prints JSON Lines: pass -f jsonl (or -o FILE.parquet for Parquet)")
        return
    p = Path(output)
    if fmt == "txt" and p.is_file():
        raise UsageError(
            f"-o {output}: -f txt writes a folder of .txt files; pass a folder, or -f jsonl|parquet"
        )
    if fmt != "txt" and p.is_dir():
        raise UsageError(f"-o {output}: -f {fmt} writes one table file; pass a file name (-o out.{fmt})")


def default_output(fmt: str) -> str:
    return "." if fmt == "txt" else f"image-to-text.{fmt}"


def run_image_to_text(
    engine: Engine,
    inputs: list[str],
    output: str,
    fmt: str,
    opts: ImageToTextOptions,
    overwrite: bool = False,
    retry_failed: bool = False,
    quiet: bool = False,
) -> int:
    """Run the job; returns the exit status. The caller has checked the inputs and the output."""
    loaded = engine.loaded
    reader = image_reader(loaded, opts)
    prompt = reader.prompt
    params = sampling_params_from_generation_config(loaded.generation_config, len(prompt), opts.generation)
    notes: list[str] = []
    if fmt == "txt" and output != "-":
        out: _FolderOutput | _TableOutput = _FolderOutput(output, overwrite, retry_failed)
        namer = out.namer
    else:
        job_key = f"{[file_key(i) if os.path.exists(i) else i for i in inputs]}|{opts}|{loaded.path}"
        out = _TableOutput(output, fmt, inputs, job_key, overwrite, retry_failed, reader.regions)
        namer = Namer()
    planned = plan_inputs(
        inputs, opts.image_column, opts.id_column, namer, notes, extensions=IMAGE_EXTENSIONS, kind="image"
    )
    progress = JobProgress(
        "image-to-text", count_files(inputs, IMAGE_EXTENSIONS), quiet=quiet, items="images"
    )
    failed: list[tuple[str, str]] = []
    counts = {"done": 0, "skipped": 0, "failed_before": 0, "items": 0}
    running: dict[int, tuple[AudioItem, tuple[int, int]]] = {}
    guard = InterruptGuard()

    def where(item: AudioItem) -> str:
        return item.input + ("" if item.row is None else f" row {item.row}")

    def fail(item: AudioItem, message: str) -> None:
        with guard.protect():  # the record and its count: a stop signal waits for both
            out.error(item, message)
            failed.append((where(item), message))
            progress.log(f"[red]error[/red] {escape(where(item))}: {escape(message)}")
            progress.advance(files=1)

    def todo() -> Iterator[AudioItem]:
        seen: set[str] = set()
        for item in planned:
            if item.key in seen:  # the same file named twice (a folder and a file in it)
                continue
            seen.add(item.key)
            item.index = counts["items"]
            counts["items"] += 1
            skip, failed_earlier = out.skip(item)
            if skip:
                counts["skipped"] += 1
                counts["failed_before"] += failed_earlier
                progress.skip()
                continue
            yield item

    def prepare(item: AudioItem):
        if item.error is not None:
            raise ValueError(item.error)
        return reader.prepare(item.source)

    def requests() -> Iterator[Request]:
        for item, (value, error) in prefetch_map(prepare, todo(), worker_count(opts.workers)):
            if error is not None:
                fail(item, error)
                continue
            running[item.index] = (item, value[1])
            yield Request(value[0], list(prompt), params, item.index)

    def on_result(r: Result) -> None:
        item, size = running.pop(r.request_id)
        if r.error:
            fail(item, r.error)
            return
        try:
            text, regions = reader.result(r.token_ids, size)
        except Exception as e:  # the post-processor cannot parse this output: the item's error
            fail(item, f"cannot parse the model's output ({type(e).__name__}: {e})")
            return
        with guard.protect():
            try:
                out.ok(item, text, regions)
            except (OSError, ValueError) as e:
                if isinstance(out, _TableOutput):
                    raise
                out.error(item, f"cannot write outputs: {e}")
                failed.append((where(item), f"cannot write outputs: {e}"))
            else:
                counts["done"] += 1
            progress.advance(files=1, amount=len(r.token_ids))

    start = time.perf_counter()
    interrupted = finished = False
    with guard.installed():
        try:
            with progress:
                for result in engine.generate(requests()):
                    on_result(result)
            finished = True
        except KeyboardInterrupt:
            interrupted = True
        finally:
            guard.stopping()  # from here on a stop signal does not cut the saving short
            out.close(finished and not interrupted, counts["items"])
    outcome = JobOutcome(
        "image-to-text",
        IMAGES,
        done=counts["done"],
        failed=len(failed),
        failed_before=counts["failed_before"],
        skipped=counts["skipped"],
        amount=progress.amount,
        wall=time.perf_counter() - start,
        output=None if output == "-" else output,
        interrupted=interrupted,
        failures=failed,
        notes=notes,
        details=[d for d in [engine.stats.speculation_summary()] if d]
        + prefix_cache_details(engine.stats)
        + stage_busy_note(engine.stats),
    )
    progress.summary(outcome.summary())
    summary.record(outcome, engine)
    return outcome.exit_code()
