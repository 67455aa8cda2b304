"""``encdec eval``: word and character error rates of transcripts against references.

Both sides are sets of texts by key:
- a folder: every ``.txt`` file under it (hidden ones aside), keyed by its path relative to the
  folder without ``.txt`` (``calls/a.txt`` -> ``calls/a``): transcribe's output folder, or a folder
  of references with the same stems;
- a table (``.parquet``, ``.jsonl``, ``.json``, ``.csv``; read by ``encdec_cli.io.tables``): one text
  column, keyed by ``--id-column`` (default: an ``id`` column, else ``input`` / ``path`` / ``file``
  / ``audio`` as a path without its audio extension, else the row number);
- a ``.txt`` file: one text per line, keyed by line number (line-aligned hypotheses and references).

Keys are matched exactly first; a key left over then matches the one left over on the other side
with the same last part (``/data/calls/a`` and ``a``) when that part is unique on both sides.
Texts are normalized (Whisper's English normalizer, its basic one for other languages, or none),
then scored with jiwer: per item, and over the corpus (total errors over total reference words or
characters, as the Open ASR leaderboard does). An item on one side only is reported and makes the
exit status 1.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from encdec_cli.errors import UsageError

# encdec_cli.io.audio.AUDIO_EXTENSIONS, without importing the audio stack (a test keeps them equal)
AUDIO_EXTENSIONS = frozenset(
    {"wav", "wave", "flac", "mp3", "ogg", "oga", "opus", "aiff", "aif", "aifc", "au", "snd", "caf", "w64",
     "m4a", "aac", "wma", "webm", "mp4", "mkv", "mka", "mov", "amr", "3gp"}
)  # fmt: skip

NORMALIZERS = ("english", "basic", "none")
TABLE_SUFFIXES = (".parquet", ".pq", ".jsonl", ".ndjson", ".json", ".csv")
HYPOTHESIS_COLUMNS = ("text", "hypothesis", "prediction", "transcription")
REFERENCE_COLUMNS = ("reference", "text", "sentence", "transcription", "transcript", "normalized_text")
PATH_COLUMNS = ("input", "path", "file", "audio")


@dataclass
class ItemScore:
    """One matched pair: the counts of its word and character alignment."""

    id: str
    reference_words: int
    hits: int
    substitutions: int
    deletions: int
    insertions: int
    wer: float | None  # None when the normalized reference is empty
    reference_chars: int
    char_errors: int
    cer: float | None
    reference: str  # normalized
    hypothesis: str  # normalized


@dataclass
class Evaluation:
    normalizer: str
    items: list[ItemScore] = field(default_factory=list)
    missing_hypotheses: list[str] = field(default_factory=list)  # references without a hypothesis
    missing_references: list[str] = field(default_factory=list)  # hypotheses without a reference
    failed_hypotheses: list[tuple[str, str]] = field(default_factory=list)  # (key, why): no text

    @property
    def word_errors(self) -> int:
        return sum(i.substitutions + i.deletions + i.insertions for i in self.items)

    @property
    def reference_words(self) -> int:
        return sum(i.reference_words for i in self.items)

    @property
    def wer(self) -> float | None:
        words = self.reference_words
        return self.word_errors / words if words else None

    @property
    def cer(self) -> float | None:
        chars = sum(i.reference_chars for i in self.items)
        return sum(i.char_errors for i in self.items) / chars if chars else None

    def overall(self) -> dict:
        return {
            "items": len(self.items),
            "reference_words": self.reference_words,
            "hits": sum(i.hits for i in self.items),
            "substitutions": sum(i.substitutions for i in self.items),
            "deletions": sum(i.deletions for i in self.items),
            "insertions": sum(i.insertions for i in self.items),
            "wer": self.wer,
            "reference_chars": sum(i.reference_chars for i in self.items),
            "char_errors": sum(i.char_errors for i in self.items),
            "cer": self.cer,
        }

    def as_dict(self) -> dict:
        return {
            "normalizer": self.normalizer,
            "overall": self.overall(),
            "items": [asdict(i) for i in self.items],
            "missing_hypotheses": self.missing_hypotheses,
            "missing_references": self.missing_references,
            "failed_hypotheses": [{"id": k, "error": e} for k, e in self.failed_hypotheses],
        }


def normalizer(name: str) -> Callable[[str], str]:
    """The text normalizer ``name`` (english | basic | none); whitespace is collapsed after it."""
    name = name.lower()
    if name == "english":
        from whisper_normalizer.english import EnglishTextNormalizer

        norm = EnglishTextNormalizer()
    elif name == "basic":
        from whisper_normalizer.basic import BasicTextNormalizer

        norm = BasicTextNormalizer()
    elif name == "none":
        norm = str
    else:
        raise UsageError(f"--normalizer must be one of {', '.join(NORMALIZERS)}, got {name!r}")
    return lambda text: " ".join(norm(text).split())


# ---- reading the two sides ----------------------------------------------------------------------


def _strip_audio_suffix(key: str) -> str:
    stem, dot, ext = key.rpartition(".")
    return stem if dot and ext.lower() in AUDIO_EXTENSIONS and "/" not in ext else key


def _folder_texts(folder: Path) -> Iterator[tuple[str, str | None, str | None]]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(".txt"):
                continue
            path = Path(root) / name
            key = _strip_audio_suffix(path.relative_to(folder).as_posix()[: -len(".txt")])
            try:
                yield key, path.read_text(encoding="utf-8", errors="replace"), None
            except OSError as e:
                yield key, None, f"cannot read {path}: {e.strerror or e}"


def _open_with_column(path: str, columns: tuple[str, ...], flag: str):
    from encdec_cli.io.tables import TableError, open_table

    last = None
    for column in columns:
        try:
            return open_table(path, column), column
        except TableError as e:
            if "no column" not in str(e):
                raise UsageError(str(e)) from None
            last = e
    tried = ", ".join(repr(c) for c in columns)
    raise UsageError(f"{last}; pass the text column with {flag} (tried {tried})") from None


def _row_key(record: dict, row_id: int, id_column: str | None, where: str) -> str:
    if id_column is not None:
        if id_column not in record:
            raise UsageError(f"{where} has no --id-column {id_column!r} (it has {', '.join(record)})")
        return str(record[id_column])
    if record.get("id") is not None:
        return str(record["id"])
    for column in PATH_COLUMNS:
        value = record.get(column)
        if isinstance(value, dict):  # a datasets Audio struct: {bytes, path}
            value = value.get("path")
        if isinstance(value, str) and value:
            return _strip_audio_suffix(PurePosixPath(value.replace(os.sep, "/")).as_posix())
    return str(row_id)


def _table_texts(
    path: str, columns: tuple[str, ...], flag: str, id_column: str | None
) -> Iterator[tuple[str, str | None, str | None]]:
    src, column = _open_with_column(path, columns, flag)
    try:
        for row in src:
            if row.record is None:
                yield str(row.row_id), None, row.error
                continue
            if Path(path).suffix.lower() == ".txt":
                key = str(row.row_id + 1)  # line-aligned files: the line number
            else:
                key = _row_key(row.record, row.row_id, id_column, path)
            value = row.record.get(column)
            if value is None:  # e.g. transcribe -o - for an input that failed
                yield key, None, row.record.get("error") or f"column {column!r} is null"
            else:
                yield key, value if isinstance(value, str) else str(value), None
    finally:
        src.close()


def read_side(path: str, columns: tuple[str, ...], flag: str, id_column: str | None, what: str):
    """``{key: text or None}`` and ``{key: why there is no text}`` of one side."""
    p = Path(path)
    if p.is_dir():
        texts = _folder_texts(p)
    elif p.is_file() and p.suffix.lower() in (*TABLE_SUFFIXES, ".txt"):
        texts = _table_texts(path, columns, flag, id_column)
    elif not p.exists():
        raise UsageError(f"the {what} {path} do not exist")
    else:
        raise UsageError(
            f"the {what} {path}: pass a folder of .txt files, a table ({', '.join(TABLE_SUFFIXES)}) "
            "or a .txt file with one text per line"
        )
    found: dict[str, str | None] = {}
    problems: dict[str, str] = {}
    duplicates = []
    for key, text, error in texts:
        if key in found:
            duplicates.append(key)
        found[key] = text
        if error is not None:
            problems[key] = error
    if duplicates:
        shown = ", ".join(repr(k) for k in duplicates[:5])
        raise UsageError(
            f"the {what} in {path} name {len(duplicates)} item(s) twice ({shown}); "
            "choose a column of unique values with --id-column"
        )
    if not found:
        raise UsageError(f"no {what} found in {path} (a folder is searched for .txt files)")
    return found, problems


def match(hyps: dict, refs: dict) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Pairs ``(hypothesis key, reference key)``, references left unmatched, hypotheses left unmatched.
    Exact keys first; then the last parts of the keys left over, where unique on both sides."""
    pairs = [(k, k) for k in refs if k in hyps]
    left_refs = [k for k in refs if k not in hyps]
    left_hyps = [k for k in hyps if k not in refs]

    def by_tail(keys):
        tails: dict[str, list[str]] = {}
        for k in keys:
            tails.setdefault(k.rsplit("/", 1)[-1], []).append(k)
        return tails

    hyp_tails, ref_tails = by_tail(left_hyps), by_tail(left_refs)
    matched_h, matched_r = set(), set()
    for tail, ref_keys in ref_tails.items():
        hyp_keys = hyp_tails.get(tail, [])
        if len(ref_keys) == 1 and len(hyp_keys) == 1:
            pairs.append((hyp_keys[0], ref_keys[0]))
            matched_h.add(hyp_keys[0])
            matched_r.add(ref_keys[0])
    return (
        pairs,
        [k for k in left_refs if k not in matched_r],
        [k for k in left_hyps if k not in matched_h],
    )


