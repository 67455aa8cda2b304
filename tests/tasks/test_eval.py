"""``encdec eval``: WER and CER against hand-computed values, every input shape, missing items."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from encdec_cli.cli import app
from encdec_cli.tasks.evaluate import evaluate, match


def run(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)], env={"COLUMNS": "120"})


def write(folder, texts: dict[str, str]):
    for name, text in texts.items():
        path = folder / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return folder


# reference, hypothesis, (substitutions, deletions, insertions), reference words, character errors
CASES = {
    "sub_del": ("the cat sat on the mat", "the cat sit on mat", (1, 1, 0), 6, 5),  # a->i; "the " gone
    "ins": ("a b c", "a x b c d", (0, 0, 2), 3, 4),  # "x " and " d"
    "exact": ("one two three", "one two three", (0, 0, 0), 3, 0),
    "empty_hyp": ("four five", "", (0, 2, 0), 2, 9),
}


def test_hand_computed_wer_and_cer(tmp_path):
    refs = write(tmp_path / "ref", {k: v[0] for k, v in CASES.items()})
    hyps = write(tmp_path / "hyp", {k: v[1] for k, v in CASES.items()})
    result = evaluate(str(hyps), str(refs), "none")
    assert not result.missing_hypotheses and not result.missing_references
    by_id = {i.id: i for i in result.items}
    for key, (ref, _, (s, d, n), words, char_errors) in CASES.items():
        item = by_id[key]
        assert (item.substitutions, item.deletions, item.insertions) == (s, d, n), key
        assert item.reference_words == words and item.wer == pytest.approx((s + d + n) / words), key
        assert item.reference_chars == len(ref) and item.char_errors == char_errors, key
        assert item.cer == pytest.approx(char_errors / len(ref)), key
    # over the corpus: all errors over all reference words (not a mean of the items' rates)
    assert result.wer == pytest.approx((2 + 2 + 0 + 2) / (6 + 3 + 3 + 2))
    chars = sum(len(v[0]) for v in CASES.values())
    assert result.cer == pytest.approx((5 + 4 + 0 + 9) / chars)

    out = tmp_path / "scores.csv"
    r = run(hyps, refs, "--normalizer", "none", "-o", out)
    assert r.exit_code == 0, r.output
    assert "42.86" in r.output and "overall (4 items)" in r.output  # 6 / 14 words, in the table
    rows = {row["id"]: row for row in csv.DictReader(out.open())}
    assert set(rows) == set(CASES) and rows["ins"]["insertions"] == "2" and float(rows["ins"]["wer"]) == 2 / 3


def test_normalizers(tmp_path):
    refs = write(
        tmp_path / "ref", {"a": "Mr. Smith paid $20 for twenty-one colours!", "b": "Größe: drei Meter, ja."}
    )
    hyps = write(
        tmp_path / "hyp", {"a": "mister smith paid twenty dollars for 21 colors", "b": "größe drei meter ja"}
    )
    english = {i.id: i for i in evaluate(str(hyps), str(refs), "english").items}
    assert english["a"].wer == 0.0  # titles, currency, numbers and spellings normalized alike
    basic = {i.id: i for i in evaluate(str(hyps), str(refs), "basic").items}
    assert basic["b"].wer == 0.0 and basic["b"].reference == "größe drei meter ja"  # case, punctuation
    assert basic["a"].wer > 0  # the basic normalizer knows no English spellings or numbers
    plain = {i.id: i for i in evaluate(str(hyps), str(refs), "none").items}
    assert plain["b"].substitutions == 3  # "Größe:" "Meter," "ja." differ as they are
    r = run(hyps, refs, "--normalizer", "french")
    assert r.exit_code == 2 and "--normalizer must be one of english, basic, none" in r.output


def test_tables_and_line_files(tmp_path):
    refs = tmp_path / "refs.parquet"
    pq.write_table(pa.table({"id": ["u1", "u2"], "reference": ["good morning", "the report is ready"]}), refs)
    # transcribe -o - records: the input path names the item; its stem matches the id
    hyp = tmp_path / "hyp.jsonl"
    records = [
        {"input": "/data/calls/u2.wav", "text": " The report is ready.", "error": None},
        {"input": "/data/calls/u1.flac", "text": "Good morning!", "error": None},
    ]
    hyp.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = evaluate(str(hyp), str(refs), "english")
    assert [i.id for i in result.items] == ["u1", "u2"] and result.wer == 0.0
    # a hypotheses folder as transcribe writes it, against the same table
    hyps = write(tmp_path / "out", {"calls/u1": "good morning", "calls/u2": "the report is late"})
    result = evaluate(str(hyps), str(refs), "english")
    assert result.word_errors == 1 and result.reference_words == 6
    # line-aligned .txt files: paired by line number
    (tmp_path / "ref.txt").write_text("a b c\nd e f\n")
    (tmp_path / "hyp.txt").write_text("a b c\nd e\n")
    result = evaluate(str(tmp_path / "hyp.txt"), str(tmp_path / "ref.txt"), "none")
    assert [(i.id, i.deletions) for i in result.items] == [("1", 0), ("2", 1)]
    # a table with both columns, named explicitly
    both = tmp_path / "both.csv"
    both.write_text("key,prediction,sentence\nx,hello there,hello their\n")
    r = run(both, both, "--hyp-column", "prediction", "--ref-column", "sentence", "--id-column", "key",
            "--normalizer", "none", "-o", tmp_path / "s.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["overall"]["wer"] == 0.5 and saved["items"][0]["id"] == "x"
    r = run(both, both, "--ref-column", "nope")
    assert r.exit_code == 2 and "no column 'nope'" in r.output and "--ref-column" in r.output


def test_missing_items_are_reported(tmp_path):
    refs = write(tmp_path / "ref", {"a": "one two", "b": "three four", "c": "five"})
    hyps = write(tmp_path / "hyp", {"a": "one two", "extra": "six"})
    summary = tmp_path / "summary.json"
    r = run(hyps, refs, "--summary-json", summary)
    assert r.exit_code == 1, r.output
    assert "2 reference(s) have no hypothesis: b, c" in r.output
    assert "1 hypothesis(es) have no reference: extra" in r.output
    saved = json.loads(summary.read_text())
    assert saved["command"] == "eval" and saved["status"] == "items_failed" and saved["exit_code"] == 1
    assert saved["counts"] == {"done": 1, "failed": 3, "skipped": 0, "failed_before": 0}
    assert {f["item"]: f["error"] for f in saved["failures"]} == {
        "b": "no hypothesis for this reference",
        "c": "no hypothesis for this reference",
        "extra": "no reference for this hypothesis",
    }
    assert saved["overall"]["wer"] == 0.0 and saved["normalizer"] == "english"
    # transcribe -o - records of inputs that failed: no text, their error reported
    hyp = tmp_path / "hyp.jsonl"
    hyp.write_text(json.dumps({"input": "a.wav", "text": None, "error": "empty (0 bytes)"}) + "\n")
    r = run(hyp, refs)
    assert r.exit_code == 1 and "a: no hypothesis text (empty (0 bytes))" in r.output
    # nothing at all, or nothing where told to look: usage errors
    (tmp_path / "none").mkdir()
    r = run(tmp_path / "none", refs)
    assert r.exit_code == 2 and "no hypotheses found in" in r.output
    r = run(tmp_path / "nope", refs)
    assert r.exit_code == 2 and "do not exist" in r.output
    r = run(hyps, refs, "-o", tmp_path / "x.parquet")
    assert r.exit_code == 2 and ".csv or .json" in r.output


def test_matching_by_the_last_part_only_when_unique():
    pairs, missing_h, missing_r = match({"x/a": "", "y/a": "", "z/b": ""}, {"a": "", "b": ""})
    assert pairs == [("z/b", "b")] and missing_h == ["a"] and sorted(missing_r) == ["x/a", "y/a"]


def test_audio_extensions_mirror_the_audio_reader():
    from encdec_cli.io.audio import AUDIO_EXTENSIONS
    from encdec_cli.tasks import evaluate as ev

    assert ev.AUDIO_EXTENSIONS == AUDIO_EXTENSIONS
