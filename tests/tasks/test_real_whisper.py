"""Real weights: the packaged Whisper tiny.en transcribes real speech, token for token like
transformers running the same (converted) weights, and close to the spoken text."""

import re

import torch
import transformers
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from encdec_cli.engine import Engine, Request
from encdec_cli.io.audio import load_audio
from encdec_cli.io.inputs import AudioItem
from encdec_cli.tasks.transcribe import TranscribeOptions, Transcriber, WhisperPrompts
from encdec_models.ctranslate2 import load_ctranslate2_whisper
from encdec_models.loading import load_model

transformers.logging.set_verbosity_error()
MAX_WER = 0.10  # the clips are clean synthetic speech; tiny.en gets them all right today


def wer(ref: str, hyp: str) -> float:
    norm = lambda s: re.sub(r"[^a-z0-9' ]", " ", s.lower()).split()  # noqa: E731
    r, h = norm(ref), norm(hyp)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[0], i
        for j in range(1, len(h) + 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r[i - 1] != h[j - 1]))
    return d[len(h)] / max(len(r), 1)


def test_tokens_identical_to_transformers(tiny_engine, tiny_en_dir, example_clips):
    cfg, state, _ = load_ctranslate2_whisper(tiny_en_dir)
    hf = WhisperForConditionalGeneration(cfg).eval()
    hf.load_state_dict({k: v.float() for k, v in state.items()})
    hf.generation_config = tiny_engine.loaded.generation_config
    fe = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins)
    prompts = WhisperPrompts(tiny_engine, TranscribeOptions(timestamps=False))
    feats = [
        fe(load_audio(c.path), sampling_rate=16000, return_tensors="pt").input_features for c in example_clips
    ]
    ours = {
        r.request_id: r
        for r in tiny_engine.generate(
            Request(f[0], prompts.prompt(None), prompts.params, i) for i, f in enumerate(feats)
        )
    }
    for i, f in enumerate(feats):
        ref = hf.generate(f, return_timestamps=False)[0].tolist()
        ref = [t for t in ref if t < prompts.eot]  # transformers keeps special tokens in some versions
        assert ours[i].token_ids == ref


def test_transcripts_from_audio_files(tiny_engine, example_clips):
    items = [AudioItem(str(c.path), c.path.stem, str(c.path)) for c in example_clips]
    out = {}
    Transcriber(tiny_engine).run(items, lambda item, t, err: out.__setitem__(item.name, (t, err)))
    for c in example_clips:
        t, err = out[c.path.stem]
        assert err is None
        assert wer(c.text, t.text) <= MAX_WER, (c.text, t.text)
        assert t.language == "en" and 1 <= len(t.segments) <= 2 and 0 <= t.segments[0].start <= 1.0
        assert t.segments[-1].end <= t.duration + 0.02 and t.segments[0].avg_logprob < 0


def test_long_audio_is_windowed_and_stitched(tiny_engine, example_clips, tmp_path):
    """Three clips with silences between them, 40 s long: two windows, both transcribed."""
    import numpy as np
    import soundfile as sf

    parts, texts = [], []
    for c in example_clips[:3]:
        parts += [load_audio(c.path), np.zeros(16000 * 8, np.float32)]
        texts.append(c.text)
    audio = np.concatenate(parts)
    assert len(audio) > 30 * 16000
    path = tmp_path / "long.wav"
    sf.write(path, audio, 16000)
    out = {}
    Transcriber(tiny_engine).run(
        [AudioItem("k", "long", str(path))], lambda i, t, e: out.setdefault("r", (t, e))
    )
    t, err = out["r"]
    assert err is None and len(t.segments) >= 3 and t.segments[-1].start > 20
    assert all(a.end <= b.start for a, b in zip(t.segments, t.segments[1:]))
    assert wer(" ".join(texts), t.text) <= 0.15, t.text


def test_multilingual_base_detects_english(base_dir, example_clips):
    engine = Engine(load_model(base_dir, device="cpu"))
    out = {}
    items = [AudioItem("a", "a", str(example_clips[0].path))]
    Transcriber(engine).run(items, lambda i, t, e: out.setdefault("r", (t, e)))
    t, err = out["r"]
    assert err is None and t.language == "en"
    assert wer(example_clips[0].text, t.text) <= MAX_WER, t.text


def test_cpu_bfloat16(tiny_en_dir, example_clips):
    engine = Engine(load_model(tiny_en_dir, device="cpu", dtype="bfloat16"))
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    out = {}
    Transcriber(engine).run(
        [AudioItem("a", "a", str(example_clips[0].path))], lambda i, t, e: out.setdefault("r", t)
    )
    assert wer(example_clips[0].text, out["r"].text) <= MAX_WER
