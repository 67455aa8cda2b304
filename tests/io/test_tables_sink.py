"""Table output: input order from out-of-order writes, parts as resume state, formats."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import random
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encdec_cli.io.tables import ERROR_COLUMN, RowIdSet, TableError, open_sink, open_table
from encdec_cli.io.tables import merge as tables  # MERGE_FAN_IN


def read_output(path):
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text("utf-8").splitlines()]
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def make_parquet(path, n):
    pq.write_table(pa.table({"id": list(range(n)), "text": [f"doc {i}" for i in range(n)]}), path)


def no_parts_left(out):
    return not out.with_name(f".{out.name}.parts").exists()


@pytest.mark.parametrize("ext", ["parquet", "jsonl", "csv"])
def test_out_of_order_writes_come_out_in_input_order(tmp_path, ext):
    make_parquet(tmp_path / "in.parquet", 50)
    src = open_table(tmp_path / "in.parquet", "text")
    rows = list(src)
    out = tmp_path / f"out.{ext}"
    sink = open_sink(out, result_columns=["summary"], input_schema=src.arrow_schema, part_rows=8)
    order = list(range(50))
    random.Random(0).shuffle(order)
    for i in order:
        if i == 7:
            sink.write_row(rows[i], error="engine: out of memory")
        else:
            sink.write_row(rows[i], {"summary": rows[i].text.upper()})
    assert sink.finalize(expected_rows=src.rows_read) == out
    got = read_output(out)
    assert [str(r["id"]) for r in got] == [str(i) for i in range(50)]
    assert list(got[0]) == ["id", "text", "summary", ERROR_COLUMN]
    assert got[3]["summary"] == "DOC 3" and got[3][ERROR_COLUMN] in (None, "")
    assert got[7]["summary"] in (None, "") and got[7][ERROR_COLUMN] == "engine: out of memory"
    assert no_parts_left(out)
    if ext == "parquet":
        schema = pq.read_schema(out)
        assert schema.field("id").type == pa.int64()  # input types kept
        assert schema.field("summary").type == pa.string() and schema.field("error").type == pa.string()


def test_resume_after_crash_each_row_exactly_once(tmp_path):
    make_parquet(tmp_path / "in.parquet", 100)
    out = tmp_path / "out.parquet"
    kw = dict(result_columns=["summary"], job_key="job-1", part_rows=10)
    src = open_table(tmp_path / "in.parquet", "text")
    sink = open_sink(out, input_schema=src.arrow_schema, **kw)
    assert len(sink.done_row_ids()) == 0
    written = []
    for row in src:  # rows 0..59 in order, then a few out of order, then "crash"
        if row.row_id < 60 or row.row_id in (71, 90):
            sink.write_row(row, {"summary": f"s{row.row_id}"})
            written.append(row.row_id)
        if row.row_id == 95:
            break
    # crash: no finalize, no close. Rows 0..59 were flushed as parts of 10.
    del sink
    assert not out.exists()

    src = open_table(tmp_path / "in.parquet", "text")
    sink = open_sink(out, input_schema=src.arrow_schema, **kw)
    done = sink.done_row_ids()
    assert done == RowIdSet([(0, 60)])
    for row in src:
        if row.row_id not in done:
            sink.write_row(row, {"summary": f"s{row.row_id}"})
    sink.write(3, {"id": 3, "text": "doc 3"}, {"summary": "again"})  # already done: ignored
    assert sink.duplicates == 1
    sink.finalize(expected_rows=src.rows_read)
    got = pq.read_table(out).to_pylist()
    assert [r["id"] for r in got] == list(range(100))
    assert [r["summary"] for r in got] == [f"s{i}" for i in range(100)]
    assert no_parts_left(out)


def test_close_saves_buffered_rows_for_resume(tmp_path):
    out = tmp_path / "out.jsonl"
    with open_sink(out, result_columns=["translation"], part_rows=1000) as sink:
        for i in (5, 1, 0, 3):
            sink.write(i, {"text": f"t{i}"}, {"translation": f"T{i}"})
    sink = open_sink(out, result_columns=["translation"], part_rows=1000)
    assert sink.done_row_ids() == RowIdSet([(0, 2), (3, 4), (5, 6)])
    for i in (2, 4):
        sink.write(i, {"text": f"t{i}"}, {"translation": f"T{i}"})
    sink.finalize(expected_rows=6)
    got = read_output(out)
    assert [r["translation"] for r in got] == [f"T{i}" for i in range(6)]


def test_rows_out_of_order_are_saved_and_merge_in_rounds(tmp_path, monkeypatch):
    """Rows finished out of order are committed all the same (the first row finishes last here);
    the many overlapping parts merge in rounds of MERGE_FAN_IN, a retried row's newest result wins."""
    monkeypatch.setattr(tables, "MERGE_FAN_IN", 4)  # 3000 / 8 parts: several rounds
    n = 3000
    out = tmp_path / "out.parquet"
    sink = open_sink(out, result_columns=["summary"], part_rows=8)
    order = list(range(1, n))
    random.Random(1).shuffle(order)
    for k, i in enumerate(order):
        error = "timeout" if i in (10, 2000) else None
        sink.write(i, {"id": i, "text": f"doc {i}"}, None if error else {"summary": f"s{i}"}, error)
        assert sink.rows_committed == (k + 1) // 8 * 8  # nothing waits for row 0
    sink.close()
    sink = open_sink(out, result_columns=["summary"], part_rows=8)
    assert sink.done_row_ids() == RowIdSet([(1, n)]) and list(sink.failed_row_ids()) == [10, 2000]
    for i in (2000, 0, 10):
        sink.write(i, {"id": i, "text": f"doc {i}"}, {"summary": f"s{i}"})
    sink.finalize(expected_rows=n)
    got = pq.read_table(out).to_pylist()
    assert [r["id"] for r in got] == list(range(n))
    assert all(r["summary"] == f"s{r['id']}" and r["error"] is None for r in got)
    assert no_parts_left(out)


