"""Nothing lost: bad input never crashes a job.

A generated corpus of many kinds of bad input, mixed with good items: every bad item gets its
error record (transcribe: manifest + summary; text jobs: the output's ``error`` column), every
good item beside it gets its result, and the exit status is 1. Input that makes the whole job
impossible (a missing column, a table that cannot be opened) is a usage error: exit 2 with a
message, never a traceback or a hang.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from typer.testing import CliRunner

from encdec_cli.cli import app
from encdec_cli.io.manifest import Manifest, file_key
from tests.support.text_models import single_thread

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny ops: one thread is much faster on a shared CPU
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def wav_header(rate: int, channels: int = 1, bits: int = 16, fmt: int = 1, frames: int = 100) -> bytes:
    """A 44-byte RIFF/WAVE header with the given fields (which may be impossible on purpose)."""
    block = channels * bits // 8
    size = frames * block
    fmt_chunk = struct.pack("<HHIIHH", fmt, channels, rate, rate * block, block, bits)
    return (
        b"RIFF"
        + struct.pack("<I", 36 + size)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<I", 16)
        + fmt_chunk
        + (b"data" + struct.pack("<I", size))
    )


# ---- transcribe ------------------------------------------------------------------------------------

# corpus file -> "ok" (transcribed) or a regex its error must match
AUDIO_CASES: dict[str, str] = {
    "good.wav": "ok",
    "spaced name ü.wav": "ok",  # odd characters in the name
    "half.wav": "ok",  # the header promises more data than there is: the rest is read
    "one_sample.wav": "ok",
    "eight_channels.wav": "ok",
    "empty.wav": r"empty \(0 bytes\)",
    "garbage.wav": r"not a readable audio file",
    "text.mp3": r"is a text file, not audio",
    "truncated_header.wav": r"could not be decoded|not a readable audio file",
    "zero_frames.wav": r"no audio samples \(zero length\)",
    "unknown_codec.wav": r"not a readable audio file",  # an unsupported sample format
    "rate_100hz.wav": r"sample rate 100 Hz, outside",
    "rate_3mhz.wav": r"sample rate 3000000 Hz, outside",
    "rate_zero.wav": r"sample rate 0 Hz",
    "no_channels.wav": r"not a readable audio file|no audio channels",
    "nan.wav": r"NaN or infinite sample values \(first at 0\.50 s\)",
    "inf.wav": r"NaN or infinite sample values",
    "dangling.wav": r"broken symbolic link",
    "loop.wav": r"broken symbolic link",
    "fifo.wav": r"is not a file",
    "garbage.m4a": r"could not be decoded|no decoder for \.m4a",
    "noperm.wav": "ok" if IS_ROOT else r"Permission denied",  # root reads it anyway
}
# table rows: (table, row) -> "ok" or error regex
TABLE_CASES: dict[tuple[str, int], str] = {
    ("bytes.parquet", 0): "ok",
    ("bytes.parquet", 1): r"empty \(0 bytes\)",  # a 0-byte audio value
    ("bytes.parquet", 2): r"empty \(0 bytes\)",  # null
    ("bytes.parquet", 3): r"is a text file, not audio",
    ("bytes.parquet", 4): r"could not be decoded|not a readable audio file",  # truncated header
    ("bytes.parquet", 5): r"not a readable audio file|could not be decoded",  # random bytes
    ("paths.parquet", 0): "ok",  # relative to the table
    ("paths.parquet", 1): r"does not exist",
    ("paths.parquet", 2): r"is not a file",  # a directory
    ("paths.parquet", 3): r"empty \(0 bytes\)",  # null
    ("paths.parquet", 4): r"broken symbolic link",
    ("hf.parquet", 0): "ok",  # datasets Audio struct with bytes
    ("hf.parquet", 1): r"empty \(0 bytes\)",  # struct without bytes or path
    ("hf.parquet", 2): r"does not exist",
    ("rows.jsonl", 0): "ok",
    ("rows.jsonl", 1): r"empty \(0 bytes\)",  # not JSON
    ("rows.jsonl", 2): r"empty \(0 bytes\)",  # a JSON array
    ("rows.jsonl", 3): r".",  # a number instead of a path or bytes
    ("rows.jsonl", 4): r"empty \(0 bytes\)",  # no audio key
}
UNREADABLE_TABLES = {"zero.parquet": r"size is 0 bytes", "corrupt.parquet": r"magic bytes not found"}


def build_audio_corpus(root: Path, clips) -> None:
    good = clips[0].path.read_bytes()
    shutil.copy(clips[0].path, root / "good.wav")
    shutil.copy(clips[1].path, root / "spaced name ü.wav")
    (root / "half.wav").write_bytes(good[: len(good) // 2])
    (root / "one_sample.wav").write_bytes(wav_header(16000, frames=1) + b"\x01\x00")
    audio, rate = sf.read(clips[1].path, dtype="float32")
    sf.write(root / "eight_channels.wav", np.repeat(audio[:, None], 8, axis=1), rate)
    (root / "empty.wav").write_bytes(b"")
    (root / "garbage.wav").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "text.mp3").write_text("this is not audio at all, just some words\n" * 20)
    (root / "truncated_header.wav").write_bytes(good[:20])
    (root / "zero_frames.wav").write_bytes(wav_header(16000, frames=0))
    (root / "unknown_codec.wav").write_bytes(wav_header(16000, fmt=0x1234) + bytes(200))
    (root / "rate_100hz.wav").write_bytes(wav_header(100) + bytes(200))
    (root / "rate_3mhz.wav").write_bytes(wav_header(3_000_000) + bytes(200))
    (root / "rate_zero.wav").write_bytes(wav_header(0) + bytes(200))
    (root / "no_channels.wav").write_bytes(wav_header(16000, channels=0) + bytes(200))
    bad = np.zeros(16000, np.float32)
    bad[8000] = np.nan
    sf.write(root / "nan.wav", bad, 16000, subtype="FLOAT")
    bad[8000], bad[100] = 0.0, np.inf
    sf.write(root / "inf.wav", bad, 16000, subtype="FLOAT")
    (root / "folder.wav").mkdir()  # a directory named like audio: searched, holds nothing
    (root / ".hidden.wav").write_bytes(b"")  # hidden files are not inputs
    os.symlink(root / "missing-target.wav", root / "dangling.wav")
    os.symlink("loop.wav", root / "loop.wav")
    os.mkfifo(root / "fifo.wav")  # would block a reader forever
    (root / "garbage.m4a").write_bytes(b"\0\0\0\x18ftypM4A " + b"\x01" * 300)
    shutil.copy(clips[1].path, root / "noperm.wav")
    os.chmod(root / "noperm.wav", 0)


def build_tables(root: Path, clips) -> None:
    good = clips[2].path.read_bytes()
    values = [good, b"", None, b"just some text, not audio", good[:30], np.random.default_rng(1).bytes(3000)]
    pq.write_table(
        pa.table({"id": list(range(6)), "audio": pa.array(values, pa.binary())}), root / "bytes.parquet"
    )
    shutil.copy(clips[3].path, root / "rel.mp3")
    os.symlink(root / "nowhere.flac", root / "dangling-row.flac")
    paths = ["rel.mp3", "missing.wav", str(root), None, "dangling-row.flac"]
    pq.write_table(pa.table({"audio": paths}), root / "paths.parquet")
    hf = [{"bytes": clips[0].path.read_bytes(), "path": None}, {"bytes": None, "path": None},
          {"bytes": None, "path": "nope.flac"}]  # fmt: skip
    pq.write_table(pa.table({"audio": hf}), root / "hf.parquet")
    lines = [json.dumps({"audio": str(clips[1].path)}), "{not json", "[1, 2]", json.dumps({"audio": 5}),
             json.dumps({"other": "x"})]  # fmt: skip
    (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
    (root / "zero.parquet").write_bytes(b"")
    (root / "corrupt.parquet").write_bytes(b"PAR1" + b"x" * 100)


@pytest.fixture(scope="module")
def transcribed(tmp_path_factory, example_clips, tiny_en_dir):
    """One transcribe run over the corpus folder, the tables and paths on stdin."""
    root = tmp_path_factory.mktemp("bad-audio")
    corpus, tables, out = root / "corpus", root / "tables", root / "out"
    corpus.mkdir()
    tables.mkdir()
    build_audio_corpus(corpus, example_clips)
    build_tables(tables, example_clips)
    table_args = [str(tables / t) for t in ("bytes.parquet", "paths.parquet", "hf.parquet", "rows.jsonl")]
    table_args += [str(tables / t) for t in UNREADABLE_TABLES]
    stdin = f"{example_clips[3].path}\n\n{root / 'listed-but-missing.wav'}\n{tables}\n"
    r = subprocess.run(
        [sys.executable, "-m", "encdec_cli", "transcribe", str(corpus), *table_args, "-", "-o", str(out),
         "-f", "txt", "-f", "json", "-q", "--summary-json", str(root / "summary.json")],
        input=stdin, capture_output=True, text=True, env=ENV, timeout=600,
    )  # fmt: skip
    return root, corpus, tables, out, r


def test_transcribe_every_bad_file_gets_its_error(transcribed, example_clips):
    root, corpus, tables, out, r = transcribed
    assert r.returncode == 1, r.stderr  # some items failed; nothing crashed or hung
    assert "Traceback" not in r.stderr
    manifest = Manifest.in_dir(out)
    n_bad = sum(v != "ok" for v in AUDIO_CASES.values()) + sum(v != "ok" for v in TABLE_CASES.values())
    n_bad += len(UNREADABLE_TABLES) + 2  # stdin: a missing path and a directory
    assert f"{n_bad} FAILED" in r.stderr
    assert len(manifest) == len(AUDIO_CASES) + len(TABLE_CASES) + len(UNREADABLE_TABLES) + 3

    # names mirror the inputs from their common folder (stdin lists a file of the repository, so
    # that folder is the one above both the repository and the test's folder, often /)
    listed = os.path.dirname(os.path.abspath(example_clips[3].path))
    common = os.path.commonpath([os.path.abspath(root), listed])
    mirror = out / os.path.relpath(root, common)
    for name, expect in AUDIO_CASES.items():
        entry = manifest.get(file_key(corpus / name))
        assert entry is not None, name
        stem = mirror / "corpus" / Path(name).stem
        if expect == "ok":
            assert entry.status == "ok", (name, entry.error)
            assert entry.outputs == (f"{stem}.txt", f"{stem}.json") and Path(f"{stem}.txt").is_file()
        else:
            assert entry.status == "error" and re.search(expect, entry.error), (name, entry.error)
            assert not Path(f"{stem}.txt").exists()
    for (table, row), expect in TABLE_CASES.items():
        entry = manifest.get(f"{file_key(tables / table)}#{row}")
        assert entry is not None, (table, row)
        if expect == "ok":
            assert entry.status == "ok", (table, row, entry.error)
            assert Path(entry.outputs[0]).is_file()
        else:
            assert entry.status == "error" and re.search(expect, entry.error), (table, row, entry.error)
    for table, expect in UNREADABLE_TABLES.items():
        entry = manifest.get(file_key(tables / table))
        assert entry.status == "error" and re.search(expect, entry.error), (table, entry.error)
    assert manifest.get(file_key(example_clips[3].path)).status == "ok"
    assert "does not exist" in manifest.get(str(root / "listed-but-missing.wav")).error
    assert "is not a file" in manifest.get(file_key(tables)).error

    # the good items really were transcribed (table rows named by id, else by the audio's file name)
    assert "good morning" in (mirror / "corpus" / "good.txt").read_text().lower()
    assert "report" in (mirror / "corpus" / "spaced name ü.txt").read_text().lower()
    assert "park" in (mirror / "tables" / "bytes" / "0.txt").read_text().lower()
    assert "coffee" in (mirror / "tables" / "paths" / "rel.txt").read_text().lower()
    assert "truncated" in manifest.get(file_key(corpus / "half.wav")).warnings[0]
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))


def check_summary_schema(summary: dict, command: str) -> None:
    """The fields every --summary-json file has, with their types."""
    assert summary["schema"] == 1 and summary["command"] == command
    assert isinstance(summary["exit_code"], int) and isinstance(summary["status"], str)
    assert isinstance(summary["wall_seconds"], float) and summary["wall_seconds"] > 0
    for key in ("started_at", "finished_at"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", summary[key]), summary[key]
    assert set(summary["counts"]) == {"done", "failed", "skipped", "failed_before"}
    assert all(isinstance(v, int) for v in summary["counts"].values())
    assert all(set(f) == {"item", "error"} for f in summary["failures"])
    assert all(set(w) == {"item", "warning"} for w in summary["warnings"])
    assert isinstance(summary["notes"], list)


def test_transcribe_summary_json(transcribed):
    """--summary-json: the same counts as the stderr summary, every failure with its message, the
    audio transcribed, the rate, and every field of the engine's statistics."""
    from dataclasses import fields

    from encdec_cli.engine import EngineStats

    root, corpus, tables, out, r = transcribed
    summary = json.loads((root / "summary.json").read_text())
    check_summary_schema(summary, "transcribe")
    assert summary["status"] == "items_failed" and summary["exit_code"] == 1 and summary["error"] is None
    n_bad = sum(v != "ok" for v in AUDIO_CASES.values()) + sum(v != "ok" for v in TABLE_CASES.values())
    n_bad += len(UNREADABLE_TABLES) + 2
    n_ok = len(AUDIO_CASES) + len(TABLE_CASES) + len(UNREADABLE_TABLES) + 3 - n_bad
    assert summary["counts"] == {"done": n_ok, "failed": n_bad, "skipped": 0, "failed_before": 0}
    assert f"transcribed {n_ok} file(s)" in r.stderr
    failures = {f["item"]: f["error"] for f in summary["failures"]}
    assert len(failures) == n_bad
    assert re.search(AUDIO_CASES["empty.wav"], failures[str(corpus / "empty.wav")])
    assert re.search(TABLE_CASES[("bytes.parquet", 3)], failures[f"{tables / 'bytes.parquet'} row 3"])
    assert "does not exist" in failures[str(root / "listed-but-missing.wav")]
    assert any("truncated" in w["warning"] for w in summary["warnings"])
    assert summary["audio_seconds"] > 1 and summary["output"] == str(out)
    assert summary["throughput"]["unit"] == "rtfx" and summary["throughput"]["value"] > 0
    assert set(summary["engine"]) == {f.name for f in fields(EngineStats)} | {"kv_dtype"}
    assert summary["engine"]["steps"] > 0 and summary["engine"]["kv_dtype"] == "float32"  # --kv-dtype auto
    assert not list(root.glob(".summary.json.*"))  # committed atomically: no temp file left


