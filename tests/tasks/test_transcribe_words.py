"""Word-level timestamps: DTW and median filter as openai-whisper's, the plain-PyTorch
teacher-forced decoder pass equal to transformers (logits and alignment-head cross-attention), and
word times on speech with known sentence boundaries (monotonic, inside their segments)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from encdec_cli.io.audio import load_audio
from encdec_cli.io.inputs import AudioItem
from encdec_cli.io.records import Segment
from encdec_cli.tasks.transcribe import Transcriber
from encdec_cli.tasks.whisper_rules import TranscribeOptions
from encdec_cli.tasks.whisper_words import (
    WordAligner,
    WordTiming,
    add_word_timestamps,
    alignment_heads,
    dtw,
    median_filter,
)
from encdec_models.ctranslate2 import load_ctranslate2_whisper
from tests.support import transcribe_clips as tc

transformers.logging.set_verbosity_error()
S = tc.SENTENCES
TOLERANCE = 0.5  # seconds


def dtw_openai(x):
    """openai-whisper's ``dtw_cpu`` + ``backtrace``, as plain loops."""
    n, m = x.shape
    cost = np.full((n + 1, m + 1), np.inf, dtype=np.float32)
    trace = -np.ones((n + 1, m + 1), dtype=np.float32)
    cost[0, 0] = 0
    for j in range(1, m + 1):
        for i in range(1, n + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = x[i - 1, j - 1] + c
            trace[i, j] = t
    i, j = n, m
    trace[0, :], trace[:, 0] = 2, 1
    out = []
    while i > 0 or j > 0:
        out.append((i - 1, j - 1))
        if trace[i, j] == 0:
            i, j = i - 1, j - 1
        elif trace[i, j] == 1:
            i -= 1
        else:
            j -= 1
    return np.array(out)[::-1, :].T


def test_dtw_and_median_filter_like_openai_whisper():
    rng = np.random.default_rng(0)
    for trial in range(25):
        x = rng.standard_normal((rng.integers(1, 25), rng.integers(1, 60))).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x)  # ties
        ours, ref = dtw(x), dtw_openai(x)
        assert np.array_equal(ours[0], ref[0]) and np.array_equal(ours[1], ref[1])
    x = torch.randn(2, 5, 40)
    padded = torch.nn.functional.pad(x, (3, 3), mode="reflect")
    naive = torch.stack([padded[..., i : i + 7].median(-1).values for i in range(40)], -1)
    assert torch.equal(median_filter(x, 7), naive)


def test_segments_span_their_words():
    """openai-whisper keeps a segment's own timestamp when its first/last word runs more than 0.5 s
    past it, and moves that word instead, which can leave the word up to the median word length
    outside its segment; here the segment always runs from its first word's start to its last
    word's end."""
    seg = Segment(0, 10.9, 12.0, " Hi there, good kind people", [1, 2, 3, 4, 5, 6], -0.1)
    alignment = [  # seconds from the window start, 10 s into the file
        WordTiming(" Hi", [1], 0.0, 1.0, 0.9),  # the window's first word, from its first frame
        WordTiming(" there", [2], 1.0, 1.3, 0.9),
        WordTiming(",", [3], 1.3, 1.3, 0.9),
        WordTiming(" good", [4], 1.3, 1.6, 0.9),
        WordTiming(" kind", [5], 1.6, 1.9, 0.9),
        WordTiming(" people", [6], 1.9, 3.8, 0.9),  # runs into the pause after the speech
    ]
    last_speech = add_word_timestamps([seg], alignment, 10.0, 10.0)
    first, last = seg.words[0], seg.words[-1]
    # openai-whisper's rules, median word 0.3 s: the long words shrink towards the segment's times
    assert (first.start, first.end) == (pytest.approx(10.7), 11.0)  # max(0, min(11.0 - 0.3, 10.9))
    assert (last.start, last.end) == (11.9, pytest.approx(12.2))  # max(11.9 + 0.3, 12.0)
    # ... and the segment spans them (openai-whisper's would stay 10.9-12.0)
    assert (seg.start, seg.end) == (first.start, last.end) and last_speech == last.end
    assert [w.word for w in seg.words] == [" Hi", " there,", " good", " kind", " people"]


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    if not tc.have_espeak():
        pytest.skip("espeak-ng not installed")
    audio, truth = tc.build([0.8, S[0], 2.0, S[1], 1.2, S[2], 3.0, S[3], 1.5])
    return tc.write(tmp_path_factory.mktemp("words") / "four.wav", audio), truth