def test_failed_rows_can_be_retried_and_replace_the_error(tmp_path):
    out = tmp_path / "out.csv"
    sink = open_sink(out, result_columns=["summary"], part_rows=4)
    for i in range(10):
        if i in (2, 6):
            sink.write(i, {"text": f"t{i}"}, error="timeout")
        else:
            sink.write(i, {"text": f"t{i}"}, {"summary": f"s{i}"})
    sink.close()
    sink = open_sink(out, result_columns=["summary"], part_rows=4)
    assert len(sink.done_row_ids()) == 10
    assert list(sink.failed_row_ids()) == [2, 6]
    sink.write(2, {"text": "t2"}, {"summary": "s2"})
    sink.write(6, {"text": "t6"}, error="timeout again")
    sink.finalize(expected_rows=10)
    got = read_output(out)
    assert [r["summary"] for r in got] == [f"s{i}" if i != 6 else "" for i in range(10)]
    assert [r["error"] for r in got] == ["" if i != 6 else "timeout again" for i in range(10)]


def test_incomplete_job_keeps_parts(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = open_sink(out, result_columns=["summary"])
    for i in (0, 1, 3):
        sink.write(i, {"text": "x"}, {"summary": "y"})
    with pytest.raises(TableError, match=r"3 of 4 rows have a result \(missing e.g. \[2\]\)"):
        sink.finalize(expected_rows=4)
    assert not out.exists() and not no_parts_left(out)


def test_parts_of_another_job_are_not_mixed_in(tmp_path):
    out = tmp_path / "out.parquet"
    sink = open_sink(out, result_columns=["summary"], job_key="A", part_rows=1)
    sink.write(0, {"text": "x"}, {"summary": "y"})
    sink.close()
    with pytest.raises(TableError, match="different job"):
        open_sink(out, result_columns=["summary"], job_key="B")
    fresh = open_sink(out, result_columns=["summary"], job_key="B", resume=False)
    assert len(fresh.done_row_ids()) == 0
    fresh.close()


def test_second_writer_is_refused(tmp_path):
    out = tmp_path / "out.parquet"
    first = open_sink(out, result_columns=["summary"])
    with pytest.raises(TableError, match="another encdec job"):
        open_sink(out, result_columns=["summary"])
    first.close()
    open_sink(out, result_columns=["summary"]).close()


def test_writer_starting_while_another_finalizes(tmp_path):
    """Finalize removes the parts folder before it lets go of its lock: a second writer that keeps
    trying while the first finishes is refused as busy until then, and then starts afresh, never
    failing on a file or folder that vanished under it."""
    out = tmp_path / "out.jsonl"
    errors: list[BaseException] = []
    refused = 0

    def second_writer(start: threading.Barrier) -> None:
        nonlocal refused
        start.wait()
        while True:
            try:
                sink = open_sink(out, result_columns=["summary"], resume=False)
            except TableError as exc:
                assert "another encdec job is writing" in str(exc)
                refused += 1
                continue
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            assert len(sink.done_row_ids()) == 0
            sink.close()
            return

    for _ in range(100):
        first = open_sink(out, result_columns=["summary"], resume=False)
        first.write(0, {"text": "x"}, {"summary": "y"})
        start = threading.Barrier(2)
        thread = threading.Thread(target=second_writer, args=(start,))
        thread.start()
        start.wait()
        first.finalize(expected_rows=1)
        thread.join()
        assert errors == []
        assert read_output(out) == [{"text": "x", "summary": "y", "error": None}]
    assert refused > 0  # the second writer did try while the first was finishing


def test_schemaless_rows_with_mixed_types(tmp_path):
    out = tmp_path / "out.parquet"
    sink = open_sink(out, result_columns=["summary"], part_rows=2)
    records = [
        {"text": "a", "meta": 1},
        {"text": "b", "meta": 2.5},
        {"text": "c", "meta": "three", "extra": [1, 2]},
        {"text": "d", "when": dt.date(2024, 1, 2)},
        None,  # a line that could not be parsed
    ]
    for i, rec in enumerate(records):
        sink.write(i, rec, {"summary": "s"} if rec else None, None if rec else "line 5 is not valid JSON")
    sink.finalize(expected_rows=5)
    table = pq.read_table(out)
    assert table.column_names == ["text", "meta", "extra", "when", "summary", "error"]
    got = table.to_pylist()
    assert [r["meta"] for r in got] == ["1", "2.5", "three", None, None]  # conflicting types -> text
    assert got[2]["extra"] == [1, 2] and got[3]["when"] == dt.date(2024, 1, 2)
    assert got[4]["text"] is None and got[4]["error"] == "line 5 is not valid JSON"


def test_result_column_replaces_input_column_of_same_name(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = open_sink(out, result_columns=["summary"])
    sink.write(0, {"summary": "old", "text": "t", "error": "old error"}, {"summary": "new"})
    sink.finalize()
    assert read_output(out) == [{"text": "t", "summary": "new", "error": None}]


def test_empty_job_writes_empty_output(tmp_path):
    make_parquet(tmp_path / "in.parquet", 0)
    src = open_table(tmp_path / "in.parquet", "text")
    sink = open_sink(tmp_path / "out.parquet", result_columns=["summary"], input_schema=src.arrow_schema)
    sink.finalize(expected_rows=0)
    assert pq.read_table(tmp_path / "out.parquet").column_names == ["id", "text", "summary", "error"]


def test_stdout_sink_streams_prefix_in_order(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf)
    sink = open_sink("-", result_columns=["summary"])
    sink.write(1, {"text": "b"}, {"summary": "B"})
    assert buf.getvalue() == ""  # row 0 is not in yet
    sink.write(0, {"text": "a"}, {"summary": "A"})
    assert [json.loads(x)["summary"] for x in buf.getvalue().splitlines()] == ["A", "B"]
    sink.write(2, {"text": "c"}, error="bad")
    sink.finalize(expected_rows=3)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[2] == {"text": "c", "summary": None, "error": "bad"}
    with pytest.raises(TableError, match="JSON Lines only"):
        open_sink("-", "csv", result_columns=["summary"])


def test_sink_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        open_sink(tmp_path / "o.jsonl", result_columns=["error"])
    with pytest.raises(TableError, match="cannot tell the output format"):
        open_sink(tmp_path / "o.xlsx", result_columns=["summary"])
    sink = open_sink(tmp_path / "o.jsonl", result_columns=["summary"])
    with pytest.raises(ValueError, match="unknown result columns"):
        sink.write(0, {"text": "x"}, {"summry": "y"})
    sink.close()


def test_row_id_set():
    s = RowIdSet()
    for i in (5, 3, 4, 10, 0, 1, 2):
        s.add(i)
    assert s.intervals() == [(0, 6), (10, 11)] and len(s) == 7
    assert 5 in s and 6 not in s and s.end_of(2) == 6 and s.end_of(7) is None
    s.add_range(6, 10)
    assert s.intervals() == [(0, 11)]
    assert RowIdSet([(0, 20)]).difference(RowIdSet([(2, 4), (8, 9), (19, 30)])).intervals() == [
        (0, 2),
        (4, 8),
        (9, 19),
    ]


def test_slow_jobs_flush_on_a_timer(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = open_sink(out, result_columns=["summary"], part_rows=1000, flush_interval_s=0.0)
    for i in range(3):
        sink.write(i, {"text": "x"}, {"summary": "y"})
    assert sink.rows_committed == 3  # each contiguous row saved at once
    del sink  # crash
    assert len(open_sink(out, result_columns=["summary"]).done_row_ids()) == 3


def test_rows_are_committed_in_time_without_further_writes(tmp_path):
    """The flush thread commits buffered rows (out of order too) when the job writes nothing more."""
    out = tmp_path / "out.jsonl"
    sink = open_sink(out, result_columns=["summary"], part_rows=1000, flush_interval_s=0.2)
    for i in (2, 0):
        sink.write(i, {"text": "x"}, {"summary": "y"})
    deadline = time.monotonic() + 60
    while sink.rows_committed < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    del sink  # crash; the thread does not keep the sink (and its lock) alive
    assert open_sink(out, result_columns=["summary"]).done_row_ids() == RowIdSet([(0, 1), (2, 3)])


def test_failed_timed_commit_is_raised_by_the_next_write(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    sink = open_sink(out, result_columns=["summary"], part_rows=1000, flush_interval_s=0.2)

    def disk_full(rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sink, "_write_part", disk_full)
    sink.write(0, {"text": "x"}, {"summary": "y"})
    deadline = time.monotonic() + 60
    while sink._flush_error is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(OSError, match="No space left"):
        sink.write(1, {"text": "x"}, {"summary": "y"})
    monkeypatch.undo()  # space again: closing saves the buffered row
    sink.close()
    assert open_sink(out, result_columns=["summary"]).done_row_ids() == RowIdSet([(0, 1)])


def test_unreadable_part_is_set_aside_and_its_rows_rerun(tmp_path):
    out = tmp_path / "out.jsonl"
    sink = open_sink(out, result_columns=["summary"], part_rows=2)
    for i in range(4):
        sink.write(i, {"text": "x"}, {"summary": "y"})
    sink.close()
    parts = out.with_name(f".{out.name}.parts")
    (parts / "part-00000001.arrow").write_bytes(b"garbage")
    sink = open_sink(out, result_columns=["summary"], part_rows=2)
    assert sink.done_row_ids() == RowIdSet([(0, 2)])
    assert "part-00000001.arrow" in sink.warnings[0]
    for i in (2, 3):
        sink.write(i, {"text": "x"}, {"summary": "z"})
    sink.finalize(expected_rows=4)
    assert [r["summary"] for r in read_output(out)] == ["y", "y", "z", "z"]


def test_torchrun_ranks_share_one_parts_folder_and_rank_0_merges(tmp_path):
    """Three ranks write disjoint rows into one output's parts folder (their own part names and
    sequence numbers, a shared lock), rank 0 opening first; rank 0 then takes in the others' parts
    and merges them; a one-process job cannot open the output meanwhile."""
    out = tmp_path / "out.parquet"
    opts = dict(result_columns=["r"], job_key="job", part_rows=2)
    sinks = [open_sink(out, writer=(rank, 3), **opts) for rank in range(3)]
    with pytest.raises(TableError, match="another encdec job"):
        open_sink(out, **opts)
    for row_id in range(20):
        sinks[(row_id // 4) % 3].write(row_id, {"n": row_id}, {"r": f"v{row_id}"})
    for sink in sinks[1:]:
        sink.close()
    names = sorted(p.name for p in (tmp_path / ".out.parquet.parts").glob("part-*"))
    assert len(names) == len(set(names)) == 10 and {n[-8:] for n in names} == {
        "r0.arrow",
        "r1.arrow",
        "r2.arrow",
    }
    seqs = [int(n.split("-")[1]) for n in names]
    assert len(set(seqs)) == len(seqs)  # interleaved by rank: never the same number twice
    sinks[0].adopt_new_parts()
    sinks[0].finalize(expected_rows=20)
    rows = pq.read_table(out).to_pylist()
    assert [r["n"] for r in rows] == list(range(20)) and rows[7]["r"] == "v7"
    again = open_sink(out, **opts)  # the finished job: every row done
    assert again.finished and again.done_row_ids() == RowIdSet([(0, 20)])
    again.close()
