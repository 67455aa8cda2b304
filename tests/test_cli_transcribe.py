"""`encdec transcribe` end to end on real files (packaged tiny.en, CPU)."""

import json
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encdec_cli.io.manifest import MANIFEST_NAME


def encdec(*args, stdin=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "encdec_cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, example_clips):
    """A folder with nested audio, a broken file and a non-audio file."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    shutil.copy(example_clips[0].path, root / "one.wav")
    shutil.copy(example_clips[2].path, root / "sub" / "three.flac")
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00garbage")
    (root / "notes.txt").write_text("not audio, not an audio extension: ignored")
    return root


def test_folder_all_formats_mirrored_and_errors_recorded(corpus, tmp_path, example_clips):
    out = tmp_path / "out"
    r = encdec("transcribe", str(corpus), "-o", str(out), "-q")
    assert r.returncode == 1, r.stderr  # one broken file -> exit status 1
    assert "broken" in r.stderr and "FAILED" in r.stderr
    for stem in ("one", "sub/three"):
        for fmt in ("txt", "srt", "vtt", "tsv", "json"):
            assert (out / f"{stem}.{fmt}").is_file()
    assert "good morning" in (out / "one.txt").read_text().lower()
    data = json.loads((out / "sub/three.json").read_text())
    assert set(data) >= {"text", "segments", "language"} and data["language"] == "en"
    assert {"id", "start", "end", "text", "tokens", "avg_logprob"} <= set(data["segments"][0])
    srt = (out / "one.srt").read_text()
    assert re.match(r"1\n00:00:00,000 --> 00:00:0\d,\d{3}\nGood morning.+", srt)
    assert (out / "one.vtt").read_text().startswith("WEBVTT")
    assert (out / "one.tsv").read_text().splitlines()[0] == "start\tend\ttext"
    assert not (out / "broken.txt").exists()
    manifest = [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]
    assert sorted(e["status"] for e in manifest) == ["error", "ok", "ok"]

    # a re-run skips finished and failed files, and its exit status still reports the failure;
    # --retry-failed retries the broken one only
    r = encdec("transcribe", str(corpus), "-o", str(out), "-q")
    assert r.returncode == 1 and "skipped" in r.stderr and "1 of them FAILED in an earlier run" in r.stderr
    r = encdec("transcribe", str(corpus), "-o", str(out), "-q", "--retry-failed")
    assert r.returncode == 1 and "transcribed 0 file(s)" in r.stderr


def test_stdin_paths_and_jsonl_stdout(example_clips):
    paths = "\n".join(str(c.path) for c in example_clips[:2]) + "\n"
    r = encdec("transcribe", "-", "-o", "-", "-q", stdin=paths)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert sorted(x["input"] for x in recs) == sorted(c.path.stem for c in example_clips[:2])
    assert all(x["error"] is None and x["text"].strip() for x in recs)


def test_parquet_audio_column(tmp_path, example_clips):
    table = pa.table({"id": [1, 2, 3], "audio": [example_clips[1].path.read_bytes(), b"", b"junk"]})
    pq.write_table(table, tmp_path / "clips.parquet")
    r = encdec("transcribe", str(tmp_path / "clips.parquet"), "-o", str(tmp_path / "o"), "-f", "txt", "-q")
    assert r.returncode == 1, r.stderr
    assert "report" in (tmp_path / "o" / "clips" / "000000.txt").read_text()
    assert not (tmp_path / "o" / "clips" / "000001.txt").exists()


def test_usage_errors_exit_2(tmp_path):
    assert encdec("transcribe", str(tmp_path / "missing.wav")).returncode == 2
    r = encdec("transcribe", str(tmp_path), "-f", "docx")
    assert r.returncode == 2 and "unknown output format" in r.stderr
    r = encdec("transcribe", str(tmp_path), "-m", str(tmp_path / "nope"))
    assert r.returncode == 2 and "not found" in r.stderr
    r = encdec("transcribe", "--help")
    assert r.returncode == 0 and "--output-format" in r.stdout
