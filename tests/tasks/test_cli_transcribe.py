"""`encdec transcribe` end to end on real files (packaged tiny.en, CPU)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encdec_cli.io.manifest import MANIFEST_NAME, Manifest, file_key


def encdec(*args, stdin=None, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "encdec_cli", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
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


def test_stdin_paths_and_jsonl_stdout_in_input_order(example_clips, tmp_path):
    # the missing file fails at once, before the others finish: without --ordered it comes first
    paths = [str(c.path) for c in example_clips[:2]] + [str(tmp_path / "missing.wav")]
    r = encdec("transcribe", "-", "-o", "-", "-q", "--ordered", stdin="\n".join(paths) + "\n")
    assert r.returncode == 1, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["input"] for x in recs] == paths  # as given, with the extension, in input order
    assert all(x["error"] is None and x["text"].strip() for x in recs[:2])
    assert "does not exist" in recs[2]["error"]


def test_table_rows_named_by_id_column_path_or_row(tmp_path, example_clips):
    report, coffee = example_clips[1].path.read_bytes(), example_clips[3].path.read_bytes()
    tables = {  # by the id column (unique, safe names), by the path in the struct, by row number
        "ids": {"id": ["a", "a", "b/c", "x"], "audio": [report, coffee, report, b"junk"]},
        "hf": {"audio": [{"bytes": coffee, "path": "talk.mp3"}, {"bytes": report, "path": None}]},
        "named": {"id": [7], "key": ["k1"], "audio": [report]},  # --id-column key
    }
    for name, columns in tables.items():
        pq.write_table(pa.table(columns), tmp_path / f"{name}.parquet")
    args = [str(tmp_path / f"{t}.parquet") for t in tables]
    r = encdec("transcribe", *args, "-o", str(tmp_path / "o"), "-f", "txt", "-q", "--id-column", "key")
    assert r.returncode == 2 and "has no column 'key'" in r.stderr and "--id-column" in r.stderr
    r = encdec("transcribe", *args[:2], "-o", str(tmp_path / "o"), "-f", "txt", "-q")
    assert r.returncode == 1, r.stderr  # the junk row failed
    r = encdec("transcribe", args[2], "-o", str(tmp_path / "o2"), "-f", "txt", "-q", "--id-column", "key")
    assert r.returncode == 0, r.stderr
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("o*/**/*.txt"))
    assert written == ["o/hf/000001.txt", "o/hf/talk.txt", "o/ids/a.txt", "o/ids/a~000001.txt",
                       "o/ids/b_c.txt", "o2/named/k1.txt"]  # fmt: skip
    for name in ("ids/a", "ids/b_c", "hf/000001"):
        assert "report" in (tmp_path / "o" / f"{name}.txt").read_text()
    for name in ("ids/a~000001", "hf/talk"):
        assert "coffee" in (tmp_path / "o" / f"{name}.txt").read_text()


def test_usage_errors_exit_2(tmp_path):
    assert encdec("transcribe", str(tmp_path / "missing.wav")).returncode == 2
    r = encdec("transcribe", str(tmp_path), "-f", "docx")
    assert r.returncode == 2 and "unknown output format" in r.stderr
    r = encdec("transcribe", str(tmp_path), "-m", str(tmp_path / "nope"))
    assert r.returncode == 2 and "not found" in r.stderr
    r = encdec("transcribe", "--help")
    assert r.returncode == 0 and "--output-format" in r.stdout


def test_name_clashes_keep_every_transcript_and_a_rerun_skips_them(tmp_path, example_clips):
    morning, report, park, coffee = (c.path for c in example_clips)
    src = tmp_path / "src"
    for rel, clip in {"coll/a/x.wav": morning, "coll/b/x.wav": report, "same/x.wav": park,
                      "same/x.mp3": coffee, "later/coll/a/x.flac": report}.items():  # fmt: skip
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, src / rel)
    out = tmp_path / "out"
    args = [str(src / "coll/a/x.wav"), str(src / "coll/b/x.wav"), str(src / "same"), "-o", str(out), "-q"]
    r = encdec("transcribe", *args, "-f", "txt")
    assert r.returncode == 0, r.stderr
    expected = {
        "coll/a/x": "good morning",
        "coll/b/x": "report",
        "same/x.wav": "park",
        "same/x.mp3": "coffee",
    }
    for name, words in expected.items():  # paths mirrored from the common folder; stems shared: extensions
        assert words in (out / f"{name}.txt").read_text().lower(), name
    manifest = Manifest.in_dir(out)
    inputs = [src / "coll/a/x.wav", src / "coll/b/x.wav", src / "same/x.wav", src / "same/x.mp3"]
    assert sorted(e.key for e in manifest.entries()) == sorted(file_key(p) for p in inputs)
    assert len({e.outputs for e in manifest.entries()}) == 4

    r = encdec("transcribe", *args, "-f", "txt")
    assert r.returncode == 0 and "transcribed 0 file(s)" in r.stderr and "4 already done" in r.stderr, (
        r.stderr
    )

    # another job into the same folder whose file mirrors to an earlier job's name: a new name
    r = encdec("transcribe", str(src / "later"), "-o", str(out), "-q", "-f", "txt")
    assert r.returncode == 0, r.stderr
    assert "report" in (out / "coll/a/x.flac.txt").read_text().lower()
    assert "good morning" in (out / "coll/a/x.txt").read_text().lower()


def test_empty_folder_warns_and_exits_1(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("not audio")
    r = encdec("transcribe", str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "-q")
    assert r.returncode == 1, r.stderr
    assert (
        f"no audio files in {tmp_path / 'empty'}" in r.stderr and ".wav" in r.stderr and ".flac" in r.stderr
    )


def test_stdout_takes_json_only(example_clips):
    r = encdec("transcribe", str(example_clips[0].path), "-o", "-", "-f", "srt")
    assert r.returncode == 2 and "-o -" in r.stderr and "srt" in r.stderr and not r.stdout


def test_progress_lines_inside_a_long_file_and_a_true_summary(tmp_path, example_clips):
    import numpy as np
    import soundfile as sf

    morning, _ = sf.read(example_clips[0].path, dtype="float32")
    report, _ = sf.read(example_clips[1].path, dtype="float32")
    audio = np.concatenate([morning, np.zeros(16000 * 27, np.float32), report])  # two 30 s windows
    sf.write(tmp_path / "long.wav", audio, 16000)
    env = {**os.environ, "ENCDEC_PROGRESS_SECONDS": "0", "OMP_NUM_THREADS": "1"}  # a line per update
    (tmp_path / "nope.wav").write_bytes(b"not audio")
    r = encdec("transcribe", tmp_path / "long.wav", tmp_path / "nope.wav", "-o", tmp_path / "out", env=env)
    assert r.returncode == 1, r.stderr
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr  # stderr is a pipe: plain lines, no redraws
    lines = [line for line in r.stderr.splitlines() if line.startswith("transcribe: ")]
    done = [tuple(map(clock, m.groups())) for m in map(AUDIO.search, lines) if m]
    assert done and all("ETA" in line for line in lines)
    seconds = len(audio) / 16000
    assert any(line.startswith("transcribe: 0/2 files") for line in lines)
    assert any(0 < d < seconds - 1 for d, _ in done)  # inside the long file: one window of two done
    assert max(d for d, _ in done) == int(seconds)  # what was transcribed, all of it; not the junk
    summary = r.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"transcribed 1 file(s), {seconds / 60:.1f} min of audio"), summary
    assert "1 FAILED" in summary


AUDIO = re.compile(r"audio (\d+:\d\d)/(\d+:\d\d) transcribed")


def clock(text: str) -> int:
    m, s = text.split(":")
    return int(m) * 60 + int(s)


def test_non_utf8_file_names_and_truncated_audio(tmp_path, example_clips):
    src, out = os.fsencode(tmp_path / "src"), tmp_path / "out"
    os.mkdir(src)
    odd = os.path.join(src, b"caf\xe9 \xff.wav")  # Latin-1 bytes: not UTF-8
    shutil.copy(example_clips[1].path, odd)
    good = example_clips[0].path.read_bytes()
    with open(os.path.join(src, b"half.wav"), "wb") as f:
        f.write(good[: len(good) // 2])  # the header promises twice the data there is
    r = encdec("transcribe", os.fsdecode(src), "-o", str(out), "-f", "txt", "-f", "json", "-q")
    assert r.returncode == 0, r.stderr
    assert "report" in open(os.path.join(os.fsencode(out), b"caf\xe9 \xff.txt")).read().lower()
    assert "truncated" in r.stderr
    half = json.loads((out / "half.json").read_text())
    assert "truncated" in half["warnings"][0] and "good morning" in half["text"].lower()

    manifest = Manifest.in_dir(out)  # the entries read back and name the files, so a re-run skips them
    assert manifest.skipped_lines == 0 and len(manifest) == 2
    assert manifest.is_done(file_key(os.fsdecode(odd)))
    assert "truncated" in manifest.get(file_key(os.fsdecode(src) + "/half.wav")).warnings[0]

    r = subprocess.run(
        [sys.executable, "-m", "encdec_cli", "transcribe", "-", "-o", "-", "-q", "--ordered"],
        input=odd + b"\n" + os.path.join(src, b"half.wav") + b"\n", capture_output=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert os.fsencode(recs[0]["input"]) == odd and "report" in recs[0]["text"].lower()
    assert "truncated" in recs[1]["warnings"][0]
