"""Memory stays bounded: a whole summarize job (engine included) holds a bounded number of rows,
whatever the input's size; inputs are streamed.

Peak RSS of the job process is its VmHWM at exit (that process alone). The rows carry a 16 KB
payload column (kept in the output, as every input column is), so a job that held its rows would
grow by ~240 MB from 5,000 to 20,000 rows; it must grow by far less.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from encdec_cli.io.tables import open_sink, open_table
from tests.support.text_models import N_WORDS

PAYLOAD = 16_000  # bytes per row in a column the job only carries through
# Stated bounds. The engine's CPU KV pool (EngineConfig.cpu_kv_cache_bytes) is 1 GiB and touched
# at start; torch, transformers and the tiny model add a few hundred MB; in-flight rows (the
# scheduler's look-ahead window, the sink's buffer: <= 64 MB of text) the rest.
MAX_PEAK_RSS = 3 << 30
MAX_GROWTH = 96 << 20  # 5,000 -> 20,000 rows; measured ~35 MB, linear would be ~240 MB of payload


def make_table(path, n: int) -> None:
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(1, 8))) for _ in range(n)]
    payload = [f"{i:08d}" + "x" * PAYLOAD for i in range(n)]
    pq.write_table(
        pa.table({"id": list(range(n)), "text": texts, "payload": payload}), path, row_group_size=2048
    )


# Runs the CLI in a fresh interpreter and, at exit, records its VmHWM: the peak RSS of this process
# image only (ru_maxrss from wait4/getrusage would include the RSS of the pytest process that
# forked it, which Linux carries over an exec).
LAUNCHER = """
import atexit, runpy, sys
def record_peak(path=sys.argv[1]):
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    with open(path, "w") as f:
        f.write(str(kib * 1024))
atexit.register(record_peak)
sys.argv = ["encdec", *sys.argv[2:]]
runpy.run_module("encdec_cli", run_name="__main__")
"""


def peak_rss_of_job(model, src, out) -> int:
    """Run ``encdec summarize`` on ``src``; returns its peak RSS in bytes (asserts success)."""
    peak = out.with_suffix(".peak")
    cmd = [sys.executable, "-c", LAUNCHER, str(peak), "summarize", str(src), "-m", str(model), "-o", str(out),
           "-q", "--max-new-tokens", "2"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return int(peak.read_text())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_summarize_peak_rss_does_not_grow_with_row_count(tiny_text_model, tmp_path):
    bart = tiny_text_model("bart")
    rss = {}
    for n in (5_000, 20_000):
        make_table(tmp_path / f"in{n}.parquet", n)
        rss[n] = peak_rss_of_job(bart.path, tmp_path / f"in{n}.parquet", tmp_path / f"out{n}.parquet")
        meta = pq.read_metadata(tmp_path / f"out{n}.parquet")
        assert meta.num_rows == n and meta.schema.names == ["id", "text", "payload", "summary", "error"]
    growth = rss[20_000] - rss[5_000]
    report = f"peak RSS {rss[5_000] >> 20} MB (5k rows), {rss[20_000] >> 20} MB (20k rows)"
    assert rss[20_000] < MAX_PEAK_RSS, report
    assert growth < MAX_GROWTH, report


def test_sink_buffer_is_bounded_in_bytes(tmp_path):
    """Rows held back behind a slow first row (the engine runs short inputs first) are spilled once
    they hold ~max_buffer_bytes, not only after part_rows rows; the output stays in order."""
    n, width, cap = 400, 10_000, 1 << 20
    pq.write_table(pa.table({"text": [f"{i} " + "y" * width for i in range(n)]}), tmp_path / "in.parquet")
    src = open_table(tmp_path / "in.parquet", "text")
    rows = list(src)
    sink = open_sink(tmp_path / "out.parquet", result_columns=["summary"], input_schema=src.arrow_schema,
                     part_rows=100_000, max_buffer_bytes=cap)  # fmt: skip
    peak = 0
    for row in rows[1:] + rows[:1]:  # row 0 finishes last: nothing is contiguous until then
        sink.write_row(row, {"summary": str(row.row_id)})
        peak = max(peak, sink._buffer_bytes)
    assert peak <= cap + 2 * width  # one row over the cap at most, then spilled
    assert len(list(sink.parts_dir.glob("part-*.arrow"))) >= n * width // cap - 1
    sink.finalize(expected_rows=n)
    assert pq.read_table(tmp_path / "out.parquet").column("summary").to_pylist() == [str(i) for i in range(n)]


def test_transcribe_folder_inputs_are_enumerated_lazily(tmp_path):
    from encdec_cli.io.inputs import plan_inputs

    for i in range(50):
        (tmp_path / f"{i:03d}.wav").write_bytes(b"")
    assert isinstance(plan_inputs([str(tmp_path)]), Iterator)
