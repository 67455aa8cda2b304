"""Kill and resume: jobs killed (SIGKILL) or interrupted (Ctrl-C = SIGINT) at several points, then
run again with the same command, end with every item exactly once, no partial or temporary file
left, and the same results as an uninterrupted run. Real subprocesses, CPU only."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encdec_cli.io.manifest import MANIFEST_NAME, Manifest, file_key
from encdec_cli.tasks.interrupts import InterruptGuard
from tests.support.text_models import N_WORDS

N_ROWS = 400
PART_ROWS = 16  # finished rows are committed every 16 rows, so a kill loses little
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ENCDEC_PART_ROWS": str(PART_ROWS)}


class Job:
    """One run of an ``encdec`` command in a subprocess (stdout/stderr to files: no pipe stalls)."""

    def __init__(self, args: list, log_dir: Path, name: str):
        self.out, self.err = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "encdec_cli", *map(str, args)], stdout=o, stderr=e, env=ENV
            )

    def wait_until(self, ready: Callable[[], bool], timeout: float = 240, poll: float = 0.02) -> None:
        """Poll until ``ready()``; the job must still be running then (else the kill point is moot)."""
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"job ended before the kill point:\n{self.stderr}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(poll)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=120)

    def finish(self) -> int:
        return self.proc.wait(timeout=600)

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def committed_rows(parts_dir: Path) -> int:
    """Rows saved in the part files of a text job's resume state (part files appear atomically)."""
    n = 0
    for p in parts_dir.glob("part-*.arrow"):
        try:
            with pa.OSFile(str(p)) as f:
                n += json.loads(pa.ipc.open_file(f).schema.metadata[b"encdec.part"])["rows"]
        except (FileNotFoundError, pa.ArrowException):  # removed by finalize meanwhile
            pass
    return n


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ---- text job ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    import random

    rng = random.Random(11)
    texts = [" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(1, 12))) for _ in range(N_ROWS)]
    texts[123] = ""  # one error row: it must survive the kills too
    path = tmp_path_factory.mktemp("resume-text") / "in.parquet"
    pq.write_table(pa.table({"id": list(range(N_ROWS)), "text": texts}), path, row_group_size=100)
    return path


def test_text_job_killed_and_interrupted_resumes_exactly_once(tiny_text_model, table, tmp_path):
    bart = tiny_text_model("bart")
    # --min-new-tokens makes each row take ~25 decode steps: the job runs for seconds, not instants
    flags = ["-m", bart.path, "--max-num-seqs", 8, "--min-new-tokens", 24]
    ref = Job(["summarize", table, "-o", tmp_path / "ref.parquet", "-q", *flags], tmp_path, "ref")
    assert ref.finish() == 1, ref.stderr  # row 123 failed
    expected = pq.read_table(tmp_path / "ref.parquet").to_pylist()

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(table, work / "in.parquet")
    out = work / "in.summary.parquet"  # the default output
    parts = work / ".in.summary.parquet.parts"
    cmd = ["summarize", work / "in.parquet", "-q", *flags]
    seen = 0
    for i, threshold in enumerate((64, 160)):  # SIGKILL twice, at different points
        job = Job(cmd, tmp_path, f"kill{i}")
        job.wait_until(lambda t=threshold: committed_rows(parts) >= t)
        assert job.kill() == -signal.SIGKILL
        assert not out.exists()
        saved = committed_rows(parts)
        assert saved >= max(seen, threshold)  # nothing saved before is lost
        seen = saved

    # Ctrl-C: the part being written is finished, buffered results are saved, exit 130 + summary
    job = Job(cmd, tmp_path, "sigint")
    job.wait_until(lambda: committed_rows(parts) >= 250)
    before = committed_rows(parts)
    assert job.kill(signal.SIGINT) == 130, job.stderr
    assert "INTERRUPTED" in job.stderr and "re-run the same command to resume" in job.stderr
    assert f"{seen} row(s) already done in an earlier run" in job.stderr
    assert committed_rows(parts) >= before and not temp_files(work)

    # what a kill during a commit leaves (a temp file of a process that is gone): cleaned up
    dead = job.proc.pid
    stale = [
        work / f".in.summary.parquet.0badc0de.{dead}.tmp",
        parts / f".part-00000999.arrow.0badc0de.{dead}.tmp",
    ]
    for p in stale:
        p.write_bytes(b"partial")
    final = Job(cmd, tmp_path, "final")
    assert final.finish() == 1, final.stderr  # row 123 failed (in an earlier run)
    assert "already done in an earlier run" in final.stderr
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == list(range(N_ROWS))  # every row exactly once, in order
    assert rows == expected  # same results as the uninterrupted run
    assert rows[123]["error"] and rows[124]["summary"]
    names = sorted(p.name for p in work.iterdir())  # no parts or temps; the finished job's state
    assert names == [".in.summary.parquet.done.json", "in.parquet", "in.summary.parquet"]


# A text job whose sink logs when each row was finished (handed to the sink): "<unix time> <row id>";
# it hands over at most 250 rows a second, so that a run's length, not the machine, says how many.
LOGGED_JOB = """
import os, sys, time
from encdec_cli.io import tables
log = os.open(sys.argv.pop(1), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
write = tables.PartsSink.write
def logged(self, row_id, *args, **kwargs):
    os.write(log, f"{time.time():.6f} {row_id}\\n".encode())
    write(self, row_id, *args, **kwargs)
    time.sleep(0.004)  # at most 250 rows a second, on any machine
tables.PartsSink.write = logged
from encdec_cli.cli import main
main()
"""
# ENCDEC_FLUSH_SECONDS for the test (30 s by default): what a crash may lose. The sink commits its
# rows half this interval after the oldest was finished; the other half is the commit's own time
# (a part file, two fsyncs and a rename) and the flush thread's wait for a CPU, which on a machine
# busy with other work can take a good part of a second.
FLUSH_S = 3.0


def saved_row_ids(parts_dir: Path) -> list[int]:
    ids = []
    for p in parts_dir.glob("part-*.arrow"):
        with pa.OSFile(str(p)) as f:
            ids += pa.ipc.open_file(f).read_all().column("__encdec_row_id").to_pylist()
    return ids


@pytest.mark.slow
def test_sigkill_loses_at_most_the_rows_of_the_flush_interval(tiny_text_model, tmp_path):
    """An 8,000-row job killed (SIGKILL) at three random moments: each time, every row finished more
    than ENCDEC_FLUSH_SECONDS before the kill is saved, whatever the order rows finish in (short
    inputs first); a re-run then gives every row exactly once, in input order. (Each run is killed
    4.5-9 s after its first row: at most 2,250 rows a run, so the job never finishes before its kill.)"""
    import random

    bart = tiny_text_model("bart")
    rng = random.Random(18)
    n = 8000
    texts = [" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(1, 12))) for _ in range(n)]
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(n)), "text": texts}), src)
    out, parts = tmp_path / "in.summary.parquet", tmp_path / ".in.summary.parquet.parts"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENCDEC_FLUSH_SECONDS": str(FLUSH_S)}  # 4096 rows a part
    cmd = ["summarize", src, "-m", bart.path, "-q", "--max-num-seqs", 32]
    for k in range(3):
        log = tmp_path / f"finished{k}.log"
        stderr = tmp_path / f"kill{k}.err"
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-c", LOGGED_JOB, log, *map(str, cmd)], stderr=err, env=env
            )
        deadline = time.monotonic() + 240
        while not (log.exists() and log.stat().st_size):  # the first row of this run is done
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.02)
        time.sleep(rng.uniform(1.5 * FLUSH_S, 3 * FLUSH_S))
        assert proc.poll() is None  # killed mid-job
        killed_at = time.time()
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL
        finished = [line.split() for line in log.read_text().splitlines()]
        due = {int(i) for t, i in finished if float(t) <= killed_at - FLUSH_S}
        saved = saved_row_ids(parts)
        assert len(saved) == len(set(saved))  # no row saved twice
        assert due and due <= set(saved), sorted(due - set(saved))[:20]
        assert max(due) >= len(due) + min(due)  # rows finished out of order (not a prefix) were saved
        assert not out.exists()

    final = Job(cmd, tmp_path, "final")
    assert final.finish() == 0, final.stderr
    assert "row(s) already done in an earlier run" in final.stderr
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == list(range(n))  # every row exactly once, in input order
    assert all(r["summary"] and r["error"] is None for r in rows)


