"""Timestamp decoding: the engine's Whisper timestamp rules against transformers' processor, real
tiny.en timestamp tokens identical to transformers' ``generate(return_timestamps=True)``, and
segment times against synthetic speech whose sentence boundaries are known."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from transformers import WhisperFeatureExtractor
from transformers.generation.logits_process import WhisperTimeStampLogitsProcessor

from encdec_cli.engine import Request, SamplingParams
from encdec_cli.engine.sampling import process_logits
from encdec_cli.engine.sequence import SequenceGroup, TimestampRules
from encdec_cli.io.audio import load_audio
from encdec_cli.io.inputs import AudioItem
from encdec_cli.tasks.transcribe import Transcriber
from encdec_cli.tasks.whisper_rules import TranscribeOptions, WhisperPrompts, parse_timestamps
from tests.support import transcribe_clips

transformers.logging.set_verbosity_error()

SENTENCES = [
    "Good morning, everyone.",
    "The weather is very nice today.",
    "I will send you the report tomorrow morning.",
    "Please close the door when you leave.",
]
TOLERANCE = transcribe_clips.TOLERANCE
words = transcribe_clips.words


# ---- the rule itself, on random logits -----------------------------------------------------------


def _our_rules(logits: torch.Tensor, histories: list[list[int]], prompt: list[int], rules, begin: int):
    params = SamplingParams(timestamp_rules=rules, begin_index=begin)
    seqs = []
    for h in histories:
        g = SequenceGroup(Request(None, prompt, params), 1500, 100, 0)
        g.seqs[0].tokens = prompt + h
        seqs.append(g.seqs[0])
    return process_logits(logits.clone(), seqs)


@pytest.mark.parametrize("begin", [0, 2])
def test_rules_match_transformers_processor(begin):
    """Random logits (scaled so that either kind of token can win) and random token histories,
    including ones no decoder would produce: masks and values equal transformers' processor."""
    vocab, eot, no_ts, tb = 160, 100, 110, 111  # ids >= 111 are timestamps 0.00 .. 0.98
    rules = TimestampRules(tb, eot, no_ts, max_initial_timestamp_index=5)
    cfg = SimpleNamespace(
        no_timestamps_token_id=no_ts, eos_token_id=eot, bos_token_id=eot, max_initial_timestamp_index=5
    )
    rng = random.Random(begin)
    prompt = [105]
    forced = [103, 104][:begin]
    for trial in range(40):
        n = rng.choice([0, 1, 2, 3, 5, 8])
        hist = forced + [rng.choice([rng.randrange(0, eot), rng.randrange(tb, vocab)]) for _ in range(n)]
        if rng.random() < 0.5:  # a plausible history: increasing timestamps around text
            hist = forced + sorted(rng.sample(range(tb, vocab), 2)) + [rng.randrange(eot)] * (n % 3)
        logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(trial)) * rng.choice(
            [0.5, 3, 8]
        )
        logits[0, tb:] += rng.choice([-4.0, 0.0, 4.0])
        ours = _our_rules(logits, [hist], prompt, rules, begin)
        hf = WhisperTimeStampLogitsProcessor(cfg, begin_index=len(prompt) + begin)
        ref = hf(torch.tensor([prompt + hist]), logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (hist, trial)
        fin = ~torch.isinf(ref)
        assert torch.equal(ours[fin], ref[fin])


def test_rules_batch_of_rows_equals_rows_one_by_one():
    """Rows without rules, rows still in their forced prefix and rows with rules, in one batch."""
    vocab, eot, no_ts, tb = 160, 100, 110, 111
    rules = TimestampRules(tb, eot, no_ts, None)
    rng = random.Random(7)
    hists = [
        [rng.choice([rng.randrange(eot), rng.randrange(tb, vocab)]) for _ in range(k % 6)] for k in range(64)
    ]
    logits = torch.randn(64, vocab, generator=torch.Generator().manual_seed(1))
    params = [
        SamplingParams(),
        SamplingParams(timestamp_rules=rules),
        SamplingParams(timestamp_rules=rules, begin_index=3),
    ]
    seqs = []
    for i, h in enumerate(hists):
        g = SequenceGroup(Request(None, [105], params[i % 3]), 1500, 100, 0)
        g.seqs[0].tokens = [105] + h
        seqs.append(g.seqs[0])
    batch = process_logits(logits.clone(), seqs)
    for i, s in enumerate(seqs):
        one = process_logits(logits[i : i + 1].clone(), [s])
        assert torch.equal(batch[i : i + 1], one)


def test_parse_timestamps_like_openai_whisper():
    tb = 1000
    ts = lambda sec: tb + round(sec / 0.02)  # noqa: E731
    # two closed segments, then an unfinished one: seek to the last pair, drop (or keep) the tail
    toks = [ts(0), 1, 2, ts(2), ts(2.5), 3, ts(4), ts(4.4), 5, 6]
    p = parse_timestamps(toks, tb, 3000, keep_tail=False)
    assert [(x.start, x.end) for x in p.pieces] == [(0, 2), (2.5, 4)] and p.seek_frames == 400
    p = parse_timestamps(toks, tb, 3000, keep_tail=True)
    assert [(x.start, x.end) for x in p.pieces][-1] == (4.4, 30.0) and p.seek_frames == 3000
    # a single timestamp at the end: the whole window is done
    p = parse_timestamps([ts(0), 1, ts(2), ts(2.5), 3, ts(4)], tb, 2000, keep_tail=False)
    assert [(x.start, x.end) for x in p.pieces] == [(0, 2), (2.5, 4)] and p.seek_frames == 2000
    # no pair: one segment to the last timestamp
    p = parse_timestamps([ts(0), 1, 2, ts(3.2)], tb, 1000, keep_tail=False)
    assert [(x.start, x.end) for x in p.pieces] == [(0, 3.2)] and p.seek_frames == 1000


# ---- real tiny.en --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    """16 s: four sentences with pauses of 2.0, 1.2 and 3.0 s."""
    if not transcribe_clips.have_espeak():
        pytest.skip("espeak-ng not installed")
    audio, truth = transcribe_clips.build(
        [0.8, SENTENCES[0], 2.0, SENTENCES[1], 1.2, SENTENCES[2], 3.0, SENTENCES[3], 1.5]
    )
    path = transcribe_clips.write(tmp_path_factory.mktemp("spoken") / "four.wav", audio)
    return path, truth


def test_timestamp_tokens_identical_to_transformers(tiny_engine, hf_tiny, example_clips, spoken):
    """Each clip decoded two ways (plain prompt; prompt ending at <|startoftranscript|> with the
    no-speech probability recorded on the way) gives transformers' tokens exactly, and the recorded
    P(<|nospeech|>) is the softmax of transformers' logits after <|startoftranscript|>."""
    fe = WhisperFeatureExtractor(feature_size=hf_tiny.config.num_mel_bins)
    prompts = WhisperPrompts(tiny_engine, TranscribeOptions())
    paths = [c.path for c in example_clips] + [spoken[0]]
    feats = [fe(load_audio(p), sampling_rate=16000, return_tensors="pt").input_features for p in paths]
    reqs = []
    for i, f in enumerate(feats):
        for probe in (False, True):
            prompt, params = prompts.window(None, [], 0.0, None, probe)
            reqs.append(Request(f[0], prompt, params, (i, probe)))
    ours = {r.request_id: r for r in tiny_engine.generate(reqs)}
    for i, f in enumerate(feats):
        ref = hf_tiny.generate(f, return_timestamps=True)[0].tolist()
        ref = [t for t in ref if t != prompts.eot]
        assert (
            ref[0] >= prompts.vocab.timestamp_begin
            and sum(t >= prompts.vocab.timestamp_begin for t in ref) >= 2
        )
        assert ours[(i, False)].token_ids == ref
        assert ours[(i, True)].token_ids == ref
        with torch.no_grad():
            logits = hf_tiny(f, decoder_input_ids=torch.tensor([[prompts.sot]])).logits[0, -1]
        p_ref = torch.softmax(logits, -1)[prompts.vocab.no_speech].item()
        p_ours = ours[(i, True)].first_step_probs[prompts.vocab.no_speech]
        assert p_ours == pytest.approx(p_ref, rel=1e-3, abs=1e-5)


def _check_against_truth(segments, truth, text):
    """Segment times from the timestamp tokens alone (no word timestamps). tiny.en's timestamps are
    whole seconds on these clips, so a segment edge lands somewhere in a pause, not at the speech:
    on the 16 s clip the segments are 0-3, 3-7, 7-12, 12-16 s for speech at 0.80-2.41, 4.41-6.27,
    7.47-9.89, 12.89-14.78 s (edges up to 2.1 s from the speech). So what is asserted is: every
    sentence lies inside one segment (+- TOLERANCE); every segment edge lies in a pause or outside
    the speech, cutting into no sentence by more than TOLERANCE (a boundary between two segments lies
    between the end of one sentence - TOLERANCE and the start of the next + TOLERANCE); every
    segment contains a sentence's midpoint (none is pure silence); times increase. Times shifted by
    a window offset, or in frames instead of seconds, fail all of these. Edges within TOLERANCE of
    the speech come with word timestamps (``transcribe_clips.check_word_segment_times``)."""
    for t in truth:
        assert any(s.start - TOLERANCE <= t.start and t.end <= s.end + TOLERANCE for s in segments), (
            t,
            segments,
        )
    for s in segments:
        for t in truth:
            for edge in (s.start, s.end):
                assert not (t.start + TOLERANCE < edge < t.end - TOLERANCE), (edge, t)
        assert any(s.start <= (t.start + t.end) / 2 <= s.end for t in truth), s
    assert all(a.end <= b.start + 1e-6 and a.start < a.end for a, b in zip(segments, segments[1:]))
    assert len(segments) >= len(truth) - 1  # segments are sentences, not the whole window
    ref = [w for t in truth for w in words(t.text)]
    hyp = words(text)
    assert len(set(ref) - set(hyp)) <= 2, (ref, hyp)


@pytest.mark.parametrize("long_form", ["chunked", "sequential"])
def test_segment_times_match_the_speech(tiny_engine, spoken, long_form):
    path, truth = spoken
    out = {}
    opts = TranscribeOptions(long_form=long_form)
    Transcriber(tiny_engine, opts).run(
        [AudioItem("k", "four", str(path))], lambda i, t, e: out.setdefault("r", (t, e))
    )
    t, err = out["r"]
    assert err is None
    _check_against_truth(t.segments, truth, t.text)
    assert all(0 <= s.no_speech_prob < 0.6 and s.avg_logprob < 0 and s.temperature == 0.0 for s in t.segments)
    assert all(s.tokens and max(s.tokens) < WhisperPrompts(tiny_engine, opts).eot for s in t.segments)


def test_no_timestamps_is_one_segment_per_window(tiny_engine, spoken):
    out = {}
    opts = TranscribeOptions(timestamps=False)
    Transcriber(tiny_engine, opts).run(
        [AudioItem("k", "four", str(spoken[0]))], lambda i, t, e: out.setdefault("r", (t, e))
    )
    t, err = out["r"]
    assert err is None and len(t.segments) == 1
    assert t.segments[0].start == 0 and t.segments[0].end == pytest.approx(t.duration, abs=0.011)
    assert len(set(words(" ".join(SENTENCES))) - set(words(t.text))) <= 2, t.text


def test_window_times_are_absolute_in_long_chunked_audio(tiny_engine, spoken, tmp_path):
    """35 s: the 16 s clip, 3 s of silence, the clip again (two windows): the second copy is shifted
    by exactly 19 s."""
    a = load_audio(spoken[0])
    audio = np.concatenate([a, np.zeros(3 * 16000, np.float32), a])
    path = transcribe_clips.write(tmp_path / "twice.wav", audio)
    out = {}
    Transcriber(tiny_engine).run(
        [AudioItem("k", "twice", str(path))], lambda i, t, e: out.setdefault("r", (t, e))
    )
    t, err = out["r"]
    assert err is None
    shift = len(a) / 16000 + 3
    truth = spoken[1] + [transcribe_clips.Spoken(x.text, x.start + shift, x.end + shift) for x in spoken[1]]
    _check_against_truth(t.segments, truth, t.text)
