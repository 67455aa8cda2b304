"""The ``encdec`` command line: one small function per command; the work is in tasks/."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import typer

app = typer.Typer(
    help="Offline, throughput-first inference for encoder/decoder models: transcribe audio with "
    "Whisper, summarize and translate text with BART/T5-family models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

MODEL_HELP = (
    "Model: a local Hugging Face folder, a CTranslate2 Whisper folder, a packaged name "
    "(tiny.en [default for transcribe], base), or a hub id already in the HF cache."
)
DEVICE_HELP = "auto (CUDA if available), cpu, cuda or cuda:N."
DTYPE_HELP = "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16."


@app.callback()
def _root():
    """encdec: transcribe, summarize, translate and generate with encoder/decoder models."""


def _engine(
    model: str,
    device: str,
    dtype: str,
    max_num_seqs: int,
    gpu_memory_utilization: float,
    enforce_eager: bool,
    quiet: bool = False,
    **extra,
):
    """Load the model into an Engine; unless ``quiet``, say on stderr what was loaded where."""
    from encdec_cli.engine import Engine

    engine = Engine(
        model,
        device=device,
        dtype=dtype,
        max_num_seqs=max_num_seqs,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        **extra,
    )
    if not quiet:
        dt = str(engine.dtype).removeprefix("torch.")
        typer.echo(f"model {engine.loaded.path} on {engine.device} ({dt})", err=True)
    return engine


def _fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def _floats(name: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{name} takes comma-separated numbers, e.g. 0,0.2,0.4; got {text!r}") from None


def _threshold(name: str, text: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} takes a number or 'off', got {text!r}") from None


@app.command()
def transcribe(
    inputs: list[str] = typer.Argument(
        ...,
        help="Audio files, folders (searched recursively), '-' to read "
        "paths from stdin, or Parquet/JSONL tables with an audio column.",
    ),
    model: str = typer.Option("tiny.en", "-m", "--model", help=MODEL_HELP),
    output: str = typer.Option(
        ".",
        "-o",
        "--output-dir",
        help="Folder for the outputs (input folders' "
        "structure is mirrored), or '-' to print JSON Lines to stdout.",
    ),
    output_format: list[str] = typer.Option(
        ["all"], "-f", "--output-format", help="txt, srt, vtt, tsv, json or all; repeat for several."
    ),
    language: str | None = typer.Option(
        None,
        "--language",
        help="Spoken language code (e.g. en, de); detected per file when omitted on multilingual models.",
    ),
    task: str = typer.Option("transcribe", "--task", help="transcribe, or translate (to English)."),
    audio_column: str = typer.Option(
        "audio", "--audio-column", help="Column with audio bytes or paths in table inputs."
    ),
    id_column: str | None = typer.Option(
        None,
        "--id-column",
        help="Column naming each table row's outputs (TABLE/ID.txt). Default: 'id' when the table "
        "has it, else the audio's file name, else the row number.",
    ),
    ordered: bool = typer.Option(
        False, "--ordered", help="With -o -: print records in input order (default: as files finish)."
    ),
    timestamps: bool = typer.Option(
        True,
        "--timestamps/--no-timestamps",
        help="Timed segments from Whisper's timestamp tokens, or one segment per window (faster).",
    ),
    long_form: str = typer.Option(
        "chunked",
        "--long-form",
        help="chunked: cut long audio at quiet points and decode all windows at once (fastest); "
        "sequential: openai-whisper's 30 s windows, each starting at the previous one's last "
        "timestamp and prompted with its text (files are still batched with each other).",
    ),
    initial_prompt: str | None = typer.Option(
        None, "--initial-prompt", help="Text the transcript continues (names, spelling, style)."
    ),
    condition_on_previous_text: bool = typer.Option(
        True,
        "--condition-on-previous-text/--no-condition-on-previous-text",
        help="Prompt each window with the text before it (sequential windows of a file, and the "
        "continuation windows of a chunk). Off: less repetition, less consistency.",
    ),
    beam_size: int = typer.Option(1, "--beam-size", help="Beam search width at temperature 0 (1 = greedy)."),
    best_of: int = typer.Option(
        1, "--best-of", help="Candidates sampled at a fallback temperature; the likeliest is kept."
    ),
    temperature: str = typer.Option(
        "0,0.2,0.4,0.6,0.8,1.0",
        "--temperature",
        help="Comma-separated temperatures tried in order while a window looks repetitive or unlikely "
        "(see the thresholds); a single 0 turns fallback off.",
    ),
    compression_ratio_threshold: str = typer.Option(
        "2.4",
        "--compression-ratio-threshold",
        help="Fall back when the text's gzip ratio is above this; 'off'.",
    ),
    logprob_threshold: str = typer.Option(
        "-1.0",
        "--logprob-threshold",
        help="Fall back when the mean token log-probability is below this; 'off'.",
    ),
    no_speech_threshold: str = typer.Option(
        "0.6",
        "--no-speech-threshold",
        help="Skip a window as silence when P(no speech) is above this and its log-probability is "
        "below --logprob-threshold; 'off'.",
    ),
    max_initial_timestamp: float = typer.Option(
        1.0, "--max-initial-timestamp", help="Latest first timestamp of a window, in seconds."
    ),
    word_timestamps: bool = typer.Option(
        False,
        "--word-timestamps",
        help="Time every word (cross-attention alignment, as openai-whisper): words in the json output, "
        "segment times tightened to the speech. Costs one more encoder and decoder pass per window.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the sampling fallbacks (runs are repeatable)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Limit per 30 s window."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    max_num_seqs: int = typer.Option(64, "--max-num-seqs", help="Windows decoded together per step."),
    gpu_memory_utilization: float = typer.Option(
        0.9, "--gpu-memory-utilization", help="Fraction of GPU memory the engine may use."
    ),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="Disable CUDA graphs."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo files the output folder's manifest marks as done."
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Retry files that failed in an earlier run."
    ),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
):
    """Transcribe (or translate) speech with Whisper.

    Long audio: cut into 30 s windows at quiet points, or window after window (--long-form).
    Windows of all files are batched together.
    Segments are timed by Whisper's timestamp tokens (--no-timestamps: one per window).
    Repetitive or unlikely windows are redone at higher temperatures; silent ones are skipped.
    Writes INPUT.{txt,srt,vtt,tsv,json} per input; a manifest in the output folder makes re-runs
    skip finished files. Exit status: 0 all done, 1 some files failed (now or, skipped now, in an
    earlier run), 2 usage error, 130 interrupted.
    """
    from encdec_cli.io.subtitles import resolve_formats
    from encdec_cli.tasks.transcribe import TranscribeOptions
    from encdec_cli.tasks.transcribe_job import UsageError, check_inputs, check_output, run_transcribe

    try:
        formats = resolve_formats(output_format)
        opts = TranscribeOptions(
            language=language,
            task=task,
            max_new_tokens=max_new_tokens,
            timestamps=timestamps,
            long_form=long_form,
            temperatures=_floats("--temperature", temperature),
            beam_size=beam_size,
            best_of=best_of,
            initial_prompt=initial_prompt,
            condition_on_previous_text=condition_on_previous_text,
            compression_ratio_threshold=_threshold(
                "--compression-ratio-threshold", compression_ratio_threshold
            ),
            logprob_threshold=_threshold("--logprob-threshold", logprob_threshold),
            no_speech_threshold=_threshold("--no-speech-threshold", no_speech_threshold),
            max_initial_timestamp=max_initial_timestamp,
            seed=seed,
            word_timestamps=word_timestamps,
        )
        check_inputs(inputs, audio_column, id_column)  # fail fast on missing inputs
        check_output(output, formats)
    except (UsageError, ValueError) as e:
        _fail(str(e))
    try:
        engine = _engine(
            model,
            device,
            dtype,
            max_num_seqs,
            gpu_memory_utilization,
            enforce_eager,
            quiet,
            window=max(2 * max_num_seqs, 16),
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        _fail(str(e))
    try:
        code = run_transcribe(
            engine,
            inputs,
            output,
            formats,
            opts,
            audio_column=audio_column,
            overwrite=overwrite,
            retry_failed=retry_failed,
            quiet=quiet,
            id_column=id_column,
            ordered=ordered,
        )
    except (UsageError, ValueError) as e:
        _fail(str(e))
    raise typer.Exit(code)


TEXT_DOCS = {
    "summarize": "Summarize each row's text with a BART/Pegasus/T5-family model.",
    "translate": "Translate each row's text with a Marian/mBART/T5-family model.",
    "generate": "Run any supported encoder/decoder text model on each row's text (raw generation).",
}


def _text_command(task: str):
    def command(
        input: str = typer.Argument(
            ...,
            help="Input table: .parquet, .jsonl, .csv, .txt (one item per line), "
            "or '-' for stdin (JSON Lines if lines are JSON objects, else lines).",
        ),
        model: str = typer.Option(..., "-m", "--model", help=MODEL_HELP),
        output: str | None = typer.Option(
            None,
            "-o",
            "--output",
            help="Output table (.parquet, .jsonl, "
            ".csv) or '-' for JSON Lines on stdout. Default: next to the "
            f"input, e.g. in.{task}.parquet. All input columns are kept.",
        ),
        column: str = typer.Option("text", "--column", help="Input column with the text."),
        output_column: str | None = typer.Option(
            None, "--output-column", help="Result column name (default: summary / translation / generated)."
        ),
        prefix: str | None = typer.Option(
            None,
            "--prefix",
            help="Text prepended to every input, e.g. "
            "'summarize: '. Default: the model's own task prefix, if any.",
        ),
        source_lang: str | None = typer.Option(
            None, "--source-lang", help="mBART-style source language code, e.g. en_XX."
        ),
        target_lang: str | None = typer.Option(
            None,
            "--target-lang",
            help="mBART-style target language code, e.g. de_DE (forced as the first output token).",
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
        repetition_penalty: float | None = typer.Option(None, "--repetition-penalty"),
        temperature: float | None = typer.Option(None, "--temperature", help="> 0 samples; 0 is greedy."),
        top_k: int | None = typer.Option(None, "--top-k"),
        top_p: float | None = typer.Option(None, "--top-p"),
        seed: int | None = typer.Option(None, "--seed", help="Seed for sampling."),
        truncate: bool = typer.Option(
            True,
            "--truncate/--no-truncate",
            help="Cut inputs longer than the "
            "model's limit (counted in the summary), or make them row errors.",
        ),
        device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
        dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
        max_num_seqs: int = typer.Option(512, "--max-num-seqs", help="Sequences decoded together per step."),
        gpu_memory_utilization: float = typer.Option(0.9, "--gpu-memory-utilization"),
        enforce_eager: bool = typer.Option(False, "--enforce-eager", help="Disable CUDA graphs."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Redo every row, ignoring what an earlier run of this job saved."
        ),
        retry_failed: bool = typer.Option(
            False, "--retry-failed", help="Redo the rows that failed in an earlier run of this job."
        ),
        quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
    ):
        from encdec_cli.io.tables import TableError, open_table
        from encdec_cli.tasks.seq2seq import Seq2SeqOptions, run_seq2seq

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
        try:
            opts = Seq2SeqOptions(
                task=task,
                column=column,
                output_column=output_column,
                prefix=prefix,
                source_lang=source_lang,
                target_lang=target_lang,
                truncate=truncate,
                generation={k: v for k, v in gen.items() if v is not None},
            )
            if input != "-":  # fail fast, before loading the model (stdin can be read only once)
                open_table(input, column).close()
            engine = _engine(model, device, dtype, max_num_seqs, gpu_memory_utilization, enforce_eager, quiet)
            code = run_seq2seq(
                engine, input, output, opts, quiet=quiet, overwrite=overwrite, retry_failed=retry_failed
            )
        except (OSError, ValueError, RuntimeError, TableError) as e:
            _fail(str(e))
        raise typer.Exit(code)

    command.__doc__ = TEXT_DOCS[task] + (
        "\n\nRows stream through the engine in bounded memory; the output keeps every input column, adds "
        "the result column and an 'error' column, and is written in input order. An interrupted run resumes "
        "where it stopped when the same command is run again.\n\nExit status: 0 all rows done, 1 some rows "
        "failed (their 'error' says why), 2 usage error, 130 interrupted."
    )
    return command


for _task in TEXT_DOCS:
    app.command(_task)(_text_command(_task))


@app.command()
def bench(
    workloads: list[str] = typer.Argument(
        None, help="Workload ids W1..W5 of benchmarks/WORKLOADS.md (default: all)."
    ),
    baseline: str = typer.Option(
        "hf", "--baseline", help="hf: also time transformers generate in the same run; none: ours only."
    ),
    baseline_batch: list[int] = typer.Option(
        [16, 64, 128],
        "--baseline-batch",
        help="transformers batch sizes to try (the best counts; Whisper always uses 64).",
    ),
    out: str | None = typer.Option(
        None, "--out", help="JSON results file (default: benchmarks/results/<device>-<time>.json)."
    ),
    max_num_seqs: int = typer.Option(
        512,
        "--max-num-seqs",
        help="Sequences per engine step (beams count singly); the KV pool limits what is admitted.",
    ),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="Disable CUDA graphs."),
    scale: float = typer.Option(1.0, "--scale", help="Fraction of each workload's requests (quick checks)."),
    profile: bool = typer.Option(False, "--profile", help="Also time each engine step phase (extra run)."),
    cross: str = typer.Option(
        "auto",
        "--cross",
        help="Cross-attention cache: auto (absorbed where the Hopper kernel runs it), absorbed (the encoder "
        "output once, K/V projections absorbed), kv (K and V per decoder layer).",
    ),
):
    """Run the standard workloads (random weights of the real architectures, fixed output lengths)
    on the GPU, ours and the transformers baseline in one process; print a table and write JSON."""
    import torch

    from encdec_cli.tasks.bench import WORKLOADS, device_rates, run_workload, write_results

    if not torch.cuda.is_available():
        _fail("encdec bench needs a CUDA GPU")
    absorb = {"auto": None, "absorbed": True, "kv": False}.get(cross, "bad")
    if absorb == "bad":
        _fail(f"--cross must be auto, absorbed or kv, got {cross!r}")
    ids = [w.upper() for w in (workloads or list(WORKLOADS))]
    bad = [w for w in ids if w not in WORKLOADS]
    if bad:
        _fail(f"unknown workload(s) {', '.join(bad)}; choose from {', '.join(WORKLOADS)}")
    results = []
    dev = torch.cuda.get_device_name().replace(" ", "-")
    path = Path(out or f"benchmarks/results/{dev}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    rates = device_rates()
    typer.echo(
        f"{torch.cuda.get_device_name()}: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {rates['bf16_flop_per_s'] / 1e12:.0f} TFLOP/s (the floors divide by these)",
        err=True,
    )
    for wid in ids:
        res = run_workload(
            wid,
            baseline == "hf",
            tuple(baseline_batch),
            {
                "max_num_seqs": max_num_seqs,
                "enforce_eager": enforce_eager,
                "profile": profile,
                "absorb_cross": absorb,
            },
            scale,
            rates,
        )
        results.append(res)
        write_results(results, path, rates)
        base = (
            f"{res['baseline']:,.1f} (batch {res['baseline_batch']})  x{res['ratio']:.2f}"
            if "baseline" in res
            else ""
        )
        typer.echo(
            f"{wid} {res['model']:<18} {res['metric']:<13} ours {res['ours']:,.1f}  baseline {base}  "
            f"floor {res['floor_fraction']:.0%}",
            err=True,
        )
    typer.echo(f"wrote {path}", err=True)


def main():
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    app()


__all__ = ["app", "main", "Path"]
