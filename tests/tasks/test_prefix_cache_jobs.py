"""Automatic prefix caching in the jobs: duplicate rows and files encoded once, each still with its
own output; temperature fallback, --best-of and word timestamps giving the results of a run with
the cache off (--no-prefix-cache); the job summary counting the reuse. CPU."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from typer.testing import CliRunner

from encdec_cli.cli import app
from encdec_cli.engine import Engine
from encdec_models.loading import load_model
from tests.support import transcribe_clips as tc
from tests.support.text_models import N_WORDS, single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with single_thread():
        yield


def encdec(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_duplicate_rows_encoded_once_each_with_its_row(tiny_text_model, tmp_path):
    rng = random.Random(5)
    unique = [" ".join(f"w{rng.randrange(N_WORDS)}" for _ in range(rng.randint(2, 10))) for _ in range(10)]
    texts = unique + [unique[i] for i in (0, 3, 3, 7, 9, 0)] + unique[:4]  # 10 repeats
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts))
    )
    tiny = tiny_text_model("bart")
    rows = {}
    for flag in ([], ["--no-prefix-cache"]):
        out = tmp_path / f"out{len(flag)}.jsonl"
        r = encdec(
            "summarize", tmp_path / "in.jsonl", "-m", tiny.path, "-o", out, "-q", "--device", "cpu", *flag
        )
        assert r.exit_code == 0, r.stderr
        rows[bool(flag)] = [json.loads(line) for line in out.read_text().splitlines()]
        if flag:
            assert "prefix cache" not in r.stderr
        else:
            assert "prefix cache: 10 of 20 encoder runs reused" in r.stderr, r.stderr
    assert rows[False] == rows[True]
    assert [row["id"] for row in rows[False]] == list(range(len(texts)))
    by_text = {}
    for row in rows[False]:  # duplicates: the same summary, each in its own row
        assert by_text.setdefault(row["text"], row["summary"]) == row["summary"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A 12 s file, an exact copy of it under another name, and an 8 s file."""
    if not tc.have_espeak():
        pytest.skip("espeak-ng not installed")
    root = tmp_path_factory.mktemp("prefix-clips")
    S = tc.SENTENCES
    a = tc.write(root / "a.wav", tc.build([0.5, S[0], 1.0, S[2], 0.8, S[1], 0.4])[0])
    shutil.copy(a, root / "a_copy.wav")
    b = tc.write(root / "b.wav", tc.build([0.3, S[3], 0.6, S[5], 0.3])[0])
    return [a, root / "a_copy.wav", b]


def words_of(t):
    return [
        (s.start, s.end, s.text, s.temperature, [(w.word, w.start, w.end) for w in s.words])
        for s in t.segments
    ]


@pytest.mark.parametrize("long_form", ["chunked", "sequential"])
def test_fallback_best_of_and_words_on_and_off(tiny_en_dir, clips, long_form):
    """Every window falls back (a log-probability threshold nothing meets) to sampled --best-of 3
    candidates, with word timestamps, absorbed cross-attention (the layout whose cache holds the
    encoder output the alignment reads): the cache-on run gives the cache-off run's transcripts,
    re-encoding no window (fallbacks, candidates, the copied file and the alignment reuse it)."""
    opts = dict(
        logprob_threshold=0.0,
        no_speech_threshold=None,
        temperatures=(0.0, 0.4),
        best_of=3,
        word_timestamps=True,
        long_form=long_form,
    )
    loaded = load_model(tiny_en_dir, device="cpu")
    out, stats = {}, {}
    for on in (False, True):
        engine = Engine(loaded, prefix_cache=on, absorb_cross=True)
        read, reads = engine.cached_encoder_output, []
        engine.cached_encoder_output = lambda x, read=read, reads=reads: reads.append(read(x)) or reads[-1]
        out[on] = tc.transcribe(engine, clips, **opts)
        # the alignment pass read every window's encoder output from the cache (none with it off)
        assert reads and all((r is not None) == on for r in reads)
        stats[on] = engine.stats
    for name in ("a", "a_copy", "b"):
        assert out[True][name].segments and all(s.temperature == 0.4 for s in out[True][name].segments)
        assert words_of(out[True][name]) == words_of(out[False][name]), name
    on = stats[True]
    # each distinct window is encoded once: 1 + 3 candidates per window, the copy's windows again
    # (sampled with seeds of their own file: their text may differ)
    assert on.prefix_cache_hits >= 3 * on.prefix_cache_misses and on.encoder_seconds_saved > 0
    assert stats[False].prefix_cache_hits == 0
