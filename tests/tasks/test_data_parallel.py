"""``--data-parallel N`` on one machine (N CPU rank processes): the same outputs, byte for byte, as
one process, bad inputs included; a rank killed mid-job costs nothing (its units run again
elsewhere) and the job exits 1; Ctrl-C stops every rank and a re-run finishes. Real subprocesses.

Byte-identical transcripts need identical batches: a window's log-probabilities (json's
``avg_logprob``) move in their last digits with the batch it was decoded in, in one process as in
N, so the transcribe comparison decodes one window at a time (``--max-num-seqs 1``)."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from encdec_cli.errors import UsageError
from encdec_cli.io.manifest import MANIFEST_NAME
from encdec_cli.tasks.data_parallel import rank_devices
from tests.support.text_models import N_WORDS

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def encdec(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "encdec_cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env or ENV, timeout=600,
    )  # fmt: skip


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes), the manifest without its times."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == MANIFEST_NAME:  # one line per input, in completion order, with the time
                lines = [json.loads(line) for line in data.splitlines()]
                data = json.dumps(sorted(({k: v for k, v in e.items() if k != "time"} for e in lines),
                                         key=lambda e: e["key"])).encode()  # fmt: skip
            files[str(p.relative_to(folder))] = data
    return files


def test_rank_devices():
    assert rank_devices("cpu", 3) == ["cpu"] * 3
    assert rank_devices("cpu,cpu", None) == ["cpu", "cpu"]
    if torch.cuda.device_count() >= 2:
        assert rank_devices("cuda:0,cuda:0", None) == ["cuda:0", "cuda:0"]
        assert rank_devices("cuda:1, cuda:0", 2) == ["cuda:1", "cuda:0"]
    with pytest.raises(UsageError, match=r"no cuda:\d here"):
        rank_devices("cuda:0,cuda:9", None)
    with pytest.raises(UsageError, match="is not cpu, cuda or cuda:N"):
        rank_devices("cpu,gpu1", None)
    assert rank_devices("cuda:1", None) == ["cuda:1"] and rank_devices("auto", 1) == ["auto"]
    with pytest.raises(UsageError, match="does not match"):
        rank_devices("cpu,cpu", 3)
    with pytest.raises(UsageError, match="name every rank's device"):
        rank_devices("cuda:1", 2)
    with pytest.raises(UsageError, match=">= 1"):
        rank_devices("cpu", 0)


def test_transcribe_two_ranks_write_what_one_process_writes(tmp_path, example_clips):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i, clip in enumerate(example_clips):
        shutil.copy(clip.path, corpus / ("sub" if i % 2 else "") / clip.path.name)
    (corpus / "broken.wav").write_bytes(b"RIFF\x00\x00garbage")  # an error record in the manifest
    flags = ["-f", "all", "--device", "cpu", "--max-num-seqs", 1]
    for name, extra in (("one", []), ("two", ["-dp", 2])):
        (tmp_path / name).mkdir()
        r = encdec("transcribe", corpus, "-o", "out", *flags, *extra, cwd=tmp_path / name)
        assert r.returncode == 1, r.stderr  # the broken file
        assert f"transcribed {len(example_clips)} file(s)" in r.stderr and "1 FAILED" in r.stderr
    assert "rank 0 ready" in r.stderr and "rank 1 ready" in r.stderr
    one, two = tree(tmp_path / "one" / "out"), tree(tmp_path / "two" / "out")
    assert {Path(p).suffix for p in one} == {".txt", ".srt", ".vtt", ".tsv", ".json", ".jsonl"}
    assert one == two


def words(rng: random.Random) -> str:
    return " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(1, 12)))


@pytest.fixture(scope="module")
def bart(tiny_text_model):
    return tiny_text_model("bart")


@pytest.mark.parametrize("out_ext", ["parquet", "jsonl"])
def test_summarize_two_ranks_write_what_one_process_writes(bart, tmp_path, out_ext):
    rng = random.Random(3)
    texts = [words(rng).encode() for _ in range(40)]
    texts[3], texts[17], texts[18], texts[30] = None, b"", b"w4 \xff\xfe w5", b"  \t "  # bad rows
    table = pa.table({"n": list(range(40)), "text": pa.array(texts, pa.binary())})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=7)
    outs = {}
    for name, extra in (("one", []), ("two", ["-dp", 2])):
        out = tmp_path / f"{name}.{out_ext}"
        r = encdec("summarize", tmp_path / "in.parquet", "-m", bart.path, "-o", out, "--device", "cpu",
                   "--max-num-seqs", 4, *extra)  # fmt: skip
        assert r.returncode == 1, r.stderr
        assert "36 row(s) done" in r.stderr and "4 row(s) FAILED" in r.stderr, r.stderr
        outs[name] = out.read_bytes()
    assert outs["one"] == outs["two"]
    assert "rank 1 ready" in r.stderr


class Job:
    def __init__(self, args: list, log: Path):
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "encdec_cli", *map(str, args)],
                stdout=subprocess.DEVNULL, stderr=err, env={**ENV, "ENCDEC_PART_ROWS": "8"},
            )  # fmt: skip

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def rank_pids(self, n: int, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            pids = dict(re.findall(r"rank (\d+) ready on \S+ \(pid (\d+)\)", self.stderr))
            if len(pids) == n:
                return [int(pids[str(r)]) for r in range(n)]
            assert self.proc.poll() is None, self.stderr
            assert time.monotonic() < deadline, "the ranks never became ready"
            time.sleep(0.05)


@pytest.fixture(scope="module")
def long_table(tmp_path_factory) -> tuple[Path, list[dict]]:
    rng = random.Random(5)
    path = tmp_path_factory.mktemp("dp-kill") / "in.parquet"
    pq.write_table(pa.table({"id": list(range(300)), "text": [words(rng) for _ in range(300)]}), path)
    return path


# each row decodes ~16 tokens, four rows at a time per rank: the job runs for seconds
SLOW = ["--device", "cpu", "--max-num-seqs", 4, "--min-new-tokens", 16]


@pytest.fixture(scope="module")
def reference(bart, long_table, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dp-ref") / "ref.parquet"
    r = encdec("summarize", long_table, "-m", bart.path, "-o", out, "-q", *SLOW)
    assert r.returncode == 0, r.stderr
    return pq.read_table(out).to_pylist()


def test_a_rank_killed_mid_job_costs_nothing(bart, long_table, reference, tmp_path):
    out = tmp_path / "out.parquet"
    cmd = ["summarize", long_table, "-m", bart.path, "-o", out, *SLOW]
    job = Job([*cmd, "-dp", 2], tmp_path / "kill.err")
    pids = job.rank_pids(2)
    time.sleep(1.0)  # both ranks have rows in flight now
    assert job.proc.poll() is None, job.stderr
    os.kill(pids[1], signal.SIGKILL)
    assert job.proc.wait(timeout=600) == 1, job.stderr
    assert "rank 1 (cpu) died: killed by SIGKILL" in job.stderr
    assert "1 process fault(s)" in job.stderr
    rows = pq.read_table(out).to_pylist()
    assert [r["id"] for r in rows] == list(range(300))  # every row exactly once
    ref = {r["id"]: r for r in reference}
    good = [r for r in rows if r["error"] is None]  # the killed rank's rows ran again on rank 0
    assert all(r == ref[r["id"]] for r in good)
    died = [r for r in rows if r["error"] is not None]
    assert all("died" in r["error"] for r in died)  # only rows that failed twice (none here)
    # a re-run finishes the job: retries what failed, and skips the rest
    r = encdec(*cmd, "--retry-failed", "-q")
    assert r.returncode == 0, r.stderr
    assert pq.read_table(out).to_pylist() == reference


def test_ctrl_c_stops_every_rank_and_a_rerun_finishes(bart, long_table, reference, tmp_path):
    out = tmp_path / "out.parquet"
    cmd = ["summarize", long_table, "-m", bart.path, "-o", out, *SLOW, "-dp", 2]
    job = Job(cmd, tmp_path / "int.err")
    pids = job.rank_pids(2)
    time.sleep(1.0)
    job.proc.send_signal(signal.SIGINT)
    assert job.proc.wait(timeout=120) == 130, job.stderr
    assert "INTERRUPTED" in job.stderr
    for pid in pids:  # the ranks are gone too
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not out.exists()
    r = encdec(*cmd, "-q")
    assert r.returncode == 0, r.stderr
    assert "already done in an earlier run" in r.stderr
    assert pq.read_table(out).to_pylist() == reference
