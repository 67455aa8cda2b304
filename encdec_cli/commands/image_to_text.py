"""``encdec image-to-text``: OCR and captioning with vision encoder/decoder models (the job:
encdec_cli.tasks.image_to_text)."""

from __future__ import annotations

import typer

from encdec_cli import errors
from encdec_cli.commands import common
from encdec_cli.commands.common import (
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

VISION_MODEL_HELP = (
    "Image-to-text model: a VisionEncoderDecoderModel folder (TrOCR: ViT/DeiT + TrOCR decoder; Donut: "
    "Swin + mBART; or a ViT/DeiT/Swin encoder with a TrOCR/BART/mBART/RoBERTa decoder) or a Florence-2 "
    "folder (transformers' native florence2, e.g. florence-community/Florence-2-large), with its tokenizer "
    "and processor files, or a hub id already in the Hugging Face cache (e.g. microsoft/trocr-base-printed)."
)


@common.command("image-to-text")
def image_to_text(
    inputs: list[str] = typer.Argument(
        ...,
        help="Image files (png, jpg, webp, bmp, gif, tiff), folders (searched recursively), '-' to read "
        "paths from stdin, or Parquet/JSONL tables with an image column (bytes, paths, or the Hugging "
        "Face datasets {bytes, path} struct).",
    ),
    model: str = typer.Option(..., "-m", "--model", help=VISION_MODEL_HELP),
    output: str | None = typer.Option(
        None,
        "-o",
        "--output",
        help="-f txt: the folder for NAME.txt per image (default: the current folder; input folders' "
        "structure is mirrored). -f jsonl|parquet: the table file (default image-to-text.jsonl / "
        ".parquet). '-': JSON Lines on stdout.",
    ),
    output_format: str = typer.Option(
        "txt",
        "-f",
        "--output-format",
        help="txt (a file per image, recorded in the folder's manifest), jsonl or parquet (one table: "
        "input, row, text, error; in input order, resumable).",
    ),
    task: str | None = typer.Option(
        None,
        "--task",
        help="Florence-2: its task token, <CAPTION> (the default), <DETAILED_CAPTION>, "
        "<MORE_DETAILED_CAPTION>, <OCR>, <OCR_WITH_REGION>, <OD>, <DENSE_REGION_CAPTION>, <REGION_PROPOSAL>, "
        "<CAPTION_TO_PHRASE_GROUNDING> (with --prompt), ...; tasks with coordinates write boxes in image "
        "pixels (NAME.json with -f txt, a 'regions' JSON column in tables). Donut: a task prompt that starts "
        "the decoder in place of the decoder start token, e.g. <s_cord-v2> or <s_docvqa>.",
    ),
    prompt: str | None = typer.Option(
        None,
        "--prompt",
        help="Donut/TrOCR: text the decoder continues from, after the task prompt (e.g. a question). "
        "Florence-2: the input of tasks that take one (the caption to ground, the region). "
        "T5Gemma 2: the encoder's text with the image, e.g. 'Describe this image.' (the image goes "
        "where <start_of_image> stands, else before the text).",
    ),
    image_column: str = typer.Option(
        "image", "--image-column", help="Column with image bytes or paths in table inputs."
    ),
    id_column: str | None = typer.Option(
        None,
        "--id-column",
        help="-f txt: column naming each table row's output (TABLE/ID.txt). Default: 'id' when the table "
        "has it, else the image's file name, else the row number.",
    ),
    num_beams: int | None = typer.Option(
        None, "--num-beams", help="Beam search width (default: the model's)."
    ),
    max_new_tokens: int | None = typer.Option(
        None, "--max-new-tokens", help="Most tokens generated per image (default: the model's limit)."
    ),
    workers: int = typer.Option(
        0, "--workers", help="Threads that decode and preprocess images (0: one per core, at most 8)."
    ),
    device: Device = "auto",
    dtype: Dtype = "auto",
    max_num_seqs: int = typer.Option(256, "--max-num-seqs", help="Images decoded together per step."),
    gpu_memory_utilization: GpuMemory = 0.9,
    enforce_eager: EnforceEager = False,
    no_prefix_cache: NoPrefixCache = False,
    kv_dtype: common.KvDtype = "auto",
    speculative: Speculative = "off",
    pipeline_parallel: PipelineParallel = 1,
    pp_layers: PpLayers = None,
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo images an earlier run finished."),
    retry_failed: RetryFailed = False,
    quiet: Quiet = False,
    summary_json: SummaryJson = None,
):
    """Read text from images (OCR), describe them or locate objects, with vision encoder/decoder
    models (TrOCR, Donut), Florence-2 and T5Gemma 2.

    Images are decoded with Pillow and preprocessed with the model's own image processor settings
    (resize, rescale, normalise) in worker threads. ViT/DeiT encoders run on the engine's packed
    encoder path and kernels; Swin encoders (Donut: windowed attention with relative-position
    biases and shifted-window masks) and Florence-2's DaViT vision tower (window and channel-group
    attention) are not what the kernels compute: they run on the reference (plain PyTorch) path.
    Florence-2's image tokens and task prompt then run through the BART encoder on the packed path;
    T5Gemma 2's SigLIP tower runs on the packed path, its image tokens and --prompt through its encoder.
    A bad image (unreadable, damaged, empty, over the decompression-bomb limit of about 89
    megapixels) gets an error record and the rest goes on. Exit status: 0 all done, 1 some images
    failed (now or in an earlier run), 2 usage error, 3 writing failed, 130 interrupted (Ctrl-C),
    143 stopped by SIGTERM.
    """
    from encdec_cli.io.inputs import check_inputs
    from encdec_cli.tasks.image_to_text import (
        ImageToTextOptions,
        check_output,
        default_output,
        run_image_to_text,
    )

    fmt = output_format.lower()
    output = output or default_output(fmt)
    check_output(output, fmt)
    check_inputs(inputs, image_column, id_column, column_flag="--image-column")
    spec = common.check_speculative(speculative, num_beams, "--num-beams")
    pipeline = common.pipeline_options(pipeline_parallel, pp_layers)
    path = common.check_model(model, "image-to-text")
    opts = ImageToTextOptions(
        task=task,
        prompt=prompt,
        image_column=image_column,
        id_column=id_column,
        generation={"num_beams": num_beams, "max_new_tokens": max_new_tokens},
        workers=workers,
    )
    engine = common.load_engine(
        *(path, device, dtype, max_num_seqs, gpu_memory_utilization, enforce_eager, kv_dtype, quiet),
        no_prefix_cache=no_prefix_cache,
        speculative=spec,
        **pipeline,
    )
    with errors.writing_to(output):
        return run_image_to_text(
            engine, inputs, output, fmt, opts, overwrite=overwrite, retry_failed=retry_failed, quiet=quiet
        )