# ---- transcribe ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clips_dir(tmp_path_factory, example_clips) -> Path:
    folder = tmp_path_factory.mktemp("resume-audio") / "clips"
    (folder / "sub").mkdir(parents=True)
    for i, clip in enumerate(example_clips):
        shutil.copy(clip.path, folder / clip.path.name)
        shutil.copy(clip.path, folder / "sub" / f"copy{i}{clip.path.suffix}")
    return folder


def ok_count(out: Path) -> int:
    try:
        lines = (out / MANIFEST_NAME).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return 0
    return sum('"status": "ok"' in line for line in lines)


def test_transcribe_killed_and_interrupted_resumes_exactly_once(clips_dir, tiny_en_dir, tmp_path):
    files = sorted(p for p in clips_dir.rglob("*") if p.is_file())
    assert len(files) == 8
    # two windows per step: files finish a pair at a time, so there are points to kill at
    flags = ["-f", "txt", "-f", "srt", "-f", "json", "-q", "--max-num-seqs", 2]
    ref = Job(["transcribe", clips_dir, "-o", tmp_path / "ref", *flags], tmp_path, "ref")
    assert ref.finish() == 0, ref.stderr

    out = tmp_path / "out"
    cmd = ["transcribe", clips_dir, "-o", out, *flags]
    job = Job(cmd, tmp_path, "kill")
    job.wait_until(lambda: ok_count(out) >= 2)
    assert job.kill() == -signal.SIGKILL

    job = Job(cmd, tmp_path, "sigint")
    job.wait_until(lambda: ok_count(out) >= 5)
    assert job.kill(signal.SIGINT) == 130, job.stderr
    assert "INTERRUPTED" in job.stderr and "skipped" in job.stderr  # the first run's files

    stale = out / "sub" / f".copy0.srt.0badc0de.{job.proc.pid}.tmp"  # a commit the kill cut short
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"partial")
    final = Job(cmd, tmp_path, "final")
    assert final.finish() == 0, final.stderr
    assert not stale.exists()
    assert "skipped" in final.stderr
    manifest = Manifest.in_dir(out)
    keys = [file_key(f) for f in files]
    assert sorted(e.key for e in manifest.entries()) == sorted(keys)  # each file recorded ...
    assert all(manifest.is_done(k) for k in keys)  # ... as done, with its outputs there
    for f in files:
        stem = f.relative_to(clips_dir).with_suffix("")
        for ext in ("txt", "srt"):
            got, want = out / f"{stem}.{ext}", tmp_path / "ref" / f"{stem}.{ext}"
            assert got.read_text() == want.read_text(), (stem, ext)  # same as uninterrupted
        got, want = (json.loads((d / f"{stem}.json").read_text()) for d in (out, tmp_path / "ref"))
        assert got["text"] == want["text"] and got["text"].strip()
        assert [s["tokens"] for s in got["segments"]] == [s["tokens"] for s in want["segments"]]
    outputs = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    assert len(outputs) == 8 * 3 and not temp_files(out)  # one set per file, nothing partial


