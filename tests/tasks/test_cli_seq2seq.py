"""`encdec summarize | translate | generate` end to end on tiny trained models (CPU).

The models are trained to copy word sequences (tests/support/text_models.py), so an output is meaningful:
every result must equal transformers' ``generate`` for the same row, with the model's own
generation config (greedy unless a flag says otherwise). Commands run in-process through
typer's CliRunner (one real subprocess checks the installed entry point and pipes).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from typer.testing import CliRunner

from encdec_cli.cli import app
from tests.support.text_models import N_WORDS, single_thread

N_ROWS = 48
EMPTY_ROW = 5  # every input below has an empty text here: an error row, exit status 1


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def words(rng: random.Random, lo: int = 1, hi: int = 12) -> str:
    return " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(lo, hi)))


TEXTS = [words(random.Random(i)) for i in range(N_ROWS)]
TEXTS[EMPTY_ROW] = ""


def encdec(*args, input: bytes | None = None, env: dict | None = None):
    """Run the CLI in-process; returns the click Result (exit_code, stdout, stderr)."""
    result = CliRunner().invoke(app, [str(a) for a in args], input=input, env=env, catch_exceptions=False)
    return result


def hf_generate(tiny, texts: list[str], **gen) -> list:
    """transformers' outputs (decoded, special tokens skipped, stripped) for the non-empty texts;
    None for empty ones. With num_return_sequences > 1: a list per text."""
    tok = AutoTokenizer.from_pretrained(tiny.path)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny.path).eval()
    n = gen.get("num_return_sequences", 1)
    good = [t for t in texts if t.strip()]
    decoded = []
    for i in range(0, len(good), 32):
        batch = tok(good[i : i + 32], return_tensors="pt", padding=True, truncation=True, max_length=64)
        with torch.no_grad():
            seqs = model.generate(**batch, **gen)
        decoded += [s.strip() for s in tok.batch_decode(seqs, skip_special_tokens=True)]
    per_text = [decoded[i * n : (i + 1) * n] if n > 1 else decoded[i] for i in range(len(good))]
    it = iter(per_text)
    return [next(it) if t.strip() else None for t in texts]


@pytest.fixture(scope="module")
def bart(tiny_text_model):
    return tiny_text_model("bart")


@pytest.fixture(scope="module")
def bart_ref(bart):
    return hf_generate(bart, TEXTS)


def read_output(path_or_text) -> list[dict]:
    if isinstance(path_or_text, str):  # stdout
        return [json.loads(line) for line in path_or_text.splitlines()]
    path = Path(path_or_text)
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [{k: (v if v != "" else None) for k, v in r.items()} for r in rows]  # CSV null is ""


def write_input(fmt: str, folder: Path) -> tuple[str, bytes | None, list[str]]:
    """(input argument, stdin bytes, input column names) for TEXTS in format ``fmt``."""
    ids = list(range(N_ROWS))
    if fmt == "parquet":
        path = folder / "in.parquet"
        meta = [{"k": i, "tag": f"t{i}"} for i in ids]
        table = pa.table({"id": ids, "text": TEXTS, "meta": meta, "score": [i / 4 for i in ids]})
        pq.write_table(table, path, row_group_size=20)  # several row groups
        return str(path), None, ["id", "text", "meta", "score"]
    lines = [json.dumps({"id": i, "text": t, "tags": [f"t{i}", "x"]}) for i, t in zip(ids, TEXTS)]
    if fmt in ("jsonl", "stdin-jsonl"):
        data = ("\n".join(lines) + "\n").encode()
        if fmt == "stdin-jsonl":
            return "-", data, ["id", "text", "tags"]
        (folder / "in.jsonl").write_bytes(data)
        return str(folder / "in.jsonl"), None, ["id", "text", "tags"]
    if fmt == "csv":
        with open(folder / "in.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "note", "text"])
            for i, t in zip(ids, TEXTS):
                w.writerow([i, f'a "quoted", note {i}\nover two lines', t])
        return str(folder / "in.csv"), None, ["id", "note", "text"]
    data = ("\n".join(TEXTS) + "\n").encode()  # txt / stdin-lines: the empty line is an item
    if fmt == "stdin-lines":
        return "-", data, ["text"]
    (folder / "in.txt").write_bytes(data)
    return str(folder / "in.txt"), None, ["text"]


def as_csv(value):
    """A value as the CSV output writes it (null -> empty, read back as None; nested -> JSON)."""
    if value is None or value == "":
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def expected_input(fmt: str, i: int) -> dict:
    if fmt == "parquet":
        return {"id": i, "text": TEXTS[i], "meta": {"k": i, "tag": f"t{i}"}, "score": i / 4}
    if fmt in ("jsonl", "stdin-jsonl"):
        return {"id": i, "text": TEXTS[i], "tags": [f"t{i}", "x"]}
    if fmt == "csv":
        return {"id": str(i), "note": f'a "quoted", note {i}\nover two lines', "text": TEXTS[i] or None}
    return {"text": TEXTS[i]}


ROUND_TRIPS = [  # every input format and every output format at least once
    ("parquet", "parquet"),
    ("jsonl", "jsonl"),
    ("csv", "csv"),
    ("txt", "parquet"),
    ("stdin-jsonl", "-"),
    ("stdin-lines", "jsonl"),
    ("parquet", "-"),
    ("jsonl", "csv"),
]


@pytest.mark.parametrize(("in_fmt", "out_fmt"), ROUND_TRIPS)
def test_round_trip(bart, bart_ref, tmp_path, in_fmt, out_fmt):
    arg, stdin, in_cols = write_input(in_fmt, tmp_path)
    out = "-" if out_fmt == "-" else tmp_path / f"out.{out_fmt}"
    # few sequence slots: requests finish and are replaced often (continuous batching)
    r = encdec("summarize", arg, "-m", bart.path, "-o", out, "-q", "--max-num-seqs", 8, input=stdin)
    assert r.exit_code == 1, r.stderr  # the empty row failed
    assert "47 row(s) done" in r.stderr and "1 row(s) FAILED" in r.stderr
    rows = read_output(r.stdout if out == "-" else out)
    assert len(rows) == N_ROWS
    for i, row in enumerate(rows):
        assert list(row) == [*in_cols, "summary", "error"], i
        expected = expected_input(in_fmt, i)
        if out_fmt == "csv":
            expected = {k: as_csv(v) for k, v in expected.items()}
        assert {c: row[c] for c in in_cols} == expected, i
        if i == EMPTY_ROW:
            assert row["summary"] is None and "empty" in row["error"]
        else:
            assert row["error"] is None and row["summary"] == bart_ref[i], (i, TEXTS[i])
    # the model really copies (the comparison means something)
    assert sum(row["summary"] == TEXTS[i] for i, row in enumerate(rows)) > N_ROWS // 2
    if out != "-":
        hidden = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert hidden == [f".{out.name}.done.json"]  # no parts or temps; the finished job's state
    if out_fmt == "parquet" and in_fmt == "parquet":
        schema = pq.read_schema(out)
        assert schema.field("id").type == pa.int64() and pa.types.is_struct(schema.field("meta").type)
        assert schema.field("summary").type == pa.string()


def test_t5_generate_and_translate(tiny_text_model, tmp_path):
    t5 = tiny_text_model("t5")
    texts = [words(random.Random(100 + i)) for i in range(12)]
    pq.write_table(pa.table({"body": texts}), tmp_path / "docs.parquet")
    ref = hf_generate(t5, texts)
    for task, column in (("generate", "generated"), ("translate", "translation")):
        r = encdec(task, tmp_path / "docs.parquet", "-m", t5.path, "--column", "body", "-q")
        assert r.exit_code == 0, r.stderr
        rows = read_output(tmp_path / f"docs.{column}.parquet")  # default output: next to the input
        assert [row[column] for row in rows] == ref
        assert [row["body"] for row in rows] == texts


def test_mbart_language_codes(tiny_text_model, tmp_path):
    mbart = tiny_text_model("mbart")
    tok = AutoTokenizer.from_pretrained(mbart.path)
    texts = [words(random.Random(200 + i)) for i in range(10)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.jsonl"
    r = encdec("translate", tmp_path / "in.txt", "-m", mbart.path, "-o", out, "-q",
               "--source-lang", "en_XX", "--target-lang", "de_DE")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    assert [row["translation"] for row in read_output(out)] == hf_generate(mbart, texts)
    # another target language is forced as the first token (and changes the output)
    en = tok.convert_tokens_to_ids("en_XX")
    r = encdec("translate", tmp_path / "in.txt", "-m", mbart.path, "-o", out, "-q", "--target-lang", "en_XX")
    assert r.exit_code == 0, r.stderr
    got = [row["translation"] for row in read_output(out)]
    assert got == hf_generate(mbart, texts, forced_bos_token_id=en)
    r = encdec("translate", tmp_path / "in.txt", "-m", mbart.path, "-o", out, "--target-lang", "xx_YY")
    assert r.exit_code == 2 and "--target-lang 'xx_YY' is not a language code" in r.stderr


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "txt", "stdin-jsonl"])
def test_missing_column_is_a_usage_error(bart, tmp_path, fmt):
    arg, stdin, in_cols = write_input(fmt, tmp_path)
    r = encdec("summarize", arg, "-m", bart.path, "--column", "body", "-o", tmp_path / "o.jsonl", input=stdin)
    assert r.exit_code == 2, r.stderr
    assert "no column 'body'" in r.stderr
    assert all(repr(c) in r.stderr for c in in_cols)  # the columns there are
    assert not (tmp_path / "o.jsonl").exists()


def test_csv_with_an_unclosed_quote_is_refused(bart, tmp_path):
    """Not a part of the rows silently glued into one field: an error naming the line, exit 2."""
    (tmp_path / "in.csv").write_bytes(b'id,text\n1,w1\n2,w2\n3,"w3\n4,w4\n5,w5\n')
    r = encdec("summarize", tmp_path / "in.csv", "-m", bart.path, "-o", tmp_path / "out.csv", "-q")
    assert r.exit_code == 2 and "in.csv line 4: a quoted field opens there and is never closed" in r.stderr
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.slow
def test_empty_csv_exits_cleanly_every_time(bart, tmp_path):
    """An empty CSV once aborted the process at exit now and then ("terminate called without an
    active exception", status 134): a native reader's thread outlived the interpreter. 20 runs."""
    (tmp_path / "empty.csv").write_bytes(b"")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "encdec_cli", "summarize", str(tmp_path / "empty.csv"), "-m", str(bart.path)]
    for _ in range(20):
        r = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
        assert r.returncode == 2, r.stderr.decode()
        assert b"empty.csv is empty; a CSV file starts with a header line" in r.stderr
        assert b"terminate called" not in r.stderr


