"""A large Parquet job streams through open_table -> sink -> finalize in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

N_ROWS = 200_000
CHUNK = 20_000
FILLER = " lorem ipsum dolor sit amet, consectetur adipiscing elit" * 8  # ~450 bytes per row

# Runs in a fresh interpreter so its peak RSS reflects only the job (and a crash there
# cannot take the test session down).
JOB = textwrap.dedent(
    """
    import json, resource, sys
    import pyarrow as pa, pyarrow.parquet as pq
    from encdec_cli.io.tables import open_sink, open_table

    def rss_kib(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])

    def job(src_path, out_path):
        with open_table(src_path, "text") as src:
            sink = open_sink(out_path, result_columns=["summary"], input_schema=src.arrow_schema)
            for row in src:
                sink.write_row(row, {"summary": row.text[:40]})
            sink.finalize(expected_rows=src.rows_read)

    warm_path, src_path, out_path = sys.argv[1:4]
    # A small job first, so code pages and allocator pools that any job needs once are
    # in place: what grows after this is what the data costs.
    job(warm_path, out_path + ".warm.parquet")
    pool = pa.proxy_memory_pool(pa.default_memory_pool())  # Arrow allocations of the job
    pa.set_memory_pool(pool)
    base = rss_kib("VmRSS:")
    try:  # reset the peak so it measures the job only (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    job(src_path, out_path)
    peak = rss_kib("VmHWM:")
    ids = pq.read_table(out_path, columns=["id"]).column("id").to_pylist()
    print(json.dumps({
        "rss_growth": (peak - base) * 1024,
        "arrow_peak": pool.max_memory(),
        "rows": len(ids),
        "ordered": ids == list(range(len(ids))),
    }))
    """
)


def write_input(path, n_rows):
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:  # written in chunks: bounded here too
        for start in range(0, n_rows, CHUNK):
            ids = pa.array(range(start, min(start + CHUNK, n_rows)), pa.int64())
            text = pc.binary_join_element_wise(pc.cast(ids, pa.string()), pa.scalar(FILLER), "")
            writer.write_table(pa.table([ids, text], schema=schema))


def test_large_parquet_streams_in_bounded_memory(tmp_path):
    src = tmp_path / "big.parquet"
    write_input(src, N_ROWS)
    write_input(tmp_path / "warm.parquet", 5_000)
    meta = pq.read_metadata(src)
    whole_table = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    assert whole_table > 80 << 20  # loading it whole would take this much Arrow memory (more as dicts)

    out = tmp_path / "out.parquet"
    proc = subprocess.run(
        [sys.executable, "-c", JOB, str(tmp_path / "warm.parquet"), str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["rows"] == N_ROWS and stats["ordered"]
    assert stats["arrow_peak"] < whole_table / 4, stats
    assert stats["rss_growth"] < whole_table / 3, (stats, whole_table)
    assert not (tmp_path / ".out.parquet.parts").exists()
