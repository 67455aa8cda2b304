"""Jobs under torchrun (``python -m torch.distributed.run``, local CPU processes on gloo): the same
outputs as one process; a job killed whole (SIGKILL to every process) resumes with another number
of processes, with or without torchrun, and ends with every item exactly once. Real subprocesses."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encdec_cli.io.manifest import MANIFEST_NAME, RANK_MANIFEST_GLOB
from tests.support.text_models import N_WORDS
from tests.tasks.test_data_parallel import tree

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(nproc: int | None, *args) -> list[str]:
    """``encdec ARGS`` in one process (``nproc`` None), or under torchrun with ``nproc`` processes."""
    launch = (
        [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    )
    return [sys.executable, *launch, "-m", "encdec_cli", *map(str, args)]


def run(nproc: int | None, *args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(nproc, *args), capture_output=True, text=True, cwd=cwd, env=ENV, timeout=900
    )


def words(rng: random.Random) -> str:
    return " ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(1, 12)))


@pytest.fixture(scope="module")
def bart(tiny_text_model):
    return tiny_text_model("bart")


def test_summarize_under_torchrun_writes_what_one_process_writes(bart, tmp_path):
    rng = random.Random(8)
    texts = [words(rng) for _ in range(70)]
    texts[2], texts[40] = "", None  # error rows, in two ranks' shares
    pq.write_table(pa.table({"n": list(range(70)), "text": texts}), tmp_path / "in.parquet")
    flags = ["-m", bart.path, "--device", "cpu", "--max-num-seqs", 8]
    one = run(None, "summarize", tmp_path / "in.parquet", "-o", tmp_path / "one.parquet", "-q", *flags)
    assert one.returncode == 1, one.stderr
    two = run(2, "summarize", tmp_path / "in.parquet", "-o", tmp_path / "two.parquet", *flags)
    assert two.returncode == 1, two.stderr  # torchrun: a rank (rank 0, the job's status) exited 1
    assert "exitcode  : 1" in two.stderr and "rank      : 0" in two.stderr
    # rank 0 prints the whole job's summary, once
    assert two.stderr.count("68 row(s) done") == 1 and "2 row(s) FAILED" in two.stderr, two.stderr
    assert (tmp_path / "one.parquet").read_bytes() == (tmp_path / "two.parquet").read_bytes()
    assert not (tmp_path / ".two.parquet.parts").exists()
    # a finished job run again under torchrun skips every row
    again = run(2, "summarize", tmp_path / "in.parquet", "-o", tmp_path / "two.parquet", *flags)
    assert again.returncode == 1 and "70 row(s) already done in an earlier run" in again.stderr, again.stderr


def test_transcribe_under_torchrun_writes_what_one_process_writes(tmp_path, example_clips):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for clip in example_clips:
        shutil.copy(clip.path, corpus / clip.path.name)
    (corpus / "broken.wav").write_bytes(b"RIFF\x00\x00garbage")
    flags = ["--device", "cpu", "--max-num-seqs", 1, "-q"]
    for name, nproc in (("one", None), ("two", 2)):
        (tmp_path / name).mkdir()
        r = run(nproc, "transcribe", corpus, "-o", "out", *flags, cwd=tmp_path / name)
        assert r.returncode == 1, r.stderr
        assert f"transcribed {len(example_clips)} file(s)" in r.stderr and "1 FAILED" in r.stderr
    out = tmp_path / "two" / "out"
    assert (out / MANIFEST_NAME).is_file() and not list(out.glob(RANK_MANIFEST_GLOB))  # one manifest
    assert tree(tmp_path / "one" / "out") == tree(out)


class Launched:
    """A command in its own process group, killed whole (as a node failure or scancel would)."""

    def __init__(self, argv: list[str], log: Path):
        with open(log, "wb") as err:
            env = {**ENV, "ENCDEC_PART_ROWS": "8", "ENCDEC_FLUSH_SECONDS": "0.5"}
            self.proc = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True
            )
        self.log = log

    def kill_when(self, ready, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.proc.poll() is None, f"ended before the kill point:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.05)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)


def part_rows(parts: Path) -> int:
    n = 0
    for p in parts.glob("part-*.arrow"):
        try:
            with pa.OSFile(str(p)) as f:
                n += json.loads(pa.ipc.open_file(f).schema.metadata[b"encdec.part"])["rows"]
        except (FileNotFoundError, pa.ArrowException):
            pass
    return n


def test_text_job_killed_under_torchrun_resumes_with_three_processes(bart, tmp_path):
    rng = random.Random(9)
    pq.write_table(
        pa.table({"id": list(range(240)), "text": [words(rng) for _ in range(240)]}), tmp_path / "in.parquet"
    )
    flags = ["-m", bart.path, "--device", "cpu", "--max-num-seqs", 4, "--min-new-tokens", 16]
    ref = run(None, "summarize", tmp_path / "in.parquet", "-o", tmp_path / "ref.parquet", "-q", *flags)
    assert ref.returncode == 0, ref.stderr
    out, parts = tmp_path / "out.parquet", tmp_path / ".out.parquet.parts"
    args = ["summarize", tmp_path / "in.parquet", "-o", out, "-q", *flags]
    job = Launched(command(2, *args), tmp_path / "kill.err")
    job.kill_when(lambda: part_rows(parts) >= 24 and len({p.name[-8:] for p in parts.glob("part-*")}) == 2)
    assert not out.exists()
    r = run(3, *args)
    assert r.returncode == 0, r.stderr
    assert "row(s) already done in an earlier run" in r.stderr, r.stderr
    assert pq.read_table(out).to_pylist() == pq.read_table(tmp_path / "ref.parquet").to_pylist()
    assert sorted(p.name for p in tmp_path.glob(".out*")) == [".out.parquet.done.json"]  # no parts left


def test_transcribe_killed_under_torchrun_resumes_in_one_process(tmp_path, example_clips):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(3):  # 12 files: the job outlives its first transcripts
        for clip in example_clips:
            shutil.copy(clip.path, corpus / f"{k}-{clip.path.name}")
    flags = ["--device", "cpu", "--max-num-seqs", 1, "-q", "-f", "txt"]
    one = run(None, "transcribe", corpus, "-o", tmp_path / "ref", *flags)
    assert one.returncode == 0, one.stderr
    out = tmp_path / "out"
    job = Launched(command(2, "transcribe", corpus, "-o", out, *flags), tmp_path / "kill.err")
    job.kill_when(lambda: len(list(out.glob(RANK_MANIFEST_GLOB))) == 2 and len(list(out.glob("*.txt"))) >= 3)
    done = len(list(out.glob("*.txt")))
    assert done < 12
    r = run(None, "transcribe", corpus, "-o", out, *flags)  # no torchrun: it reads the ranks' manifests
    assert r.returncode == 0, r.stderr
    assert "already done or failed before (skipped" in r.stderr, r.stderr
    assert not list(out.glob(RANK_MANIFEST_GLOB))  # folded into the one manifest
    lines = [json.loads(x) for x in (out / MANIFEST_NAME).read_text().splitlines()]
    assert len({x["key"] for x in lines}) == 12 and all(x["status"] == "ok" for x in lines)
    assert {p.name: p.read_bytes() for p in out.glob("*.txt")} == {
        p.name: p.read_bytes() for p in (tmp_path / "ref").glob("*.txt")
    }