def test_bad_rows_become_error_rows(bart, tmp_path):
    texts = ["w1 w2 w3", None, "", "   \t ", b"w4 \xff\xfe w5", "w6 w7", b"w8 w9", "w10"]
    table = pa.table({"n": list(range(len(texts))), "text": pa.array(
        [t.encode() if isinstance(t, str) else t for t in texts], pa.binary())})  # fmt: skip
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out.jsonl"
    r = encdec("summarize", tmp_path / "in.parquet", "-m", bart.path, "-o", out, "-q")
    assert r.exit_code == 1
    assert "4 row(s) FAILED" in r.stderr and "4 row(s) done" in r.stderr
    rows = read_output(out)
    assert [row["n"] for row in rows] == list(range(len(texts)))
    errors = {row["n"]: row["error"] for row in rows if row["error"]}
    assert set(errors) == {1, 2, 3, 4}
    assert "null" in errors[1] and "empty" in errors[2] and "empty" in errors[3]
    assert "not valid UTF-8" in errors[4] and "0xff" in errors[4]
    assert [rows[i]["summary"] for i in (0, 5, 6, 7)] == ["w1 w2 w3", "w6 w7", "w8 w9", "w10"]


def test_truncation_counted_or_error_with_no_truncate(bart, tmp_path):
    long_text = words(random.Random(7), 100, 100)  # 102 tokens; the model takes 64
    texts = ["w1 w2", long_text, "w3 w4 w5"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.jsonl"
    r = encdec("summarize", tmp_path / "in.txt", "-m", bart.path, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert "1 input(s) truncated to 64 tokens" in r.stderr
    rows = read_output(out)
    assert [row["summary"] for row in rows] == hf_generate(bart, texts)  # reference truncates too
    assert rows[1]["error"] is None and rows[1]["summary"]

    r = encdec("summarize", tmp_path / "in.txt", "-m", bart.path, "-o", out, "-q", "--no-truncate")
    assert r.exit_code == 1
    rows = read_output(out)
    assert rows[1]["summary"] is None and "102 tokens, the model takes 64" in rows[1]["error"]
    assert rows[0]["summary"] == "w1 w2" and rows[2]["summary"] == "w3 w4 w5"
    assert "truncated" not in r.stderr


def test_generation_flags_take_effect(bart, tmp_path):
    texts = [words(random.Random(300 + i), 4, 12) for i in range(10)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    out = tmp_path / "out.parquet"

    def run(*flags):
        r = encdec("summarize", tmp_path / "in.parquet", "-m", bart.path, "-o", out, "-q", *flags)
        assert r.exit_code == 0, r.stderr
        return [row["summary"] for row in read_output(out)]

    short = run("--max-new-tokens", 3)
    assert short == hf_generate(bart, texts, max_new_tokens=3)
    assert all(len(s.split()) == 2 for s in short)  # the forced <s> is one of the 3
    beams = run("--num-beams", 3)
    assert beams == hf_generate(bart, texts, num_beams=3)
    both = run("--num-beams", 3, "--num-return-sequences", 2, "--max-new-tokens", 6)
    assert both == hf_generate(bart, texts, num_beams=3, num_return_sequences=2, max_new_tokens=6)
    assert all(isinstance(b, list) and len(b) == 2 for b in both)
    assert pq.read_schema(out).field("summary").type == pa.list_(pa.string())


def test_default_output_paths_and_output_column(bart, tmp_path):
    (tmp_path / "notes.txt").write_text("w1 w2\nw3\n")
    pq.write_table(pa.table({"text": ["w5 w6"]}), tmp_path / "a.pq")
    with open(tmp_path / "t.csv", "w") as f:
        f.write("text\nw7 w8\n")
    assert encdec("summarize", tmp_path / "notes.txt", "-m", bart.path, "-q").exit_code == 0
    assert read_output(tmp_path / "notes.summary.jsonl") == [
        {"text": "w1 w2", "summary": "w1 w2", "error": None},
        {"text": "w3", "summary": "w3", "error": None},
    ]
    assert encdec("translate", tmp_path / "a.pq", "-m", bart.path, "-q").exit_code == 0
    assert read_output(tmp_path / "a.translation.parquet")[0]["translation"] == "w5 w6"
    r = encdec("generate", tmp_path / "t.csv", "-m", bart.path, "-q", "--output-column", "out")
    assert r.exit_code == 0
    assert read_output(tmp_path / "t.out.csv") == [{"text": "w7 w8", "out": "w7 w8", "error": None}]
    # the output may not replace the input
    r = encdec("summarize", tmp_path / "a.pq", "-m", bart.path, "-o", tmp_path / "a.pq")
    assert r.exit_code == 2 and "overwrite the input" in r.stderr


def test_interrupted_job_resumes_each_row_once(bart, bart_ref, tmp_path, monkeypatch):
    """Ctrl-C after some results (KeyboardInterrupt from the engine loop): exit 130, finished rows
    saved as parts; the same command again finishes the rest; every row appears once."""
    from encdec_cli.engine import Engine

    arg, _, _ = write_input("parquet", tmp_path)
    out = tmp_path / "out.parquet"
    parts = tmp_path / ".out.parquet.parts"
    env = {"ENCDEC_PART_ROWS": "4"}
    real_generate = Engine.generate

    def interrupted_after(n):
        def generate(self, requests):
            for i, result in enumerate(real_generate(self, requests)):
                if i == n:
                    raise KeyboardInterrupt
                yield result

        return generate

    monkeypatch.setattr(Engine, "generate", interrupted_after(20))
    r = encdec("summarize", arg, "-m", bart.path, "-o", out, "-q", "--max-num-seqs", 8, env=env)
    assert r.exit_code == 130 and "INTERRUPTED" in r.stderr and "re-run" in r.stderr
    assert not out.exists() and any(parts.glob("part-*.arrow"))
    monkeypatch.setattr(Engine, "generate", interrupted_after(10))
    r = encdec("summarize", arg, "-m", bart.path, "-o", out, "-q", "--max-num-seqs", 8, env=env)
    assert r.exit_code == 130 and "already done in an earlier run" in r.stderr
    monkeypatch.setattr(Engine, "generate", real_generate)
    r = encdec("summarize", arg, "-m", bart.path, "-o", out, "-q", "--max-num-seqs", 8, env=env)
    assert r.exit_code == 1, r.stderr  # the empty row failed (in the first run)
    assert "already done in an earlier run" in r.stderr and "failed in an earlier run" in r.stderr
    rows = read_output(out)
    assert [row["id"] for row in rows] == list(range(N_ROWS))
    assert [row["summary"] for row in rows] == bart_ref
    names = sorted(p.name for p in tmp_path.iterdir())  # no parts or temps; the finished job's state
    assert names == [".out.parquet.done.json", "in.parquet", "out.parquet"]


def test_entry_point_pipes_stdin_to_stdout(bart):
    """The real console script in a subprocess: plain lines in, JSON Lines out, summary on stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "encdec_cli", "summarize", "-", "-m", str(bart.path), "-o", "-"],
        input=b"w1 w2 w3\nw4\n", capture_output=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr.decode()
    assert [json.loads(line)["summary"] for line in r.stdout.decode().splitlines()] == ["w1 w2 w3", "w4"]
    assert b"summarize: 2 row(s) done" in r.stderr


@pytest.mark.parametrize("out_fmt", ["parquet", "jsonl", "csv"])
def test_finished_job_is_skipped_retried_or_overwritten(bart, bart_ref, tmp_path, monkeypatch, out_fmt):
    """A finished job run again: plain, nothing is recomputed and the output stays as it is (same exit
    status); --retry-failed recomputes only the failed rows, keeping the others as they were;
    --overwrite recomputes all. The state is the done file beside the output."""
    from encdec_cli.engine import Engine, Result

    arg, _, _ = write_input("parquet", tmp_path)
    out = tmp_path / f"out.{out_fmt}"
    real_generate = Engine.generate
    ran: list[int] = []  # row ids the engine got

    def generate(self, requests, fail=()):
        def counted():
            for request in requests:
                ran.append(request.request_id)
                yield request

        for r in real_generate(self, counted()):
            yield Result(r.request_id, [], error="out of memory") if r.request_id in fail else r

    def run(*flags, fail=()):
        ran.clear()
        monkeypatch.setattr(Engine, "generate", lambda self, requests: generate(self, requests, fail))
        r = encdec("summarize", arg, "-m", bart.path, "-o", out, "-q", "--max-num-seqs", 8, *flags)
        assert r.exit_code == 1, r.stderr  # the empty row failed, in this run or an earlier one
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [f".{out.name}.done.json"]
        return r.stderr, read_output(out), (out.stat().st_mtime_ns, out.read_bytes())

    valid = [i for i in range(N_ROWS) if i != EMPTY_ROW]
    log, first, _ = run(fail={7})
    assert sorted(ran) == valid and "2 row(s) FAILED" in log
    assert first[7]["summary"] is None and first[7]["error"] == "out of memory"

    log, rows, file = run()
    assert ran == [] and rows == first
    assert "0 row(s) done" in log and f"{N_ROWS} row(s) already done in an earlier run" in log
    assert "2 row(s) failed in an earlier run" in log

    log, retried, _ = run("--retry-failed")
    assert ran == [7] and "1 row(s) done" in log and "1 row(s) FAILED" in log
    assert retried[7]["summary"] == bart_ref[7] and retried[7]["error"] is None
    assert retried[:7] + retried[8:] == first[:7] + first[8:]  # the other rows as they were
    if out_fmt == "parquet":
        assert pq.read_schema(out).field("meta").type == pa.struct({"k": pa.int64(), "tag": pa.string()})

    log, rows, again = run()
    assert ran == [] and rows == retried and "1 row(s) failed in an earlier run" in log
    assert again != file  # the retry rewrote the output; this run left it as it was
    assert run()[2] == again

    log, rows, _ = run("--overwrite")
    assert sorted(ran) == valid and rows == retried


def test_finished_job_run_again_loads_no_weights(bart, tmp_path):
    """A finished job run again skips every row without loading the model: with its weights gone it
    ends as before (same exit status, output untouched); --overwrite, which runs rows, cannot load."""
    model = tmp_path / "model"
    shutil.copytree(bart.path, model)
    arg, _, _ = write_input("jsonl", tmp_path)
    out = tmp_path / "out.jsonl"
    args = ["summarize", arg, "-m", model, "-o", out, "--max-num-seqs", 8]
    r = encdec(*args)
    assert r.exit_code == 1 and r.stderr.startswith(f"model {model} on cpu"), r.stderr  # the empty row
    first = out.read_bytes()
    (model / "model.safetensors").unlink()
    r = encdec(*args)
    assert r.exit_code == 1 and not r.stderr.startswith("model "), r.stderr
    assert "0 row(s) done" in r.stderr and f"{N_ROWS} row(s) already done in an earlier run" in r.stderr
    assert out.read_bytes() == first
    r = encdec(*args, "--overwrite")
    assert r.exit_code == 2 and "no weights in" in r.stderr, r.stderr


def test_speculative_decoding_gives_the_same_rows(bart, bart_ref, tmp_path):
    """--speculative (prompt lookup, and the model as its own draft): the same summaries as plain
    greedy decoding (transformers'), and the job summary says how many drafts were accepted."""
    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "in.parquet")
    for i, spec in enumerate(("ngram:3", f"model:{bart.path}:2")):
        out = tmp_path / f"out{i}.parquet"
        args = ["-o", out, "-q", "--max-num-seqs", 8, "--speculative", spec]
        r = encdec("summarize", tmp_path / "in.parquet", "-m", bart.path, *args)
        assert r.exit_code == 1, r.stderr  # the empty row
        assert [row["summary"] for row in read_output(out)] == bart_ref
        assert "speculative decoding:" in r.stderr and "draft tokens accepted" in r.stderr


@pytest.mark.parametrize(
    "args, words",
    [
        (["--speculative", "ngram", "--num-beams", "2"], ["--speculative", "beam search", "--num-beams 1"]),
        (["--speculative", "lookup"], ["--speculative", "ngram[:K]"]),
        (["--speculative", "ngram:0"], ["K must be", "1 to 16"]),
    ],
)
def test_speculative_usage_errors(bart, tmp_path, args, words):
    pq.write_table(pa.table({"text": TEXTS[:3]}), tmp_path / "in.parquet")
    r = encdec("summarize", tmp_path / "in.parquet", "-m", bart.path, "-q", *args)
    assert r.exit_code == 2
    assert r.stderr.startswith("error:") and all(w in r.stderr for w in words), r.stderr