def test_transcribe_usage_errors_are_exit_2(tmp_path, tiny_en_dir):
    pq.write_table(pa.table({"sound": [b"x"]}), tmp_path / "nocol.parquet")
    for args, message in (
        ([str(tmp_path / "nocol.parquet")], "has no column 'audio'"),
        ([str(tmp_path / "missing.wav")], "does not exist"),
    ):
        cmd = [sys.executable, "-m", "encdec_cli", "transcribe", *args, "-o", str(tmp_path / "o"),
               "--summary-json", str(tmp_path / "s.json")]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        summary = json.loads((tmp_path / "s.json").read_text())  # written also when the command fails
        check_summary_schema(summary, "transcribe")
        assert summary["status"] == "usage_error" and summary["exit_code"] == 2
        assert message in summary["error"] and summary["engine"] is None


# ---- text jobs -----------------------------------------------------------------------------------

TOO_LONG = " ".join(["w1"] * 100)  # 102 tokens; the tiny BART takes 64

# JSON Lines: raw line -> None (a result expected) or a regex its error must match
JSONL_CASES: list[tuple[bytes, str | None]] = [
    (b'{"id": 0, "text": "w1 w2"}', None),
    (b'{"id": 1, "text": null}', r"column 'text' is null"),
    (b'{"id": 2, "text": ""}', r"column 'text' is empty"),
    (b'{"id": 3, "text": " \\t  "}', r"column 'text' is empty"),  # whitespace only
    (b'{"id": 4, "text": "w3 \xff w4"}', r"line 5 is not valid UTF-8 \(byte 0xff"),
    (b'{"id": 5, "text": "w5"', r"line 6 is not valid JSON"),  # malformed JSON
    (b"[1, 2, 3]", r"line 7 is a JSON list, expected an object"),
    (b"42", r"line 8 is a JSON int, expected an object"),
    (b'{"id": 8, "body": "w6"}', r"line 9 has no column 'text' \(it has 'id', 'body'\)"),
    (b'{"id": 9, "text": 123}', r"column 'text' is int, expected a string"),
    (b'{"id": 10, "text": ["w7"]}', r"column 'text' is list, expected a string"),
    (b'{"id": 11, "text": {"a": "w8"}}', r"column 'text' is dict, expected a string"),
    (b'{"id": 12, "text": true}', r"column 'text' is bool, expected a string"),
    (b'{"id": 13, "text": "w9 \\ud800 w10"}', r"not valid Unicode \(lone surrogate U\+D800"),
    (b'{"id": 14, "text": "w11", "note": "\\udc80"}', None),  # a lone surrogate elsewhere: kept as U+FFFD
    ('{"id": 15, "text": "w12 \U0001f600"}'.encode(), None),  # emoji (an unknown token here)
    (b'{"id": 16, "text": "w13\\u0000w14"}', None),  # a NUL character
    (('{"id": 17, "text": "' + TOO_LONG + '"}').encode(), r"102 tokens, the model takes 64"),
    (b'{"id": 18, "text": "w15 w16", "extra": {"deep": [1, "mixed", null]}}', None),
    (b'{"id": 19, "text": "w17", "id": 20}', None),  # duplicate key: the last wins (as json)
    (b'{"id": 21, "text": "</s> <pad> w18"}', None),  # special-token text
    (b'{"id": 22, "text": "w19"}\r', None),  # CRLF line end
]


