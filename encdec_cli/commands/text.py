"""``encdec summarize | translate | generate``: text to text (the job: encdec_cli.tasks.seq2seq)."""

from __future__ import annotations

import functools
from pathlib import Path

import typer

from encdec_cli import errors
from encdec_cli.commands import common
from encdec_cli.commands.common import (
    TABLE_OUTPUT_EXTENSIONS,
    TEXT_MODEL_HELP,
    DataParallelRanks,
    Device,
    Dtype,
    EnforceEager,
    GpuMemory,
    NoPrefixCache,
    PipelineParallel,
    PpLayers,
    Quiet,
    RetryFailed,
    Speculative,
    SummaryJson,
)
from encdec_cli.errors import UsageError

# task -> (its result column, the first line of its help)
TEXT_TASKS = {
    "summarize": ("summary", "Summarize each row's text with a BART/Pegasus/T5-family model."),
    "translate": (
        "translation",
        "Translate each row's text with a Marian, mBART, NLLB-200, M2M100 or T5-family model.",
    ),
    "generate": (
        "generated",
        "Run any supported encoder/decoder text model on each row's text (raw generation).",
    ),
}


def _text_command(task: str):
    result_column = TEXT_TASKS[task][0]

    def command(
        input: str = typer.Argument(
            ...,
            help="Input table: .parquet, .jsonl, .csv, .txt (one item per line), .arrow, a folder "
            "saved by Hugging Face datasets' save_to_disk, or '-' for stdin (JSON Lines if lines are "
            "JSON objects, else lines).",
        ),
        model: str | None = typer.Option(None, "-m", "--model", help=TEXT_MODEL_HELP),
        output: str | None = typer.Option(
            None,
            "-o",
            "--output",
            help="Output table (.parquet, .jsonl, .csv) or '-' for JSON Lines on stdout. Default: next to "
            f"the input, named after the result column: in.parquet -> in.{result_column}.parquet (.txt and "
            ".json inputs -> .jsonl; .arrow and save_to_disk folders -> .parquet). All input columns "
            "are kept.",
        ),
        column: str = typer.Option("text", "--column", help="Input column with the text."),
        output_column: str | None = typer.Option(
            None, "--output-column", help=f"Result column name (default: {result_column})."
        ),
        prefix: str | None = typer.Option(
            None,
            "--prefix",
            help="Text prepended to every input, e.g. "
            "'summarize: '. Default: the model's own task prefix, if any.",
        ),
        source_lang: str | None = typer.Option(
            None,
            "--source-lang",
            help="Language code of the inputs, as the model's tokenizer spells it: en_XX (mBART-50), "
            "eng_Latn (NLLB-200), en (M2M100).",
        ),
        target_lang: str | None = typer.Option(
            None,
            "--target-lang",
            help="Language code of the outputs, e.g. de_DE, fra_Latn or fr (forced as the first output "
            "token). NLLB-200 and M2M100 need it (or --target-lang-column). An unknown code is an error "
            "listing close matches.",
        ),
        target_lang_column: str | None = typer.Option(
            None,
            "--target-lang-column",
            help="Input column with each row's target language code: rows into different languages run "
            "together in one job (a row with an unknown code gets an error).",
        ),
        num_beams: int | None = typer.Option(None, "--num-beams", help="Beam search width (1 = greedy)."),
        num_return_sequences: int | None = typer.Option(
            None, "--num-return-sequences", help="Hypotheses kept per row (best first)."
        ),
        max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Most tokens per output."),
        min_new_tokens: int | None = typer.Option(None, "--min-new-tokens", help="Fewest tokens per output."),
        length_penalty: float | None = typer.Option(None, "--length-penalty", help="Beam score exponent."),
        no_repeat_ngram_size: int | None = typer.Option(
            None, "--no-repeat-ngram-size", help="Forbid repeating n-grams of this size."
        ),
        repetition_penalty: float | None = typer.Option(
            None,
            "--repetition-penalty",
            help="Divide the scores of tokens already in the input or output by this (> 1 repeats less).",
        ),
        temperature: float | None = typer.Option(None, "--temperature", help="> 0 samples; 0 is greedy."),
        top_k: int | None = typer.Option(
            None, "--top-k", help="Sample only from the k likeliest tokens (with --temperature > 0)."
        ),
        top_p: float | None = typer.Option(
            None,
            "--top-p",
            help="Sample only from the likeliest tokens whose probabilities add up to p "
            "(with --temperature > 0).",
        ),
        seed: int | None = typer.Option(None, "--seed", help="Seed for sampling."),
        truncate: bool = typer.Option(
            True,
            "--truncate/--no-truncate",
            help="Cut inputs longer than the "
            "model's limit (counted in the summary), or make them row errors.",
        ),
        device: Device = "auto",
        data_parallel: DataParallelRanks = None,
        dtype: Dtype = "auto",
        max_num_seqs: int = typer.Option(
            1024,
            "--max-num-seqs",
            help="Sequences decoded together per step (beams count singly; the KV pool limits what is "
            "admitted). Text inputs are short, so many fit at once (1024 against 512 on an H100: beam "
            "search about 1.3x faster, greedy 3-8%); the engine's own default is 256.",
        ),
        gpu_memory_utilization: GpuMemory = 0.9,
        enforce_eager: EnforceEager = False,
        pipeline_parallel: PipelineParallel = 1,
        pp_layers: PpLayers = None,
        no_prefix_cache: NoPrefixCache = False,
        kv_dtype: common.KvDtype = "auto",
        speculative: Speculative = "off",
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Redo every row, ignoring what an earlier run of this job saved."
        ),
        retry_failed: RetryFailed = False,
        quiet: Quiet = False,
        summary_json: SummaryJson = None,
    ):
        from encdec_models.registry import how_to_get_a_model

        if model is None:
            raise UsageError(f"{task} needs a text model: {how_to_get_a_model()}")
        if output not in (None, "-") and Path(output).suffix.lower() not in TABLE_OUTPUT_EXTENSIONS:
            raise UsageError(
                f"-o {output}: the output format comes from its extension; end it in .parquet, .jsonl or "
                ".csv, or pass '-o -' for JSON Lines on stdout"
            )
        from encdec_cli.io.tables import open_table
        from encdec_cli.tasks.seq2seq import LazyEngine, Seq2SeqOptions, default_output, run_seq2seq

        gen = {
            "num_beams": num_beams,
            "num_return_sequences": num_return_sequences,
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": min_new_tokens,
            "length_penalty": length_penalty,
            "no_repeat_ngram_size": no_repeat_ngram_size,
            "repetition_penalty": repetition_penalty,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
        }
        opts = Seq2SeqOptions(
            task=task,
            column=column,
            output_column=output_column,
            prefix=prefix,
            source_lang=source_lang,
            target_lang=target_lang,
            target_lang_column=target_lang_column,
            truncate=truncate,
            generation={k: v for k, v in gen.items() if v is not None},
        )
        if input != "-":  # fail fast, before loading the model (stdin can be read only once)
            try:
                open_table(input, column).close()
            except OSError as e:
                raise UsageError(f"cannot read the input {input}: {e.strerror or e}") from None
        pipeline = common.pipeline_options(pipeline_parallel, pp_layers)
        spec = common.check_speculative(speculative, num_beams, "--num-beams")
        path = common.check_model(model, task)
        engine_options = (max_num_seqs, gpu_memory_utilization, enforce_eager, kv_dtype)
        dist, device, ranks = common.placement(
            path, device, dtype, data_parallel, quiet, engine_options, spec, no_prefix_cache, **pipeline
        )
        if ranks is None:
            common.check_dtype(dtype, device)
        engine = LazyEngine(  # loaded when some row must run: a finished job run again never loads it
            path,
            (lambda: ranks)
            if ranks is not None  # the ranks start, each loading the model, when some row must run
            else functools.partial(
                common.load_engine,
                *(path, device, dtype, *engine_options, quiet, no_prefix_cache),
                speculative=spec,
                **pipeline,
            ),
        )
        with errors.writing_to(output or default_output(input, opts)):
            return run_seq2seq(
                engine,
                input,
                output,
                opts,
                quiet=quiet,
                overwrite=overwrite,
                retry_failed=retry_failed,
                speculative=spec is not None,
                dist=dist,
            )

    command.__doc__ = TEXT_TASKS[task][1] + (
        "\n\nRows stream through the engine in bounded memory; the output keeps every input column, adds "
        "the result column and an 'error' column, and is written in input order. An interrupted run resumes "
        "where it stopped when the same command is run again.\n\nExit status: 0 all rows done, 1 some rows "
        "failed (their 'error' says why), 2 usage error, 3 reading or writing failed (a re-run resumes), "
        "130 interrupted (Ctrl-C), 143 stopped by SIGTERM."
    )
    return command


for _task in TEXT_TASKS:
    common.command(_task)(_text_command(_task))