def test_sigterm_as_the_first_outputs_appear_cuts_no_transcript(clips_dir, tmp_path):
    """SIGTERM the moment the first output file appears (while its item's files and manifest line
    are being written): exit 143 with the summary; every output there is whole and recorded as ok;
    the same command then does the rest."""
    out = tmp_path / "out"
    cmd = ["transcribe", clips_dir, "-o", out, "-f", "txt", "-f", "srt", "-f", "json", "-q"]
    job = Job([*cmd, "--max-num-seqs", 2], tmp_path, "term")

    def outputs() -> list[Path]:  # temps too: a commit under way
        return [p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_NAME]

    job.wait_until(lambda: bool(outputs()), poll=0.001)
    assert job.kill(signal.SIGTERM) == 143, job.stderr
    last = job.stderr.strip().splitlines()[-1]
    assert "INTERRUPTED by SIGTERM" in last and "re-run" in last, job.stderr
    assert not temp_files(out), job.stderr  # the commit under way was finished
    manifest = Manifest(out / MANIFEST_NAME)
    assert manifest.skipped_lines == 0  # no half line
    recorded = {Path(o) for e in manifest.entries() if e.status == "ok" for o in e.outputs}
    written = outputs()
    assert written and set(written) == recorded  # each file is its item's, and the item is done
    for path in written:
        text = path.read_text()
        if path.suffix == ".json":
            assert json.loads(text)["segments"]
        elif path.suffix == ".srt":
            for n, block in enumerate(text.strip().split("\n\n"), 1):
                assert re.fullmatch(rf"{n}\n[\d:,]+ --> [\d:,]+\n.+", block, re.S), text
        else:
            assert text.strip() and text.endswith("\n"), text

    final = Job(cmd, tmp_path, "final")
    assert final.finish() == 0, final.stderr
    manifest = Manifest(out / MANIFEST_NAME)
    files = [p for p in clips_dir.rglob("*") if p.is_file()]
    assert all(manifest.is_done(file_key(f)) for f in files)
    assert len(outputs()) == len(files) * 3


# ---- Ctrl-C never cuts a write -------------------------------------------------------------------


def test_interrupt_guard_defers_ctrl_c_to_the_end_of_a_write():
    guard = InterruptGuard()
    previous = signal.getsignal(signal.SIGINT)
    finished = []
    with guard.installed():
        with pytest.raises(KeyboardInterrupt):
            with guard.protect():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler has run by now: deferred, not raised here
                finished.append("write")
        assert finished == ["write"]
        with pytest.raises(KeyboardInterrupt):  # outside a write: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        guard.stopping()  # while saving on the way out, Ctrl-C is only noted
        with guard.protect():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        assert guard.count == 3
    assert signal.getsignal(signal.SIGINT) is previous