@pytest.fixture(scope="module")
def bart(tiny_text_model):
    return tiny_text_model("bart")


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def run_text(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def check_rows(rows: list[dict], cases: list[str | None]) -> None:
    """Failed rows hold their error and no summary; the others a summary and no error: a non-empty
    one, except where the text is special-token markup (transformers 5.25's tokenizer reads
    "</s> <pad>" as the tokens themselves, after which the tiny model may end at once)."""
    assert len(rows) == len(cases)
    for i, (row, expect) in enumerate(zip(rows, cases)):
        if expect is None:
            special = "</s>" in (row.get("text") or "")
            assert row["error"] is None and isinstance(row["summary"], str), (i, row)
            assert row["summary"] or special, (i, row)
        else:
            assert row["summary"] is None and re.search(expect, row["error"]), (i, row)


def test_jsonl_bad_rows(bart, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + b"\n".join(line for line, _ in JSONL_CASES) + b"\n\n")  # BOM, blank end
    out = tmp_path / "out.jsonl"
    r = run_text("summarize", src, "-m", bart.path, "-o", out, "-q", "--no-truncate",
                 "--summary-json", tmp_path / "summary.json")  # fmt: skip
    assert r.exit_code == 1
    n_bad = sum(e is not None for _, e in JSONL_CASES)
    assert f"{n_bad} row(s) FAILED" in r.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    check_summary_schema(summary, "summarize")
    assert summary["status"] == "items_failed" and summary["exit_code"] == 1
    n_ok = len(JSONL_CASES) - n_bad
    assert summary["counts"] == {"done": n_ok, "failed": n_bad, "skipped": 0, "failed_before": 0}
    failures = {f["item"]: f["error"] for f in summary["failures"]}
    for i, (_, expect) in enumerate(JSONL_CASES):
        assert (f"row {i}" in failures) == (expect is not None), i
        if expect is not None:
            assert re.search(expect, failures[f"row {i}"]), (i, failures[f"row {i}"])
    assert summary["tokens"] > 0 and summary["throughput"]["unit"] == "tokens_per_second"
    assert summary["engine"]["steps"] > 0 and "preemptions" in summary["engine"]
    # a re-run finds every row finished: counted as skipped, the failed ones as failed before
    r = run_text("summarize", src, "-m", bart.path, "-o", out, "-q", "--no-truncate",
                 "--summary-json", tmp_path / "summary.json")  # fmt: skip
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"] == {"done": 0, "failed": 0, "skipped": len(JSONL_CASES), "failed_before": n_bad}
    assert summary["exit_code"] == 1 and summary["engine"] is None  # the model never loaded
    rows = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    check_rows(rows, [e for _, e in JSONL_CASES])
    assert rows[0]["summary"] == "w1 w2" and rows[14]["note"] == "\ufffd" and rows[19]["id"] == 20
    assert rows[18]["extra"] is not None  # nested input values are kept
    # the same rows through Parquet output (the sink must take every kind of value)
    r = run_text("summarize", src, "-m", bart.path, "-o", tmp_path / "out.parquet", "-q", "--no-truncate")
    assert r.exit_code == 1
    check_rows(pq.read_table(tmp_path / "out.parquet").to_pylist(), [e for _, e in JSONL_CASES])


def test_csv_txt_and_stdin_bad_rows(bart, tmp_path):
    csv_bytes = (
        b'\xef\xbb\xbfid,text\n0,w1 w2\n1,\n2,"   "\n3,w3 \xff w4\n4,w5,extra,fields\n5\n6,"w6\nw7"\n7,w8\n'
    )
    (tmp_path / "in.csv").write_bytes(csv_bytes)
    r = run_text("summarize", tmp_path / "in.csv", "-m", bart.path, "-o", tmp_path / "c.jsonl", "-q")
    assert r.exit_code == 1 and "5 row(s) FAILED" in r.stderr
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    # malformed CSV rows follow the good rows of their block (pyarrow reports them at its end)
    check_rows(rows, [None, "empty", "empty", r"not valid UTF-8 \(byte 0xff", None, None,
                      r"CSV line 6 has 4 fields, expected 2", r"CSV line 7 has 1 fields"])  # fmt: skip
    assert [row["id"] for row in rows[:6]] == ["0", "1", "2", "3", "6", "7"]

    txt = b"w1 w2\n\n  \t\nw3 \xfe w4\n" + TOO_LONG.encode() + b"\nw5\r\nw6"
    for source, stdin in ((tmp_path / "in.txt", None), ("-", txt)):
        if stdin is None:
            source.write_bytes(txt)
        r = run_text("summarize", source, "-m", bart.path, "-o", tmp_path / "t.jsonl", "-q", "--no-truncate",
                     input=stdin)  # fmt: skip
        assert r.exit_code == 1, r.stderr
        rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
        check_rows(rows, [None, "line 2 is empty", "line 3 is empty", r"line 4 is not valid UTF-8",
                          r"102 tokens", None, None])  # fmt: skip


def test_parquet_bad_rows_and_corrupt_row_group(bart, tmp_path):
    texts = pa.array([b"w1 w2", None, b"", b" ", b"w3 \xff", b"w4"], pa.binary())
    pq.write_table(pa.table({"text": texts}), tmp_path / "binary.parquet")
    # a string column holding invalid UTF-8 (written by a careless producer)
    pq.write_table(pa.table({"text": texts.view(pa.string())}), tmp_path / "string.parquet")
    expected = [None, "is null", "is empty", "is empty", r"not valid UTF-8 \(byte 0xff", None]
    for name in ("binary.parquet", "string.parquet"):
        out = tmp_path / f"{name}.jsonl"
        r = run_text("summarize", tmp_path / name, "-m", bart.path, "-o", out, "-q")
        assert r.exit_code == 1, r.stderr
        check_rows([json.loads(line) for line in out.read_text().splitlines()], expected)

    # three row groups; the second one's text page is corrupt: its 10 rows are error rows
    pq.write_table(pa.table({"id": list(range(30)), "text": [f"w{i} w{i + 1}" for i in range(30)]}),
                   tmp_path / "rg.parquet", row_group_size=10, compression="snappy")  # fmt: skip
    chunk = pq.ParquetFile(tmp_path / "rg.parquet").metadata.row_group(1).column(1)
    data = bytearray((tmp_path / "rg.parquet").read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + 20] = b"\xab" * 20  # the page header
    (tmp_path / "rg_bad.parquet").write_bytes(bytes(data))
    out = tmp_path / "rg.parquet.out.parquet"
    r = run_text("summarize", tmp_path / "rg_bad.parquet", "-m", bart.path, "-o", out, "-q")
    assert r.exit_code == 1 and "20 row(s) done" in r.stderr and "10 row(s) FAILED" in r.stderr
    rows = pq.read_table(out).to_pylist()
    check_rows(rows, [None] * 10 + [r"unreadable Parquet data in row group 1"] * 10 + [None] * 10)
    assert [row["id"] for row in rows[20:]] == list(range(20, 30))


def test_job_level_bad_input_is_a_usage_error(bart, tmp_path):
    (tmp_path / "zero.parquet").write_bytes(b"")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1" + b"\0" * 64)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"body": ["w1"]}), tmp_path / "nocol.parquet")
    (tmp_path / "nocol.jsonl").write_text('{"body": "w1"}\n')
    (tmp_path / "table.xlsx").write_bytes(b"PK")
    cases = {
        "zero.parquet": r"cannot read .* as Parquet",
        "corrupt.parquet": r"cannot read .* as Parquet",
        "ints.parquet": r"has type int64; expected a text",
        "nocol.parquet": r"no column 'text'; available columns: 'body'",
        "nocol.jsonl": r"no column 'text'; available columns: 'body'",
        "table.xlsx": r"cannot tell the format",
        "missing.parquet": r"does not exist",
    }
    for name, message in cases.items():
        r = run_text("summarize", tmp_path / name, "-m", bart.path, "-o", tmp_path / "o.jsonl")
        assert r.exit_code == 2 and re.search(message, r.stderr), (name, r.stderr)
    assert not (tmp_path / "o.jsonl").exists()
    # an empty input is not an error: an empty output
    (tmp_path / "empty.jsonl").write_bytes(b"")
    r = run_text("summarize", tmp_path / "empty.jsonl", "-m", bart.path, "-o", tmp_path / "o.jsonl", "-q")
    assert r.exit_code == 0 and (tmp_path / "o.jsonl").read_text() == ""