# ---- scoring ------------------------------------------------------------------------------------


def score_pair(key: str, reference: str, hypothesis: str) -> ItemScore:
    """Word and character alignment counts of one normalized pair (jiwer)."""
    import jiwer

    if reference:
        w = jiwer.process_words(reference, hypothesis)
        hits, sub, dele, ins = w.hits, w.substitutions, w.deletions, w.insertions
        c = jiwer.process_characters(reference, hypothesis)
        char_errors = c.substitutions + c.deletions + c.insertions
        ref_chars = c.hits + c.substitutions + c.deletions
    else:  # nothing to say: every hypothesis word is an insertion
        hits = sub = dele = 0
        ins = len(hypothesis.split())
        char_errors, ref_chars = len(hypothesis), 0
    words = hits + sub + dele
    return ItemScore(
        id=key,
        reference_words=words,
        hits=hits,
        substitutions=sub,
        deletions=dele,
        insertions=ins,
        wer=(sub + dele + ins) / words if words else None,
        reference_chars=ref_chars,
        char_errors=char_errors,
        cer=char_errors / ref_chars if ref_chars else None,
        reference=reference,
        hypothesis=hypothesis,
    )


def evaluate(
    hypotheses: str,
    references: str,
    normalizer_name: str = "english",
    hyp_column: str | None = None,
    ref_column: str | None = None,
    id_column: str | None = None,
) -> Evaluation:
    """Score ``hypotheses`` against ``references`` (see the module docstring)."""
    norm = normalizer(normalizer_name)
    hyp_columns = (hyp_column,) if hyp_column else HYPOTHESIS_COLUMNS
    ref_columns = (ref_column,) if ref_column else REFERENCE_COLUMNS
    refs, ref_problems = read_side(references, ref_columns, "--ref-column", id_column, "references")
    hyps, hyp_problems = read_side(hypotheses, hyp_columns, "--hyp-column", id_column, "hypotheses")
    pairs, missing_hyps, missing_refs = match(hyps, refs)
    result = Evaluation(normalizer_name.lower(), missing_hypotheses=sorted(missing_hyps))
    result.missing_references = sorted(missing_refs)
    for hyp_key, ref_key in sorted(pairs, key=lambda p: _natural(p[1])):
        if refs[ref_key] is None:
            raise UsageError(f"reference {ref_key!r} has no text: {ref_problems.get(ref_key, 'null')}")
        if hyps[hyp_key] is None:
            result.failed_hypotheses.append((ref_key, hyp_problems.get(hyp_key, "no text")))
            continue
        result.items.append(score_pair(ref_key, norm(refs[ref_key]), norm(hyps[hyp_key])))
    return result


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def write_scores(evaluation: Evaluation, path: str) -> None:
    """``.csv``: one row per item; ``.json``: the overall scores, the items and what is missing."""
    from encdec_cli.io.atomic import atomic_open

    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        with atomic_open(path) as f:
            json.dump(evaluation.as_dict(), f, indent=2, ensure_ascii=False)
            f.write("\n")
    elif suffix == ".csv":
        names = [f.name for f in ItemScore.__dataclass_fields__.values()]
        with atomic_open(path, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            for item in evaluation.items:
                writer.writerow(asdict(item))
    else:
        raise UsageError(f"--output {path}: end it in .csv or .json")
