"""Job manifest: append-only, fsynced lines; a truncated last line is ignored."""

from __future__ import annotations

import json
import os

from encdec_cli.io.manifest import MANIFEST_NAME, Manifest, file_key, key_input, row_key


def test_record_and_reload(tmp_path):
    out = tmp_path / "a.srt"
    out.write_text("x")
    with Manifest.in_dir(tmp_path) as m:
        m.record_ok("k1", [out])
        m.record_error("k2", "cannot decode audio: bad header")
    m2 = Manifest(tmp_path / MANIFEST_NAME)
    assert m2.is_done("k1") and not m2.is_done("k2") and not m2.is_done("k3")
    assert m2.failed("k2") == "cannot decode audio: bad header"
    assert m2.failed("k1") is None and m2.failed("k3") is None
    lines = [json.loads(line) for line in (tmp_path / MANIFEST_NAME).read_text().splitlines()]
    assert lines[0]["status"] == "ok" and lines[0]["outputs"] == [str(out)] and "time" in lines[0]
    assert lines[1] == {
        "key": "k2",
        "status": "error",
        "error": "cannot decode audio: bad header",
        "time": lines[1]["time"],
    }


def test_latest_record_wins_and_missing_outputs_mean_not_done(tmp_path):
    m = Manifest(tmp_path / "m.jsonl")
    m.record_error("k", "oom")
    m.record_ok("k", [tmp_path / "gone.txt"])
    m.close()
    m2 = Manifest(tmp_path / "m.jsonl")
    assert m2.failed("k") is None
    assert not m2.is_done("k")  # its output was deleted: do it again
    assert m2.is_done("k", check_outputs=False)


def test_truncated_last_line_is_ignored_and_appends_start_clean(tmp_path):
    path = tmp_path / "m.jsonl"
    m = Manifest(path)
    m.record_ok("a")
    m.record_ok("b")
    m.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 9])  # crash in the middle of the last line
    m2 = Manifest(path)
    assert m2.is_done("a") and not m2.is_done("b")
    assert m2.skipped_lines == 1
    m2.record_ok("c")
    m2.close()
    m3 = Manifest(path)
    assert m3.is_done("a") and m3.is_done("c") and not m3.is_done("b")
    assert m3.skipped_lines == 1


def test_keys(tmp_path):
    f = tmp_path / "in.wav"
    f.write_bytes(b"123")
    k = file_key(f)
    assert str(f.resolve()) in k and k == file_key(tmp_path / "." / "in.wav")
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_key(f) != k  # a changed file is a new item
    assert row_key(3, "abc") == row_key(3, b"abc") != row_key(4, "abc")
    assert row_key(3, "abc") != row_key(3, "abd")
    assert key_input(k) == f"file:{f.resolve()}" == key_input(file_key(f))  # the input, not its state
    assert key_input(f"{k}#7") == f"file:{f.resolve()}#7"


def test_non_utf8_names_and_warnings_round_trip(tmp_path):
    name = os.fsdecode(b"caf\xe9.wav")  # a Latin-1 file name: a lone surrogate in the str
    out = tmp_path / os.fsdecode(b"caf\xe9.txt")
    out.write_text("x")
    with Manifest.in_dir(tmp_path) as m:
        m.record_ok(f"file:/in/{name}:1:2", [out], ["truncated"])
    raw = (tmp_path / MANIFEST_NAME).read_bytes()
    raw.decode("utf-8")  # valid UTF-8 (the surrogate is \u-escaped)
    entry = Manifest.in_dir(tmp_path).get(f"file:/in/{name}:1:2")
    assert entry.outputs == (str(out),) and entry.warnings == ("truncated",)
    assert Manifest.in_dir(tmp_path).is_done(entry.key)


def test_torchrun_ranks_write_their_own_manifests_read_together_and_folded(tmp_path, monkeypatch):
    from encdec_cli.io import manifest as manifest_module
    from encdec_cli.io.manifest import RANK_MANIFEST_GLOB, fold_rank_manifests

    clock = iter(range(100, 200))
    monkeypatch.setattr(manifest_module.time, "time", lambda: float(next(clock)))
    with Manifest.in_dir(tmp_path) as m:  # an earlier one-process run
        m.record_error("a", "failed once")
    r0, r1 = Manifest.in_dir(tmp_path, rank=0), Manifest.in_dir(tmp_path, rank=1)
    assert r0.failed("a") and r1.failed("a")  # every rank reads the folder's manifest
    r1.record_ok("a")  # retried by rank 1, newer than the failure
    r0.record_ok("b")
    r0.record_error("c", "bad")
    r0.close()
    r1.close()
    assert (tmp_path / MANIFEST_NAME).read_text().count("\n") == 1  # the ranks never touch it
    seen = Manifest.in_dir(tmp_path, rank=2)  # a rank of a re-run with 3 processes: all of it
    assert seen.is_done("a", check_outputs=False) and seen.is_done("b") and seen.failed("c") == "bad"
    seen.close()
    fold_rank_manifests(tmp_path)
    assert not list(tmp_path.glob(RANK_MANIFEST_GLOB))
    one = Manifest(tmp_path / MANIFEST_NAME)
    assert one.is_done("a") and one.is_done("b") and one.failed("c") == "bad" and len(one) == 3
    # a one-process job folds what an interrupted torchrun job left, before it reads
    r0 = Manifest.in_dir(tmp_path, rank=0)
    r0.record_error("b", "redone, failed")
    r0.close()
    assert Manifest.in_dir(tmp_path).failed("b") == "redone, failed"
    assert not list(tmp_path.glob(RANK_MANIFEST_GLOB))
