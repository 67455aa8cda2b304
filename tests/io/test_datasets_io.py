"""Hugging Face datasets in and out without encdec importing `datasets`: save_to_disk folders and
the audio shapes datasets writes are read by io/tables; the transcribe Parquet output is read back by
`datasets.load_dataset("parquet")`. The files are written by the real `datasets` (a test extra)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from encdec_cli.io.audio import AudioError, Samples, load_audio
from encdec_cli.io.tables import TableError, open_table, table_columns
from tests.support.compare import same_segments

datasets = pytest.importorskip("datasets")
REPO = Path(__file__).resolve().parents[2]


def speech_dataset(clips, n: int | None = None):
    """The example clips as datasets stores audio: an Audio column of {bytes, path} structs."""
    clips = clips[:n]
    ds = datasets.Dataset.from_dict(
        {
            "id": [c.path.stem for c in clips],
            "audio": [{"bytes": c.path.read_bytes(), "path": c.path.name} for c in clips],
            "text": [c.text for c in clips],
        }
    )
    return ds.cast_column("audio", datasets.Audio(decode=False))


def test_save_to_disk_folder_is_a_table(tmp_path, example_clips):
    """A save_to_disk folder of 2 shards reads as one table (rows numbered across the shards, in
    order), raw for the audio column and as text for the text commands; only selected columns are
    read; a DatasetDict folder names its splits; a lone .arrow file reads too."""
    ds = speech_dataset(example_clips)
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    assert len(list((tmp_path / "ds").glob("data-*.arrow"))) == 2
    assert table_columns(tmp_path / "ds") == ["id", "audio", "text"]
    with open_table(tmp_path / "ds", "audio", batch_rows=1, raw=True, select=["id"]) as src:
        rows = list(src)
    assert [r.row_id for r in rows] == list(range(len(ds)))
    assert all(r.error is None and r.text is None for r in rows)
    assert [r.record for r in rows] == [{"id": row["id"], "audio": row["audio"]} for row in ds]
    texts = [r.text for r in open_table(tmp_path / "ds", "text")]  # summarize/translate input
    assert texts == ds["text"]
    with pytest.raises(TableError, match="expected a text"):
        open_table(tmp_path / "ds", "audio")

    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(TableError, match=r"DatasetDict \(splits: train, test\).*dd/train"):
        open_table(tmp_path / "dd", "audio", raw=True)
    assert [r.text for r in open_table(tmp_path / "dd" / "test", "text")] == ds["text"]

    arrow = next((tmp_path / "ds").glob("data-00000-*.arrow"))
    assert [r.text for r in open_table(arrow, "text")] == ds["text"][: len(list(open_table(arrow, "text")))]


def test_save_to_disk_shard_cut_short_is_an_error_row(tmp_path, example_clips):
    ds = speech_dataset(example_clips)
    ds.save_to_disk(str(tmp_path / "ds"), num_shards=2)
    first, second = sorted((tmp_path / "ds").glob("data-*.arrow"))
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2])
    rows = list(open_table(tmp_path / "ds", "text"))
    good = len(list(open_table(first, "text")))
    assert [r.error for r in rows[:good]] == [None] * good
    assert rows[-1].error and "unreadable Arrow data" in rows[-1].error and second.name in rows[-1].error


def test_decoded_samples_read_like_the_file(example_clips):
    """datasets' decoded shape {array, sampling_rate}: the same 16 kHz samples as the file; stereo
    [channels, samples] is mixed to mono; another rate is resampled; bad values are AudioErrors."""
    path = example_clips[0].path
    audio, rate = sf.read(path, dtype="float32")
    assert rate == 16000
    np.testing.assert_array_equal(load_audio(Samples(audio.tolist(), rate)), load_audio(str(path)))
    stereo = np.stack([audio, audio])
    np.testing.assert_allclose(load_audio(Samples(stereo, rate)), audio, atol=1e-7)
    assert abs(len(load_audio(Samples(audio[::2], 8000))) - len(audio)) <= 2
    with pytest.raises(AudioError, match="no integer sampling_rate"):
        load_audio(Samples(audio, None))
    with pytest.raises(AudioError, match="no audio samples"):
        load_audio(Samples([], 16000))
    with pytest.raises(AudioError, match="NaN"):
        load_audio(Samples([0.0, float("nan")], 16000))


def encdec(*args, cwd=None):
    cmd = [sys.executable, "-m", "encdec_cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=cwd)


@pytest.mark.slow
def test_datasets_round_trip(tmp_path, example_clips, tiny_en_dir):
    """examples/datasets_roundtrip.py: save_to_disk -> encdec transcribe -> Parquet that
    load_dataset reads back, segments a list of structs. Its transcripts equal those of the same
    audio given as files and as decoded {array, sampling_rate} Parquet; a re-run skips every row."""
    work = tmp_path / "rt"
    example = REPO / "examples" / "datasets_roundtrip.py"
    cmd = [sys.executable, example, "--workdir", work, "--device", "cpu", "--model", tiny_en_dir]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    out = work / "speech.transcripts.parquet"
    loaded = datasets.load_dataset(
        "parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "c")
    )
    seg = loaded.features["segments"]
    assert isinstance(seg, datasets.List) and set(seg.feature) >= {"start", "end", "text", "tokens"}
    assert loaded["row"] == list(range(len(example_clips))) and loaded["error"] == [None] * len(example_clips)
    assert r.stdout.splitlines() == [
        f"{c.path.stem}\t{c.text}\t{t.strip()}" for c, t in zip(example_clips, loaded["text"], strict=True)
    ]

    # the same audio as files, and decoded (16 kHz clips only: their samples are the files' own)
    wavs = [c for c in example_clips if c.path.suffix == ".wav"]
    decoded = [dict(zip(("array", "sampling_rate"), sf.read(c.path, dtype="float32"))) for c in wavs]
    datasets.Dataset.from_dict({"audio": [{**d, "array": d["array"].tolist()} for d in decoded]}).to_parquet(
        str(tmp_path / "decoded.parquet")
    )
    schema = pq.read_schema(tmp_path / "decoded.parquet").field("audio").type
    assert pa.types.is_struct(schema) and {f.name for f in schema} == {"array", "sampling_rate"}
    r = encdec("transcribe", *[c.path for c in example_clips], tmp_path / "decoded.parquet", "-o", "-",
               "--ordered", "-m", tiny_en_dir, "--device", "cpu", "-q")  # fmt: skip
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    files, arrays = records[: len(example_clips)], records[len(example_clips) :]
    assert [f["text"] for f in files] == loaded["text"]
    for f, segments in zip(files, loaded["segments"], strict=True):
        same_segments(f["segments"], segments)
    assert [a["text"] for a in arrays] == [f["text"] for f, c in zip(files, example_clips) if c in wavs]

    before = out.read_bytes()
    r = encdec("transcribe", work / "speech", "-o", out, "-m", tiny_en_dir, "--device", "cpu", "-q")
    assert r.returncode == 0, r.stderr
    assert f"{len(example_clips)} already done" in r.stderr and out.read_bytes() == before


@pytest.mark.slow
def test_summarize_a_save_to_disk_folder(tmp_path, tiny_text_model):
    """A text command reads a save_to_disk folder as it reads the same rows from Parquet; the output
    goes beside it as Parquet, every input column kept."""
    bart = tiny_text_model("bart")
    texts = ["alpha beta gamma delta", "one two three four", "", "the quick brown fox"]
    ds = datasets.Dataset.from_dict({"id": list(range(len(texts))), "text": texts})
    ds.save_to_disk(str(tmp_path / "articles"), num_shards=2)
    ds.to_parquet(str(tmp_path / "articles.parquet"))
    r = encdec("summarize", tmp_path / "articles", "-m", bart.path, "--device", "cpu", "-q")
    assert r.returncode == 1, r.stderr  # the empty text is an error row
    out = tmp_path / "from-parquet.parquet"
    r = encdec(
        "summarize", tmp_path / "articles.parquet", "-o", out, "-m", bart.path, "--device", "cpu", "-q"
    )
    assert r.returncode == 1, r.stderr
    from_folder = pq.read_table(tmp_path / "articles.summary.parquet")  # the default output name
    assert from_folder.column_names == ["id", "text", "summary", "error"]
    assert from_folder.to_pylist() == pq.read_table(out).to_pylist()
    assert [e is not None for e in from_folder.column("error").to_pylist()] == [False, False, True, False]
