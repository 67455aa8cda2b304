"""``encdec eval``: word and character error rates of outputs against references
(encdec_cli.tasks.evaluate)."""

from __future__ import annotations

from pathlib import Path

import typer

from encdec_cli import errors
from encdec_cli.commands import common
from encdec_cli.commands.common import SummaryJson
from encdec_cli.errors import UsageError

SHOWN_ROWS = 50  # per-item rows in the table printed; all of them go to --output


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


@common.command("eval")
def evaluate(
    hypotheses: str = typer.Argument(
        ...,
        help="Our outputs: transcribe's output folder (its .txt files), a table (.parquet, .jsonl, .csv) "
        "with a text column (e.g. transcribe -o - > hyp.jsonl), or a .txt file with one text per line.",
    ),
    references: str = typer.Argument(
        ...,
        help="The references: a folder of .txt files with the same stems (subfolders as the "
        "hypotheses'), a table with a reference column, or a .txt file with one text per line.",
    ),
    normalizer: str = typer.Option(
        "english",
        "--normalizer",
        help="english: Whisper's English normalizer (case, punctuation, spellings, numbers), as the "
        "Open ASR leaderboard scores; basic: Whisper's basic normalizer for other languages (case, "
        "punctuation, symbols); none: the texts as they are (whitespace collapsed).",
    ),
    hyp_column: str | None = typer.Option(
        None,
        "--hyp-column",
        help="Text column of a hypotheses table (default: the first of text, hypothesis, prediction, "
        "transcription).",
    ),
    ref_column: str | None = typer.Option(
        None,
        "--ref-column",
        help="Text column of a references table (default: the first of reference, text, sentence, "
        "transcription, transcript, normalized_text).",
    ),
    id_column: str | None = typer.Option(
        None,
        "--id-column",
        help="Column that pairs table rows (default: id, else the input/path/file/audio path without "
        "its extension, matched to file stems, else the row number).",
    ),
    output: str | None = typer.Option(
        None, "-o", "--output", help="Also write the scores: .csv (one row per item) or .json (all)."
    ),
    quiet: common.Quiet = False,
    summary_json: SummaryJson = None,
):
    """Word and character error rates (WER, CER) of transcripts against references.

    Items are paired by file stem, id or row; texts are normalized, then scored with jiwer per item
    and over the whole set (errors over reference words, as the Open ASR leaderboard does). Prints a
    table (the worst items first when there are many) and the overall scores. Exit status: 0 every
    reference had its hypothesis and every hypothesis its reference, 1 some did not (listed),
    2 usage error, 3 writing failed.
    """
    from encdec_cli.tasks import summary
    from encdec_cli.tasks.evaluate import NORMALIZERS, evaluate, write_scores

    if normalizer.lower() not in NORMALIZERS:
        raise UsageError(f"--normalizer must be one of {', '.join(NORMALIZERS)}, got {normalizer!r}")
    if output is not None and Path(output).suffix.lower() not in (".csv", ".json"):
        raise UsageError(f"-o {output}: the scores are written as .csv or .json; end the name in one")
    result = evaluate(hypotheses, references, normalizer, hyp_column, ref_column, id_column)
    if output is not None:
        with errors.writing_to(output):
            write_scores(result, output)
    _print(result, quiet)
    missing = len(result.missing_hypotheses) + len(result.missing_references) + len(result.failed_hypotheses)
    failures = [(k, "no hypothesis for this reference") for k in result.missing_hypotheses]
    failures += [(k, "no reference for this hypothesis") for k in result.missing_references]
    failures += [(k, f"the hypothesis has no text: {e}") for k, e in result.failed_hypotheses]
    summary.record(
        counts={"done": len(result.items), "failed": missing, "skipped": 0, "failed_before": 0},
        failures=[{"item": k, "error": e} for k, e in failures],
        output=output,
        normalizer=result.normalizer,
        overall=result.overall(),
    )
    return errors.ITEMS_FAILED if missing else errors.OK


def _print(result, quiet: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    out, err = Console(), Console(stderr=True)
    if not quiet and result.items:
        items = result.items
        caption = None
        if len(items) > SHOWN_ROWS:
            items = sorted(items, key=lambda i: -(i.wer or 0))[:SHOWN_ROWS]
            caption = f"the {SHOWN_ROWS} items of {len(result.items)} with the highest WER (-o writes all)"
        table = Table(title=f"WER / CER ({result.normalizer} normalizer)", caption=caption)
        for name in ("item", "words", "sub", "del", "ins", "WER %", "CER %"):
            table.add_column(name, justify="left" if name == "item" else "right")
        for i in items:
            table.add_row(
                i.id, str(i.reference_words), str(i.substitutions), str(i.deletions), str(i.insertions),
                _pct(i.wer), _pct(i.cer),
            )  # fmt: skip
        o = result.overall()
        table.add_section()
        table.add_row(
            f"overall ({o['items']} items)", str(o["reference_words"]), str(o["substitutions"]),
            str(o["deletions"]), str(o["insertions"]), _pct(o["wer"]), _pct(o["cer"]), style="bold",
        )  # fmt: skip
        out.print(table)
    for what, keys in (
        ("reference(s) have no hypothesis", result.missing_hypotheses),
        ("hypothesis(es) have no reference", result.missing_references),
    ):
        if keys:
            shown = ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")
            err.print(f"warning: {len(keys)} {what}: {shown}", highlight=False, markup=False, soft_wrap=True)
    for key, error in result.failed_hypotheses[:10]:
        err.print(f"warning: {key}: no hypothesis text ({error})", highlight=False, markup=False)
    line = f"WER {_pct(result.wer)}%, CER {_pct(result.cer)}% over {len(result.items)} item(s)"
    line += f" ({result.reference_words} reference words, {result.normalizer} normalizer)"
    err.print(line, highlight=False, markup=False, soft_wrap=True)
