"""Ray Data integration (``pip install 'encdec[ray]'``): callable classes for ``Dataset.map_batches``.

Each class loads one engine when Ray starts its actor and then turns batches of rows into batches
with result columns. They run the same task code as the CLI (``Transcriber``; the text job's
``TextTask``) with the same options, so a row gets the same result as from ``encdec transcribe`` /
``encdec summarize``::

    import ray
    from encdec_cli.integrations.ray import Summarize, Transcribe

    ds = ray.data.read_parquet("speech.parquet")
    ds = ds.map_batches(Transcribe, fn_constructor_kwargs={"model": "large-v3", "language": "en"},
                        batch_size=256, num_gpus=1, concurrency=4, batch_format="pyarrow")
    ds.write_parquet("transcripts/")

:class:`Transcribe` reads an audio column (file bytes, paths, or the Hugging Face datasets shapes
``{bytes, path}`` / ``{array, sampling_rate}``) and adds ``text``, ``language``, ``duration``,
``segments`` (a list of structs) and ``error``. :class:`Summarize`, :class:`Translate` and
:class:`Generate` read a text column and add the result column (``summary``, ``translation``,
``generated``) and ``error``. A bad row gets its ``error`` and null results; the batch goes on.
Batches may come as ``pyarrow.Table``, ``pandas.DataFrame`` or a dict of arrays; the result is a
``pyarrow.Table`` with the input columns first.

Ray itself is imported only here: ``import encdec_cli`` and the CLI never import it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

try:
    import ray  # noqa: F401  (the integration is for Ray Data; fail early with the install line)
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("encdec_cli.integrations.ray needs Ray Data: pip install 'encdec[ray]'") from e

from encdec_cli.engine import Engine
from encdec_cli.io.inputs import AudioItem, audio_value
from encdec_cli.io.records import TRANSCRIPT_COLUMNS
from encdec_cli.io.tables import ERROR_COLUMN
from encdec_cli.io.tables.sources import text_or_error
from encdec_cli.tasks.seq2seq import Seq2SeqOptions, TextTask
from encdec_cli.tasks.transcribe import TranscribeOptions, Transcriber, engine_window

__all__ = ["Generate", "Summarize", "Transcribe", "Translate"]


def _as_table(batch: Any) -> pa.Table:
    """A map_batches batch (pyarrow, pandas or numpy format) as a pyarrow Table."""
    if isinstance(batch, pa.Table):
        return batch
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas.DataFrame
        return pa.Table.from_pandas(batch, preserve_index=False)
    return pa.table({name: list(values) for name, values in batch.items()})


def _with_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    """``table`` with ``columns`` added (replacing input columns of the same name), in order."""
    for name, array in columns.items():
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, array)
    return table


class Transcribe:
    """Speech to text for ``map_batches``: the audio column in; ``text``, ``language``,
    ``duration``, ``segments`` and ``error`` out.

    ``model``, ``device``, ``dtype``, ``max_num_seqs``, ``gpu_memory_utilization`` and
    ``enforce_eager`` are the CLI's engine options; ``audio_column`` is ``--audio-column``; every
    other keyword is a field of ``TranscribeOptions`` (the CLI's decoding options: ``language``,
    ``task``, ``timestamps``, ``long_form``, ``temperatures``, ``beam_size``, ``word_timestamps``...).
    A relative audio path is taken relative to the worker's current folder.
    """

    def __init__(
        self,
        model: str = "tiny.en",
        *,
        audio_column: str = "audio",
        device: str = "auto",
        dtype: str = "auto",
        max_num_seqs: int = 64,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        **options: Any,
    ):
        if "vad" not in options and options.get("long_form", "chunked") == "chunked":
            from encdec_cli.tasks.vad import VadOptions

            options["vad"] = VadOptions()  # the CLI's default: --vad with chunked long-form
        self.options = TranscribeOptions(**options)
        self.audio_column = audio_column
        self.engine = Engine(
            model,
            device=device,
            dtype=dtype.lower(),
            max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            window=engine_window(max_num_seqs),
        )

    def __call__(self, batch: Any) -> pa.Table:
        table = _as_table(batch)
        if self.audio_column not in table.column_names:
            raise KeyError(f"the batch has no column {self.audio_column!r}; columns: {table.column_names}")
        items = []
        for i, value in enumerate(table.column(self.audio_column).to_pylist()):
            source, _ = audio_value(value, "")
            items.append(AudioItem(str(i), str(i), source, input=self.audio_column, row=i, index=i))
        results: list[dict[str, Any]] = [{}] * len(items)
        errors: list[str | None] = [None] * len(items)

        def on_done(item: AudioItem, transcript, error: str | None) -> None:
            if error is None:
                results[item.index] = transcript.to_columns()
            else:
                errors[item.index] = error

        Transcriber(self.engine, self.options).run(iter(items), on_done)
        columns = {
            name: pa.array([r.get(name) for r in results], type) for name, type in TRANSCRIPT_COLUMNS.items()
        }
        return _with_columns(table, {**columns, ERROR_COLUMN: pa.array(errors, pa.string())})


class Generate:
    """Text to text for ``map_batches``: the text column in; the result column and ``error`` out.

    ``model``, ``device``, ``dtype``, ``max_num_seqs``, ``gpu_memory_utilization`` and
    ``enforce_eager`` are the CLI's engine options; ``column``, ``output_column``, ``prefix``,
    ``source_lang``, ``target_lang`` and ``truncate`` its input options (``Seq2SeqOptions``); every
    other keyword is a generation option named as the CLI's flags (``num_beams``,
    ``max_new_tokens``, ``length_penalty``, ``no_repeat_ngram_size``, ``temperature``, ``top_k``,
    ``top_p``, ``seed``, ...).
    """

    task = "generate"

    def __init__(
        self,
        model: str,
        *,
        column: str = "text",
        output_column: str | None = None,
        prefix: str | None = None,
        source_lang: str | None = None,
        target_lang: str | None = None,
        truncate: bool = True,
        device: str = "auto",
        dtype: str = "auto",
        max_num_seqs: int = 512,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = False,
        **generation: Any,
    ):
        self.options = Seq2SeqOptions(
            task=self.task,
            column=column,
            output_column=output_column,
            prefix=prefix,
            source_lang=source_lang,
            target_lang=target_lang,
            truncate=truncate,
            generation={k: v for k, v in generation.items() if v is not None},
        )
        self.engine = Engine(
            model,
            device=device,
            dtype=dtype.lower(),
            max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
        )
        self.text_task = TextTask(self.engine.loaded, self.options)
        self.text_task.fit(self.engine)

    def __call__(self, batch: Any) -> pa.Table:
        table = _as_table(batch)
        column = self.options.column
        if column not in table.column_names:
            raise KeyError(f"the batch has no column {column!r}; columns: {table.column_names}")
        values: list[Any] = [None] * table.num_rows
        errors: list[str | None] = [None] * table.num_rows
        requests = []
        for i, cell in enumerate(table.column(column).to_pylist()):
            text, errors[i] = text_or_error(cell, column)  # the table reader's check of a text cell
            if errors[i] is None:
                try:
                    requests.append(self.text_task.request(i, text))
                except ValueError as e:
                    errors[i] = str(e)
        for result in self.engine.generate(requests):
            if result.error:
                errors[result.request_id] = result.error
            else:
                values[result.request_id] = self.text_task.value(result)
        out = pa.array(values, self.text_task.result_type)
        return _with_columns(
            table, {self.options.result_column: out, ERROR_COLUMN: pa.array(errors, pa.string())}
        )


class Summarize(Generate):
    """:class:`Generate` as ``encdec summarize`` (result column ``summary``)."""

    task = "summarize"


class Translate(Generate):
    """:class:`Generate` as ``encdec translate`` (result column ``translation``)."""

    task = "translate"
