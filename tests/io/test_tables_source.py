"""Streaming table input: every format, stdin, bad rows, clear errors."""

from __future__ import annotations

import io
import json
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encdec_cli.io.tables import Row, TableError, open_table
from encdec_cli.io.tables import sources as tables  # MAX_QUOTED_LINES

TEXTS = ["first doc", "second, with a comma", 'third "quoted"\nand multi-line', "fourth ünïcode"]


def write_inputs(tmp_path):
    """The same 4 rows as parquet, jsonl, csv and txt (txt: single-line texts only)."""
    ids = list(range(len(TEXTS)))
    pq.write_table(pa.table({"id": ids, "text": TEXTS}), tmp_path / "in.parquet")
    with open(tmp_path / "in.jsonl", "w", encoding="utf-8") as f:
        for i, t in zip(ids, TEXTS, strict=True):
            f.write(json.dumps({"id": i, "text": t}) + "\n\n")  # blank lines are skipped
    with open(tmp_path / "in.csv", "w", encoding="utf-8", newline="") as f:
        import csv

        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows(zip(ids, TEXTS, strict=True))
    (tmp_path / "in.txt").write_text("".join(t.replace("\n", " ") + "\n" for t in TEXTS), "utf-8")


@pytest.mark.parametrize("ext", ["parquet", "jsonl", "csv", "txt"])
def test_formats_read_all_rows(tmp_path, ext):
    write_inputs(tmp_path)
    with open_table(tmp_path / f"in.{ext}", "text", batch_rows=3) as src:
        batches = list(src.iter_batches())
        assert [len(b) for b in batches] == [3, 1]  # bounded batches
        rows = [r for b in batches for r in b]
        assert src.rows_read == 4
    assert [r.row_id for r in rows] == [0, 1, 2, 3]
    assert all(r.error is None for r in rows)
    expected = TEXTS if ext != "txt" else [t.replace("\n", " ") for t in TEXTS]
    assert [r.text for r in rows] == expected
    assert [r.record["text"] for r in rows] == expected
    if ext != "txt":
        assert "id" in src.columns and "text" in src.columns
        assert [str(r.record["id"]) for r in rows] == ["0", "1", "2", "3"]


def test_parquet_schema_and_row_count(tmp_path):
    write_inputs(tmp_path)
    src = open_table(tmp_path / "in.parquet", "text")
    assert src.num_rows == 4
    assert src.arrow_schema == pa.schema([("id", pa.int64()), ("text", pa.string())])


@pytest.mark.parametrize("ext", ["parquet", "jsonl", "csv", "txt"])
def test_missing_column_lists_available(tmp_path, ext):
    write_inputs(tmp_path)
    with pytest.raises(TableError, match="no column 'document'.*available columns: .*'text'"):
        open_table(tmp_path / f"in.{ext}", "document")


