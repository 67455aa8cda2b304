"""Multilingual Whisper (packaged ``base``): per-file language detection on German, French and
Spanish speech, transcription in that language, ``--task translate`` to English, beam search with
forced language/task tokens, and timestamp tokens identical to transformers with a forced prefix."""

import pytest
import torch
import transformers
from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

from encdec_cli.engine import Engine, Request
from encdec_cli.io.audio import load_audio
from encdec_cli.tasks.whisper_rules import TranscribeOptions, WhisperPrompts
from encdec_models.ctranslate2 import load_ctranslate2_whisper
from encdec_models.loading import load_model
from tests.support import transcribe_clips as tc

transformers.logging.set_verbosity_error()

SPEECH = {  # language -> (espeak-ng voice, sentences, words a transcript must contain)
    "de": (
        "de",
        ["Guten Morgen. Das Wetter ist heute sehr schön.", "Ich trinke gern einen Kaffee mit Milch."],
        ["guten morgen", "heute"],
    ),
    "fr": (
        "fr",
        ["Bonjour à tous. Il fait très beau aujourd'hui.", "Je voudrais un café, s'il vous plaît."],
        ["bonjour", "café"],
    ),
    "es": (
        "es",
        ["Buenos días. Hoy hace muy buen tiempo.", "Me gustaría un café con leche, por favor."],
        ["buenos días", "leche"],
    ),
}


@pytest.fixture(scope="module")
def base_engine(base_dir):
    return Engine(load_model(base_dir, device="cpu"))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    if not tc.have_espeak():
        pytest.skip("espeak-ng not installed")
    root = tmp_path_factory.mktemp("foreign")
    paths = {}
    for lang, (voice, sentences, _) in SPEECH.items():
        audio, _ = tc.build([0.5, sentences[0], 1.0, sentences[1], 0.5], voice=voice, wpm=140)
        paths[lang] = tc.write(root / f"{lang}.wav", audio)
    return paths


def test_language_detected_and_transcribed(base_engine, foreign):
    out = tc.transcribe(base_engine, list(foreign.values()))
    for lang, (_, _, must) in SPEECH.items():
        t = out[lang]
        assert t.language == lang
        for w in must:
            assert w in t.text.lower(), (lang, t.text)
        assert t.segments[0].start < 1.0 and t.segments[-1].end <= t.duration + 0.01


@pytest.mark.parametrize("long_form", ["chunked", "sequential"])
def test_translate_to_english(base_engine, foreign, long_form):
    out = tc.transcribe(base_engine, [foreign["de"], foreign["es"]], task="translate", long_form=long_form)
    for lang in ("de", "es"):
        text = out[lang].text.lower()
        assert out[lang].language == lang
        assert "good morning" in text and "coffee" in text and "milk" in text, text
        assert not any(w in text for w in ("guten", "buenos", "leche", "kaffee")), text


def test_beam_search_with_forced_task_tokens(base_engine, foreign):
    """Beams cannot carry forced tokens, so the no-speech probability comes from a probe request."""
    t = tc.transcribe(base_engine, [foreign["de"]], beam_size=2, language="de")["de"]
    assert "guten morgen" in t.text.lower() and t.language == "de"
    assert all(0 < s.no_speech_prob < 0.6 for s in t.segments)


def test_forced_prefix_tokens_identical_to_transformers(base_engine, base_dir, foreign):
    """The prompt ends at <|startoftranscript|> and <|de|><|transcribe|> are forced (begin_index 2):
    the free tokens equal transformers' generate(language="de", return_timestamps=True)."""
    cfg, state, _ = load_ctranslate2_whisper(base_dir)
    hf = WhisperForConditionalGeneration(cfg).eval()
    hf.load_state_dict({k: v.float() for k, v in state.items()})
    hf.generation_config = base_engine.loaded.generation_config
    hf.generation_config.max_initial_timestamp_index = 50
    fe = WhisperFeatureExtractor(feature_size=cfg.num_mel_bins)
    feats = fe(load_audio(foreign["de"]), sampling_rate=16000, return_tensors="pt").input_features
    prompts = WhisperPrompts(base_engine, TranscribeOptions())
    reqs = [Request(feats[0], *prompts.window("de", [], 0.0, None, probe), probe) for probe in (False, True)]
    ours = {r.request_id: r for r in base_engine.generate(reqs)}
    with torch.no_grad():
        ref = hf.generate(feats, language="de", task="transcribe", return_timestamps=True)[0].tolist()
    ref = [t for t in ref if t != prompts.eot]
    assert ours[False].token_ids == ref
    assert ours[True].token_ids == prompts.task_tokens("de") + ref
    assert reqs[1].params.begin_index == 2 and ours[True].first_step_probs
