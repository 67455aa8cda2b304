"""``--data-parallel`` on the GPU: two ranks on one GPU (``--device cuda:0,cuda:0``, the KV cache
split between them) give the same outputs as one process on it. A correctness check, not a
measurement (scaling over several GPUs is ``encdec bench --data-parallel N``).

Outputs equal byte for byte need equal batches (a window's scores move in their last digits with
its batch): one window, or row, at a time (``--max-num-seqs 1``)."""

from __future__ import annotations

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

from tests.support.text_models import N_WORDS
from tests.tasks.test_data_parallel import tree

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def encdec(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "encdec_cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=os.environ, timeout=900,
    )  # fmt: skip


def test_transcribe_two_ranks_on_one_gpu(tmp_path, example_clips, tiny_en_dir):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(2):
        for clip in example_clips:
            shutil.copy(clip.path, corpus / f"{k}-{clip.path.name}")
    # the packaged tiny.en (skips where it is not installed, as on a GPU machine without the package)
    flags = ["-m", tiny_en_dir, "--max-num-seqs", 1, "--gpu-memory-utilization", 0.5, "-f", "all"]
    for name, device in (("one", "cuda:0"), ("two", "cuda:0,cuda:0")):
        (tmp_path / name).mkdir()
        r = encdec("transcribe", corpus, "-o", "out", "--device", device, *flags, cwd=tmp_path / name)
        assert r.returncode == 0, r.stderr
    assert "rank 0 ready on cuda:0" in r.stderr and "rank 1 ready on cuda:0" in r.stderr
    one = tree(tmp_path / "one" / "out")
    assert len(one) == 2 * len(example_clips) * 5 + 1  # five formats per file, and the manifest
    assert one == tree(tmp_path / "two" / "out")


def test_summarize_two_ranks_on_one_gpu(tiny_text_model, tmp_path):
    bart = tiny_text_model("bart")
    rng = random.Random(4)
    texts = [" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(1, 12))) for _ in range(200)]
    texts[7] = ""
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    outs = {}
    for name, device in (("one", "cuda:0"), ("two", "cuda:0,cuda:0")):
        out = tmp_path / f"{name}.parquet"
        r = encdec("summarize", tmp_path / "in.parquet", "-m", bart.path, "-o", out, "--device", device,
                   "--max-num-seqs", 1, "--gpu-memory-utilization", 0.5)  # fmt: skip
        assert r.returncode == 1, r.stderr  # row 7
        outs[name] = Path(out).read_bytes()
    assert "rank 1 ready on cuda:0" in r.stderr
    assert outs["one"] == outs["two"]