def test_corrupt_or_unknown_inputs(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(TableError, match="cannot read .*bad.parquet as Parquet"):
        open_table(tmp_path / "bad.parquet", "text")
    with pytest.raises(TableError, match="does not exist"):
        open_table(tmp_path / "nope.jsonl", "text")
    (tmp_path / "x.xlsx").write_bytes(b"")
    with pytest.raises(TableError, match="cannot tell the format"):
        open_table(tmp_path / "x.xlsx", "text")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(TableError, match="type int64; expected a text"):
        open_table(tmp_path / "ints.parquet", "text")


def test_csv_unclosed_quote_is_an_error_naming_its_line(tmp_path, monkeypatch):
    """A quote that never closes would make every later row part of one field's text: the input is
    refused, naming the line where the quote opens. Quotes that pyarrow reads as text, escaped ones
    and multi-line fields (also in the header) are fine."""
    path = tmp_path / "in.csv"
    path.write_bytes(b'id,text\n1,fine\n2,"unclosed\n3,swallowed\n4,"" still inside\n')
    with pytest.raises(TableError, match=r"in.csv line 3: a quoted field opens there and is never closed"):
        open_table(path, "text")
    monkeypatch.setattr(tables, "MAX_QUOTED_LINES", 5)
    path.write_bytes(b'id,text\n1,"a\nb\nc\nd\ne\nf"\n2,swallowed\n')
    with pytest.raises(TableError, match=r"line 2: a quoted field opens there and runs over more than 5"):
        open_table(path, "text")
    path.write_bytes(b'\xef\xbb\xbf"id","te\nxt"\n1,he said "hi\n2,"a ""b"", c\nd\ne"\n3,x""y\n4,"q"\n')
    rows = list(open_table(path, "te\nxt"))
    assert [r.text for r in rows] == ['he said "hi', 'a "b", c\nd\ne', 'x""y', "q"]
    assert [r.record["id"] for r in rows] == ["1", "2", "3", "4"]


def test_empty_csv_is_an_error(tmp_path):
    for data in (b"", b"\n\n", b"\xef\xbb\xbf"):
        (tmp_path / "e.csv").write_bytes(data)
        with pytest.raises(TableError, match="e.csv is empty; a CSV file starts with a header line"):
            open_table(tmp_path / "e.csv", "text")
    (tmp_path / "e.csv").write_bytes(b"id,text\n")
    assert list(open_table(tmp_path / "e.csv", "text")) == []


def test_close_ends_a_pass_read_halfway(tmp_path):
    """close() ends the native reader of a pass not read to its end at once, not at the exit."""
    (tmp_path / "in.csv").write_bytes(b"text\n" + b"row\n" * 10)
    src = open_table(tmp_path / "in.csv", "text", batch_rows=2)
    batches = src.iter_batches()
    assert len(next(batches)) == 2
    src.close()
    assert src._open_batches is None and list(batches) == []


def _errors(rows: list[Row]) -> dict[int, str]:
    return {r.row_id: r.error for r in rows if r.error}


def test_bad_rows_become_error_rows_parquet(tmp_path):
    # A binary column may hold bytes that are not UTF-8.
    texts = pa.array([b"good one", None, b"   ", b"caf\xe9", b"good two"], pa.binary())
    pq.write_table(pa.table({"k": list("abcde"), "text": texts}), tmp_path / "b.parquet")
    rows = list(open_table(tmp_path / "b.parquet", "text"))
    assert [r.text for r in rows] == ["good one", None, None, None, "good two"]
    errs = _errors(rows)
    assert set(errs) == {1, 2, 3}
    assert "null" in errs[1] and "empty" in errs[2] and "not valid UTF-8 (byte 0xe9 at position 3)" in errs[3]
    assert rows[3].record["k"] == "d"  # the other columns survive for the output


def test_bad_rows_become_error_rows_jsonl(tmp_path):
    lines = [
        b'{"text": "ok 1"}',
        b'{"text": null}',
        b'{"text": ""}',
        b'{"text": 42}',
        b'{"other": "x"}',
        b"not json",
        b"[1, 2]",
        b'{"text": "caf\xe9"}',
        b'{"text": "ok 2"}',
    ]
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    rows = list(open_table(tmp_path / "b.jsonl", "text"))
    assert [r.text for r in rows if r.error is None] == ["ok 1", "ok 2"]
    errs = _errors(rows)
    assert sorted(errs) == [1, 2, 3, 4, 5, 6, 7]
    assert "is null" in errs[1] and "is empty" in errs[2] and "is int, expected a string" in errs[3]
    assert "line 5 has no column 'text' (it has 'other')" in errs[4]
    assert "line 6 is not valid JSON" in errs[5] and "expected an object" in errs[6]
    assert "line 8 is not valid UTF-8" in errs[7]


def test_bad_rows_become_error_rows_csv_and_txt(tmp_path):
    (tmp_path / "b.csv").write_bytes(b"id,text\n1,fine\n2,\n3,caf\xe9\n4\n5,also fine\n")
    rows = list(open_table(tmp_path / "b.csv", "text"))
    assert [r.text for r in rows if r.error is None] == ["fine", "also fine"]
    assert len(rows) == 5 and len(_errors(rows)) == 3
    assert any("CSV line 5 has 1 fields, expected 2" in e for e in _errors(rows).values())
    (tmp_path / "b.txt").write_bytes(b"one\n\ncaf\xe9\ntwo\r\n\n\n")
    rows = list(open_table(tmp_path / "b.txt", "text"))
    assert [r.text for r in rows] == ["one", None, None, "two"]  # trailing blank lines are no items
    assert "line 2 is empty" in rows[1].error and "line 3 is not valid UTF-8" in rows[2].error


def test_json_array_file(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, {"text": ""}, 5]), "utf-8")
    rows = list(open_table(tmp_path / "a.json", "text"))
    assert rows[0].text == "x" and "is empty" in rows[1].error and "item 2 is a JSON int" in rows[2].error


