"""What the commands share: the Typer app, the options several commands take, the wrapper that turns
a command's faults into one ``error:`` line and a documented exit status, and the model checks that
run before a model loads.

Importing this imports neither torch nor transformers (``encdec --help`` stays fast).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from encdec_cli import errors
from encdec_cli.errors import UsageError
from encdec_cli.tasks import interrupts, summary
from encdec_models.registry import ModelNotFoundError

app = typer.Typer(
    help="Offline, throughput-first inference for encoder/decoder models: transcribe audio with "
    "Whisper, summarize and translate text with BART/T5-family models.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion, --show-completion (cli.py keeps them fast)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain text: "[...]" is shown, not taken as markup
)

WHISPER_MODEL_HELP = (
    "Whisper model: a packaged name (tiny.en [the default], base [multilingual]), a local Hugging Face "
    "or CTranslate2 Whisper folder, or a hub id already in the Hugging Face cache "
    "(e.g. openai/whisper-small)."
)
TEXT_MODEL_HELP = (
    "Text model (BART, mBART, Marian, Pegasus, T5, mT5): a local Hugging Face folder (config.json, "
    "weights, tokenizer files) or a hub id already in the Hugging Face cache, e.g. "
    "facebook/bart-large-cnn (fill the cache with `hf download ID` on a machine with internet)."
)
# options that several commands share
Device = Annotated[
    str,
    typer.Option(
        "--device",
        help="auto (CUDA if available), cpu, cuda or cuda:N; a comma-separated list (cuda:0,cuda:1) runs "
        "one engine process per entry (see --data-parallel).",
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16 "
        "(CUDA only: slow on the CPU).",
    ),
]
GpuMemory = Annotated[
    float,
    typer.Option(
        "--gpu-memory-utilization",
        help="Fraction of the GPU's memory the engine may use (weights, KV cache, CUDA graphs).",
    ),
]
EnforceEager = Annotated[bool, typer.Option("--enforce-eager", help="Disable CUDA graphs.")]
PipelineParallel = Annotated[
    int,
    typer.Option(
        "-pp",
        "--pipeline-parallel",
        min=1,
        help="Split the model's layers into this many pipeline stages, one process and device each "
        "(--device cuda:N: stage s on cuda:N+s; on the CPU they share the cores). For models larger "
        "than one GPU, or to run encoder and decoder work at once. Outputs are those of one process "
        "(also with --kv-dtype fp8: each stage's cache in fp8).",
    ),
]
PpLayers = Annotated[
    str | None,
    typer.Option(
        "--pp-layers",
        help="Layers per pipeline stage, encoder layers first then decoder layers, e.g. 6,6 for a "
        "12-layer model in 2 stages (default: balanced by estimated cost; the job summary's stage "
        "busy times show a bad split).",
    ),
]
NoPrefixCache = Annotated[
    bool,
    typer.Option(
        "--no-prefix-cache",
        help="Turn off automatic prefix caching: by default requests with the same encoder input (a "
        "duplicate file or row, a window decoded again at a fallback temperature, --best-of candidates) "
        "share one encoder run and its cache, kept until the memory is needed. Outputs are the same.",
    ),
]
KvDtype = Annotated[
    str,
    typer.Option(
        "--kv-dtype",
        help="KV cache values: auto (the model's dtype) or fp8 (e4m3 with a float32 scale per cached row: "
        "about half the bytes of bf16, so twice the sequences fit and each decode step reads half as "
        "much; the attention kernels read fp8 directly). It covers decoder self-attention and "
        "cross-attention alike (one memory pool holds both), and with -pp every stage's cache; "
        "cross-attention then keeps per-layer K/V. Outputs may change slightly (Whisper tiny.en: "
        "identical transcripts on the test speech). Off by default: on an H100, Whisper large-v3 at "
        "512 requests ran 5% slower than bf16 (see benchmarks/README.md).",
    ),
]
Speculative = Annotated[
    str,
    typer.Option(
        "--speculative",
        help="Speculative decoding: off; ngram[:K] (prompt lookup: up to K tokens copied from the "
        "input's and the output's own n-gram matches; default K 4); model:DIR[:K] (a smaller draft "
        "model with the same tokenizer, e.g. distil-whisper for large-v3). Outputs are unchanged "
        "(greedy: token for token; sampling: the same distribution). Not with beam search.",
    ),
]
DataParallelRanks = Annotated[
    int | None,
    typer.Option(
        "--data-parallel",
        "-dp",
        help="Run N engine processes, one per device (cuda:0..N-1, or N CPU processes with --device cpu); "
        "--device cuda:0,cuda:0 names each rank's device instead. One job: the same outputs, manifest and "
        "summary as one process. Under torchrun, leave it out: each torchrun process is one rank.",
    ),
]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No progress bar.")]
SummaryJson = Annotated[
    str | None,
    typer.Option(
        "--summary-json",
        metavar="FILE",
        help="Also write what the command did as JSON to FILE (counts, failures with their messages, "
        "work, wall time, throughput, engine statistics), written atomically, also when the command "
        "fails or is stopped.",
    ),
]
RetryFailed = Annotated[
    bool, typer.Option("--retry-failed", help="Redo the items that failed in an earlier run of this job.")
]
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
TABLE_OUTPUT_EXTENSIONS = (".parquet", ".pq", ".jsonl", ".ndjson", ".json", ".csv")
TRANSCRIPT_EXTENSIONS = (".txt", ".srt", ".vtt", ".tsv", ".json", ".jsonl")


class _Command(TyperCommand):
    """Usage lines name arguments as ``INPUTS...`` / ``[WORKLOADS]...``."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.name.upper() if param.required else f"[{param.name.upper()}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


job_stopped = False  # a job stopped on a stop signal and printed its summary (no more to say)


def command(name: str | None = None):
    """Register a command whose faults end in one line and a documented exit status: 2 usage (an
    option, an input or the model), 3 reading or writing failed; otherwise the status the command
    returns. A stop signal (typer turns its KeyboardInterrupt into status 130) is :func:`main`'s."""

    def register(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            global job_stopped
            interrupts.reset()
            try:
                summary.begin(kwargs.get("summary_json"), name or fn.__name__)  # --summary-json
                code = fn(*args, **kwargs)
            except typer.Exit:  # fail() inside the command: its summary is written
                raise
            except KeyboardInterrupt:  # before the job took over (loading): typer's status 130
                _summary_of_fault(interrupts.exit_status(), interrupts.stop_message())
                raise
            except Exception as e:
                # a stop signal that an import hook wrapped, or one that native code turned into an
                # error of its own (torch's "could not determine the shape of object type ..." when
                # the KeyboardInterrupt was raised in Python code it called): the stop is the cause
                if interrupts.caused_by_stop(e) or interrupts.stop_received():
                    _summary_of_fault(interrupts.exit_status(), interrupts.stop_message())
                    raise KeyboardInterrupt from None
                if isinstance(e, (ValueError, ModelNotFoundError)):  # UsageError, TableError, model errors
                    fail(str(e), errors.USAGE)
                if isinstance(e, OSError):
                    fail(errors.describe_os_error(e), errors.IO_FAILURE)
                if isinstance(e, errors.PipelineFailure):  # a pipeline stage died: what finished is saved
                    fail(str(e), errors.ITEMS_FAILED)
                # a bug: the summary says so, the traceback follows
                _summary_of_fault(1, f"internal error: {type(e).__name__}: {e}")
                raise
            try:
                summary.finish(code or 0)
            except OSError as e:
                fail(errors.describe_os_error(e), errors.IO_FAILURE)
            if code in interrupts.STOP_SIGNALS.values():  # the job's summary said it stopped
                job_stopped = True
            raise typer.Exit(code or 0)

        return app.command(name, cls=_Command)(run)

    return register


def pipeline_options(pipeline_parallel: int, pp_layers: str | None) -> dict:
    """The engine options of -pp / --pp-layers (the layer counts are checked against the model when
    it loads)."""
    if pp_layers is None or not pp_layers.strip():
        return {"pipeline_parallel": pipeline_parallel}
    try:
        layers = tuple(int(x) for x in pp_layers.split(","))
    except ValueError:
        raise UsageError(
            f"--pp-layers takes comma-separated layer counts, one per stage, e.g. 6,6; got {pp_layers!r}"
        ) from None
    if len(layers) != pipeline_parallel:
        raise UsageError(
            f"--pp-layers {pp_layers}: give one number per stage of --pipeline-parallel {pipeline_parallel}"
        )
    return {"pipeline_parallel": pipeline_parallel, "pp_layers": layers}


def _summary_of_fault(code: int, message: str) -> None:
    """A command ended by a fault: its summary JSON (when asked for) says so."""
    try:
        summary.finish(code, message)
    except OSError as e:
        typer.secho(f"warning: {errors.describe_os_error(e)}", fg="yellow", err=True)


def fail(message: str, code: int = errors.USAGE):
    """End the command with one ``error:`` line and ``code`` (its summary JSON says so too); a stop
    signal meanwhile is only noted."""
    with interrupts.noted_only():
        _summary_of_fault(code, message)
        typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def check_model(name: str, command: str, language: str | None = None, task: str = "transcribe") -> Path:
    """The folder of model ``name`` once it is known to fit ``command``; reads its config and tokenizer
    files only. Raises UsageError naming the flag that fixes a mismatch."""
    from encdec_models.registry import TEXT_AND_IMAGES, inspect_model, resolve_model_path

    path = resolve_model_path(name)
    info = inspect_model(path)
    reads_images = info.is_vision or info.architecture in TEXT_AND_IMAGES
    if (command == "image-to-text" and not reads_images) or (command != "image-to-text" and info.is_vision):
        raise UsageError(
            f"model {name!r} is an image-to-text model: use it with encdec image-to-text"
            if info.is_vision
            else f"model {name!r} ({info.architecture}) does not read images: image-to-text takes a vision "
            "encoder/decoder model (TrOCR, Donut), Florence-2 or T5Gemma 2 in -m"
        )
    if command == "transcribe" and not info.is_speech:
        raise UsageError(
            f"model {name!r} is a text model ({info.architecture}), not a Whisper speech model: use it "
            "with encdec summarize, translate or generate; transcribe takes a Whisper model (-m tiny.en, "
            "-m base)"
        )
    if command != "transcribe" and info.is_speech:
        raise UsageError(
            f"model {name!r} is a {'Whisper' if info.is_whisper else 'Moonshine'} speech model: use it with "
            f"encdec transcribe; {command} needs a text model (BART, mBART, Marian, Pegasus, NLLB, M2M100, "
            "T5, mT5, T5Gemma, T5Gemma 2) in -m"
        )
    if info.is_speech and not info.is_whisper and (task == "translate" or language not in (None, "en")):
        raise UsageError(
            f"{info.architecture} transcribes English only: drop --task translate / --language, or pass a "
            "multilingual Whisper model (-m base)"
        )
    if info.multilingual is False:
        if task == "translate":
            raise UsageError(
                f"--task translate needs a multilingual model; {name!r} is English-only: pass -m base "
                "(or another multilingual Whisper)"
            )
        if language not in (None, "en"):
            raise UsageError(
                f"--language {language}: {name!r} is English-only; drop --language, or pass a "
                "multilingual model (-m base)"
            )
    if language is not None and info.languages and language not in info.languages:
        raise UsageError(
            f"unknown --language {language!r}; this model knows: {', '.join(sorted(info.languages))}"
        )
    return path


def check_dtype(dtype: str, device: str) -> None:
    """Raises UsageError unless --dtype is known and suits --device."""
    if dtype.lower() not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    from encdec_models.loading import resolve_device

    if dtype.lower() in ("float16", "fp16") and resolve_device(device).type == "cpu":
        raise UsageError(
            "--dtype float16 runs slowly on the CPU (it has no half-precision matrix kernels): use "
            "--dtype float32 (the CPU default) or bfloat16, or run on a GPU (--device cuda)"
        )


def check_tokenizer(path: Path) -> None:
    """UsageError for a model folder without tokenizer files: the commands read and write text."""
    from encdec_models.registry import UnsupportedModelError, check_tokenizer

    try:
        check_tokenizer(path)
    except UnsupportedModelError as e:
        raise UsageError(str(e)) from None


def load_engine(
    path: Path,
    device: str,
    dtype: str,
    max_num_seqs: int,
    gpu_memory_utilization: float,
    enforce_eager: bool,
    kv_dtype: str = "auto",
    quiet: bool = False,
    no_prefix_cache: bool = False,
    **extra,
):
    """Load the model folder into an Engine; unless ``quiet``, say on stderr what was loaded where."""
    check_dtype(dtype, device)
    check_kv_dtype(kv_dtype)
    check_tokenizer(path)
    from encdec_cli.engine import Engine

    try:
        engine = Engine(
            str(path),
            device=device,
            dtype=dtype.lower(),
            max_num_seqs=max_num_seqs,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            kv_dtype=kv_dtype,
            prefix_cache=not no_prefix_cache,
            **extra,
        )
    except (RuntimeError, ModelNotFoundError) as e:  # e.g. a dtype the model cannot run in, no weights
        raise UsageError(str(e)) from None  # (not an OSError: a job's writing_to would name its output)
    if not quiet:
        dt = str(engine.dtype).removeprefix("torch.")
        kv = "" if kv_dtype == "auto" else f", KV cache {engine.kv_dtype_name}"
        typer.echo(f"model {engine.loaded.path} on {engine.device} ({dt}{kv})", err=True)
    return engine


def check_speculative(speculative: str, num_beams: int | None, beam_flag: str) -> str | None:
    """The --speculative value for the engine (None: off); UsageError for a bad value or beams."""
    from encdec_cli.engine import parse_speculative

    if parse_speculative(speculative) is None:
        return None
    if num_beams is not None and num_beams > 1:
        raise UsageError(
            f"--speculative cannot be combined with beam search ({beam_flag} {num_beams}); "
            f"use {beam_flag} 1 or --speculative off"
        )
    return speculative


ENGINE_OPTIONS = (
    "max_num_seqs",
    "gpu_memory_utilization",
    "enforce_eager",
    "kv_dtype",
)  # load_engine's, in order


def check_kv_dtype(kv_dtype: str) -> None:
    """UsageError for a --kv-dtype the engine does not have."""
    from encdec_cli.engine import KV_DTYPES

    if kv_dtype not in KV_DTYPES:
        raise UsageError(f"--kv-dtype takes {' or '.join(KV_DTYPES)}, got {kv_dtype!r}")


def torchrun_rank(device: str, ranks: int | None):
    """(this process's place in a torchrun job or None, the device it runs on)."""
    from encdec_cli.tasks.distributed import Distributed

    dist = Distributed.from_env()
    return dist, device if dist is None else dist.device(device, ranks)


def data_parallel(path: Path, device: str, dtype: str, ranks: int | None, quiet: bool, **config):
    """The ranks of a data-parallel job (``encdec_cli.tasks.data_parallel``), or None when ``--device``
    and ``--data-parallel`` ask for one process; ``config``: the engine's options."""
    from encdec_cli.tasks.data_parallel import DataParallel, rank_devices
    from encdec_cli.tasks.ranks import EngineSpec

    devices = rank_devices(device, ranks)
    if len(devices) == 1:
        return None
    for d in set(devices):
        check_dtype(dtype, d)
    spec = EngineSpec(str(path), dtype.lower(), tuple(sorted(config.items())))
    say = (lambda message: None) if quiet else (lambda message: typer.echo(message, err=True))
    if not quiet:
        typer.echo(f"model {path}: {len(devices)} ranks on {', '.join(devices)}", err=True)
    return DataParallel(spec, devices, log=say)


def placement(
    path: Path,
    device: str,
    dtype: str,
    ranks: int | None,
    quiet: bool,
    engine_options: tuple,
    speculative: str | None,
    no_prefix_cache: bool,
    **extra,
):
    """Where a job runs: (its place in a torchrun job or None, this process's device, the ranks of a
    data-parallel job or None); ``engine_options``: ``ENGINE_OPTIONS``' values, ``extra``: more
    EngineConfig fields for the ranks' engines."""
    check_kv_dtype(dict(zip(ENGINE_OPTIONS, engine_options)).get("kv_dtype", "auto"))
    dist, device = torchrun_rank(device, ranks)
    if dist is not None:
        return dist, device, None
    config = {**dict(zip(ENGINE_OPTIONS, engine_options)), **extra}
    if speculative:
        config["speculative"] = speculative
    if no_prefix_cache:
        config["prefix_cache"] = False
    return dist, device, data_parallel(path, device, dtype, ranks, quiet, **config)


def floats(name: str, text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{name} takes comma-separated numbers, e.g. 0,0.2,0.4; got {text!r}") from None


def threshold(name: str, text: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} takes a number or 'off', got {text!r}") from None
