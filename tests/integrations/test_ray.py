"""The Ray Data integration (encdec_cli.integrations.ray) on a local Ray instance: the example script
(Parquet in, Parquet out) gives the CLI's outputs, for audio (packaged tiny.en) and text (a tiny
BART); and nothing but that module imports Ray."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.support.compare import same_segments

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[2]


def test_encdec_and_its_cli_never_import_ray():
    code = (
        "import sys\n"
        "import encdec_cli, encdec_cli.cli, encdec_cli.tasks.seq2seq, encdec_cli.tasks.transcribe_job\n"
        "from typer.testing import CliRunner\n"
        "for cmd in ('transcribe', 'summarize', 'bench'):\n"
        "    assert CliRunner().invoke(encdec_cli.cli.app, [cmd, '--help']).exit_code == 0\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("ray_data_example", REPO / "examples" / "ray_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def encdec(*args):
    cmd = [sys.executable, "-m", "encdec_cli", *map(str, args), "--device", "cpu", "-q"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def compare(ray_out: Path, cli_out: Path, columns: list[str]) -> None:
    """The same rows as the CLI's output. Their order across Ray's output files is Ray's: with
    preserve_order set it usually is the input order, but a CI run (ray 2.60) once read them back
    with one block out of place."""
    got = pq.read_table(ray_out).select(columns).to_pylist()
    want = pq.read_table(cli_out).select(columns).to_pylist()
    assert sorted(got, key=repr) == sorted(want, key=repr)


@pytest.mark.slow
def test_transcribe_equals_the_cli(local_ray, example, tmp_path, example_clips, tiny_en_dir):
    audio = [c.path.read_bytes() for c in example_clips] + [b"not audio at all"]
    pq.write_table(pa.table({"id": list(range(len(audio))), "audio": audio}), tmp_path / "speech.parquet")
    r = encdec("transcribe", tmp_path / "speech.parquet", "-o", tmp_path / "cli.parquet", "-m", tiny_en_dir)
    assert r.returncode == 1, r.stderr  # the last row is no audio
    example.run(
        "transcribe", str(tmp_path / "speech.parquet"), str(tmp_path / "ray"),
        batch_size=3, model=str(tiny_en_dir), device="cpu",
    )  # fmt: skip
    compare(tmp_path / "ray", tmp_path / "cli.parquet", ["text", "language", "duration", "error"])
    out = pq.read_table(tmp_path / "ray")
    out = out.take(pc.sort_indices(out, [("id", "ascending")]))  # Ray may write blocks in any order
    cli_segments = pq.read_table(tmp_path / "cli.parquet").column("segments").to_pylist()
    for got, want in zip(out.column("segments").to_pylist(), cli_segments, strict=True):
        same_segments(got, want)
    assert out.column_names[:2] == ["id", "audio"] and out.column("id").to_pylist() == list(range(len(audio)))
    texts = out.column("text").to_pylist()
    assert [t.strip() for t in texts[:-1]] == [c.text for c in example_clips]
    assert texts[-1] is None and out.column("error").to_pylist()[-1]


@pytest.mark.slow
def test_summarize_equals_the_cli(local_ray, example, tmp_path, tiny_text_model):
    bart = tiny_text_model("bart")
    texts = ["alpha beta gamma delta", "one two three", None, "the quick brown fox jumps", "  "]
    pq.write_table(pa.table({"text": texts}), tmp_path / "in.parquet")
    r = encdec("summarize", tmp_path / "in.parquet", "-m", bart.path, "-o", tmp_path / "cli.parquet")
    assert r.returncode == 1, r.stderr  # two rows are empty
    example.run(
        "summarize", str(tmp_path / "in.parquet"), str(tmp_path / "ray"),
        batch_size=2, model=str(bart.path), device="cpu", column="text",
    )  # fmt: skip
    compare(tmp_path / "ray", tmp_path / "cli.parquet", ["text", "summary", "error"])
    rows = pq.read_table(tmp_path / "ray").select(["text", "summary"]).to_pylist()
    assert len(rows) == len(texts)
    assert all((r["summary"] is None) == (not (r["text"] or "").strip()) for r in rows)
