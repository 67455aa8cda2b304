"""Long-form transcription: sequential (openai-whisper) windows batched across files give each
file's own result and transformers' long-form result; fallback, silence skipping, prompts, beams."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from encdec_cli.tasks.whisper_rules import TranscribeOptions, WhisperPrompts
from encdec_models.audio import file_log_mel
from tests.support import transcribe_clips as tc

transformers.logging.set_verbosity_error()
S = tc.SENTENCES


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three files: 41 s and 34 s of sentences and pauses (two sequential windows each), 12 s."""
    if not tc.have_espeak():
        pytest.skip("espeak-ng not installed")
    root = tmp_path_factory.mktemp("long")
    specs = {
        "a": [
            0.5,
            S[0],
            2.0,
            S[1],
            1.0,
            S[2],
            1.5,
            S[3],
            2.5,
            S[4],
            1.0,
            S[5],
            2.0,
            S[6],
            1.5,
            S[7],
            1.0,
            S[0],
            2.0,
            S[4],
            1.0,
        ],
        "b": [1.0, S[5], 1.5, S[6], 2.5, S[7], 1.0, S[1], 1.5, S[2], 3.0, S[3], 1.0, S[4], 2.0, S[0], 1.0],
        "c": [0.3, S[2], 1.0, S[3], 1.2, S[1], 0.5],
    }
    out = {}
    for name, parts in specs.items():
        audio, truth = tc.build(parts)
        out[name] = (tc.write(root / f"{name}.wav", audio), audio, truth)
    return out


def timeline(t):
    return [(s.start, s.end, s.text) for s in t.segments]


def test_sequential_batched_across_files_equals_one_by_one(tiny_engine, clips):
    paths = [clips[k][0] for k in "abc"]
    sizes = []
    decode = tiny_engine.runner.decode
    tiny_engine.runner.decode = lambda seqs: sizes.append(len(seqs)) or decode(seqs)
    try:
        together = tc.transcribe(tiny_engine, paths, long_form="sequential")
    finally:
        tiny_engine.runner.decode = decode
    assert max(sizes) >= 2  # windows of different files did share steps
    for p in paths:
        alone = tc.transcribe(tiny_engine, [p], long_form="sequential")
        assert timeline(alone[p.stem]) == timeline(together[p.stem])
    t = together["a"]
    assert t.duration == pytest.approx(len(clips["a"][1]) / 16000, abs=0.01)
    assert max(s.seek for s in t.segments) > 0  # a second window, started at a timestamp
    assert all(a.end <= b.start for a, b in zip(t.segments, t.segments[1:]))
    assert t.segments[-1].end <= t.duration + 0.01


def test_sequential_word_timestamps_start_the_next_window_at_the_last_word(tiny_engine, clips):
    """openai-whisper with word timestamps: a window that does not end in a single timestamp is
    followed by one starting at its last word's end, not at its last timestamp pair (a last word
    running past that pair would otherwise overlap the next window's first one)."""
    path, _, truth = clips["a"]
    t = tc.transcribe(tiny_engine, [path], long_form="sequential", word_timestamps=True)["a"]
    windows: dict[int, list] = {}
    for s in t.segments:
        windows.setdefault(s.seek, []).append(s)
    seeks = sorted(windows)
    assert (
        len(seeks) == 2
    )  # tiny.en's first window ends in a timestamp pair at 26.00 s, its last word at 25.44
    assert seeks[1] == round(windows[seeks[0]][-1].words[-1].end * 100)
    tc.check_word_segment_times(t.segments, truth)  # no overlaps, edges at the speech
    assert tc.word_error_rate(" ".join(x.text for x in truth), t.text) <= 0.2


@pytest.mark.parametrize("condition", [False, True])
def test_sequential_matches_transformers_long_form(tiny_engine, hf_tiny, clips, condition):
    """transformers' long-form generate on the same log-mel (ours: ``file_log_mel``, the whole file,
    windows zero-padded in mel space as openai-whisper and transformers do), greedy, same
    no-speech / logprob thresholds: the same segments, times and text. One explained difference:
    segments timed after the end of the audio (tiny.en's loops in the zero padding of the last
    window) are dropped from our output; transformers keeps them. Both use them as the next prompt."""
    path, audio, _ = clips["a"]
    ours = tc.transcribe(
        tiny_engine, [path], long_form="sequential", temperatures=(0.0,), condition_on_previous_text=condition
    )
    mel = file_log_mel(audio)
    with torch.no_grad():
        res = hf_tiny.generate(
            mel[None],
            return_timestamps=True,
            return_segments=True,
            condition_on_prev_tokens=condition,
            temperature=0.0,
            logprob_threshold=-1.0,
            no_speech_threshold=0.6,
        )
    eot = WhisperPrompts(tiny_engine, TranscribeOptions()).eot
    duration = mel.shape[1] / 100
    ref = []
    for s in res["segments"][0]:
        text = tiny_engine.tokenizer.decode([t for t in s["tokens"].tolist() if t < eot])
        start, end = round(float(s["start"]), 3), round(min(float(s["end"]), duration), 3)
        if text.strip() and start < duration:
            ref.append((start, end, text))
    assert timeline(ours[path.stem]) == ref


