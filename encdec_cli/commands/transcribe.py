"""``encdec transcribe``: speech to text with Whisper or Moonshine (the job: tasks.transcribe_job)."""

from __future__ import annotations

from pathlib import Path

import typer

from encdec_cli import errors
from encdec_cli.commands import common
from encdec_cli.commands.common import (
    TRANSCRIPT_EXTENSIONS,
    WHISPER_MODEL_HELP,
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
    SummaryJson,
)
from encdec_cli.errors import UsageError


@common.command()
def transcribe(
    inputs: list[str] = typer.Argument(
        ...,
        help="Audio files, folders (searched recursively), '-' to read paths from stdin, or "
        "tables with an audio column: Parquet, JSONL, Arrow, or a folder saved by Hugging Face "
        "datasets' save_to_disk.",
    ),
    model: str = typer.Option("tiny.en", "-m", "--model", help=WHISPER_MODEL_HELP),
    output: str = typer.Option(
        ".",
        "-o",
        "--output-dir",
        help="Folder for the outputs (input folders' structure is mirrored), a .parquet file for "
        "one table of transcripts (a row per input, segments as a list of structs; Hugging Face "
        "datasets reads it), or '-' to print JSON Lines to stdout.",
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
        "audio",
        "--audio-column",
        help="Column with the audio in table inputs: file bytes, paths, or the datasets shapes "
        "{bytes, path} and {array, sampling_rate}.",
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
    vad: bool | None = typer.Option(
        None,
        "--vad/--no-vad",
        help="Find the speech first with Silero VAD and decode only it: windows of <= 30 s of speech "
        "regions joined, so silence, noise and music never reach the decoder (no words invented "
        "there); timestamps stay on the file's timeline. Default: on with --long-form chunked; "
        "sequential long-form takes --no-vad only.",
    ),
    vad_threshold: float = typer.Option(
        0.5, "--vad-threshold", help="Speech probability from which a 32 ms frame counts as speech (--vad)."
    ),
    min_silence: float = typer.Option(
        0.5,
        "--min-silence",
        help="Seconds of non-speech that end a speech region (--vad); shorter pauses stay inside one.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the sampling fallbacks (runs are repeatable)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Limit per 30 s window."),
    device: Device = "auto",
    data_parallel: DataParallelRanks = None,
    dtype: Dtype = "auto",
    max_num_seqs: int = typer.Option(
        64,
        "--max-num-seqs",
        help="Windows decoded together per step (beams count singly). 64, lower than the text commands' "
        "1024: windows come from audio decoded on the host as the job goes, and each holds 1500 encoder "
        "positions of cache; raise it on a large GPU fed with many files (encdec bench runs W1 at 512).",
    ),
    gpu_memory_utilization: GpuMemory = 0.9,
    enforce_eager: EnforceEager = False,
    pipeline_parallel: PipelineParallel = 1,
    pp_layers: PpLayers = None,
    no_prefix_cache: NoPrefixCache = False,
    kv_dtype: common.KvDtype = "auto",
    speculative: common.Speculative = "off",
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo files the output folder's manifest marks as done."
    ),
    retry_failed: RetryFailed = False,
    quiet: Quiet = False,
    summary_json: SummaryJson = None,
):
    """Transcribe (or translate) speech with Whisper.

    Long audio: cut into 30 s windows at quiet points, or window after window (--long-form).
    Windows of all files are batched together.
    Segments are timed by Whisper's timestamp tokens (--no-timestamps: one per window). A Moonshine
    model reads each quiet-point chunk's raw waveform and has no timestamp tokens: its segments are
    the chunks, timed by their boundaries (Whisper-only options do not apply to it).
    Repetitive or unlikely windows are redone at higher temperatures; silent ones are skipped.
    Writes INPUT.{txt,srt,vtt,tsv,json} per input; a manifest in the output folder makes re-runs
    skip finished files. Exit status: 0 all done, 1 some files failed (now or, skipped now, in an
    earlier run), 2 usage error, 3 writing failed, 130 interrupted (Ctrl-C), 143 stopped by SIGTERM.
    """
    from encdec_cli.io.subtitles import resolve_formats
    from encdec_cli.tasks.transcribe import TranscribeOptions, engine_window
    from encdec_cli.tasks.transcribe_job import check_inputs, check_output, is_table_output, run_transcribe
    from encdec_cli.tasks.vad import VadOptions

    formats = resolve_formats(output_format)
    opts = TranscribeOptions(
        language=language,
        task=task,
        max_new_tokens=max_new_tokens,
        timestamps=timestamps,
        long_form=long_form,
        temperatures=common.floats("--temperature", temperature),
        beam_size=beam_size,
        best_of=best_of,
        initial_prompt=initial_prompt,
        condition_on_previous_text=condition_on_previous_text,
        compression_ratio_threshold=common.threshold(
            "--compression-ratio-threshold", compression_ratio_threshold
        ),
        logprob_threshold=common.threshold("--logprob-threshold", logprob_threshold),
        no_speech_threshold=common.threshold("--no-speech-threshold", no_speech_threshold),
        max_initial_timestamp=max_initial_timestamp,
        seed=seed,
        word_timestamps=word_timestamps,
        vad=VadOptions(vad_threshold, min_silence)
        if (long_form == "chunked" if vad is None else vad)
        else None,
    )
    out = Path(output)
    file = out.is_file() or not out.exists() and out.suffix.lower() in TRANSCRIPT_EXTENSIONS
    if output != "-" and not is_table_output(output) and file:
        raise UsageError(
            f"-o {output}: transcribe writes a folder of transcripts (one file per input and format); "
            "pass a folder (-o transcripts), a .parquet file for one table, or '-o -' for JSON Lines "
            "on stdout"
        )
    check_inputs(inputs, audio_column, id_column)  # fail fast on missing inputs
    check_output(output, formats)
    pipeline = common.pipeline_options(pipeline_parallel, pp_layers)
    if word_timestamps and pipeline_parallel > 1:
        raise UsageError(
            "--word-timestamps needs the whole decoder in one process (it re-runs it to align words); "
            "drop --pipeline-parallel or --word-timestamps"
        )
    spec = common.check_speculative(speculative, beam_size, "--beam-size")
    path = common.check_model(model, "transcribe", language, task)
    window = engine_window(max_num_seqs)
    engine_options = (max_num_seqs, gpu_memory_utilization, enforce_eager, kv_dtype)
    dist, device, ranks = common.placement(
        *(path, device, dtype, data_parallel, quiet, engine_options, spec, no_prefix_cache),
        window=window,
        **pipeline,
    )
    engine = ranks or common.load_engine(
        *(path, device, dtype, *engine_options, quiet, no_prefix_cache),
        window=window,
        speculative=spec,
        **pipeline,
    )
    with errors.writing_to(output):
        return run_transcribe(
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
            dist=dist,
        )
