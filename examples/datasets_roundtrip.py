"""Round-trip a Hugging Face dataset through `encdec transcribe`.

A small speech dataset (the clips in examples/audio) is saved with `datasets`' `save_to_disk`;
`encdec transcribe` reads that folder directly (encdec itself never needs `datasets`) and writes one
Parquet table, a row per dataset row in the same order, with the segments as a list of structs;
`datasets.load_dataset("parquet", ...)` reads it back and the transcripts join the dataset.

    pip install datasets
    python examples/datasets_roundtrip.py [--model tiny.en] [--workdir roundtrip]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import datasets

AUDIO = Path(__file__).resolve().parent / "audio"


def build_dataset() -> datasets.Dataset:
    """The example clips as a dataset with an Audio column ({bytes, path}, as datasets stores it)."""
    rows = [line.split("\t", 1) for line in (AUDIO / "TEXTS.tsv").read_text("utf-8").splitlines() if line]
    ds = datasets.Dataset.from_dict(
        {
            "id": [Path(name).stem for name, _ in rows],
            "audio": [{"bytes": (AUDIO / name).read_bytes(), "path": name} for name, _ in rows],
            "reference": [text for _, text in rows],
        }
    )
    # cast, not encode: the bytes are stored as they are (no audio codec needed to build it)
    return ds.cast_column("audio", datasets.Audio(decode=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny.en", help="Whisper model (any encdec --model value)")
    parser.add_argument("--workdir", type=Path, default=Path("roundtrip"), help="where the files go")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    saved, output = args.workdir / "speech", args.workdir / "speech.transcripts.parquet"
    ds = build_dataset()
    ds.save_to_disk(str(saved))  # data-*.arrow + dataset_info.json + state.json

    cmd = [sys.executable, "-m", "encdec_cli", "transcribe", str(saved), "-o", str(output)]
    cmd += ["-m", args.model, "--device", args.device, "-q"]
    status = subprocess.run(cmd).returncode
    if status != 0:
        return status

    out = datasets.load_dataset(
        "parquet", data_files=str(output), split="train", cache_dir=str(args.workdir / "hf-cache")
    )
    joined = ds.add_column("transcript", out["text"]).add_column("segments", out["segments"])
    for row in joined.select_columns(["id", "reference", "transcript"]):
        print(f"{row['id']}\t{row['reference']}\t{row['transcript'].strip()}")
    print(f"segments: {out.features['segments']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