def test_temperature_fallback_is_seeded_and_recorded(tiny_engine, clips):
    """A logprob threshold no decoding meets: every window falls back to the last temperature,
    sampling best_of candidates with seeds derived from the file and window (repeatable)."""
    path = clips["c"][0]
    opts = dict(logprob_threshold=0.0, no_speech_threshold=None, temperatures=(0.0, 0.3), best_of=2)
    first = tc.transcribe(tiny_engine, [path], **opts)["c"]
    again = tc.transcribe(tiny_engine, [path], **opts)["c"]
    assert first.segments and all(s.temperature == 0.3 for s in first.segments)
    assert timeline(first) == timeline(again)
    other = tc.transcribe(tiny_engine, [path], seed=1, **opts)["c"]
    assert all(s.temperature == 0.3 for s in other.segments)


@pytest.mark.parametrize("long_form", ["chunked", "sequential"])
def test_silence_is_skipped(tiny_engine, clips, tmp_path, long_form):
    """Speech, 40 s of digital silence, speech: nothing is transcribed in the silence (the silent
    windows are not even decoded), and the second sentence lands at its place."""
    _, audio, truth = clips["c"]
    gap = 40.0
    path = tc.write(
        tmp_path / "gap.wav", np.concatenate([audio, np.zeros(int(gap * 16000), np.float32), audio])
    )
    t = tc.transcribe(tiny_engine, [path], long_form=long_form)["gap"]
    clip = len(audio) / 16000
    assert not [s for s in t.segments if clip + 1.0 < s.start < clip + gap - 1.0], timeline(t)
    assert any(s.start >= clip + gap - 1.0 for s in t.segments), timeline(t)
    assert all(s.no_speech_prob < 0.6 for s in t.segments)
    assert t.text.lower().count("report") == 2, t.text


def test_prompt_layout_with_previous_text(tiny_engine):
    pr = WhisperPrompts(tiny_engine, TranscribeOptions(initial_prompt="Meeting notes."))
    v = pr.vocab
    prompt_toks = tiny_engine.tokenizer.encode(" Meeting notes.", add_special_tokens=False)
    assert pr.initial_prompt == prompt_toks
    ids, params = pr.window("en", pr.initial_prompt, 0.0, None, probe=True)
    assert ids == [v.sot_prev, *prompt_toks, v.sot] and params.record_first_step_probs == (v.no_speech,)
    long_prev = list(range(1000, 1400))
    ids, params = pr.window("en", long_prev, 0.0, None, probe=False)
    assert ids == [v.sot_prev, *long_prev[-223:], v.sot] and params.timestamp_rules is not None
    ids, _ = WhisperPrompts(tiny_engine, TranscribeOptions(timestamps=False)).window(
        "en", [], 0.0, None, False
    )
    assert ids == [v.sot, v.no_timestamps]


@pytest.mark.parametrize("long_form", ["chunked", "sequential"])
def test_beam_search_and_initial_prompt(tiny_engine, clips, long_form):
    path, _, truth = clips["c"]
    opts = dict(long_form=long_form, beam_size=3, initial_prompt="Meeting notes.")
    t = tc.transcribe(tiny_engine, [path], **opts)["c"]
    words = lambda s: "".join(ch for ch in s.lower() if ch.isalnum() or ch == " ").split()  # noqa: E731
    assert words(t.text) == words(" ".join(x.text for x in truth))
    assert 0.0 < t.segments[0].no_speech_prob < 0.6 and all(-1 < s.avg_logprob < 0 for s in t.segments)


def test_cli_sequential_options(clips, tmp_path):
    path = clips["c"][0]
    cmd = [
        sys.executable,
        "-m",
        "encdec_cli",
        "transcribe",
        str(path),
        "-o",
        str(tmp_path),
        "-q",
        "-f",
        "json",
    ]
    r = subprocess.run(
        cmd
        + [
            "--long-form",
            "sequential",
            "--temperature",
            "0",
            "--no-condition-on-previous-text",
            "--beam-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    assert len(data["segments"]) >= 2 and "report" in data["text"].lower()
    assert {"no_speech_prob", "compression_ratio", "avg_logprob", "temperature", "seek"} <= set(
        data["segments"][0]
    )
    r = subprocess.run(cmd + ["--temperature", "zero"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--temperature" in r.stderr
    r = subprocess.run(cmd + ["--long-form", "weekly"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "--long-form" in r.stderr