def test_stdin_jsonl(monkeypatch):
    data = '\n{"text": "a", "n": 1}\n{"text": "b", "n": 2}\n{"text": null}\n'
    monkeypatch.setattr(sys, "stdin", io.StringIO(data))
    src = open_table("-", "text")
    assert src.format == "jsonl" and src.columns == ["text", "n"]
    rows = list(src)
    assert [r.text for r in rows] == ["a", "b", None]
    assert rows[1].record == {"text": "b", "n": 2}
    with pytest.raises(TableError, match="only once"):
        list(src)


def test_stdin_plain_lines_bytes(monkeypatch):
    raw = io.BytesIO(b"\nhello world\n{not json\nbad \xff\n")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw, encoding="utf-8"))
    src = open_table("-", "text")
    assert src.format == "txt"
    rows = list(src)
    assert [r.text for r in rows] == [None, "hello world", "{not json", None]
    assert "line 1 is empty" in rows[0].error and "not valid UTF-8" in rows[3].error


def test_stdin_missing_column(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"doc": "a"}\n'))
    with pytest.raises(TableError, match="stdin .* no column 'text'; available columns: 'doc'"):
        open_table("-", "text")


def test_raw_column_any_type_parquet(tmp_path):
    """raw: an audio column of {bytes, path} structs is read as is (no text check, no text), only the
    selected columns are read, and rows keep their ids across batches."""
    audio = [{"bytes": b"\x00\x01", "path": "a.wav"}, {"bytes": None, "path": None}, None]
    table = pa.table({"id": ["x", "y", "z"], "audio": audio, "big": ["unread"] * 3})
    pq.write_table(table, tmp_path / "a.parquet")
    with pytest.raises(TableError, match="expected a text"):
        open_table(tmp_path / "a.parquet", "audio")
    with open_table(tmp_path / "a.parquet", "audio", batch_rows=2, raw=True, select=["id"]) as src:
        assert src.columns == ["id", "audio"]
        batches = list(src.iter_batches())
    assert [len(b) for b in batches] == [2, 1]
    rows = [r for b in batches for r in b]
    assert [(r.row_id, r.text, r.error) for r in rows] == [(0, None, None), (1, None, None), (2, None, None)]
    assert [r.record for r in rows] == [{"id": i, "audio": a} for i, a in zip("xyz", audio)]


def test_raw_column_jsonl(tmp_path):
    """raw JSONL: any value, a missing key is null; lines that are no object stay error rows."""
    lines = [
        json.dumps({"audio": "a.wav"}),
        "{not json",
        json.dumps({"audio": 5}),
        "[1]",
        json.dumps({"x": 1}),
    ]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    rows = list(open_table(tmp_path / "a.jsonl", "audio", raw=True))
    assert [r.row_id for r in rows] == [0, 1, 2, 3, 4]
    assert [(r.record or {}).get("audio") for r in rows] == ["a.wav", None, 5, None, None]
    assert [r.error is not None for r in rows] == [False, True, False, True, False]
    assert "not valid JSON" in rows[1].error and "expected an object" in rows[3].error