def test_teacher_forced_pass_equals_transformers(tiny_engine, tiny_en_dir, four):
    cfg, state, _ = load_ctranslate2_whisper(tiny_en_dir)
    hf = WhisperForConditionalGeneration(cfg).eval()
    hf.load_state_dict({k: v.float() for k, v in state.items()})
    hf.config._attn_implementation = "eager"
    feats = WhisperFeatureExtractor(feature_size=80)(
        load_audio(four[0]), sampling_rate=16000, return_tensors="pt"
    )
    feats = feats.input_features
    aligner = WordAligner(tiny_engine)
    toks = [
        50257,
        50362,
        4599,
        3329,
        11,
        2506,
        13,
        50256,
    ]  # <|sot|><|notimestamps|> Good morning, everyone.<|eot|>
    with torch.no_grad():
        enc = tiny_engine.model.encode(tiny_engine.model.prepare_encoder_batch([feats[0]], "cpu")).view(
            1, 1500, -1
        )
        tokens = torch.tensor([toks, toks[:5] + [50256] * 3])
        logits, qk = tiny_engine.model.teacher_forced(tokens, enc.expand(2, -1, -1), aligner.heads)
        ref = hf(feats, decoder_input_ids=torch.tensor([toks]), output_attentions=True)
    torch.testing.assert_close(logits[0], ref.logits[0], atol=2e-3, rtol=1e-4)
    torch.testing.assert_close(
        logits[1, :5], ref.logits[0, :5], atol=2e-3, rtol=1e-4
    )  # right padding is inert
    heads = alignment_heads(tiny_engine)
    ref_w = torch.stack([ref.cross_attentions[layer][0, head] for layer, head in heads])  # [n, T, 1500]
    torch.testing.assert_close(qk[0].softmax(-1), ref_w, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("long_form", ["chunked", "sequential"])
def test_word_times(tiny_engine, four, long_form):
    path, truth = four
    out = {}
    opts = TranscribeOptions(word_timestamps=True, long_form=long_form)
    Transcriber(tiny_engine, opts).run(
        [AudioItem("k", "four", str(path))], lambda i, t, e: out.setdefault("r", (t, e))
    )
    t, err = out["r"]
    assert err is None
    words = [w for s in t.segments for w in s.words]
    assert len(words) >= 20
    for s in t.segments:
        assert s.words and "".join(w.word for w in s.words) == s.text
        assert all(0 <= w.probability <= 1 for w in s.words)
    # segment edges at the speech (0.00-3.46, 4.46-6.36, 7.58-10.16, 12.80-14.86 s in sequential mode
    # for 0.80-2.41, 4.41-6.27, 7.47-9.89, 12.89-14.78), words inside their segments, in order
    tc.check_word_segment_times(t.segments, truth)
    # after the first sentence (its first word starts at the window start, its last word runs into the
    # pause: openai-whisper's DTW does the same), sentence edges are within TOLERANCE of the truth
    for sentence in truth[1:]:
        first = min(words, key=lambda w: abs(w.start - sentence.start))
        last = min(words, key=lambda w: abs(w.end - sentence.end))
        assert abs(first.start - sentence.start) <= TOLERANCE, (sentence, first)
        assert abs(last.end - sentence.end) <= TOLERANCE, (sentence, last)


def test_cli_word_timestamps_in_outputs(four, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "encdec_cli",
            "transcribe",
            str(four[0]),
            "-o",
            str(tmp_path),
            "-q",
            "--word-timestamps",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "four.json").read_text())
    assert all(
        seg["words"] and {"word", "start", "end", "probability"} <= set(seg["words"][0])
        for seg in data["segments"]
    )
    assert (tmp_path / "four.srt").read_text().startswith("1\n00:00:0")
    rows = (tmp_path / "four.tsv").read_text().splitlines()[1:]
    assert [int(r.split("\t")[0]) for r in rows] == [round(1000 * s["start"]) for s in data["segments"]]
