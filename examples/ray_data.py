"""encdec on Ray Data: Parquet in, Parquet out, with one engine per GPU.

    pip install 'encdec[ray]'
    python examples/ray_data.py transcribe speech.parquet transcripts/ --concurrency 4
    python examples/ray_data.py summarize articles.parquet summaries/ -m ./bart-large-cnn --concurrency 8

`transcribe` reads the audio column (file bytes, paths, or the datasets shapes {bytes, path} and
{array, sampling_rate}) and adds text, language, duration, segments and error; `summarize`,
`translate` and `generate` read the text column and add the result column and error. Each of the
`--concurrency` actors loads one engine and, with `--num-gpus 1` (the default when CUDA is there),
holds one GPU. The output folder gets Ray's Parquet files, with the rows the CLI would write; the
example asks Ray to keep the input order (preserve_order), which Ray does not promise across files.
"""

from __future__ import annotations

import argparse
import sys

import ray

from encdec_cli.integrations.ray import Generate, Summarize, Transcribe, Translate

CLASSES = {"transcribe": Transcribe, "summarize": Summarize, "translate": Translate, "generate": Generate}


def run(
    task: str,
    source: str,
    output: str,
    *,
    concurrency: int = 1,
    num_gpus: float = 0,
    batch_size: int = 64,
    **options,
) -> None:
    """Read ``source`` (Parquet file or folder), run ``task`` over it with ``options`` (the class's
    keywords: model, device, language, column, ...), write ``output`` (a folder of Parquet files)."""
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # rows in input order
    ds = ray.data.read_parquet(source)
    ds = ds.map_batches(
        CLASSES[task],
        fn_constructor_kwargs=options,
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=concurrency,
        num_gpus=num_gpus,
    )
    ds.write_parquet(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(CLASSES))
    parser.add_argument("input", help="Parquet file or folder")
    parser.add_argument("output", help="output folder (Parquet files)")
    parser.add_argument("-m", "--model", default=None, help="default: tiny.en for transcribe")
    parser.add_argument("--column", default=None, help="input column (default: audio / text)")
    parser.add_argument("--concurrency", type=int, default=1, help="actors, one engine each")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs per actor (default: 1 with CUDA)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows handed to an actor at once")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--language", default=None, help="transcribe: spoken language (e.g. en)")
    args = parser.parse_args(argv)

    import torch

    num_gpus = args.num_gpus if args.num_gpus is not None else float(torch.cuda.is_available())
    options: dict = {"device": args.device}
    if args.task == "transcribe":
        options["model"] = args.model or "tiny.en"
        options["audio_column"] = args.column or "audio"
        options["language"] = args.language
    else:
        if args.model is None:
            parser.error(f"{args.task} needs a text model (-m)")
        options["model"] = args.model
        options["column"] = args.column or "text"
    if not ray.is_initialized():
        ray.init()
    run(
        args.task,
        args.input,
        args.output,
        concurrency=args.concurrency,
        num_gpus=num_gpus,
        batch_size=args.batch_size,
        **options,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
